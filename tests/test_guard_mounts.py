"""Guards of the mount path that other tests did not reach alone (found by the mutation pass).

* A bind is verified read-only before it is attached: a kernel that accepts ``mount_setattr`` (or the
  read-only remount at the staging point) without applying it gets nothing attached. The kernel is the
  boundary here, so the tests stand in for it: they replace the one system call that sets the flags.
* A target parent replaced by another *directory* during a slow pull (a symlink is refused by the walk
  itself, tests/test_mounts.py) gets nothing mounted: not at the path, not in the directory moved away.
* After attaching, the target must show the view: a target directory swapped for another during the
  attach is reported as a failed mount, not published, and the bind that landed in the moved-away
  directory is undone through the mount's own descriptor (a path would name the newcomer).
"""

from __future__ import annotations

import os
import pathlib
import threading
from typing import Any, Iterator

import grpc
import pytest

import faultproxy as fp
from conftest import RunningDriver, mount_tree, wait_for
from csi_wasm import syscalls
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.errors import MountError
from csi_wasm.mounts import READ_ONLY_FLAGS, LinuxMounter, read_mountinfo
from csi_wasm.targets import Targets

MODULE = make_module(8 * 1024, "guard-mounts")


@pytest.fixture
def tree(tmp_path: pathlib.Path) -> Iterator[tuple[pathlib.Path, pathlib.Path, Targets]]:
    with mount_tree(tmp_path, MODULE) as made:
        yield made


def _mounts_under(path: pathlib.Path) -> list[str]:
    return [m.mount_point for m in read_mountinfo() if m.mount_point.startswith(f"{path}/")]


def test_a_kernel_that_ignores_mount_setattr_gets_nothing_attached(
    tree: tuple[pathlib.Path, pathlib.Path, Targets], monkeypatch: pytest.MonkeyPatch
) -> None:
    view, path, targets = tree
    monkeypatch.setattr(syscalls, "mount_setattr", lambda tree_fd, attributes: None)  # accepted, not applied
    with targets.open(str(path)) as target:
        target.make()
        with pytest.raises(MountError, match="not read-only"):
            LinuxMounter(new_api=True).bind_read_only(view, target)
    assert LinuxMounter().mount_at(path) is None and not (path / "plugin.wasm").exists()


def test_a_read_only_remount_that_is_not_applied_gets_nothing_attached(
    tree: tuple[pathlib.Path, pathlib.Path, Targets], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    view, path, targets = tree
    mount = syscalls.mount

    def remount_without_the_flags(source: bytes | None, target: bytes, flags: int, *rest: Any) -> None:
        if flags & syscalls.MS_REMOUNT:
            flags &= ~READ_ONLY_FLAGS  # the remount succeeds and leaves the bind writable
        mount(source, target, flags, *rest)

    monkeypatch.setattr(syscalls, "mount", remount_without_the_flags)
    staging = tmp_path / "state" / "staging"
    with targets.open(str(path)) as target:
        target.make()
        with pytest.raises(MountError, match="not read-only"):
            LinuxMounter(staging_dir=staging, new_api=False).bind_read_only(view, target)
    assert LinuxMounter().mount_at(path) is None and not (path / "plugin.wasm").exists()
    assert _mounts_under(staging) == [] and list(staging.iterdir()) == []


@pytest.mark.parametrize("new_api", [True, False], ids=["open_tree", "staging"])
def test_a_target_swapped_during_the_attach_is_not_reported_as_published_and_leaves_no_mount(
    tree: tuple[pathlib.Path, pathlib.Path, Targets], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
    new_api: bool,
) -> None:
    view, path, targets = tree
    moved = path.with_name("moved")

    def swap() -> None:
        os.rename(path, moved)  # the directory the held descriptor names goes elsewhere
        path.mkdir()  # and another takes its name

    if new_api:
        move_mount = syscalls.move_mount

        def swap_then_attach(tree_fd: int, directory: int, flags: int) -> None:
            swap()
            move_mount(tree_fd, directory, flags)

        monkeypatch.setattr(syscalls, "move_mount", swap_then_attach)
    else:
        mount = syscalls.mount

        def swap_then_move(source: bytes | None, target: bytes, flags: int, *rest: Any) -> None:
            if flags & syscalls.MS_MOVE:
                swap()
            mount(source, target, flags, *rest)

        monkeypatch.setattr(syscalls, "mount", swap_then_move)
    with targets.open(str(path)) as target:
        target.make()
        with pytest.raises(MountError, match="does not show"):
            LinuxMounter(staging_dir=tmp_path / "staging", new_api=new_api).bind_read_only(view, target)
    assert LinuxMounter().mount_at(path) is None and not (path / "plugin.wasm").exists()
    assert LinuxMounter().mount_at(moved) is None and not (moved / "plugin.wasm").exists()
    assert _mounts_under(tmp_path / "kubelet" / "pods") == [] and _mounts_under(tmp_path / "staging") == []


def test_a_volume_dir_replaced_by_another_directory_during_a_slow_pull_gets_nothing_mounted(
    proxied_csi: RunningDriver, proxy: fp.FaultProxy, pusher: Pusher
) -> None:
    pusher.wasm_artifact("guard/slow", "v1", MODULE)
    blobs = r"GET /v2/guard/slow/blobs/"
    proxy.add(blobs, fp.stall_headers(), times=1)
    volume = proxied_csi.volume(f"{proxy.host}/guard/slow:v1")
    kubelet = proxied_csi.kubelet
    volume_dir = kubelet.target_path(volume).parent
    volume_dir.mkdir(parents=True)
    request = kubelet.publish_request(volume)
    outcome: list[tuple[grpc.StatusCode, str]] = []

    def publish_once() -> None:
        try:
            kubelet.node.NodePublishVolume(request, timeout=30)
        except grpc.RpcError as exc:
            outcome.append((exc.code(), exc.details() or ""))

    publish = threading.Thread(target=publish_once)
    publish.start()
    try:
        assert wait_for(lambda: proxy.count(blobs) == 1, timeout=20), "the pull never started"
        elsewhere = proxied_csi.driver.pods_dir / "another-pod" / "moved"
        elsewhere.parent.mkdir()
        os.rename(volume_dir, elsewhere)
        volume_dir.mkdir()  # a directory this time: the walk itself finds nothing wrong with the path
    finally:
        proxy.clear()
        publish.join(30)
    assert len(outcome) == 1 and outcome[0][0] == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert "was replaced during the publish" in outcome[0][1], outcome
    assert LinuxMounter().mount_at(elsewhere / "mount") is None and not (elsewhere / "mount").exists()
    assert LinuxMounter().mount_at(volume_dir / "mount") is None and not (volume_dir / "mount").exists()
    assert proxied_csi.mounts_under_kubelet() == [] and proxied_csi.driver.records.all() == []
