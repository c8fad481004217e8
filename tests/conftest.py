"""Shared fixtures: a real registry, a real driver on a real unix socket, real mounts.

The whole test session runs in a private mount namespace (entered before any
thread starts), so no bind mount made by a test can reach the host. Inside it,
every kubelet pods dir is made a shared mount of its own (``share_directory``),
as it is on a node: the driver refuses to start otherwise.
"""

from __future__ import annotations

import contextlib
import pathlib
import subprocess
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import grpc
import pytest

from csi_wasm.config import DriverConfig, NodeConfig, PullConfig
from csi_wasm.demo.kubelet import InlineVolume, Kubelet, new_pod_uid
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.registry import LocalRegistry, RegistryAuth
from csi_wasm import syscalls
from csi_wasm.mounts import LinuxMounter, Mounter, enter_private_mount_namespace, read_mountinfo, unmount_path
from csi_wasm.registry import RegistryClient
from csi_wasm.server import BackgroundServer, Driver
from csi_wasm.targets import Targets
from csi_wasm.topology import share_directory

if TYPE_CHECKING:
    from faultproxy import FaultProxy

DRIVER_NAME = "csi-wasm.dev"


def pytest_configure(config: pytest.Config) -> None:
    enter_private_mount_namespace()


@pytest.fixture(scope="session", autouse=True)
def _no_mounts_left_in_temp_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Shared pods dirs of drivers run as subprocesses outlive their tests: unmount them at the end."""
    yield
    base = f"{tmp_path_factory.getbasetemp()}/"
    for point in sorted((m.mount_point for m in LinuxMounter().mounts() if m.mount_point.startswith(base)), reverse=True):
        unmount_path(pathlib.Path(point))


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    with LocalRegistry(tmp_path_factory.mktemp("registry")) as running:
        yield running


@pytest.fixture
def proxy(registry: LocalRegistry) -> Iterator["FaultProxy"]:
    """Our fault-injecting HTTP proxy in front of the shared registry (tests/faultproxy.py)."""
    from faultproxy import FaultProxy

    with FaultProxy(registry.host) as running:
        yield running


@pytest.fixture
def proxied_csi(tmp_path: pathlib.Path, proxy: "FaultProxy") -> Iterator[RunningDriver]:
    """A driver whose pods name the shared registry through the fault proxy (``proxy.host``)."""
    running = start_driver(tmp_path, NodeConfig(pull=fast_pull_config()).with_insecure([proxy.host]))
    yield running
    stop_driver(running)


@pytest.fixture(scope="session")
def pusher(registry: LocalRegistry) -> Pusher:
    return Pusher(registry.host)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


PRIVATE_AUTH = RegistryAuth("wasm-reader", "s3cret-Pa55word")


@pytest.fixture(scope="session")
def private_registry(
    tmp_path_factory: pytest.TempPathFactory, tls_files: tuple[pathlib.Path, pathlib.Path]
) -> Iterator[LocalRegistry]:
    """A registry with TLS (self-signed) and basic auth, like a private in-house registry."""
    with LocalRegistry(tmp_path_factory.mktemp("private-registry"), auth=PRIVATE_AUTH, tls=tls_files) as running:
        yield running


@pytest.fixture(scope="session")
def private_pusher(private_registry: LocalRegistry, tls_files: tuple[pathlib.Path, pathlib.Path]) -> Pusher:
    return Pusher(
        private_registry.host, "https", (PRIVATE_AUTH.username, PRIVATE_AUTH.password), verify=str(tls_files[0])
    )


@dataclass
class RunningDriver:
    driver: Driver
    kubelet: Kubelet
    config: DriverConfig
    server: BackgroundServer
    volumes: list[InlineVolume] = field(default_factory=list)

    def volume(self, image: str, **attributes: str) -> InlineVolume:
        return self.inline(attributes | {"image": image})

    def inline(self, attributes: dict[str, str], secrets: dict[str, str] | None = None) -> InlineVolume:
        volume = InlineVolume(new_pod_uid(), "app", "default", "wasm", attributes, secrets or {})
        self.volumes.append(volume)
        return volume

    def mounts_under_kubelet(self) -> list[str]:
        """Mounts in kubelet's pods tree (the pods dir's own shared mount, as on a node, not counted)."""
        prefix = f"{self.config.kubelet_dir}/pods/"
        return [m.mount_point for m in LinuxMounter().mounts() if m.mount_point.startswith(prefix)]


def start_driver(
    tmp_path: pathlib.Path, node: NodeConfig, mounter: Mounter | None = None, registry_client: RegistryClient | None = None
) -> RunningDriver:
    config = DriverConfig(
        driver_name=DRIVER_NAME,
        node_id="test-node",
        endpoint=f"unix://{tmp_path}/csi/csi.sock",
        state_dir=tmp_path / "state",
        kubelet_dir=tmp_path / "kubelet",
        node=node,
    )
    share_directory(config.kubelet_dir / "pods")
    pathlib.Path(config.socket_path).parent.mkdir(parents=True, exist_ok=True)  # kubelet's plugin dir exists
    server = BackgroundServer(Driver(config, mounter=mounter, registry_client=registry_client))
    return RunningDriver(server.driver, Kubelet(config.socket_path, config.kubelet_dir), config, server)


def stop_driver(running: RunningDriver) -> None:
    running.kubelet.close()
    running.server.stop()
    for mount_point in sorted(running.mounts_under_kubelet(), reverse=True):
        unmount_path(pathlib.Path(mount_point))
    unmount_path(running.config.kubelet_dir / "pods")


def fast_pull_config() -> PullConfig:
    return PullConfig(connect_timeout_seconds=2.0, read_timeout_seconds=5.0, attempts=2)


@pytest.fixture
def node_config(registry: LocalRegistry) -> NodeConfig:
    return NodeConfig(pull=fast_pull_config()).with_insecure([registry.host])


@pytest.fixture
def csi(tmp_path: pathlib.Path, node_config: NodeConfig) -> Iterator[RunningDriver]:
    running = start_driver(tmp_path, node_config)
    yield running
    stop_driver(running)
    assert not any(running.driver.store.tmp_dir.iterdir()), "partial download left in the store"


def code_of(call: object) -> grpc.StatusCode:
    """Run a zero-argument callable expected to fail with an RpcError; return its status code."""
    with pytest.raises(grpc.RpcError) as failure:
        call()  # type: ignore[operator]
    return failure.value.code()


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll until ``condition`` holds (for logs written after the response); False on timeout.

    The timeout is only how long to wait before calling a test failed, never a claim about speed: it is
    generous because a passing run never waits for it and the 2-core machine is shared."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@dataclass
class DriverProcess:
    """The driver run by its real CLI in a subprocess (for restarts, SIGTERM and kill -9)."""

    args: list[str]
    socket: str
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> DriverProcess:
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stderr.read().decode() if self.process.stderr else ""
            if pathlib.Path(self.socket).exists() and self._ready():
                return self
            time.sleep(0.05)
        raise AssertionError("driver subprocess did not become ready")

    def _ready(self) -> bool:
        from csi_wasm._gen import csi_pb2, csi_pb2_grpc

        with grpc.insecure_channel(f"unix://{self.socket}") as channel:
            try:
                response = csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=2)
            except grpc.RpcError:
                return False
        return response.ready.value

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(60)


def driver_process(tmp_path: pathlib.Path, *extra: str, global_args: tuple[str, ...] = ()) -> DriverProcess:
    import sys

    socket = str(tmp_path / "csi" / "csi.sock")
    share_directory(tmp_path / "kubelet" / "pods")
    (tmp_path / "csi").mkdir(exist_ok=True)
    args = [sys.executable, "-m", "csi_wasm", *global_args, "serve", "--endpoint", f"unix://{socket}", "--node-id", "test-node",
            "--driver-name", DRIVER_NAME, "--state-dir", str(tmp_path / "state"),
            "--kubelet-dir", str(tmp_path / "kubelet"), *extra]  # fmt: skip
    return DriverProcess(args, socket)


# -- mount helpers shared by the mount tests ---------------------------------------------------------


@contextlib.contextmanager
def read_only(directory: pathlib.Path) -> Iterator[None]:
    """``directory`` on a read-only bind of itself, as if its filesystem had been remounted read-only."""
    syscalls.mount(bytes(directory), bytes(directory), syscalls.MS_BIND)
    try:
        syscalls.mount(b"none", bytes(directory), syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_RDONLY)
        yield
    finally:
        unmount_path(directory)


@contextlib.contextmanager
def mount_tree(root: pathlib.Path, module: bytes) -> Iterator[tuple[pathlib.Path, pathlib.Path, Targets]]:
    """A view directory holding ``module``, and kubelet's pods dir as a shared mount with a pod's volume dir:
    (view, target, targets). Every mount made under ``root`` is removed afterwards."""
    view = root / "store" / "views" / "x" / "plugin.wasm"
    view.mkdir(parents=True)
    (view / "plugin.wasm").write_bytes(module)
    share_directory(root / "kubelet" / "pods")
    volume_dir = root / "kubelet" / "pods" / "uid" / "volumes" / "kubernetes.io~csi" / "vol"
    volume_dir.mkdir(parents=True)
    try:
        yield view, volume_dir / "mount", Targets(root / "kubelet")
    finally:
        for point in sorted((m.mount_point for m in read_mountinfo() if m.mount_point.startswith(f"{root}/")), reverse=True):
            unmount_path(pathlib.Path(point))
