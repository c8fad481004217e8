"""Assemble the driver (constructor injection) and serve it on the CSI unix socket."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import pathlib
import threading
import time
from typing import Callable

import grpc

from csi_wasm._gen import csi_pb2_grpc
from csi_wasm.config import DriverConfig, UsageError
from csi_wasm.credentials import Keychain, load_docker_config
from csi_wasm.endpoint import SocketBinding, clear_stale_socket, sweep_stale_bindings
from csi_wasm.errors import DriverError
from csi_wasm.gc import GarbageCollector
from csi_wasm.logs import event
from csi_wasm.metrics import Metrics
from csi_wasm.mounts import LinuxMounter, Mounter
from csi_wasm.pins import Pins
from csi_wasm.publish import Publisher
from csi_wasm.pull import ModuleRequest, Puller
from csi_wasm.records import RecordStore
from csi_wasm.reference import parse_reference
from csi_wasm.recovery import RecoveryReport, recover
from csi_wasm.registry import RegistryClient
from csi_wasm.servicers import IdentityServicer, NodeServicer
from csi_wasm.statedir import StateDirLock
from csi_wasm.store import ModuleStore
from csi_wasm.topology import require_shared_pods_dir

log = logging.getLogger("csi_wasm.server")
# gRPC workers beyond the publishes that may wait on registries (pull.max_pulling_publishes, enforced by
# csi_wasm.admission): Probe, capabilities, unpublish and publishes of stored modules always find one.
FAST_WORKERS = 16
STOP_GRACE_SECONDS = 30.0


class Driver:
    """Everything one node process runs. Seams (mounter, registry client, metrics) are injectable."""

    def __init__(
        self,
        config: DriverConfig,
        metrics: Metrics | None = None,
        mounter: Mounter | None = None,
        registry_client: RegistryClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        require_shared_pods_dir(self.pods_dir)  # before anything is created: a refused start leaves nothing
        self.metrics = metrics or Metrics()
        self.mounter = mounter or LinuxMounter(staging_dir=config.state_dir / "staging")
        self.store = ModuleStore(config.state_dir / "store", config.node.store.min_free_bytes)
        self.records = RecordStore(config.state_dir / "volumes")
        self.client = registry_client or RegistryClient(config.node)
        self.puller = Puller(
            self.store, self.client, config.node.pull, self.metrics, config.node.store.auth_cache_seconds, clock
        )
        keychain = load_docker_config(pathlib.Path(config.node.docker_config)) if config.node.docker_config else Keychain()
        self.pins = Pins()
        self.publisher = Publisher(
            config.kubelet_dir, self.store, self.records, self.puller, self.mounter, self.metrics, self.pins, keychain
        )
        self.gc = GarbageCollector(
            self.store, self.records, self.pins, config.node.store, self.metrics, protected=self.protected_from_gc
        )
        self._prepulled: set[str] = set()
        self.metrics.watch_store(lambda: {m.digest: m.size for m in self.store.modules()}, self.records.references)
        self.metrics.watch_store_space(self.store.root, config.node.store)
        self._ready = threading.Event()
        self.metrics.watch_readiness(self.is_ready)
        self._stop_background = threading.Event()

    def prepulled(self) -> set[str]:
        return set(self._prepulled)

    def protected_from_gc(self) -> set[str]:
        return self.prepulled() | self.puller.recently_landed()

    def start_background(self) -> None:
        """Pre-pull configured modules, then collect garbage every ``gc_interval_seconds``."""
        threading.Thread(target=self._prepull, name="prepull", daemon=True).start()
        threading.Thread(
            target=self.gc.run_forever,
            args=(self.config.node.store.gc_interval_seconds, self._stop_background),
            name="gc",
            daemon=True,
        ).start()

    def _prepull(self) -> None:
        for image in self.config.node.prepull:
            try:
                module = self.puller.ensure(ModuleRequest(parse_reference(image)))
            except DriverError as exc:
                event(log, "prepull.failed", logging.WARNING, image=image, reason=exc.reason, error=str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - one image's failure must not end the pre-pull of the rest
                event(log, "prepull.failed", logging.ERROR, trace=True, image=image, reason="internal",
                      error=f"{type(exc).__name__}: {exc}")  # fmt: skip
                continue
            self._prepulled.add(module.digest)
            event(log, "prepull", image=image, digest=module.digest, cached=module.from_cache)

    @property
    def pods_dir(self) -> pathlib.Path:
        return pathlib.Path(os.path.realpath(self.config.kubelet_dir)) / "pods"

    def is_ready(self) -> bool:
        return self._ready.is_set()

    def recover(self) -> RecoveryReport:
        report = recover(self.store, self.records, self.mounter, self.publisher.targets, self.metrics)
        self._ready.set()
        return report

    def grpc_server(self) -> grpc.Server:
        workers = self.config.node.pull.max_pulling_publishes + FAST_WORKERS
        server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            options=[("grpc.so_reuseport", 0)],
        )
        csi_pb2_grpc.add_IdentityServicer_to_server(
            IdentityServicer(self.config.driver_name, self.is_ready), server
        )
        csi_pb2_grpc.add_NodeServicer_to_server(
            NodeServicer(self.config.node_id, self.publisher, self.metrics, self.is_ready), server
        )
        return server

    def close(self) -> None:
        self._stop_background.set()
        self.gc.trigger()
        self.puller.close()
        self.client.close()


def serve(driver: Driver, stop: threading.Event, on_ready: Callable[[], None] | None = None) -> None:
    """Serve until ``stop`` is set, then drain in-flight calls and remove our socket.

    The state dir is claimed first (a second driver on it waits here until the first has
    exited), and only then is the socket touched: a stale one is replaced, a live one or
    anything that is not a socket is refused (UsageError).
    """
    lock = StateDirLock(driver.config.state_dir)
    if not lock.acquire(stop):
        event(log, "stopped", why="stopped while waiting for the state dir")
        return
    try:
        socket_path = pathlib.Path(driver.config.socket_path)
        clear_stale_socket(socket_path)
        sweep_stale_bindings(socket_path)
        server = driver.grpc_server()
        binding = SocketBinding(socket_path)
        try:
            server.add_insecure_port(binding.address)
        except RuntimeError as exc:
            binding.close()
            raise UsageError(f"--endpoint unix://{socket_path}: cannot listen there ({exc})") from exc
        server.start()
        binding.publish()
        event(log, "serving", endpoint=str(socket_path), driver=driver.config.driver_name, node_id=driver.config.node_id)
        try:
            driver.recover()
            driver.start_background()
            if on_ready:
                on_ready()
            stop.wait()
        finally:
            event(log, "stopping", grace_seconds=STOP_GRACE_SECONDS)
            server.stop(STOP_GRACE_SECONDS).wait()
            binding.close()  # before the lock goes: a successor binds only once it holds the lock
            driver.close()
            event(log, "stopped")
    finally:
        lock.release()


class BackgroundServer:
    """``serve`` on a thread of this process, for the demo and the tests; ``stop`` drains and joins."""

    def __init__(self, driver: Driver, ready_timeout: float = 30.0) -> None:
        self.driver = driver
        self._stop = threading.Event()
        self._settled = threading.Event()  # ready, or serve() ended early
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._settled.wait(ready_timeout):
            self.stop()
            raise RuntimeError(f"driver did not become ready within {ready_timeout}s")
        if self._failure is not None or not self._thread.is_alive():
            self.stop()
            raise RuntimeError("driver stopped before it was ready") from self._failure

    def _serve(self) -> None:
        try:
            serve(self.driver, self._stop, self._settled.set)
        except BaseException as exc:  # handed to the constructor, which re-raises it in the caller's thread
            self._failure = exc
        finally:
            self._settled.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(STOP_GRACE_SECONDS * 2)
