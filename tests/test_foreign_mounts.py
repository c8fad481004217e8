"""Mounts the driver did not make live in the same tree as its own (kubelet's secret tmpfs, other volume
plugins' binds): recovery and unpublish must leave them alone. Plus the other guards of the mount path:
another volume id on a published target, a failed mount, a module held open at unpublish, an old
driver's writable bind under a publish."""

from __future__ import annotations

import pathlib
from typing import Iterator

import grpc
import pytest

from csi_wasm import syscalls
from csi_wasm.config import NodeConfig
from csi_wasm.demo.kubelet import InlineVolume
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.errors import MountError
from csi_wasm.mounts import REQUIRED_OPTIONS, LinuxMounter, MountTarget, unmount_path
from csi_wasm.records import RecordStore, VolumeRecord

from conftest import RunningDriver, code_of, start_driver, stop_driver

MODULE = make_module(6000, "foreign")
OTHER = make_module(7000, "foreign-other")


@pytest.fixture(scope="module")
def image(pusher: Pusher) -> str:
    return pusher.wasm_artifact("foreign/filter", "v1", MODULE).reference


@pytest.fixture(scope="module")
def other_image(pusher: Pusher) -> str:
    return pusher.wasm_artifact("foreign/other", "v1", OTHER).reference


def tmpfs_at(path: pathlib.Path, content: bytes = b"token") -> None:
    """A secret volume, as kubelet mounts one: a tmpfs with the secret's files."""
    path.mkdir(parents=True, exist_ok=True)
    syscalls.mount(b"tmpfs", bytes(path), 0, b"tmpfs")
    (path / "token").write_bytes(content)


