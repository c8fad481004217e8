"""Assemble the driver (constructor injection) and serve it on the CSI unix socket."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import pathlib
import threading
from typing import Callable

import grpc

from csi_wasm._gen import csi_pb2_grpc
from csi_wasm.config import DriverConfig
from csi_wasm.credentials import Keychain, load_docker_config
from csi_wasm.logs import event
from csi_wasm.metrics import Metrics
from csi_wasm.mounts import LinuxMounter, Mounter
from csi_wasm.publish import Publisher
from csi_wasm.pull import Puller
from csi_wasm.records import RecordStore
from csi_wasm.recovery import RecoveryReport, recover
from csi_wasm.registry import RegistryClient
from csi_wasm.servicers import IdentityServicer, NodeServicer
from csi_wasm.store import ModuleStore

log = logging.getLogger("csi_wasm.server")
GRPC_WORKERS = 16
STOP_GRACE_SECONDS = 30.0


class Driver:
    """Everything one node process runs. Seams (mounter, registry client, metrics) are injectable."""

    def __init__(
        self,
        config: DriverConfig,
        metrics: Metrics | None = None,
        mounter: Mounter | None = None,
        registry_client: RegistryClient | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.mounter = mounter or LinuxMounter()
        self.store = ModuleStore(config.state_dir / "store", config.node.store.min_free_bytes)
        self.records = RecordStore(config.state_dir / "volumes")
        self.client = registry_client or RegistryClient(config.node)
        self.puller = Puller(
            self.store, self.client, config.node.pull, self.metrics, config.node.store.auth_cache_seconds
        )
        keychain = load_docker_config(pathlib.Path(config.node.docker_config)) if config.node.docker_config else Keychain()
        self.publisher = Publisher(
            config.kubelet_dir, self.store, self.records, self.puller, self.mounter, self.metrics, keychain
        )
        self._ready = threading.Event()

    @property
    def pods_dir(self) -> pathlib.Path:
        return pathlib.Path(os.path.realpath(self.config.kubelet_dir)) / "pods"

    def is_ready(self) -> bool:
        return self._ready.is_set()

    def recover(self) -> RecoveryReport:
        report = recover(self.store, self.records, self.mounter, self.pods_dir, self.metrics)
        self._ready.set()
        return report

    def grpc_server(self) -> grpc.Server:
        server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS, thread_name_prefix="grpc"),
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
        self.puller.close()


def serve(driver: Driver, stop: threading.Event, on_ready: Callable[[], None] | None = None) -> None:
    """Serve until ``stop`` is set, then drain in-flight calls and remove the socket."""
    socket_path = pathlib.Path(driver.config.socket_path)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)  # a stale socket from a previous run blocks bind
    server = driver.grpc_server()
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    event(log, "serving", endpoint=str(socket_path), driver=driver.config.driver_name, node_id=driver.config.node_id)
    try:
        driver.recover()
        if on_ready:
            on_ready()
        stop.wait()
    finally:
        event(log, "stopping", grace_seconds=STOP_GRACE_SECONDS)
        server.stop(STOP_GRACE_SECONDS).wait()
        driver.close()
        socket_path.unlink(missing_ok=True)
        event(log, "stopped")
