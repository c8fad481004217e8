"""Size limits that other checks used to hide (found by the mutation pass).

* A layer whose descriptor declares more than the node accepts (``pull.max_module_bytes``, four times
  that for a compat layer) is refused before any byte of it is downloaded: the registry sees no blob
  request. Without that check the store's own cap still refuses the module, but only after the
  download ran (and a compat layer's remaining bytes are hashed to the declared end).
* Volume attributes: each at most 4 KiB, at most 64 in all. Attributes under kubelet's
  ``csi.storage.k8s.io/`` prefix are accepted and ignored, so only these limits bound them.
"""

from __future__ import annotations

import pathlib
import random
from dataclasses import replace
from typing import Iterator

import grpc
import pytest

import faultproxy as fp
from conftest import RunningDriver, fast_pull_config, start_driver, stop_driver
from csi_wasm.config import NodeConfig
from csi_wasm.demo.push import Pushed, Pusher
from csi_wasm.demo.wasm_modules import make_module

CAP = 4096
# a Wasm header, then bytes gzip cannot shrink: 16 x the cap raw, and its compat layer still over 4 x
MODULE = b"\0asm\x01\0\0\0" + random.Random(14).randbytes(64 * 1024)


@pytest.fixture
def capped(tmp_path: pathlib.Path, proxy: fp.FaultProxy) -> Iterator[RunningDriver]:
    node = NodeConfig(pull=replace(fast_pull_config(), max_module_bytes=CAP)).with_insecure([proxy.host])
    running = start_driver(tmp_path, node)
    yield running
    stop_driver(running)


def _through(pushed: Pushed, proxy: fp.FaultProxy) -> str:
    return pushed.reference.replace(pushed.reference.split("/", 1)[0], proxy.host, 1)


@pytest.mark.parametrize("layout", ["raw", "compat"])
def test_a_layer_declared_over_the_cap_is_refused_before_it_is_downloaded(
    capped: RunningDriver, proxy: fp.FaultProxy, pusher: Pusher, layout: str
) -> None:
    repo = f"guard/size-{layout}"
    pushed = (pusher.wasm_artifact(repo, "v1", MODULE) if layout == "raw" else pusher.compat_image(repo, "v1", MODULE))
    with pytest.raises(grpc.RpcError) as failure:
        capped.kubelet.mount(capped.volume(_through(pushed, proxy)), timeout=30)
    detail = failure.value.details() or ""
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "module layer is" in detail, detail
    assert proxy.count(rf"GET /v2/{repo}/manifests/") == 1  # the manifest was read: the refusal is the layer's
    assert proxy.count(rf"/v2/{repo}/blobs/") == 0
    assert capped.driver.store.modules() == [] and capped.mounts_under_kubelet() == []


@pytest.fixture(scope="module")
def image(pusher: Pusher) -> str:
    return pusher.wasm_artifact("guard/attributes", "v1", make_module(4000, "guard-attributes")).reference


def test_an_attribute_over_4_kib_is_invalid_even_one_the_driver_ignores(csi: RunningDriver, image: str) -> None:
    volume = csi.volume(image, **{"csi.storage.k8s.io/extra": "x" * 5000})
    with pytest.raises(grpc.RpcError) as failure:
        csi.kubelet.mount(volume)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "longer than 4096 bytes" in (failure.value.details() or "")
    assert csi.mounts_under_kubelet() == [] and csi.driver.records.all() == []


def test_more_than_64_attributes_are_invalid_even_ones_the_driver_ignores(csi: RunningDriver, image: str) -> None:
    volume = csi.volume(image, **{f"csi.storage.k8s.io/extra-{n}": "x" for n in range(64)})
    with pytest.raises(grpc.RpcError) as failure:
        csi.kubelet.mount(volume)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "too many volume attributes" in (failure.value.details() or "")
    assert csi.mounts_under_kubelet() == [] and csi.driver.records.all() == []
