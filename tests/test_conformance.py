"""The CSI rules, checked the way csi-sanity checks a node-only plugin, plus the ephemeral publish
cases csi-sanity does not exercise (idempotent repeat, target creation/removal, unknown unpublish,
two volumes, read-only). Everything goes over the real unix socket to the real server."""

from __future__ import annotations

import errno
import os
import re

import grpc
import pytest

from csi_wasm._gen import csi_pb2
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.mounts import LinuxMounter

from conftest import DRIVER_NAME, RunningDriver, code_of

NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,61}[A-Za-z0-9]$")
MOUNT_CAPABILITY = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(),
    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
)


@pytest.fixture(scope="module")
def image(pusher: Pusher) -> str:
    return pusher.wasm_artifact("conformance/filter", "v1", make_module(4096, "conformance")).reference


# -- Identity -------------------------------------------------------------


def test_plugin_info_has_a_valid_name_and_the_package_version(csi: RunningDriver) -> None:
    info = csi.kubelet.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == DRIVER_NAME and NAME_RULE.match(info.name)
    from csi_wasm import __version__

    assert info.vendor_version == __version__


def test_plugin_capabilities_are_none_as_a_node_only_plugin(csi: RunningDriver) -> None:
    """No CONTROLLER_SERVICE (there is no controller to call) and no VOLUME_ACCESSIBILITY_CONSTRAINTS (an
    inline volume has no topology): a node-only plugin advertises nothing. The list itself is asserted, so
    an empty answer cannot pass a loop over its items vacuously."""
    caps = csi.kubelet.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest()).capabilities
    assert list(caps) == []


def test_probe_reports_ready(csi: RunningDriver) -> None:
    response = csi.kubelet.identity.Probe(csi_pb2.ProbeRequest())
    assert response.HasField("ready") and response.ready.value is True


# -- Node info ------------------------------------------------------------


def test_node_capabilities_advertise_nothing_we_do_not_serve(csi: RunningDriver) -> None:
    caps = csi.kubelet.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest()).capabilities
    assert [c.rpc.type for c in caps] == []


def test_node_info_carries_the_node_id(csi: RunningDriver) -> None:
    info = csi.kubelet.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == "test-node" and info.max_volumes_per_node >= 0


@pytest.mark.parametrize(
    "rpc, request_type",
    [
        ("NodeStageVolume", csi_pb2.NodeStageVolumeRequest),
        ("NodeUnstageVolume", csi_pb2.NodeUnstageVolumeRequest),
        ("NodeGetVolumeStats", csi_pb2.NodeGetVolumeStatsRequest),
        ("NodeExpandVolume", csi_pb2.NodeExpandVolumeRequest),
    ],
)
def test_other_node_rpcs_are_unimplemented(csi: RunningDriver, rpc: str, request_type: type) -> None:
    assert code_of(lambda: getattr(csi.kubelet.node, rpc)(request_type())) == grpc.StatusCode.UNIMPLEMENTED


# -- Publish argument checks, in csi-sanity's order -------------------------


def _publish(csi: RunningDriver, **fields: object) -> None:
    csi.kubelet.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(**fields))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, "volume_id"),
        ({"target_path": "/x", "volume_capability": MOUNT_CAPABILITY}, "volume_id"),
        ({"volume_id": "v"}, "target_path"),
        ({"volume_id": "v", "volume_capability": MOUNT_CAPABILITY}, "target_path"),
        ({"volume_id": "v", "target_path": "/x"}, "volume_capability"),
        (
            {"volume_id": "v", "target_path": "/x", "volume_capability": csi_pb2.VolumeCapability(
                block=csi_pb2.VolumeCapability.BlockVolume())},
            "block",
        ),
        ({"volume_id": "v", "target_path": "/x", "volume_capability": MOUNT_CAPABILITY}, "image"),
        (
            {"volume_id": "v", "target_path": "/x", "volume_capability": MOUNT_CAPABILITY,
             "volume_context": {"image": "Not a Reference!"}},
            "not a valid OCI reference|invalid",
        ),
        (
            {"volume_id": "v", "target_path": "/etc/mount", "volume_capability": MOUNT_CAPABILITY,
             "volume_context": {"image": "registry.example/a/b:v1"}},
            "outside kubelet's pods directory",
        ),
    ],
)  # fmt: skip
def test_publish_rejects_bad_requests_in_order(csi: RunningDriver, fields: dict[str, object], message: str) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        _publish(csi, **fields)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, failure.value.details() or ""), failure.value.details()
    assert csi.mounts_under_kubelet() == []


def test_publish_refuses_a_target_of_another_pod(csi: RunningDriver, image: str) -> None:
    volume = csi.volume(image)
    request = csi.kubelet.publish_request(volume)
    request.volume_context["csi.storage.k8s.io/pod.uid"] = "someone-else"
    csi.kubelet.target_path(volume).parent.mkdir(parents=True)
    with pytest.raises(grpc.RpcError) as failure:
        csi.kubelet.node.NodePublishVolume(request)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "belongs to pod" in (failure.value.details() or "")


