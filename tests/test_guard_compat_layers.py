"""Compat (tar+gzip) layers: the guards that no other test reaches alone (found by the mutation pass).

Each layer here passes every other check, so only the guard named can refuse it:

* the inflate cap (``pull.INFLATE_FACTOR`` x ``max_module_bytes``): the bytes inflate in entries *before*
  ``plugin.wasm``, each of them skipped, never stored, so no size check of the module sees them;
* ``plugin.wasm`` must be a regular file: a sparse or unknown-type entry whose data is a valid module
  (what tar would extract from it is not those bytes);
* a negative size in a tar header: with it accepted, the reader's data loop never ends (``left`` only
  moves towards zero by the bytes it reads, and reads of a negative count return nothing), so a
  ``plugin.wasm`` entry with a negative size would spin a download worker for ever.
"""

from __future__ import annotations

import hashlib
import io
import pathlib
import tarfile
from dataclasses import replace
from typing import Iterator

import grpc
import pytest

from csi_wasm.config import NodeConfig
from csi_wasm.demo.kubelet import InlineVolume, new_pod_uid
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.errors import UnsupportedLayout
from csi_wasm.tarstream import TarStream

from conftest import RunningDriver, fast_pull_config, start_driver, stop_driver

MODULE = make_module(16 * 1024, "guard-compat")
MAX_MODULE_BYTES = 1024 * 1024  # the inflate cap is 4 MiB


@pytest.fixture
def small_cap_csi(tmp_path: pathlib.Path, registry: LocalRegistry) -> Iterator[RunningDriver]:
    node = NodeConfig(pull=replace(fast_pull_config(), max_module_bytes=MAX_MODULE_BYTES))
    running = start_driver(tmp_path, node.with_insecure([registry.host]))
    yield running
    stop_driver(running)


def _tar(entries: list[tuple[str, bytes]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def _with_header_field(tar: bytes, start: int, value: bytes) -> bytes:
    """The first header block with ``value`` at ``start``, and its checksum made right again."""
    header = bytearray(tar[:512])
    header[start : start + len(value)] = value
    header[148:156] = b" " * 8
    header[148:155] = f"{sum(header):06o}\0".encode()
    return bytes(header) + tar[512:]


def _push_compat(pusher: Pusher, tar: bytes) -> str:
    import gzip

    layer = gzip.compress(tar, mtime=0)
    repo = "guard/compat"
    blob = pusher.blob(repo, layer) | {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}
    config = pusher.blob(repo, b"{}") | {"mediaType": "application/vnd.oci.image.config.v1+json"}
    tag = "t" + hashlib.sha256(layer).hexdigest()[:12]
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": config,
                "layers": [blob]}  # fmt: skip
    pusher.manifest(repo, tag, manifest, "application/vnd.oci.image.manifest.v1+json")
    return f"{pusher.host}/{repo}:{tag}"


def _refusal(csi: RunningDriver, image: str) -> tuple[grpc.StatusCode, str]:
    volume = InlineVolume(new_pod_uid(), "p", "default", "wasm", {"image": image})
    with pytest.raises(grpc.RpcError) as failure:
        csi.kubelet.mount(volume, timeout=60)
    assert csi.mounts_under_kubelet() == [] and csi.driver.records.all() == []
    assert csi.driver.store.modules() == [] and not any(csi.driver.store.tmp_dir.iterdir())
    return failure.value.code(), failure.value.details() or ""


def test_a_layer_that_inflates_past_the_cap_before_its_module_is_refused(
    small_cap_csi: RunningDriver, pusher: Pusher
) -> None:
    padding = [(f"padding-{n}", b"\0" * MAX_MODULE_BYTES) for n in range(6)]  # 6 MiB, each entry under the cap
    image = _push_compat(pusher, _tar([*padding, ("plugin.wasm", MODULE)]))
    code, detail = _refusal(small_cap_csi, image)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and f"inflates past {4 * MAX_MODULE_BYTES}" in detail, detail


@pytest.mark.parametrize("entry_type, kind", [(b"S", "sparse"), (b"V", "other")], ids=["GNU sparse", "unknown type"])
def test_a_plugin_wasm_that_is_not_a_regular_file_is_refused_even_holding_a_module(
    small_cap_csi: RunningDriver, pusher: Pusher, entry_type: bytes, kind: str
) -> None:
    image = _push_compat(pusher, _with_header_field(_tar([("plugin.wasm", MODULE)]), 156, entry_type))
    code, detail = _refusal(small_cap_csi, image)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and f"not a regular file ({kind})" in detail, detail


def test_a_negative_size_in_a_tar_header_is_refused() -> None:
    negative = b"\xff" + (256**11 - 1000).to_bytes(11, "big")  # GNU base-256: -1000
    tar = _with_header_field(_tar([("notes.txt", b"")]), 124, negative)
    with pytest.raises(UnsupportedLayout, match="negative size"):
        list(TarStream(io.BytesIO(tar).read, "registry.example/t:v1"))
