"""The DaemonSet's real topology, on the node-in-a-box harness (tests/nodebox.py): the driver in a mount
namespace of its own with the pods dir as a peer of the host's, pod containers binding the host's copy.

What issue 12 found there, and what must hold now: every module mount is ro,nosuid,nodev,noexec in the
host's view (kubelet's) and not only in the driver's; root in a container whose volumeMount is not
readOnly cannot write, chmod or truncate the module; restarts (SIGTERM, SIGKILL, a rolling update, a
node reboot) keep or restore every mount; a pods dir without Bidirectional propagation is refused.
"""

from __future__ import annotations

import hashlib
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest
import yaml

from csi_wasm.demo.kubelet import InlineVolume, new_pod_uid
from csi_wasm.demo.push import Pushed, Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.mounts import REQUIRED_OPTIONS
from csi_wasm.records import RecordStore, VolumeRecord, record_key
from csi_wasm.store import ModuleStore

from nodebox import NEW_MOUNT_API, NSEXEC, NodeBox

MODULE = make_module(64 * 1024, "nodebox")
OTHER = make_module(32 * 1024, "nodebox-other")
DEPLOY = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "daemonset.yaml"


@pytest.fixture(scope="module")
def image(pusher: Pusher) -> Pushed:
    return pusher.wasm_artifact("box/filter", "v1", MODULE)


@pytest.fixture(scope="module")
def other_image(pusher: Pusher) -> Pushed:
    return pusher.wasm_artifact("box/other", "v1", OTHER)


@pytest.fixture
def box(tmp_path: pathlib.Path, registry: LocalRegistry) -> Iterator[NodeBox]:
    node = NodeBox(tmp_path, registry.host)
    try:
        yield node
    finally:
        node.close()


def pod(reference: str, name: str = "app") -> InlineVolume:
    return InlineVolume(new_pod_uid(), name, "default", "filter", {"image": reference})


def hex_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_only_everywhere(box: NodeBox, targets: list[pathlib.Path], *driver_views: dict[str, Any]) -> None:
    host = box.host_mounts()
    for target in targets:
        assert REQUIRED_OPTIONS <= host[str(target)].options, ("host view", target, host[str(target)].options)
        for view in driver_views:
            assert REQUIRED_OPTIONS <= view[str(target)].options, ("driver view", target)


@pytest.mark.parametrize("api", ["open_tree", "staging"])
def test_module_mounts_are_read_only_in_every_namespace(box: NodeBox, image: Pushed, api: str) -> None:
    """staging: the kernel answers ENOSYS to the new mount API (a seccomp filter says so), so the driver
    falls back to bind + remount at its private staging point, then MS_MOVE."""
    driver = box.driver(*(["--deny-syscalls", NEW_MOUNT_API] if api == "staging" else []))
    kubelet = box.kubelet(driver)
    volumes = [pod(image.reference, f"app-{n}") for n in range(2)]
    targets = [kubelet.mount(volume) for volume in volumes]
    own = driver.mounts()
    read_only_everywhere(box, targets, own)
    staging = str(box.state_dir / "staging")
    assert (staging in own) is (api == "staging")  # the fallback really ran (and only there)
    if api == "staging":
        assert not own[staging].shared  # MS_MOVE needs a private parent; nothing propagates from it

    writable = box.container("writable", targets[0], read_only=False)  # the pod author's choice
    read_only = box.container("read-only", targets[1], read_only=True)
    for container in (writable, read_only):
        assert container.call("read") == {"ok": True, "sha256": hex_of(MODULE), "size": len(MODULE)}
        assert REQUIRED_OPTIONS <= set(container.call("options", name="")["options"])
    for op, fields in (("write", {"hex": "00" * 16}), ("chmod", {"mode": "4755"}), ("truncate", {})):
        assert writable.call(op, **fields) == {"ok": False, "errno": "EROFS"}, op
    assert writable.call("create", name="planted.wasm") == {"ok": False, "errno": "EROFS"}
    assert writable.call("stat")["mode"] == oct(0o100444)
    stored = box.state_dir / "store" / "modules" / "sha256" / image.module_digest.removeprefix("sha256:")
    assert hex_of(stored.read_bytes()) == image.module_digest.removeprefix("sha256:")  # the store's bytes kept

    for volume in volumes:
        kubelet.unmount(volume)
    assert len(driver.events("unpublish", count=2)) == 2
    assert box.host_mounts() == {}
    kubelet.close()
    assert driver.terminate() == 0


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_restarted_driver_keeps_and_adopts_every_mount(box: NodeBox, image: Pushed, stop: int) -> None:
    first = box.driver()
    kubelet = box.kubelet(first)
    volumes = [pod(image.reference, f"app-{n}") for n in range(3)]
    targets = [kubelet.mount(volume) for volume in volumes]
    running = box.container("running", targets[0], read_only=False)
    mount_ids = {point: entry.mount_id for point, entry in box.host_mounts().items()}
    # one record lost (say, a disk restored from an older backup): the mount alone must be enough
    (box.state_dir / "volumes" / f"{record_key(str(targets[2]))}.json").unlink()
    kubelet.close()

    first.process.send_signal(stop)  # type: ignore[union-attr]
    assert first.wait() == (0 if stop == signal.SIGTERM else -signal.SIGKILL)
    assert {p: e.mount_id for p, e in box.host_mounts().items()} == mount_ids  # the kernel kept them all
    assert running.call("read")["sha256"] == hex_of(MODULE)

    second = box.driver()  # a new container: a fresh mount namespace, copied from the host's
    (recovered,) = second.events("recovered")
    assert (recovered["adopted_mounts"], recovered["records_without_mount"], recovered["writable_mounts"],
            recovered["volumes"]) == (1, 0, 0, 3)  # fmt: skip
    assert {p: e.mount_id for p, e in box.host_mounts().items()} == mount_ids  # the same mounts, none redone
    read_only_everywhere(box, targets, second.mounts())
    restarted = box.container("restarted", targets[0], read_only=False)  # a container restart meanwhile
    assert restarted.call("read")["sha256"] == hex_of(MODULE)
    assert restarted.call("write", hex="00") == {"ok": False, "errno": "EROFS"}

    kubelet = box.kubelet(second)
    for volume in volumes:
        kubelet.unmount(volume)  # unpublish after the restart, the adopted volume included
    assert box.host_mounts() == {} and not any(target.exists() for target in targets)
    assert [e["result"] for e in second.events("unpublish", count=3)] == ["success"] * 3
    kubelet.close()
    assert second.terminate() == 0


