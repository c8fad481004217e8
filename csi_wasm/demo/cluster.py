"""Simulated nodes on one machine: several drivers, each as a node would run it, for tests and bench.rollout.

A ``SimulatedNode`` is ``csi-wasm serve`` in its own process, with its own state dir,
kubelet dir (its ``pods`` dir a shared mount of its own, as on a node), unix socket,
node config file and log, and a kubelet-shaped client (``csi_wasm.demo.kubelet.Kubelet``)
on that socket. Nodes share nothing but the registries they are configured with, so
a mirror in front of an upstream sees exactly the requests a fleet of nodes makes.

Run it as root inside a private mount namespace (the tests and the benchmark enter one
before anything else): the pods dirs are real mounts.
"""

from __future__ import annotations

import contextlib
import pathlib
import subprocess
import sys
import time
from typing import IO, Any, Mapping, Sequence

import grpc
import yaml

from csi_wasm._gen import csi_pb2, csi_pb2_grpc
from csi_wasm.demo.kubelet import Kubelet
from csi_wasm.demo.processes import stop_gracefully

DRIVER_NAME = "csi-wasm.dev"


def mirrored_registry_config(
    upstream: str, mirrors: Sequence[str] = (), pull: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """A node config (as the YAML mapping an admin writes) for a plain-HTTP upstream behind ``mirrors``."""
    registries: dict[str, Any] = {upstream: {"insecure": True, "mirrors": list(mirrors)}}
    for mirror in mirrors:
        registries[mirror] = {"insecure": True}
    config: dict[str, Any] = {"registries": registries}
    if pull:
        config["pull"] = dict(pull)
    return config


class SimulatedNode:
    """One node's driver process and the kubelet that calls it."""

    def __init__(
        self,
        name: str,
        workdir: pathlib.Path,
        node_config: Mapping[str, Any],
        launcher: Sequence[str] | None = None,
        log_level: str = "info",
        log_format: str = "text",
    ) -> None:
        self.name = name
        self.workdir = workdir
        self.node_config = dict(node_config)
        self.launcher = list(launcher or [sys.executable, "-m", "csi_wasm"])
        self.log_level = log_level
        self.log_format = log_format
        self.socket_path = workdir / "csi" / "csi.sock"
        self.state_dir = workdir / "state"
        self.kubelet_dir = workdir / "kubelet"
        self.config_path = workdir / "config.yaml"
        self.log_path = workdir / "driver.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._kubelet: Kubelet | None = None
        self._launched_at = 0.0

    @property
    def pods_dir(self) -> pathlib.Path:
        return self.kubelet_dir / "pods"

    def command(self) -> list[str]:
        return [
            *self.launcher, "--log-level", self.log_level, "--log-format", self.log_format, "serve",
            "--endpoint", f"unix://{self.socket_path}",
            "--node-id", self.name,
            "--driver-name", DRIVER_NAME,
            "--state-dir", str(self.state_dir),
            "--kubelet-dir", str(self.kubelet_dir),
            "--config", str(self.config_path),
        ]  # fmt: skip

    def launch(self) -> None:
        """Write the node config, make the node's directories, spawn the driver (do not wait)."""
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        _share(self.pods_dir)
        self.config_path.write_text(yaml.safe_dump(self.node_config))
        self._log = open(self.log_path, "ab")
        self._launched_at = time.monotonic()
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=self._log)

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait until Probe answers ready=true; return the seconds since ``launch``."""
        deadline = self._launched_at + timeout
        while not self.socket_path.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {self.name}: no socket within {timeout}s; see {self.log_path}")
            time.sleep(0.01)
        with grpc.insecure_channel(f"unix://{self.socket_path}") as channel:
            identity = csi_pb2_grpc.IdentityStub(channel)
            while True:
                self._check_alive()
                remaining = max(0.1, deadline - time.monotonic())
                answer = identity.Probe(csi_pb2.ProbeRequest(), timeout=remaining, wait_for_ready=True)
                if answer.ready.value:
                    return time.monotonic() - self._launched_at
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node {self.name}: not ready within {timeout}s; see {self.log_path}")
                time.sleep(0.01)

    def _check_alive(self) -> None:
        assert self.process is not None, "node not launched"
        if self.process.poll() is not None:
            raise RuntimeError(f"node {self.name}: driver exited with {self.process.returncode}; see {self.log_path}")

    @property
    def kubelet(self) -> Kubelet:
        if self._kubelet is None:
            self._kubelet = Kubelet(str(self.socket_path), self.kubelet_dir, node_name=self.name)
        return self._kubelet

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the driver (SIGKILL after ``timeout``), then remove every mount under the node's pods dir."""
        if self._kubelet is not None:
            self._kubelet.close()
            self._kubelet = None
        if self.process is not None:
            stop_gracefully(self.process, timeout)
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        _unshare(self.pods_dir)


def start_nodes(nodes: Sequence[SimulatedNode], timeout: float = 60.0) -> list[float]:
    """Launch every node first, then wait for each: start-up overlaps, as on a cluster."""
    try:
        for node in nodes:
            node.launch()
        return [node.wait_ready(timeout) for node in nodes]
    except BaseException:
        stop_nodes(nodes)
        raise


def stop_nodes(nodes: Sequence[SimulatedNode]) -> None:
    for node in nodes:
        with contextlib.suppress(Exception):
            node.stop()


def _share(path: pathlib.Path) -> None:
    """Make ``path`` a shared mount of its own, as kubelet's pods dir is on a node (idempotent)."""
    path.mkdir(parents=True, exist_ok=True)
    if not _is_mount_point(path):
        subprocess.run(["mount", "--bind", str(path), str(path)], check=True, capture_output=True)
    subprocess.run(["mount", "--make-shared", str(path)], check=True, capture_output=True)


def _unshare(path: pathlib.Path) -> None:
    """Unmount ``path`` and everything below it (modules a driver left mounted, then the bind itself)."""
    if _is_mount_point(path):
        subprocess.run(["umount", "--recursive", str(path)], check=False, capture_output=True)


def _is_mount_point(path: pathlib.Path) -> bool:
    resolved = str(path.resolve())
    with open("/proc/self/mountinfo", encoding="utf-8") as table:
        return any(_unescape(line.split(" ", 5)[4]) == resolved for line in table)


def _unescape(field: str) -> str:
    # mountinfo octal-escapes space, tab, newline and backslash in paths
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


__all__ = ["SimulatedNode", "start_nodes", "stop_nodes", "mirrored_registry_config"]
