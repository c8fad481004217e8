"""The shared store's access rule for a module without an access record (found by the mutation pass).

A store written before access records existed, or one whose record was lost, holds modules nobody has
a record for. Such a module counts as private elsewhere (``csi_wasm.access``, rule 3): a pod gets it
only if its own registry serves it the bytes. Here a private module is pulled with credentials, its
record is removed while the driver is down, and after the restart a pod without credentials names it
(by tag, which the store remembers, and by digest): refused. The owner, whose registry serves the
bytes again, still gets it, and the record is written anew.
"""

from __future__ import annotations

import pathlib

import grpc
import pytest

from conftest import PRIVATE_AUTH, fast_pull_config, start_driver, stop_driver
from csi_wasm.config import NodeConfig, RegistryHostConfig
from csi_wasm.demo.push import Pushed, Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module

MODULE = make_module(5000, "guard-access")
CREDENTIALS = {"username": PRIVATE_AUTH.username, "password": PRIVATE_AUTH.password}


@pytest.fixture(scope="module")
def private(private_pusher: Pusher) -> Pushed:
    return private_pusher.wasm_artifact("guard/private", "v1", MODULE)


def test_a_module_without_an_access_record_is_not_shared(
    tmp_path: pathlib.Path, private_registry: LocalRegistry, tls_files: tuple[pathlib.Path, pathlib.Path],
    private: Pushed,
) -> None:  # fmt: skip
    registries = {private_registry.host: RegistryHostConfig(ca_bundle=str(tls_files[0]))}
    node = NodeConfig(registries=registries, pull=fast_pull_config())
    first = start_driver(tmp_path, node)
    try:
        owner = first.inline({"image": private.reference}, CREDENTIALS)
        first.kubelet.mount(owner)
        first.kubelet.unmount(owner)
    finally:
        stop_driver(first)
    records = list((tmp_path / "state" / "store" / "access").glob("*.json"))
    assert len(records) == 1
    records[0].unlink()  # an older store, or a lost record: the module stays, nobody is on record for it

    restarted = start_driver(tmp_path, node)
    try:
        assert restarted.driver.store.has(private.module_digest)
        for image in (private.reference, private.pinned):
            intruder = restarted.volume(image)
            with pytest.raises(grpc.RpcError) as refused:
                restarted.kubelet.mount(intruder)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, (image, refused.value.details())
            assert not restarted.kubelet.target_path(intruder).exists()
        assert restarted.mounts_under_kubelet() == []
        owner = restarted.inline({"image": private.reference}, CREDENTIALS)
        assert (restarted.kubelet.mount(owner) / "plugin.wasm").read_bytes() == MODULE
        assert len(list((tmp_path / "state" / "store" / "access").glob("*.json"))) == 1
        restarted.kubelet.unmount(owner)
    finally:
        stop_driver(restarted)