def test_a_rolling_update_hands_every_mount_to_the_next_driver(box: NodeBox, image: Pushed, other_image: Pushed) -> None:
    """Two driver containers on one node (maxSurge): the next one starts while the old one still runs, in
    its own namespace, on the same state dir and the same plugin (socket) dir. It waits for the old one."""
    old = box.driver(instance=0)
    kubelet = box.kubelet(old)
    volumes = [pod(image.reference, f"app-{n}") for n in range(3)]
    targets = [kubelet.mount(volume) for volume in volumes]
    reader = box.container("reader", targets[1], read_only=True)
    mount_ids = {point: entry.mount_id for point, entry in box.host_mounts().items()}
    kubelet.close()

    new = box.driver(instance=0, wait_ready=False)
    (waiting,) = new.events("state_dir.waiting")
    assert waiting["holder_pid"] is not None and old.socket.exists()
    assert not new.events("serving", timeout=0.5), "the next driver served before the old one exited"
    assert old.terminate() == 0
    new.wait_ready()
    assert {p: e.mount_id for p, e in box.host_mounts().items()} == mount_ids
    read_only_everywhere(box, targets, new.mounts())
    assert reader.call("read")["sha256"] == hex_of(MODULE)

    kubelet = box.kubelet(new)
    added = pod(other_image.reference, "app-new")
    new_target = kubelet.mount(added)
    read_only_everywhere(box, [new_target], new.mounts())
    for volume in (*volumes, added):
        kubelet.unmount(volume)
    assert box.host_mounts() == {}
    kubelet.close()
    assert new.terminate() == 0


def test_a_node_reboot_then_kubelets_republish(box: NodeBox, image: Pushed) -> None:
    driver = box.driver()
    kubelet = box.kubelet(driver)
    volumes = [pod(image.pinned, f"app-{n}") for n in range(2)]
    targets = [kubelet.mount(volume) for volume in volumes]
    box.container("before", targets[0], read_only=False)
    kubelet.close()

    box.reboot()  # every process and mount gone; /var/lib/csi-wasm and kubelet's pod dirs stay on disk
    assert box.host_mounts() == {} and all(target.is_dir() for target in targets)
    assert len(list((box.state_dir / "volumes").glob("*.json"))) == 2

    driver = box.driver()
    (recovered,) = driver.events("recovered")
    assert (recovered["records_without_mount"], recovered["volumes"]) == (2, 0)
    kubelet = box.kubelet(driver)
    for volume in volumes:
        kubelet.mount(volume)  # kubelet sets up the volumes of the pods it runs again
    assert [(e["result"], e["cached"]) for e in driver.events("publish", count=2)] == [("success", True)] * 2
    read_only_everywhere(box, targets, driver.mounts())
    after = box.container("after", targets[0], read_only=False)
    assert after.call("read")["sha256"] == hex_of(MODULE)
    for volume in volumes:
        kubelet.unmount(volume)
    kubelet.close()
    assert driver.terminate() == 0


