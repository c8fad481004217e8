"""``csi-wasm demo``: the driver's main job end to end, on this machine, with nothing outside it.

Starts a local registry, pushes a demo module, starts the driver on a unix
socket, publishes the module for three pods exactly as kubelet would, shows the
three mounts share one inode and are read-only, then cleans everything up. It
runs in a private mount namespace, so no mount reaches the host; there, kubelet's
pods dir is made a shared mount, as it is on a node (the driver checks).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import shutil
import tempfile

from csi_wasm.config import DriverConfig, NodeConfig
from csi_wasm.demo.kubelet import InlineVolume, Kubelet, new_pod_uid
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.mounts import LinuxMounter, enter_private_mount_namespace, unmount_path
from csi_wasm.server import BackgroundServer, Driver
from csi_wasm.topology import share_directory

DEMO_DRIVER = "csi-wasm.dev"
PODS = 3


def run_demo(module_size: int = 256 * 1024, keep: bool = False) -> int:
    enter_private_mount_namespace()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="csi-wasm-demo-"))
    registry = LocalRegistry(workdir / "registry").start()
    server: BackgroundServer | None = None
    try:
        print(f"1. registry: docker-registry listening on {registry.host}")
        pushed = Pusher(registry.host).wasm_artifact("demo/filters/hello", "v1", make_module(module_size, "hello"))
        print(f"2. pushed {pushed.reference} ({module_size} bytes, manifest {pushed.manifest_digest[:19]}...)")
        share_directory(workdir / "kubelet" / "pods")
        config = DriverConfig(
            driver_name=DEMO_DRIVER,
            node_id="demo-node",
            endpoint=f"unix://{workdir}/csi/csi.sock",
            state_dir=workdir / "state",
            kubelet_dir=workdir / "kubelet",
            node=NodeConfig().with_insecure([registry.host]),
        )
        (workdir / "csi").mkdir()
        server = BackgroundServer(Driver(config))
        print(f"3. driver {DEMO_DRIVER} serving on {config.socket_path}")
        return _publish_three_pods(Kubelet(config.socket_path, config.kubelet_dir), pushed.reference, server.driver)
    finally:
        if server is not None:
            server.stop()
        with contextlib.suppress(OSError):
            unmount_path(workdir / "kubelet" / "pods")
        registry.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _publish_three_pods(kubelet: Kubelet, image: str, driver: Driver) -> int:
    volumes = [
        InlineVolume(new_pod_uid(), f"envoy-{n}", "demo", "wasm-filter", {"image": image}) for n in range(PODS)
    ]
    mounter = LinuxMounter()
    inodes = set()
    failures = 0
    print(f"4. publishing {image} for {PODS} pods as kubelet would:")
    for volume in volumes:
        target = kubelet.mount(volume)
        module = target / "plugin.wasm"
        info = module.stat()
        inodes.add((info.st_dev, info.st_ino))
        entry = mounter.mount_at(target)
        options = sorted((entry.options if entry else set()) & {"ro", "nosuid", "nodev", "noexec"})
        writable = _try_write(module)
        print(f"   pod {volume.pod_name}: {module}")
        print(f"      inode {info.st_ino}, {info.st_size} bytes, mount options {','.join(options)}, write -> {writable}")
        failures += writable != "EROFS (read-only)" or len(options) != 4
    stored = driver.store.modules()
    print(f"5. distinct inodes across {PODS} pods: {len(inodes)}; modules in the node store: {len(stored)}")
    failures += len(inodes) != 1 or len(stored) != 1
    for volume in volumes:
        kubelet.unmount(volume)
        kubelet.delete_pod(volume.pod_uid)
    leftover = [m for m in mounter.mounts() if m.mount_point.startswith(f"{kubelet.kubelet_dir}/pods/")]
    print(f"6. unpublished all pods; mounts left under the kubelet dir: {len(leftover)}")
    failures += bool(leftover)
    kubelet.close()
    print("demo: OK, three pods shared one read-only copy" if not failures else f"demo: {failures} checks FAILED")
    return 0 if not failures else 1


def _try_write(path: pathlib.Path) -> str:
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        return "EROFS (read-only)" if exc.errno == errno.EROFS else os.strerror(exc.errno or 0)
    return "WRITABLE"
