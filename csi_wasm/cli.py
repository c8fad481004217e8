"""``csi-wasm``: the command line. The only place that reads the environment."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import signal
import sys
import threading
from typing import Sequence

from csi_wasm import __version__
from csi_wasm.config import ConfigError, DriverConfig, NodeConfig, check_files, describe, load_node_config
from csi_wasm.logs import configure, event

log = logging.getLogger("csi_wasm.cli")
DEFAULT_DRIVER_NAME = "csi-wasm.dev"
DEFAULT_ENDPOINT = "unix:///csi/csi.sock"
DEFAULT_STATE_DIR = "/var/lib/csi-wasm"
DEFAULT_KUBELET_DIR = "/var/lib/kubelet"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csi-wasm", description="CSI driver that mounts Wasm modules into pods")
    parser.add_argument("--version", action="version", version=f"csi-wasm {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])  # fmt: skip
    parser.add_argument("--log-format", default=os.environ.get("LOG_FORMAT", "text"), choices=["text", "json"])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the CSI Identity and Node services (the DaemonSet's job)")
    _node_options(serve)
    serve.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", DEFAULT_ENDPOINT),
                       help="unix socket URL or path (env CSI_ENDPOINT)")  # fmt: skip
    serve.add_argument("--node-id", default=os.environ.get("NODE_ID", ""), help="this node's name (env NODE_ID)")
    serve.add_argument("--driver-name", default=os.environ.get("DRIVER_NAME", DEFAULT_DRIVER_NAME))
    serve.add_argument("--kubelet-dir", type=pathlib.Path, default=pathlib.Path(DEFAULT_KUBELET_DIR))
    serve.add_argument("--metrics-address", default=os.environ.get("METRICS_ADDRESS", ""), metavar="HOST:PORT",
                       help="serve /metrics and /healthz here (off when empty)")  # fmt: skip

    pull = commands.add_parser("pull", help="warm the node's store with modules ahead of pods")
    _node_options(pull)
    pull.add_argument("images", nargs="+")

    store = commands.add_parser("store", help="inspect and maintain the node's module store")
    store_commands = store.add_subparsers(dest="store_command", required=True)
    for name, text in (("list", "modules with size, references and last use"),
                       ("gc", "collect unreferenced modules now (asks the running driver if there is one)"),
                       ("verify", "rehash every module; quarantine corrupt ones")):  # fmt: skip
        sub = store_commands.add_parser(name, help=text)
        _node_options(sub)

    demo = commands.add_parser("demo", help="run the driver end to end against a local registry (needs root)")
    demo.add_argument("--module-size", type=int, default=256 * 1024)
    demo.add_argument("--keep", action="store_true", help="keep the demo's temp directory")
    return parser


def _node_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=pathlib.Path, default=pathlib.Path(DEFAULT_STATE_DIR),
                        help="where the module store and volume records live (a hostPath)")  # fmt: skip
    parser.add_argument("--config", type=pathlib.Path, default=None, help="node configuration file (YAML)")
    parser.add_argument("--insecure-registry", action="append", default=[], metavar="HOST:PORT",
                        help="registry reached over plain HTTP (repeatable); all others use verified TLS")  # fmt: skip


def node_config(args: argparse.Namespace) -> NodeConfig:
    config = load_node_config(args.config) if args.config else NodeConfig()
    check_files(config)
    return config.with_insecure(args.insecure_registry)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure(args.log_level, args.log_format)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "pull":
            return _pull(args)
        if args.command == "store":
            from csi_wasm import store_cli

            return store_cli.run(args.store_command, args.state_dir, node_config(args))
        if args.command == "demo":
            from csi_wasm.demo.run import run_demo

            return run_demo(args.module_size, args.keep)
    except ConfigError as exc:
        print(f"csi-wasm: configuration error: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)


def _serve(args: argparse.Namespace) -> int:
    from csi_wasm.server import Driver, serve

    config = DriverConfig(
        driver_name=args.driver_name,
        node_id=args.node_id,
        endpoint=args.endpoint,
        state_dir=args.state_dir,
        kubelet_dir=args.kubelet_dir,
        node=node_config(args),
    )
    event(log, "config", version=__version__, node=describe(config.node))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    driver = Driver(config)
    signal.signal(signal.SIGUSR1, lambda *_: driver.gc.trigger())  # `csi-wasm store gc` on a live node
    metrics_server = None
    if args.metrics_address:
        from csi_wasm.http import MetricsServer, parse_address

        host, port = parse_address(args.metrics_address)
        metrics_server = MetricsServer(host, port, driver.metrics.registry, driver.is_ready).start()
        event(log, "metrics", address=f"{host}:{metrics_server.port}")
    try:
        serve(driver, stop)
    finally:
        if metrics_server is not None:
            metrics_server.stop()
    return 0


def _pull(args: argparse.Namespace) -> int:
    from csi_wasm.errors import DriverError
    from csi_wasm.metrics import Metrics
    from csi_wasm.pull import ModuleRequest, Puller
    from csi_wasm.reference import parse_reference
    from csi_wasm.registry import RegistryClient
    from csi_wasm.store import ModuleStore

    node = node_config(args)
    metrics = Metrics(process=False)
    store = ModuleStore(args.state_dir / "store", node.store.min_free_bytes)
    puller = Puller(store, RegistryClient(node), node.pull, metrics)
    failed = 0
    try:
        for image in args.images:
            try:
                module = puller.ensure(ModuleRequest(parse_reference(image)))
            except DriverError as exc:
                print(f"{image}: FAILED: {exc}", file=sys.stderr)
                failed += 1
                continue
            print(f"{image}: {module.digest} {module.size} bytes ({'already stored' if module.from_cache else 'pulled'})")
    finally:
        puller.close()
    return 1 if failed else 0