@pytest.mark.parametrize("propagation", ["private", "slave"])
def test_a_pods_dir_without_bidirectional_propagation_is_refused_at_start(box: NodeBox, propagation: str) -> None:
    """private: the volumeMount without mountPropagation; slave: HostToContainer. Either way kubelet would
    never see a module mount, so the driver refuses with one line naming the setting."""
    driver = box.driver("--pods-propagation", propagation, wait_ready=False)
    assert driver.wait() == 2
    (line,) = [line for line in driver.stderr_lines if "configuration error" in line]
    assert "mountPropagation: Bidirectional on the pods-dir volumeMount of the csi-wasm container" in line
    assert not driver.socket.exists() and not (box.state_dir / "store").exists()


def test_a_driver_on_a_read_only_root_filesystem_writes_only_its_state_and_socket_dirs(
    box: NodeBox, image: Pushed
) -> None:
    container = next(c for doc in yaml.safe_load_all(DEPLOY.read_text()) if doc and doc["kind"] == "DaemonSet"
                     for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == "csi-wasm")  # fmt: skip
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/csi", "/var/lib/kubelet/pods", "/var/lib/csi-wasm"}  # socket, pods, state: as here

    options = ["--read-only-root", "--writable", str(box.state_dir), "--writable", str(box.socket_dir())]
    for run in range(2):  # the second run recovers what the first left, still read-only
        driver = box.driver(*options)
        assert "ro" in driver.mounts()["/"].options  # the root filesystem really is read-only in there
        kubelet = box.kubelet(driver)
        volume = pod(image.reference, f"app-{run}")
        target = kubelet.mount(volume)
        read_only_everywhere(box, [target], driver.mounts())
        assert (target / "plugin.wasm").read_bytes() == MODULE
        if run:
            kubelet.unmount(volume)
        kubelet.close()
        assert driver.terminate() == 0
        assert not [e for e in driver.log if e.get("level") == "error"], driver.stderr_lines[-5:]
    assert box.host_mounts() != {}  # the first run's volume is still published


def test_an_upgrade_covers_the_writable_binds_an_older_driver_left(
    box: NodeBox, image: Pushed, other_image: Pushed
) -> None:
    """The state a driver from before issue 12 leaves: each module bound, then remounted read-only in its
    own namespace, so the host's copy is writable, and root in a non-readOnly container rewrote a module.
    The new driver covers the intact ones with a read-only bind (pods keep their module) and takes down
    the tampered one (its module quarantined, fetched again by the next publish)."""
    seed = box.driver()  # fills the store the way any driver does
    kubelet = box.kubelet(seed)
    for pushed in (image, other_image):
        volume = pod(pushed.reference, "seed")
        kubelet.mount(volume)
        kubelet.unmount(volume)
    kubelet.close()
    assert seed.terminate() == 0

    store, records = ModuleStore(box.state_dir / "store"), RecordStore(box.state_dir / "volumes")
    old = {name: (pod(pushed.reference, name), pushed) for name, pushed in
           (("a", image), ("b", other_image), ("c", image))}  # fmt: skip
    target = {name: box.kubelet_dir / "pods" / v.pod_uid / "volumes" / "kubernetes.io~csi" / v.volume_name / "mount"
              for name, (v, _) in old.items()}  # fmt: skip
    for name, (volume, pushed) in old.items():
        target[name].parent.mkdir(parents=True)
        view = store.view(pushed.module_digest, "plugin.wasm")
        subprocess.run([sys.executable, NSEXEC, "old-publish", str(view), str(target[name])], check=True)
        records.put(VolumeRecord(volume.volume_id, str(target[name]), pushed.reference, pushed.module_digest,
                                 "plugin.wasm", time.time()))  # fmt: skip
    host = box.host_mounts()
    assert all("rw" in host[str(t)].options for t in target.values())  # issue 12's finding, reproduced
    attacker = box.container("attacker", target["b"], read_only=False)
    assert attacker.call("write", hex="00" * 16) == {"ok": True}

    new = box.driver()
    (recovered,) = new.events("recovered")
    assert (recovered["writable_mounts"], recovered["tampered_mounts"], recovered["volumes"]) == (2, 1, 2)
    read_only_everywhere(box, [target["a"], target["c"]], new.mounts())
    assert str(target["b"]) not in box.host_mounts() and not target["b"].exists()
    assert not store.has(other_image.module_digest) and any((box.state_dir / "store" / "quarantine").iterdir())
    late = box.container("late", target["a"], read_only=False)  # a container started after the upgrade
    assert late.call("write", hex="00") == {"ok": False, "errno": "EROFS"}
    assert late.call("read")["sha256"] == hex_of(MODULE)

    kubelet = box.kubelet(new)
    again = pod(other_image.reference, "again")
    assert (kubelet.mount(again) / "plugin.wasm").read_bytes() == OTHER  # fetched again, the right bytes
    for volume in (old["a"][0], old["c"][0], again):
        kubelet.unmount(volume)  # the cover and the writable bind under it both go
    assert box.host_mounts() == {}
    kubelet.close()
    assert new.terminate() == 0
