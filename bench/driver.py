"""The driver under test, as a real subprocess on its unix socket, and a kubelet-shaped client for it.

The benchmark talks to ``python -m csi_wasm serve`` exactly as kubelet would (the
project's ``Kubelet`` client over gRPC), so every figure includes the real
server, its thread pool and its logging. Being a separate process, its memory
can be read from ``/proc/<pid>/status`` and its start-up timed to Probe ready.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import IO

import grpc

from csi_wasm._gen import csi_pb2, csi_pb2_grpc
from csi_wasm.demo.kubelet import InlineVolume, Kubelet, new_pod_uid
from csi_wasm.demo.processes import stop_gracefully
from csi_wasm.topology import share_directory

CALL_TIMEOUT = 120.0  # kubelet's per-call timeout


class DriverProcess:
    """``csi-wasm serve`` in a subprocess, with its state and kubelet directories under ``workdir``."""

    def __init__(self, workdir: pathlib.Path, registry_host: str, launcher: list[str] | None = None) -> None:
        self.workdir = workdir
        self.launcher = launcher or [sys.executable, "-m", "csi_wasm"]
        self.registry_host = registry_host
        self.socket_path = workdir / "csi" / "csi.sock"
        self.state_dir = workdir / "state"
        self.kubelet_dir = workdir / "kubelet"
        self.log_path = workdir / "driver.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "driver not started"
        return self.process.pid

    def command(self) -> list[str]:
        return [
            *self.launcher, "serve",
            "--endpoint", f"unix://{self.socket_path}",
            "--node-id", "bench",
            "--state-dir", str(self.state_dir),
            "--kubelet-dir", str(self.kubelet_dir),
            "--insecure-registry", self.registry_host,
        ]  # fmt: skip

    def start(self, timeout: float = 60.0) -> float:
        """Start the driver; return the seconds from spawn until Probe answers ready=true."""
        share_directory(self.kubelet_dir / "pods")  # as on a node: the driver refuses a private pods dir
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")
        started = time.perf_counter()
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = started + timeout
        while not self.socket_path.exists():
            self._check_alive()
            if time.perf_counter() > deadline:
                raise RuntimeError(f"driver made no socket within {timeout}s; see {self.log_path}")
            time.sleep(0.002)
        # a fresh channel once the socket exists: no reconnect backoff inflates the figure
        with grpc.insecure_channel(f"unix://{self.socket_path}") as channel:
            probe = csi_pb2_grpc.IdentityStub(channel)
            while True:
                self._check_alive()
                answer = probe.Probe(csi_pb2.ProbeRequest(), timeout=5, wait_for_ready=True)
                if answer.ready.value:
                    return time.perf_counter() - started
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"driver not ready within {timeout}s; see {self.log_path}")
                time.sleep(0.002)

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"driver exited with {self.process.returncode}; see {self.log_path}")

    def stop(self, timeout: float = 60.0) -> None:
        if self.process is None:
            return
        stop_gracefully(self.process, timeout)
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- memory ------------------------------------------------------------

    def status_kib(self, field: str) -> int:
        """A ``/proc/<pid>/status`` figure in KiB (VmRSS: resident now; VmHWM: peak resident)."""
        for line in pathlib.Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise KeyError(field)

    def reset_peak(self) -> int:
        """Reset VmHWM to the current RSS (``clear_refs`` 5); return that RSS in KiB."""
        pathlib.Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        return self.status_kib("VmRSS")


class Client:
    """Timed CSI calls through the project's kubelet-shaped client. Only the RPC itself is timed."""

    def __init__(self, driver: DriverProcess) -> None:
        self.kubelet = Kubelet(str(driver.socket_path), driver.kubelet_dir)

    def close(self) -> None:
        self.kubelet.close()

    def probe(self) -> float:
        started = time.perf_counter()
        answer = self.kubelet.identity.Probe(csi_pb2.ProbeRequest(), timeout=CALL_TIMEOUT)
        elapsed = time.perf_counter() - started
        assert answer.ready.value, "driver answered Probe with ready=false"
        return elapsed

    def volume(self, image: str, name: str = "bench") -> InlineVolume:
        volume = InlineVolume(new_pod_uid(), name, "bench", "wasm", {"image": image})
        # kubelet creates the target's parent before it calls NodePublishVolume
        self.kubelet.target_path(volume).parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        return volume

    def publish_request(self, volume: InlineVolume) -> csi_pb2.NodePublishVolumeRequest:
        return self.kubelet.publish_request(volume)

    def publish(self, volume: InlineVolume) -> float:
        request = self.kubelet.publish_request(volume)
        started = time.perf_counter()
        self.kubelet.node.NodePublishVolume(request, timeout=CALL_TIMEOUT)
        return time.perf_counter() - started

    def unpublish(self, volume: InlineVolume) -> float:
        target = self.kubelet.target_path(volume)
        request = csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=str(target))
        started = time.perf_counter()
        self.kubelet.node.NodeUnpublishVolume(request, timeout=CALL_TIMEOUT)
        elapsed = time.perf_counter() - started
        if os.path.lexists(target):
            raise AssertionError(f"driver left {target} behind after NodeUnpublishVolume")
        shutil.rmtree(self.kubelet.kubelet_dir / "pods" / volume.pod_uid, ignore_errors=True)
        return elapsed
