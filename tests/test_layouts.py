"""Every Wasm OCI layout, pushed with its real media types to a real registry and read back byte-exact."""

from __future__ import annotations

import hashlib
import json

import grpc
import pytest

from csi_wasm import layouts
from csi_wasm.demo.push import Pusher, tar_gzip
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module, sha256_digest

from conftest import RunningDriver


def _publish_and_read(csi: RunningDriver, image: str, **attributes: str) -> bytes:
    volume = csi.volume(image, **attributes)
    target = csi.kubelet.mount(volume)
    data = (target / attributes.get("fileName", "plugin.wasm")).read_bytes()
    csi.kubelet.unmount(volume)
    return data


def _failed(csi: RunningDriver, image: str, **attributes: str) -> grpc.RpcError:
    volume = csi.volume(image, **attributes)
    with pytest.raises(grpc.RpcError) as failure:
        csi.kubelet.mount(volume)
    assert csi.mounts_under_kubelet() == []
    assert not csi.kubelet.target_path(volume).exists()
    assert csi.driver.records.all() == []
    return failure.value


@pytest.mark.parametrize(
    "layer_type",
    ["application/wasm", "application/vnd.module.wasm.content.layer.v1+wasm",
     "application/vnd.wasm.content.layer.v1+wasm"],
)  # fmt: skip
def test_raw_layouts_are_read_back_byte_exact(csi: RunningDriver, pusher: Pusher, layer_type: str) -> None:
    module = make_module(10_000, layer_type)
    pushed = pusher.wasm_artifact("layouts/raw", layer_type.replace("/", "-").replace("+", "-")[:60], module, layer_type)
    assert _publish_and_read(csi, pushed.reference) == module
    assert csi.driver.store.has(sha256_digest(module))


@pytest.mark.parametrize("docker", [False, True])
@pytest.mark.parametrize("path", ["plugin.wasm", "usr/share/filters/plugin.wasm"])
def test_compat_images_yield_plugin_wasm(csi: RunningDriver, pusher: Pusher, docker: bool, path: str) -> None:
    module = make_module(20_000, f"compat-{docker}-{path}")
    pushed = pusher.compat_image("layouts/compat", f"d{int(docker)}-{len(path)}", module, docker=docker, path=path)
    assert _publish_and_read(csi, pushed.reference) == module
    # the module is stored by the digest of its bytes, not of the tar layer
    assert csi.driver.store.has(sha256_digest(module)) and not csi.driver.store.has(pushed.layer_digest)


def test_index_picks_the_wasm_platform(csi: RunningDriver, pusher: Pusher) -> None:
    wasm = pusher.wasm_artifact("layouts/index", "wasm-only", make_module(3000, "index-wasm"))
    other = pusher.compat_image("layouts/index", "linux-only", make_module(3000, "index-linux"))
    pusher.index("layouts/index", "multi", [(other, {"os": "linux", "architecture": "amd64"}),
                                            (wasm, {"os": "wasip1", "architecture": "wasm"})])  # fmt: skip
    assert _publish_and_read(csi, f"{pusher.host}/layouts/index:multi") == make_module(3000, "index-wasm")


def test_index_with_a_single_manifest_uses_it(csi: RunningDriver, pusher: Pusher) -> None:
    only = pusher.wasm_artifact("layouts/index1", "only", make_module(3000, "index-only"))
    pusher.index("layouts/index1", "single", [(only, {"os": "linux", "architecture": "amd64"})])
    assert _publish_and_read(csi, f"{pusher.host}/layouts/index1:single") == make_module(3000, "index-only")


def test_ambiguous_index_is_refused(csi: RunningDriver, pusher: Pusher) -> None:
    a = pusher.compat_image("layouts/ambiguous", "a", make_module(3000, "amb-a"))
    b = pusher.compat_image("layouts/ambiguous", "b", make_module(3000, "amb-b"))
    pusher.index("layouts/ambiguous", "multi", [(a, {"os": "linux", "architecture": "amd64"}),
                                                (b, {"os": "linux", "architecture": "arm64"})])  # fmt: skip
    error = _failed(csi, f"{pusher.host}/layouts/ambiguous:multi")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "exactly one wasm platform" in (error.details() or "")


def test_components_are_accepted(csi: RunningDriver, pusher: Pusher) -> None:
    component = make_module(5000, "component", component=True)
    pushed = pusher.wasm_artifact("layouts/component", "v1", component)
    assert _publish_and_read(csi, pushed.reference) == component


def test_a_non_wasm_layer_is_refused_and_nothing_is_stored(csi: RunningDriver, pusher: Pusher) -> None:
    pushed = pusher.wasm_artifact("layouts/notwasm", "v1", b"#!/bin/sh\necho not wasm\n" + b"x" * 100)
    error = _failed(csi, pushed.reference)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not a WebAssembly module" in (error.details() or "") and pushed.reference in (error.details() or "")
    assert csi.driver.store.modules() == []


