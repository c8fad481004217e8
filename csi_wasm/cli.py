"""``csi-wasm``: the command line. The only place that reads the environment.

An operator's mistake (a bad flag or environment value, a path that is not there, a port
in use) ends with one line on stderr naming it and exit code 2, before anything is
created or removed: no traceback, no directory made on a mistyped path, no file replaced.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import signal
import sys
import threading
from typing import TYPE_CHECKING, Callable, Mapping, NoReturn, Sequence

from csi_wasm import __version__
from csi_wasm.config import (
    ConfigError,
    DriverConfig,
    NodeConfig,
    UsageError,
    check_files,
    describe,
    load_node_config,
    socket_path_of,
)
from csi_wasm.credentials import load_docker_config
from csi_wasm.logs import configure, event

if TYPE_CHECKING:
    from csi_wasm.http import MetricsServer
    from csi_wasm.metrics import Metrics

log = logging.getLogger("csi_wasm.cli")
DEFAULT_DRIVER_NAME = "csi-wasm.dev"
DEFAULT_ENDPOINT = "unix:///csi/csi.sock"
DEFAULT_STATE_DIR = "/var/lib/csi-wasm"
DEFAULT_KUBELET_DIR = "/var/lib/kubelet"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
DEFAULT_MODULE_SIZE = 256 * 1024


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (what is wrong, where to look) and exit 2, without the usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if environ is None else environ
    parser = _Parser(prog="csi-wasm", description="CSI driver that mounts WebAssembly modules into pods")
    parser.add_argument("--version", action="version", version=f"csi-wasm {__version__}")
    _log_options(parser, default=None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the CSI Identity and Node services (the DaemonSet's job)",
                                description="Serve the CSI Identity and Node services on a unix socket.")  # fmt: skip
    serve.add_argument("--endpoint", default=env.get("CSI_ENDPOINT", DEFAULT_ENDPOINT), metavar="unix:///PATH",
                       help="the unix socket to serve on; its directory must exist "
                            f"(env CSI_ENDPOINT; default: {DEFAULT_ENDPOINT})")  # fmt: skip
    serve.add_argument("--node-id", default=env.get("NODE_ID", ""), metavar="NAME",
                       help="this node's name, reported to kubelet (env NODE_ID; required)")  # fmt: skip
    serve.add_argument("--driver-name", default=env.get("DRIVER_NAME", DEFAULT_DRIVER_NAME), metavar="NAME",
                       help=f"the CSI driver name pods use (env DRIVER_NAME; default: {DEFAULT_DRIVER_NAME})")  # fmt: skip
    _state_dir_option(serve)
    serve.add_argument("--kubelet-dir", type=pathlib.Path, default=pathlib.Path(DEFAULT_KUBELET_DIR), metavar="DIR",
                       help="kubelet's root directory; targets must lie in its pods/ "
                            f"(default: {DEFAULT_KUBELET_DIR})")  # fmt: skip
    serve.add_argument("--metrics-address", default=env.get("METRICS_ADDRESS", ""), metavar="HOST:PORT",
                       help="serve /metrics and /healthz on this TCP address, e.g. 0.0.0.0:9808 "
                            "(env METRICS_ADDRESS; default: off)")  # fmt: skip
    _config_option(serve)
    _insecure_option(serve)
    _log_options(serve, default=argparse.SUPPRESS)

    pull = commands.add_parser("pull", help="warm the node's store with modules ahead of pods",
                               description="Pull modules into the node's store (for pullPolicy Never, or warm-up).")  # fmt: skip
    _state_dir_option(pull)
    _config_option(pull)
    _insecure_option(pull)
    _log_options(pull, default=argparse.SUPPRESS)
    pull.add_argument("images", nargs="+", metavar="IMAGE",
                      help="OCI references, registry/repository:tag or registry/repository@sha256:DIGEST")  # fmt: skip

    store = commands.add_parser("store", help="inspect and maintain the node's module store")
    store_commands = store.add_subparsers(dest="store_command", required=True, metavar="STORE_COMMAND")
    _state_dir_option(store_commands.add_parser("list", help="modules with size, references and last use"))
    _state_dir_option(store_commands.add_parser("verify", help="rehash every module; quarantine corrupt ones"))
    gc = store_commands.add_parser("gc", help="collect unreferenced modules now (asks the running driver if there is one)")
    _state_dir_option(gc)
    _config_option(gc, "the node configuration whose store settings (grace period, cap) apply")

    demo = commands.add_parser("demo", help="run the driver end to end against a local registry (needs root)")
    demo.add_argument("--module-size", type=_positive_int, default=DEFAULT_MODULE_SIZE, metavar="BYTES",
                      help=f"size of the demo module in bytes (default: {DEFAULT_MODULE_SIZE})")  # fmt: skip
    demo.add_argument("--keep", action="store_true", help="keep the demo's temp directory (default: removed)")
    return parser


def _log_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    """Accepted before the command and after it (a subcommand's copy leaves the value alone unless given)."""
    parser.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default=default,
                        help="debug, info, warning or error (env LOG_LEVEL; default: info)")  # fmt: skip
    parser.add_argument("--log-format", type=str.lower, choices=LOG_FORMATS, default=default,
                        help="text (one line per event) or json (one object per line) (env LOG_FORMAT; default: text)")  # fmt: skip


def _state_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=pathlib.Path, default=pathlib.Path(DEFAULT_STATE_DIR), metavar="DIR",
                        help=f"where the module store and volume records live, a hostPath (default: {DEFAULT_STATE_DIR})")  # fmt: skip


