"""Node in a box: the DaemonSet's mount topology on one machine, with real mount namespaces.

::

    host view: this test process's (private) namespace; kubelet's pods dir is a shared mount, as on a node
    ├── driver container: ``tests/nsexec.py driver`` unshares, then execs the real ``csi-wasm serve``;
    │   its copy of the pods dir is a peer of the host's, which is what mountPropagation: Bidirectional
    │   makes (optionally: pods dir private/slave, read-only root filesystem, new mount API denied)
    └── pod containers: ``tests/nsexec.py container`` unshares, makes its tree private and binds the
        *host's* copy of the target at /wasm-like paths, read-only only if the volumeMount says so,
        then answers file operations as root inside that namespace

kubelet is the project's kubelet-shaped client, working on the host view's paths; the host's own
mount table is this process's ``/proc/self/mountinfo``, the driver's is ``/proc/<pid>/mountinfo``.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from csi_wasm._gen import csi_pb2, csi_pb2_grpc
from csi_wasm.demo.kubelet import Kubelet
from csi_wasm.mounts import MountEntry, read_mountinfo, top_mounts, unmount_path
from csi_wasm.topology import share_directory

NSEXEC = str(pathlib.Path(__file__).resolve().parent / "nsexec.py")
DRIVER_NAME = "csi-wasm.dev"
NEW_MOUNT_API = "428,429,442"  # open_tree, move_mount, mount_setattr
OPENAT2 = "437"


@dataclass
class BoxedDriver:
    """``csi-wasm serve`` in a mount namespace of its own; JSON log lines collected from stderr."""

    args: list[str]
    socket: pathlib.Path
    process: subprocess.Popen[str] | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    stderr_lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def start(self, wait_ready: bool = True) -> BoxedDriver:
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, args=(self.process,), daemon=True)
        self.reader.start()
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready():
            assert self.process is not None and self.process.poll() is None, f"driver exited: {self.stderr_lines[-5:]}"
            assert time.monotonic() < deadline, "the boxed driver did not become ready"
            time.sleep(0.02)

    def _ready(self) -> bool:
        if not self.socket.exists():
            return False
        with grpc.insecure_channel(f"unix://{self.socket}") as channel:
            try:
                return bool(csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=2).ready.value)
            except grpc.RpcError:
                return False

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self.stderr_lines.append(line.rstrip("\n"))
            try:
                self.log.append(json.loads(line))
            except ValueError:
                pass

    def events(self, name: str, count: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The log lines of event ``name``, once at least ``count`` arrived (a thread reads the pipe:
        a line written before an answer may be read after it)."""
        deadline = time.monotonic() + timeout
        while len(found := [entry for entry in list(self.log) if entry.get("event") == name]) < count:
            if time.monotonic() > deadline or (self.process is not None and self.process.poll() is not None
                                               and self.reader is not None and not self.reader.is_alive()):  # fmt: skip
                break
            time.sleep(0.01)
        return found

    def mounts(self) -> dict[str, MountEntry]:
        """The driver's own mount table (its namespace), top mount per mount point."""
        assert self.process is not None
        return top_mounts(read_mountinfo(pathlib.Path(f"/proc/{self.process.pid}/mountinfo")))

    def terminate(self) -> int:
        assert self.process is not None
        self.process.terminate()
        return self.wait()

    def kill(self) -> int:
        assert self.process is not None
        self.process.kill()
        return self.wait()

    def wait(self, timeout: float = 60.0) -> int:
        """The exit code, once every line the process wrote has been read."""
        assert self.process is not None and self.reader is not None
        code = self.process.wait(timeout)
        self.reader.join(timeout)
        return code

    def ensure_stopped(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


class PodContainer:
    """A container process with a bind of the host's copy of a volume; file operations run as root in it."""

    def __init__(self, source: pathlib.Path, destination: pathlib.Path, read_only: bool) -> None:
        args = [sys.executable, NSEXEC, "container", str(source), str(destination)] + (["--read-only"] if read_only else [])
        self.destination = destination
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self._answer()
        assert hello.get("ready"), hello

    def call(self, op: str, name: str = "plugin.wasm", **fields: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, "name": name, **fields}) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"container process exited with {self.process.poll()}"
        return json.loads(line)  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
            self.process.stdin.close()
            self.process.wait(30)
        if self.process.stdout is not None:
            self.process.stdout.close()


class NodeBox:
    """One node: host paths under ``root``, a shared pods dir, drivers and pod containers."""

    def __init__(self, root: pathlib.Path, registry_host: str) -> None:
        self.root = root
        self.registry_host = registry_host
        self.kubelet_dir = root / "host" / "var-lib-kubelet"
        self.pods_dir = self.kubelet_dir / "pods"
        self.state_dir = root / "host" / "var-lib-csi-wasm"
        self.drivers: list[BoxedDriver] = []
        self.containers: list[PodContainer] = []
        share_directory(self.pods_dir)

    def socket_dir(self, instance: int = 0) -> pathlib.Path:
        return self.root / "host" / f"plugins-{instance}" / DRIVER_NAME

    def driver(self, *options: str, instance: int = 0, wait_ready: bool = True) -> BoxedDriver:
        """A driver container (``instance``: a separate socket dir, as a second pod on the node would have)."""
        socket = self.socket_dir(instance) / "csi.sock"
        socket.parent.mkdir(parents=True, exist_ok=True)  # the plugin-dir hostPath (DirectoryOrCreate)
        serve = [sys.executable, "-m", "csi_wasm", "--log-format", "json", "serve", "--endpoint", f"unix://{socket}",
                 "--node-id", "box-node", "--driver-name", DRIVER_NAME, "--state-dir", str(self.state_dir),
                 "--kubelet-dir", str(self.kubelet_dir), "--insecure-registry", self.registry_host]  # fmt: skip
        args = [sys.executable, NSEXEC, "driver", "--pods", str(self.pods_dir), *options, "--", *serve]
        driver = BoxedDriver(args, socket)
        self.drivers.append(driver)
        return driver.start(wait_ready)

    def kubelet(self, driver: BoxedDriver) -> Kubelet:
        return Kubelet(str(driver.socket), self.kubelet_dir, node_name="box-node", driver_name=DRIVER_NAME)

    def container(self, name: str, target: pathlib.Path, read_only: bool) -> PodContainer:
        container = PodContainer(target, self.root / "containers" / name / "wasm", read_only)
        self.containers.append(container)
        return container

    def host_mounts(self) -> dict[str, MountEntry]:
        """kubelet's view: the host's mount table under the pods dir, top mount per mount point."""
        prefix = f"{self.pods_dir}/"
        return {p: e for p, e in top_mounts(read_mountinfo()).items() if p.startswith(prefix)}

    def host_mount_count(self) -> int:
        prefix = f"{self.pods_dir}/"
        return sum(1 for entry in read_mountinfo() if entry.mount_point.startswith(prefix))

    def reboot(self) -> None:
        """Every process and every mount under the pods dir gone; disks (records, store, pod dirs) kept."""
        for driver in self.drivers:
            driver.ensure_stopped()
        for container in self.containers:
            container.stop()
        self.containers.clear()
        prefix = f"{self.pods_dir}/"
        while points := sorted({e.mount_point for e in read_mountinfo() if e.mount_point.startswith(prefix)}, reverse=True):
            for point in points:
                unmount_path(pathlib.Path(point))

    def close(self) -> None:
        self.reboot()
        unmount_path(self.pods_dir)