def test_a_tampered_blob_is_refused_and_nothing_is_stored(
    csi: RunningDriver, pusher: Pusher, registry: LocalRegistry
) -> None:
    genuine, tampered = make_module(4000, "genuine"), make_module(4000, "tampered")
    pushed = pusher.wasm_artifact("layouts/tampered", "v1", genuine)
    # rewrite the blob's bytes on the registry's disk, as a compromised registry would serve them
    blob = registry.workdir / "data/docker/registry/v2/blobs/sha256" / pushed.layer_digest[7:9] / pushed.layer_digest[7:] / "data"
    blob.write_bytes(tampered)
    error = _failed(csi, pushed.reference)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not match" in (error.details() or "")
    assert csi.driver.store.modules() == []


def test_a_manifest_without_a_wasm_layer_names_what_it_found(csi: RunningDriver, pusher: Pusher) -> None:
    layer = pusher.blob("layouts/foreign", b"some text") | {"mediaType": "text/plain"}
    config = pusher.blob("layouts/foreign", b"{}") | {"mediaType": "application/vnd.oci.empty.v1+json"}
    pusher.manifest("layouts/foreign", "v1", {"schemaVersion": 2, "mediaType": layouts.OCI_MANIFEST,
                                              "config": config, "layers": [layer]}, layouts.OCI_MANIFEST)  # fmt: skip
    error = _failed(csi, f"{pusher.host}/layouts/foreign:v1")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "text/plain" in (error.details() or "")


def test_two_wasm_layers_are_ambiguous(csi: RunningDriver, pusher: Pusher) -> None:
    layers = [pusher.blob("layouts/two", make_module(100, s)) | {"mediaType": "application/wasm"} for s in "ab"]
    config = pusher.blob("layouts/two", b"{}") | {"mediaType": layouts.WASM_CONFIG_V0}
    pusher.manifest("layouts/two", "v1", {"schemaVersion": 2, "mediaType": layouts.OCI_MANIFEST,
                                          "config": config, "layers": layers}, layouts.OCI_MANIFEST)  # fmt: skip
    error = _failed(csi, f"{pusher.host}/layouts/two:v1")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "2 Wasm layers" in (error.details() or "")


def test_compat_layer_without_plugin_wasm_is_refused(csi: RunningDriver, pusher: Pusher) -> None:
    layer = pusher.blob("layouts/nowasm", tar_gzip({"etc/motd": b"hello"})) | {
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}
    config = pusher.blob("layouts/nowasm", b"{}") | {"mediaType": "application/vnd.oci.image.config.v1+json"}
    pusher.manifest("layouts/nowasm", "v1", {"schemaVersion": 2, "mediaType": layouts.OCI_MANIFEST,
                                             "config": config, "layers": [layer]}, layouts.OCI_MANIFEST)  # fmt: skip
    error = _failed(csi, f"{pusher.host}/layouts/nowasm:v1")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "holds no plugin.wasm" in (error.details() or "")


def test_module_digest_attribute_is_checked(csi: RunningDriver, pusher: Pusher) -> None:
    module = make_module(2000, "moduledigest")
    pushed = pusher.wasm_artifact("layouts/moddigest", "v1", module)
    assert _publish_and_read(csi, pushed.reference, moduleDigest=sha256_digest(module)) == module
    wrong = "sha256:" + hashlib.sha256(b"other").hexdigest()
    error = _failed(csi, pushed.reference, moduleDigest=wrong)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and wrong in (error.details() or "")


def test_file_names_share_one_copy(csi: RunningDriver, pusher: Pusher) -> None:
    module = make_module(2000, "filenames")
    pushed = pusher.wasm_artifact("layouts/names", "v1", module)
    first, second = csi.volume(pushed.reference), csi.volume(pushed.reference, fileName="filter.wasm")
    a = (csi.kubelet.mount(first) / "plugin.wasm").stat()
    target = csi.kubelet.mount(second)
    assert sorted(p.name for p in target.iterdir()) == ["filter.wasm"]
    b = (target / "filter.wasm").stat()
    assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    csi.kubelet.unmount(first)
    csi.kubelet.unmount(second)


@pytest.mark.parametrize("name", ["../escape.wasm", "a/b.wasm", "..", ".", "bad\x00name"])
def test_bad_file_names_are_invalid(csi: RunningDriver, pusher: Pusher, name: str) -> None:
    pushed = pusher.wasm_artifact("layouts/badnames", "v1", make_module(100, "badnames"))
    error = _failed(csi, pushed.reference, fileName=name)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_config_blob_is_never_downloaded(csi: RunningDriver, pusher: Pusher, registry: LocalRegistry) -> None:
    module = make_module(3000, "onlylayer")
    pushed = pusher.wasm_artifact("layouts/onlylayer", "v1", module)
    manifest = json.loads(pusher.session.get(f"{pusher.base}/layouts/onlylayer/manifests/v1",
                                             headers={"Accept": layouts.OCI_MANIFEST}).content)  # fmt: skip
    assert _publish_and_read(csi, pushed.reference) == module
    registry.sync()
    assert registry.blob_gets("layouts/onlylayer", pushed.layer_digest) == 1
    assert registry.blob_gets("layouts/onlylayer", manifest["config"]["digest"]) == 0