def test_publish_refuses_a_target_that_escapes_through_a_symlink(csi: RunningDriver, image: str, tmp_path: object) -> None:
    volume = csi.volume(image)
    target = csi.kubelet.target_path(volume)
    target.parent.parent.mkdir(parents=True)
    os.symlink("/tmp", target.parent)  # .../kubernetes.io~csi/wasm -> /tmp
    request = csi.kubelet.publish_request(volume)
    with pytest.raises(grpc.RpcError) as failure:
        csi.kubelet.node.NodePublishVolume(request)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not os.path.exists("/tmp/mount")


# -- Unpublish argument checks --------------------------------------------


def test_unpublish_empty_request_is_invalid(csi: RunningDriver) -> None:
    call = lambda: csi.kubelet.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest())  # noqa: E731
    assert code_of(call) == grpc.StatusCode.INVALID_ARGUMENT


def test_unpublish_unknown_volume_without_target_is_invalid_not_not_found(csi: RunningDriver) -> None:
    call = lambda: csi.kubelet.node.NodeUnpublishVolume(  # noqa: E731
        csi_pb2.NodeUnpublishVolumeRequest(volume_id="csi-unknown")
    )
    assert code_of(call) == grpc.StatusCode.INVALID_ARGUMENT


def test_unpublish_of_an_unknown_volume_is_ok(csi: RunningDriver, image: str) -> None:
    volume = csi.volume(image)
    csi.kubelet.unmount(volume)  # never published, nothing on disk: kubelet must not be stuck retrying
    # never published, but its empty target is there (a crash between mkdir and mount): removed too
    target = csi.kubelet.target_path(volume)
    target.mkdir(parents=True)
    csi.kubelet.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=str(target)), timeout=10
    )
    assert not target.exists() and target.parent.is_dir()


# -- A real publish --------------------------------------------------------


def test_publish_creates_a_read_only_target_and_unpublish_removes_it(csi: RunningDriver, image: str) -> None:
    volume = csi.volume(image)
    target = csi.kubelet.mount(volume)
    module = target / "plugin.wasm"
    assert module.read_bytes() == make_module(4096, "conformance")
    entry = LinuxMounter().mount_at(target)
    assert entry is not None and {"ro", "nosuid", "nodev", "noexec"} <= entry.options
    with pytest.raises(OSError) as denied:
        module.write_bytes(b"tampered")
    assert denied.value.errno == errno.EROFS
    with pytest.raises(OSError):
        (target / "new-file").write_bytes(b"x")
    csi.kubelet.unmount(volume)
    assert not target.exists() and csi.mounts_under_kubelet() == []
    assert csi.driver.records.all() == []


def test_publish_is_read_only_even_when_the_pod_asks_for_read_write(csi: RunningDriver, image: str) -> None:
    volume = csi.volume(image)
    request = csi.kubelet.publish_request(volume)
    request.readonly = False
    csi.kubelet.target_path(volume).parent.mkdir(parents=True)
    csi.kubelet.node.NodePublishVolume(request)
    entry = LinuxMounter().mount_at(csi.kubelet.target_path(volume))
    assert entry is not None and "ro" in entry.options
    csi.kubelet.unmount(volume)


def test_identical_repeat_publish_is_ok_and_mounts_once(csi: RunningDriver, image: str) -> None:
    volume = csi.volume(image)
    target = csi.kubelet.mount(volume)
    csi.kubelet.mount(volume)
    assert csi.mounts_under_kubelet() == [str(target)]
    assert len(csi.driver.records.all()) == 1
    csi.kubelet.unmount(volume)


def test_same_target_with_a_different_module_is_already_exists(
    csi: RunningDriver, image: str, pusher: Pusher
) -> None:
    other = pusher.wasm_artifact("conformance/other", "v1", make_module(4096, "other")).reference
    volume = csi.volume(image)
    csi.kubelet.mount(volume)
    changed = csi.kubelet.publish_request(volume)
    changed.volume_context["image"] = other
    assert code_of(lambda: csi.kubelet.node.NodePublishVolume(changed)) == grpc.StatusCode.ALREADY_EXISTS
    assert (csi.kubelet.target_path(volume) / "plugin.wasm").read_bytes() == make_module(4096, "conformance")
    csi.kubelet.unmount(volume)


def test_two_volumes_of_one_module_share_one_inode(csi: RunningDriver, image: str) -> None:
    first, second = csi.volume(image), csi.volume(image)
    a = (csi.kubelet.mount(first) / "plugin.wasm").stat()
    b = (csi.kubelet.mount(second) / "plugin.wasm").stat()
    assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    assert len(csi.driver.store.modules()) == 1
    csi.kubelet.unmount(first)
    assert (csi.kubelet.target_path(second) / "plugin.wasm").read_bytes() == make_module(4096, "conformance")
    csi.kubelet.unmount(second)


def test_unpublish_twice_is_ok(csi: RunningDriver, image: str) -> None:
    volume = csi.volume(image)
    csi.kubelet.mount(volume)
    csi.kubelet.unmount(volume)
    csi.kubelet.unmount(volume)
    assert csi.mounts_under_kubelet() == []


def test_error_responses_carry_a_status_not_an_empty_message(csi: RunningDriver) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        _publish(csi)
    assert failure.value.code() != grpc.StatusCode.OK and failure.value.details()
