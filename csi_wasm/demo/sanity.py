"""``python -m csi_wasm.demo.sanity WORKDIR``: the registry and the driver that csi-sanity runs against.

``scripts/sanity.sh`` runs this inside its private mount namespace. It starts the
embedded registry, pushes the demo module, writes the volume parameters file it
hands csi-sanity, serves the real driver on ``WORKDIR/csi/csi.sock`` with kubelet's
directory at ``WORKDIR/kubelet`` (csi-sanity's mount dir lies under its ``pods``),
then writes ``WORKDIR/ready`` and waits for SIGTERM or SIGINT. It stops the driver
and the registry before it exits, whatever happened.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Sequence

import yaml

from csi_wasm.config import DriverConfig, NodeConfig
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.logs import configure, event
from csi_wasm.server import BackgroundServer, Driver

log = logging.getLogger("csi_wasm.demo.sanity")
DRIVER_NAME = "csi-wasm.dev"
NODE_ID = "sanity-node"
DEMO_REPOSITORY = "demo/filters/hello"
DEMO_TAG = "v1"
MODULE_SIZE = 64 * 1024


@dataclass(frozen=True)
class SanityLayout:
    """Where everything lives under the run's work directory (scripts/sanity.sh uses the same names)."""

    workdir: pathlib.Path

    @property
    def endpoint(self) -> str:
        return f"unix://{self.workdir}/csi/csi.sock"

    @property
    def kubelet_dir(self) -> pathlib.Path:
        return self.workdir / "kubelet"

    @property
    def state_dir(self) -> pathlib.Path:
        return self.workdir / "state"

    @property
    def registry_dir(self) -> pathlib.Path:
        return self.workdir / "registry"

    @property
    def parameters_file(self) -> pathlib.Path:
        return self.workdir / "volume-parameters.yaml"

    @property
    def ready_file(self) -> pathlib.Path:
        return self.workdir / "ready"


def serve_for_sanity(layout: SanityLayout, stop: threading.Event) -> None:
    """Registry up, demo module pushed, driver serving; then wait for ``stop`` and tear both down."""
    registry = LocalRegistry(layout.registry_dir).start()
    server: BackgroundServer | None = None
    try:
        pushed = Pusher(registry.host).wasm_artifact(DEMO_REPOSITORY, DEMO_TAG, make_module(MODULE_SIZE, "sanity"))
        # csi-sanity hands these to CreateVolume only; a node-only driver never sees them (README).
        layout.parameters_file.write_text(yaml.safe_dump({"image": pushed.reference}))
        config = DriverConfig(
            driver_name=DRIVER_NAME,
            node_id=NODE_ID,
            endpoint=layout.endpoint,
            state_dir=layout.state_dir,
            kubelet_dir=layout.kubelet_dir,
            node=NodeConfig().with_insecure([registry.host]),
        )
        pathlib.Path(config.socket_path).parent.mkdir(exist_ok=True)  # the driver binds only in an existing dir
        server = BackgroundServer(Driver(config))
        _write_atomically(layout.ready_file, f"{pushed.reference}\n")
        event(log, "sanity.ready", endpoint=layout.endpoint, image=pushed.reference)
        stop.wait()
    finally:
        if server is not None:
            server.stop()
        registry.stop()
        event(log, "sanity.stopped")


def _write_atomically(path: pathlib.Path, text: str) -> None:
    """The script polls for ``path``: it must never see it half-written."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m csi_wasm.demo.sanity", description=__doc__)
    parser.add_argument("workdir", type=pathlib.Path, help="an empty directory of this run (kubelet/pods made already)")
    args = parser.parse_args(argv)
    configure("info")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    serve_for_sanity(SanityLayout(args.workdir.resolve()), stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
