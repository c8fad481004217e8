"""The metrics port: Prometheus text at ``/metrics`` and ``/healthz`` for the kubelet probe."""

from __future__ import annotations

import http.server
import ipaddress
import socket
import threading
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from csi_wasm.config import UsageError


class _IPv6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """Binds at construction, so a port in use is reported before the driver starts anything."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, is_healthy: Callable[[], bool]) -> None:
        handler = _handler(registry, is_healthy)
        server_class = _IPv6Server if ":" in host else http.server.ThreadingHTTPServer
        try:
            self._server = server_class((host, port), handler)
        except OSError as exc:
            raise UsageError(
                f"--metrics-address {_join(host, port)}: cannot listen there: {exc.strerror or exc} "
                "(is another process using the port? pick another or stop it)"
            ) from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` (all IPv4 interfaces) or ``[IPv6]:PORT`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    problem = None
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        problem = "expected HOST:PORT with a port from 0 to 65535, e.g. 0.0.0.0:9808"
    elif host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        problem = "write an IPv6 host in brackets, e.g. [::]:9808"
    elif host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            problem = f"{host} is not an IPv6 address"
    if problem:
        raise UsageError(f"--metrics-address {address[:100]!r}: {problem}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _handler(registry: CollectorRegistry, is_healthy: Callable[[], bool]) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                healthy = is_healthy()
                self._send(200 if healthy else 503, b"ok\n" if healthy else b"starting\n", "text/plain")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # scrapes every few seconds would drown the event log

    return Handler