def _config_option(parser: argparse.ArgumentParser, text: str = "the node configuration file (YAML)") -> None:
    parser.add_argument("--config", type=pathlib.Path, default=None, metavar="FILE",
                        help=f"{text}; README 'Node configuration' lists every key (default: built-in defaults)")  # fmt: skip


def _insecure_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--insecure-registry", action="append", default=[], metavar="HOST:PORT",
                        help="a registry reached over plain HTTP, repeatable; all others use verified TLS (default: none)")  # fmt: skip


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of bytes, got {text!r}")
    return int(text)


def node_config(args: argparse.Namespace) -> NodeConfig:
    config = load_node_config(args.config) if args.config else NodeConfig()
    check_files(config)
    if config.docker_config:  # read now, before anything is created: the driver reads it again at start
        load_docker_config(pathlib.Path(config.docker_config))
    return config.with_insecure(getattr(args, "insecure_registry", []))


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    args = build_parser(env).parse_args(argv)
    try:
        configure(*_log_settings(args, env))
        return _run(args)
    except UsageError as exc:
        print(f"csi-wasm: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"csi-wasm: configuration error: {exc}", file=sys.stderr)
        return 2


def _log_settings(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[str, str]:
    """Flags win over the environment; an environment value is checked as strictly as a flag."""
    settings = []
    for flag, variable, allowed, default in (("log_level", "LOG_LEVEL", LOG_LEVELS, "info"),
                                             ("log_format", "LOG_FORMAT", LOG_FORMATS, "text")):  # fmt: skip
        value = getattr(args, flag) or env.get(variable, "").strip().lower() or default
        if value not in allowed:
            raise UsageError(f"{variable}={env.get(variable, '')[:40]!r}: expected one of {', '.join(allowed)}")
        settings.append(value)
    return settings[0], settings[1]


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return _serve(args)
    if args.command == "pull":
        return _pull(args)
    if args.command == "store":
        from csi_wasm import store_cli

        config = node_config(args) if args.store_command == "gc" else NodeConfig()
        return store_cli.run(args.store_command, args.state_dir, config)
    if args.command == "demo":
        from csi_wasm.demo.run import run_demo

        return run_demo(args.module_size, args.keep)
    raise AssertionError(args.command)


def prepare_state_dir(state_dir: pathlib.Path) -> None:
    """Create the state dir itself if needed, never a missing parent: a mistyped path fails here."""
    if state_dir.is_dir():
        return
    if state_dir.exists():
        raise UsageError(f"--state-dir {state_dir}: exists and is not a directory")
    if not state_dir.parent.is_dir():
        raise UsageError(
            f"--state-dir {state_dir}: its parent {state_dir.parent} does not exist; fix the path or create it"
        )
    state_dir.mkdir(mode=0o755)
    event(log, "state_dir.created", state_dir=str(state_dir))


def _serve(args: argparse.Namespace) -> int:
    from csi_wasm.endpoint import check_endpoint, refuse_live_socket
    from csi_wasm.metrics import Metrics
    from csi_wasm.server import Driver, serve

    config = DriverConfig(
        driver_name=args.driver_name,
        node_id=args.node_id,
        endpoint=args.endpoint,
        state_dir=args.state_dir,
        kubelet_dir=args.kubelet_dir,
        node=node_config(args),
    )
    # Every check that can fail on an operator's mistake runs before anything is created.
    socket_path = pathlib.Path(socket_path_of(config.endpoint))
    check_endpoint(socket_path)
    if not config.state_dir.exists():
        refuse_live_socket(socket_path)  # no driver can hold a state dir that is not there: not a hand-over
    metrics = Metrics()
    driver: Driver | None = None
    metrics_server = _metrics_server(args.metrics_address, metrics, lambda: driver is not None and driver.is_ready())
    try:
        prepare_state_dir(config.state_dir)
        if not config.kubelet_dir.is_dir():
            event(log, "kubelet_dir.missing", logging.WARNING, kubelet_dir=str(config.kubelet_dir),
                  why="publishes fail until it exists; check --kubelet-dir (csi-sanity creates its own later)")  # fmt: skip
        event(log, "config", version=__version__, node=describe(config.node))
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        driver = Driver(config, metrics=metrics)
        signal.signal(signal.SIGUSR1, lambda *_: driver.gc.trigger() if driver else None)  # `csi-wasm store gc`
        serve(driver, stop)
    finally:
        if metrics_server is not None:
            metrics_server.stop()
    return 0


def _metrics_server(address: str, metrics: Metrics, is_ready: Callable[[], bool]) -> MetricsServer | None:
    """Bound first, so a bad address or a port in use stops the start before anything is created."""
    if not address:
        return None
    from csi_wasm.http import MetricsServer, parse_address

    host, port = parse_address(address)
    server = MetricsServer(host, port, metrics.registry, is_ready).start()
    event(log, "metrics", address=f"{host}:{server.port}")
    return server


def _pull(args: argparse.Namespace) -> int:
    from csi_wasm.errors import DriverError
    from csi_wasm.metrics import Metrics
    from csi_wasm.pull import ModuleRequest, Puller
    from csi_wasm.reference import parse_reference
    from csi_wasm.registry import RegistryClient
    from csi_wasm.store import ModuleStore

    node = node_config(args)
    prepare_state_dir(args.state_dir)
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
            except Exception as exc:  # noqa: BLE001 - one line per image, and the others are still pulled
                print(f"{image}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
                failed += 1
                continue
            print(f"{image}: {module.digest} {module.size} bytes ({'already stored' if module.from_cache else 'pulled'})")
    finally:
        puller.close()
    return 1 if failed else 0
