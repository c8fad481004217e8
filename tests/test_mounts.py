"""The mounter's two ways to a read-only bind, the target walk, and the start-up propagation check, with
real mounts in the test's namespace (the cross-namespace properties are tests/test_topology.py's)."""

from __future__ import annotations

import os
import pathlib
import threading
from typing import Iterator

import grpc
import pytest

from csi_wasm import syscalls
from csi_wasm.config import ConfigError
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.errors import InvalidRequest, MountError
from csi_wasm.mounts import REQUIRED_OPTIONS, LinuxMounter, mount_holding, unmount_path
from csi_wasm.targets import Targets
from csi_wasm.topology import require_shared_pods_dir, share_directory

import faultproxy as fp
from conftest import RunningDriver, code_of, mount_tree, wait_for

MODULE = make_module(8 * 1024, "mounts")


@pytest.fixture
def tree(tmp_path: pathlib.Path) -> Iterator[tuple[pathlib.Path, pathlib.Path, Targets]]:
    with mount_tree(tmp_path, MODULE) as made:
        yield made


@pytest.mark.parametrize("new_api", [True, False], ids=["open_tree", "staging"])
def test_both_ways_attach_a_read_only_bind_and_leave_nothing_staged(
    tree: tuple[pathlib.Path, pathlib.Path, Targets], tmp_path: pathlib.Path, new_api: bool
) -> None:
    view, path, targets = tree
    staging = tmp_path / "state" / "staging"
    mounter = LinuxMounter(staging_dir=staging, new_api=new_api)
    assert mounter.method == ("open_tree" if new_api else "staging")
    with targets.open(str(path)) as target:
        assert target.make()
        mounter.bind_read_only(view, target)
        entry = mounter.mount_at(path)
        assert entry is not None and REQUIRED_OPTIONS <= entry.options and entry.shared  # a peer of the pods dir's group
        assert (path / "plugin.wasm").read_bytes() == MODULE
        with pytest.raises(OSError):
            (path / "plugin.wasm").write_bytes(b"x")
        mounter.unmount(target)
        assert mounter.mount_at(path) is None and target.remove()
    if not new_api:
        holder = mount_holding(staging)
        assert holder is not None and holder.mount_point == str(staging) and not holder.shared
        assert list(staging.iterdir()) == []  # each staging point is removed after the move


def test_the_staging_fallback_works_under_a_shared_state_dir_and_clears_what_a_crash_left(
    tree: tuple[pathlib.Path, pathlib.Path, Targets], tmp_path: pathlib.Path
) -> None:
    """MS_MOVE refuses a mount whose parent is shared: the staging dir is made a private mount of its own
    even when the state dir sits on a shared mount, and a bind a killed predecessor left there goes."""
    view, path, targets = tree
    share_directory(tmp_path / "state")
    leftover = tmp_path / "state" / "staging" / "killed-mid-publish"
    leftover.mkdir(parents=True)
    syscalls.mount(bytes(view), bytes(leftover), syscalls.MS_BIND)  # a writable bind, never moved
    mounter = LinuxMounter(staging_dir=tmp_path / "state" / "staging", new_api=False)
    with targets.open(str(path)) as target:
        target.make()
        mounter.bind_read_only(view, target)
        assert mounter.mount_at(path) is not None
        mounter.unmount(target)
    assert not leftover.exists() and mounter.mount_at(leftover) is None


def test_the_staging_fallback_needs_a_staging_dir(tree: tuple[pathlib.Path, pathlib.Path, Targets]) -> None:
    view, path, targets = tree
    with targets.open(str(path)) as target, pytest.raises(MountError, match="staging directory"):
        target.make()
        LinuxMounter(new_api=False).bind_read_only(view, target)


# -- the start-up check ---------------------------------------------------------------------------


def test_only_a_shared_pods_dir_passes_the_start_up_check(tmp_path: pathlib.Path) -> None:
    require_shared_pods_dir(tmp_path / "not-yet" / "pods")  # kubelet (or csi-sanity) has not made it yet
    private = tmp_path / "private" / "pods"
    private.mkdir(parents=True)  # on the test namespace's private tree: what a DaemonSet without the setting gives
    with pytest.raises(ConfigError) as refused:
        require_shared_pods_dir(private)
    message = str(refused.value)
    assert "\n" not in message and "mountPropagation: Bidirectional" in message and str(private) in message
    share_directory(tmp_path / "shared" / "pods")
    try:
        require_shared_pods_dir(tmp_path / "shared" / "pods")
        (tmp_path / "shared" / "pods" / "uid").mkdir()
        require_shared_pods_dir(tmp_path / "shared" / "pods" / "uid")  # held by the shared mount above it
    finally:
        unmount_path(tmp_path / "shared" / "pods")


# -- the target walk ------------------------------------------------------------------------------