def bind_at(source: pathlib.Path, path: pathlib.Path, read_only: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    syscalls.mount(bytes(source), bytes(path), syscalls.MS_BIND)
    if read_only:
        syscalls.mount(None, bytes(path), syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_RDONLY)


def csi_target(csi: RunningDriver, name: str) -> pathlib.Path:
    return csi.driver.pods_dir / f"pod-{name}" / "volumes" / "kubernetes.io~csi" / name / "mount"


def test_recovery_leaves_mounts_that_are_not_ours_alone(
    tmp_path: pathlib.Path, node_config: NodeConfig, image: str
) -> None:
    running = start_driver(tmp_path, node_config)
    ours = running.volume(image)
    running.kubelet.mount(ours)
    pods = running.driver.pods_dir
    secret = pods / "pod-a" / "volumes" / "kubernetes.io~secret" / "token"
    tmpfs_at(secret)
    plain = tmp_path / "another-plugin"
    plain.mkdir()
    (plain / "data").write_bytes(b"theirs")
    writable = csi_target(running, "other-driver")
    bind_at(plain, writable)  # another CSI driver's volume, writable, at a path shaped like ours
    look_alike = tmp_path / "elsewhere" / "views" / ("ab" * 32) / "plugin.wasm"
    look_alike.mkdir(parents=True)
    (look_alike / "plugin.wasm").write_bytes(b"\0asm not ours")
    mimic = csi_target(running, "mimic")
    bind_at(look_alike, mimic, read_only=True)  # root says .../views/<hex>/plugin.wasm, but not our store
    # and a record (say, from a lost volume) whose target now holds someone else's mount
    RecordStore(running.config.state_dir / "volumes").put(
        VolumeRecord("csi-lost", str(writable), image, "sha256:" + "cd" * 32, "plugin.wasm", 0.0)
    )
    running.kubelet.close()
    running.server.stop()  # the driver goes; every mount stays

    restarted = start_driver(tmp_path, node_config)
    try:
        mounted = {m.mount_point: m for m in LinuxMounter().mounts()}
        assert str(secret) in mounted and (secret / "token").read_bytes() == b"token"
        assert str(writable) in mounted and "rw" in mounted[str(writable)].options  # not "fixed", not unmounted
        assert (writable / "data").read_bytes() == b"theirs"
        assert str(mimic) in mounted
        records = {r.target_path for r in restarted.driver.records.all()}
        assert records == {str(restarted.kubelet.target_path(ours))}  # the foreign mounts adopted as nothing
        wrong_owner = InlineVolume("pod-other-driver", "p", "default", "other-driver", {"image": image})
        assert code_of(lambda: restarted.kubelet.unmount(wrong_owner)) == grpc.StatusCode.INVALID_ARGUMENT
        assert (writable / "data").read_bytes() == b"theirs"
        restarted.kubelet.unmount(ours)
    finally:
        for path in (secret, writable, mimic):
            unmount_path(path)
        stop_driver(restarted)


def test_unpublish_leaves_a_mount_it_did_not_make_alone(csi: RunningDriver, image: str) -> None:
    # no record, kubelet's tmpfs at the target: refused, untouched
    stranger = csi.volume(image)
    target = csi.kubelet.target_path(stranger)
    tmpfs_at(target)
    assert code_of(lambda: csi.kubelet.unmount(stranger)) == grpc.StatusCode.INVALID_ARGUMENT
    assert (target / "token").read_bytes() == b"token"
    unmount_path(target)

    # ours, with someone else's mount put on top of it: neither the stranger's mount nor ours is touched
    volume = csi.volume(image)
    target = csi.kubelet.mount(volume)
    tmpfs_at(target, b"on top")
    with pytest.raises(grpc.RpcError) as refused:
        csi.kubelet.unmount(volume)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "did not make" in (refused.value.details() or "")
    assert (target / "token").read_bytes() == b"on top"
    unmount_path(target)  # its owner takes it away; then the unpublish goes through
    csi.kubelet.unmount(volume)
    assert csi.mounts_under_kubelet() == []


def test_another_volume_id_on_a_published_target_is_already_exists(csi: RunningDriver, image: str) -> None:
    volume = csi.volume(image)
    target = csi.kubelet.mount(volume)
    intruder = csi.kubelet.publish_request(volume)
    intruder.volume_id = "csi-" + "0" * 64  # same target, same image, another volume
    assert code_of(lambda: csi.kubelet.node.NodePublishVolume(intruder)) == grpc.StatusCode.ALREADY_EXISTS
    (record,) = csi.driver.records.all()
    assert record.volume_id == volume.volume_id and (target / "plugin.wasm").read_bytes() == MODULE
    csi.kubelet.unmount(volume)


class FailingMounter(LinuxMounter):
    """The kernel refuses the mount (say, EPERM in a container that lost CAP_SYS_ADMIN)."""

    def bind_read_only(self, source: pathlib.Path, target: MountTarget) -> None:
        raise MountError(f"attaching {source} at {target.path} failed: Operation not permitted")


@pytest.fixture
def failing_csi(tmp_path: pathlib.Path, node_config: NodeConfig) -> Iterator[RunningDriver]:
    running = start_driver(tmp_path, node_config, mounter=FailingMounter(staging_dir=tmp_path / "staging"))
    yield running
    stop_driver(running)


def test_a_failed_mount_leaves_no_target_directory_behind(failing_csi: RunningDriver, image: str) -> None:
    volume = failing_csi.volume(image)
    request = failing_csi.kubelet.publish_request(volume)
    target = failing_csi.kubelet.target_path(volume)
    target.parent.mkdir(parents=True)
    assert code_of(lambda: failing_csi.kubelet.node.NodePublishVolume(request)) == grpc.StatusCode.INTERNAL
    assert not target.exists() and target.parent.is_dir()
    assert failing_csi.driver.records.all() == [] and failing_csi.mounts_under_kubelet() == []


def test_an_unpublish_of_a_module_held_open_still_succeeds(csi: RunningDriver, image: str) -> None:
    volume = csi.volume(image)
    target = csi.kubelet.mount(volume)
    with open(target / "plugin.wasm", "rb") as held:  # Envoy keeps its filter open
        csi.kubelet.unmount(volume)  # EBUSY for a plain unmount: detached lazily instead
        assert not target.exists() and csi.mounts_under_kubelet() == []
        assert held.read() == MODULE  # the process keeps reading what it opened
    assert csi.driver.records.all() == []


def test_a_publish_covers_a_writable_bind_of_our_view_instead_of_trusting_it(
    csi: RunningDriver, image: str, other_image: str
) -> None:
    """An older driver's bind (remounted read-only only in its own namespace) reaches this one writable."""
    volume = csi.volume(image)
    csi.kubelet.mount(volume)
    csi.kubelet.unmount(volume)  # the module and its view are in the store now
    view = next(csi.driver.store.views_dir.glob("*/plugin.wasm"))
    target = csi.kubelet.target_path(volume)
    bind_at(view, target)  # writable, no record
    csi.kubelet.mount(volume)
    top = LinuxMounter().mount_at(target)
    assert top is not None and REQUIRED_OPTIONS <= top.options
    assert csi.mounts_under_kubelet().count(str(target)) == 2
    with pytest.raises(OSError):
        (target / "plugin.wasm").write_bytes(b"x")
    other = InlineVolume(volume.pod_uid, volume.pod_name, "default", volume.volume_name, {"image": other_image})
    assert code_of(lambda: csi.kubelet.node.NodePublishVolume(csi.kubelet.publish_request(other))) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    csi.kubelet.unmount(volume)  # both layers go
    assert csi.mounts_under_kubelet() == [] and not target.exists()