@pytest.mark.parametrize("use_openat2", [True, False], ids=["openat2", "O_NOFOLLOW"])
def test_the_walk_refuses_symlinks_files_and_long_names(tmp_path: pathlib.Path, use_openat2: bool) -> None:
    pods = tmp_path / "kubelet" / "pods"
    csi = pods / "uid" / "volumes" / "kubernetes.io~csi"
    csi.mkdir(parents=True)
    (csi / "linked").symlink_to(tmp_path)  # out of the pods tree
    (csi / "file").write_text("not a directory")
    (csi / "vol").mkdir()
    (csi / "vol" / "mount").symlink_to(tmp_path)
    (csi / "inside").symlink_to(csi / "vol")  # a symlink that stays inside the pods tree is refused too
    targets = Targets(tmp_path / "kubelet", use_openat2=use_openat2)
    symlink = "has a symlink on the way" if use_openat2 else "has a file or a symlink where a directory should be"
    cases = {
        csi / "linked" / "mount": symlink,
        csi / "inside" / "mount": symlink,
        csi / "file" / "mount": "has a file or a symlink where a directory should be",
        csi / "vol" / "mount": "is a symlink; refusing to follow it",
        csi / ("x" * 300) / "mount": "has a component longer than 255 bytes",
        pods / ".." / "elsewhere" / "mount": "is outside kubelet's pods directory",
    }
    for path, message in cases.items():
        with pytest.raises(InvalidRequest) as refused, targets.open(str(path)):
            pass
        assert message in str(refused.value).replace(str(tmp_path), "<tmp>"), (path, str(refused.value))
    with targets.open(str(csi / "missing" / "mount")) as target:
        assert not target.parent_exists and target.lstat() is None and target.remove()


def test_a_volume_dir_swapped_for_a_symlink_during_a_slow_pull_gets_nothing_mounted(
    proxied_csi: RunningDriver, proxy: fp.FaultProxy, pusher: Pusher
) -> None:
    pushed = pusher.wasm_artifact("mounts/slow", "v1", make_module(8 * 1024, "slow"))
    proxy.add(r"GET /v2/mounts/slow/blobs/", fp.stall_headers(), times=1)
    volume = proxied_csi.volume(f"{proxy.host}/mounts/slow:v1")
    kubelet = proxied_csi.kubelet
    volume_dir = kubelet.target_path(volume).parent
    volume_dir.mkdir(parents=True)  # kubelet's part, then its NodePublishVolume call
    request = kubelet.publish_request(volume)
    outcome: list[grpc.StatusCode] = []
    publish = threading.Thread(
        target=lambda: outcome.append(code_of(lambda: kubelet.node.NodePublishVolume(request, timeout=30)))
    )
    publish.start()
    assert wait_for(lambda: proxy.count(r"GET /v2/mounts/slow/blobs/") == 1, timeout=20), "the pull never started"
    # a node user moves the volume dir away (into another pod's dir: a rename cannot leave the pods dir's
    # mount here) and puts a symlink in its place while the module downloads
    elsewhere = proxied_csi.driver.pods_dir / "another-pod" / "moved"
    elsewhere.parent.mkdir()
    os.rename(volume_dir, elsewhere)
    volume_dir.symlink_to(elsewhere)
    proxy.clear()
    publish.join(30)
    assert outcome == [grpc.StatusCode.INVALID_ARGUMENT]
    assert not (elsewhere / "mount").exists() and LinuxMounter().mount_at(elsewhere / "mount") is None
    assert proxied_csi.mounts_under_kubelet() == [] and proxied_csi.driver.records.all() == []
    volume_dir.unlink()
    assert pushed.module_digest  # the module itself is fine and stays in the store


def test_a_long_component_or_a_file_for_a_parent_is_refused_with_a_message_never_internal(
    csi: RunningDriver, pusher: Pusher
) -> None:
    image = pusher.wasm_artifact("mounts/plain", "v1", MODULE).reference
    volume = csi.volume(image)
    request = csi.kubelet.publish_request(volume)
    csi_dir = csi.kubelet.target_path(volume).parent.parent
    csi_dir.mkdir(parents=True)
    (csi_dir / "a-file").write_text("kubelet's vol_data.json, say")
    for target, message in (
        (csi_dir / ("v" * 300) / "mount", "longer than 255 bytes"),
        (csi_dir / "a-file" / "mount", "file or a symlink where a directory should be"),
        (csi_dir / "a-file", "exists and is not a directory"),
    ):
        request.target_path = str(target)
        with pytest.raises(grpc.RpcError) as refused:
            csi.kubelet.node.NodePublishVolume(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (target, refused.value.details())
        assert message in (refused.value.details() or ""), refused.value.details()
    assert csi.mounts_under_kubelet() == [] and csi.driver.records.all() == []
