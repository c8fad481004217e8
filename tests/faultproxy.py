"""A fault-injecting HTTP(S) proxy to put in front of a real registry (tests and tools/soak.py).

``FaultProxy(upstream)`` listens on 127.0.0.1 and forwards each request to the
upstream registry, unless a rule matches the request line (``"GET /v2/..."``): then
the rule's fault answers instead, e.g.::

    proxy.add(r"GET /v2/app/blobs/", reset_after(1000), times=1)

Faults: ``status`` (any code, with headers such as Retry-After), ``reset_after``
(RST mid-body), ``truncate_after`` (FIN before Content-Length is reached),
``corrupt`` (same length, wrong bytes), ``stall_headers``/``stall_body`` (silence
until released), ``drip`` (the body a few bytes at a time), ``redirect_to``,
``redirect_loop``, ``oversized`` and ``endless_chunked`` bodies, ``drip_headers`` (the status
line and headers a byte at a time) and ``replace_body`` (the upstream's answer, rewritten). ``refuse()``
closes the listening socket (connection refused) and ``accept()`` reopens it on the
same port. Every request is recorded (``seen``/``count``), with its headers, so a
test can tell whether a retry happened, when, and which credentials went where; and
every fault that ran to its end without the client hanging up first (``finished``),
so a test can tell that a slow fault was cut short by the client, not waited out.
Nothing here ever connects anywhere but the upstream it was given.
"""

from __future__ import annotations

import fcntl
import http.client
import http.server
import re
import socket
import ssl
import struct
import termios
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

Upstream = tuple[int, list[tuple[str, str]], bytes]
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    at: float  # time.monotonic()

    @property
    def line(self) -> str:
        return f"{self.method} {self.path}"


class Exchange:
    """One request being answered: the fault writes raw bytes to ``sock``."""

    def __init__(self, proxy: FaultProxy, handler: http.server.BaseHTTPRequestHandler, seen: Seen) -> None:
        self.proxy = proxy
        self.handler = handler
        self.seen = seen
        self.sock: socket.socket = handler.connection
        self._counter = proxy._counter(seen)

    def write(self, data: bytes) -> None:
        """Send raw bytes, counted as they go (``FaultProxy.bytes_sent``)."""
        self.sock.sendall(data)
        with self.proxy._lock:
            self._counter[0] += len(data)

    def upstream(self) -> Upstream:
        return self.proxy.forward(self.seen)

    def send_head(self, status: int, headers: list[tuple[str, str]], length: int | None) -> None:
        reason = http.client.responses.get(status, "Status")
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [f"{k}: {v}" for k, v in headers if k.lower() not in _HOP_HEADERS]
        lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
        lines.append("Connection: close")
        self.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_head(status, headers, len(body))
        self.write(body)

    def reset(self) -> None:
        """Abort the connection with a TCP RST, once the client's kernel has every byte written so far.

        A close with SO_LINGER 0 throws away what is still in our send queue: without the wait, "reset after
        N bytes" would be a reset after fewer, however many the client's kernel had received by then.
        """
        self._wait_until_acknowledged()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def _wait_until_acknowledged(self, give_up_after: float = 10.0) -> None:
        """Until the send queue is empty (the client's kernel acknowledged it), the proxy is released, or a
        client that stopped reading has had ``give_up_after`` seconds."""
        deadline = time.monotonic() + give_up_after
        while _unacknowledged_bytes(self.sock) > 0 and time.monotonic() < deadline:
            if self.wait(0.001):
                return

    def wait(self, seconds: float) -> bool:
        """Sleep unless the proxy is released or stopped; True if it was."""
        return self.proxy.released.wait(seconds)


Fault = Callable[[Exchange], None]


def _unacknowledged_bytes(sock: socket.socket) -> int:
    """Bytes in the socket's send queue the peer has not acknowledged (SIOCOUTQ); 0 once it is closed."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])
    except (OSError, ValueError):
        return 0


def passthrough(ex: Exchange) -> None:
    code, headers, body = ex.upstream()
    if ex.seen.method == "HEAD":  # the upstream's length, and no body
        length = next((int(v) for k, v in headers if k.lower() == "content-length" and v.isdigit()), 0)
        ex.send_head(code, headers, length)
        return
    ex.send(code, headers, body)


def status(code: int, headers: dict[str, str] | None = None, body: bytes = b"") -> Fault:
    def fault(ex: Exchange) -> None:
        ex.send(code, list((headers or {}).items()), body)

    return fault


def reset_after(count: int) -> Fault:
    """Send the headers and ``count`` body bytes, then a TCP RST."""

    def fault(ex: Exchange) -> None:
        code, headers, body = ex.upstream()
        ex.send_head(code, headers, len(body))
        ex.write(body[: min(count, max(len(body) - 1, 0))])
        ex.reset()

    return fault


def truncate_after(count: int) -> Fault:
    """Announce the full Content-Length, send ``count`` bytes, close cleanly (FIN)."""

    def fault(ex: Exchange) -> None:
        code, headers, body = ex.upstream()
        ex.send_head(code, headers, len(body))
        ex.write(body[: min(count, max(len(body) - 1, 0))])
        ex.sock.shutdown(socket.SHUT_RDWR)

    return fault


def corrupt(ex: Exchange) -> None:
    """The right length, the wrong bytes (the last byte flipped)."""
    code, headers, body = ex.upstream()
    if body:
        body = body[:-1] + bytes([body[-1] ^ 0xFF])
    ex.send(code, headers, body)


def stall_headers(seconds: float = 300.0) -> Fault:
    """Accept the request and say nothing (until released)."""

    def fault(ex: Exchange) -> None:
        ex.wait(seconds)

    return fault


def hold(seconds: float = 300.0) -> Fault:
    """Say nothing until released (or ``seconds``), then answer as the upstream does."""

    def fault(ex: Exchange) -> None:
        ex.wait(seconds)
        passthrough(ex)

    return fault


def hold_tail(answer: bytes | None = None, count: int = 1, seconds: float = 300.0) -> Fault:
    """An answer (the upstream's, or 200 with ``answer``), Content-Length and all, but its last ``count``
    bytes, which wait for a release."""

    def fault(ex: Exchange) -> None:
        code, headers, body = ex.upstream() if answer is None else (200, [], answer)
        ex.send_head(code, headers, len(body))
        ex.write(body[:-count])
        ex.wait(seconds)
        ex.write(body[-count:])

    return fault


def stall_body(after: int = 16, seconds: float = 300.0) -> Fault:
    """Send the headers and ``after`` bytes, then nothing (until released)."""

    def fault(ex: Exchange) -> None:
        code, headers, body = ex.upstream()
        ex.send_head(code, headers, len(body))
        ex.write(body[:after])
        ex.wait(seconds)

    return fault


def drip(total_seconds: float, pieces: int = 40) -> Fault:
    """Send the whole body in ``pieces`` evenly over ``total_seconds`` (each gap under any read timeout)."""

    def fault(ex: Exchange) -> None:
        code, headers, body = ex.upstream()
        ex.send_head(code, headers, len(body))
        step = max(1, -(-len(body) // pieces))
        gap = total_seconds / max(1, -(-len(body) // step))
        for offset in range(0, len(body), step):
            if ex.wait(gap):  # released: the network is healthy again, send the rest at once
                ex.write(body[offset:])
                return
            ex.write(body[offset : offset + step])

    return fault


def redirect_to(location: str | Callable[[Seen], str], code: int = 307) -> Fault:
    def fault(ex: Exchange) -> None:
        target = location(ex.seen) if callable(location) else location
        ex.send(code, [("Location", target)], b"")

    return fault


def redirect_loop(ex: Exchange) -> None:
    """Redirect every request back to itself, forever."""
    path = re.sub(r"[?&]loop=\d+$", "", ex.seen.path)
    previous = re.search(r"loop=(\d+)$", ex.seen.path)
    number = (int(previous.group(1)) if previous else 0) + 1
    ex.send(307, [("Location", f"{path}{'&' if '?' in path else '?'}loop={number}")], b"")


def oversized(size: int) -> Fault:
    """A well-formed JSON body of ``size`` bytes, announced in Content-Length."""

    def fault(ex: Exchange) -> None:
        body = b'{"pad":"' + b"a" * max(0, size - 10) + b'"}'
        ex.send(200, [("Content-Type", "application/vnd.oci.image.manifest.v1+json")], body)

    return fault


def endless_chunked(
    chunk: int = 64 * 1024, limit: int = 2 * 1024**3, code: int = 200, prefix: bytes = b"", fill: bytes = b"\0"
) -> Fault:
    """A chunked body that never ends (until the client hangs up, or ``limit`` bytes as a safety stop).

    ``prefix`` goes first (e.g. a valid Wasm header, so a client cannot refuse it on its magic), then ``fill``.
    """

    def fault(ex: Exchange) -> None:
        ex.send_head(code, [("Content-Type", "application/vnd.oci.image.manifest.v1+json")], None)
        if prefix:
            ex.write(f"{len(prefix):x}\r\n".encode() + prefix + b"\r\n")
        piece = f"{chunk:x}\r\n".encode() + (fill * chunk)[:chunk] + b"\r\n"
        sent = 0
        while sent < limit and not ex.proxy.released.is_set():
            ex.write(piece)
            sent += chunk

    return fault


def drip_headers(gap: float = 0.5, total_seconds: float | None = None) -> Fault:
    """The upstream's answer, its status line and headers one byte every ``gap`` seconds (or spread evenly
    over ``total_seconds``), until released; then the body."""

    def fault(ex: Exchange) -> None:
        code, headers, body = ex.upstream()
        lines = [f"HTTP/1.1 {code} {http.client.responses.get(code, 'Status')}"]
        lines += [f"{k}: {v}" for k, v in headers if k.lower() not in _HOP_HEADERS]
        head = ("\r\n".join(lines + [f"Content-Length: {len(body)}", "Connection: close"]) + "\r\n\r\n").encode()
        pause = gap if total_seconds is None else total_seconds / len(head)
        for index in range(len(head)):
            if ex.wait(pause):
                ex.write(head[index:] + body)
                return
            ex.write(head[index : index + 1])
        ex.write(body)

    return fault


def replace_body(rewrite: Callable[[bytes], bytes], headers: dict[str, str] | None = None) -> Fault:
    """The upstream's answer with its body rewritten (and headers replaced or added)."""

    def fault(ex: Exchange) -> None:
        code, upstream_headers, body = ex.upstream()
        merged = {k: v for k, v in upstream_headers if k.lower() not in {h.lower() for h in headers or {}}}
        ex.send(code, list((merged | (headers or {})).items()), rewrite(body))

    return fault


def challenge(realm: str | Callable[[Seen], str], service: str = "csi-wasm-test") -> Fault:
    """A Bearer challenge (401) unless the request carries an Authorization header; then the upstream's answer."""

    def fault(ex: Exchange) -> None:
        if "Authorization" in ex.seen.headers:
            passthrough(ex)
            return
        where = realm(ex.seen) if callable(realm) else realm
        ex.send(401, [("WWW-Authenticate", f'Bearer realm="{where}",service="{service}"')], b"")

    return fault


@dataclass
class _Rule:
    pattern: re.Pattern[str]
    fault: Fault
    times: int | None
    hits: int = 0


@dataclass
class FaultProxy:
    upstream: str  # host:port of the real registry
    upstream_scheme: str = "http"
    upstream_ca: str | None = None  # CA bundle to verify an https upstream
    tls: tuple[str, str] | None = None  # (cert, key): serve https
    port: int = 0
    released: threading.Event = field(default_factory=threading.Event)
    _rules: list[_Rule] = field(default_factory=list)
    _seen: list[Seen] = field(default_factory=list)
    _finished: list[Seen] = field(default_factory=list)
    _sent: list[tuple[Seen, list[int]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: http.server.ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------

    def start(self) -> FaultProxy:
        self.released.clear()
        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        server.daemon_threads = True
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def refuse(self) -> None:
        """Stop listening: connections are refused until ``accept``."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def accept(self) -> None:
        self.start()

    def stop(self) -> None:
        self.released.set()
        self.refuse()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    # -- rules -----------------------------------------------------------

    def add(self, pattern: str, fault: Fault, times: int | None = None) -> FaultProxy:
        with self._lock:
            self._rules.append(_Rule(re.compile(pattern), fault, times))
        return self

    def clear(self) -> None:
        """Heal: drop every rule and let stalled or dripping answers finish."""
        with self._lock:
            self._rules.clear()
        self.released.set()

    def arm(self) -> None:
        """Make stalls stall again after a ``clear``."""
        self.released.clear()

    def _fault_for(self, seen: Seen) -> Fault:
        with self._lock:
            for rule in self._rules:
                if rule.pattern.search(seen.line) and (rule.times is None or rule.hits < rule.times):
                    rule.hits += 1
                    return rule.fault
        return passthrough

    # -- what was asked --------------------------------------------------

    def seen(self, pattern: str = "") -> list[Seen]:
        regex = re.compile(pattern)
        with self._lock:
            return [s for s in self._seen if regex.search(s.line)]

    def count(self, pattern: str = "") -> int:
        return len(self.seen(pattern))

    def finished(self, pattern: str = "") -> int:
        """How many faults (or plain answers) for requests matching ``pattern`` ran to their end without the
        client hanging up first. Recorded synchronously, as the fault's thread ends."""
        regex = re.compile(pattern)
        with self._lock:
            return sum(1 for s in self._finished if regex.search(s.line))

    def bytes_sent(self, pattern: str = "") -> int:
        """Bytes the proxy wrote to clients for the requests matching ``pattern`` (those finished or cut off)."""
        regex = re.compile(pattern)
        with self._lock:
            return sum(sent[0] for seen, sent in self._sent if regex.search(seen.line))

    def _counter(self, seen: Seen) -> list[int]:
        counter = [0]
        with self._lock:
            self._sent.append((seen, counter))
        return counter

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self._seen.append(seen)

    # -- forwarding ------------------------------------------------------

    def forward(self, seen: Seen) -> Upstream:
        host, _, port = self.upstream.rpartition(":")
        if self.upstream_scheme == "https":
            context = ssl.create_default_context(cafile=self.upstream_ca)
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, int(port), timeout=30, context=context
            )
        else:
            connection = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            headers = {k: v for k, v in seen.headers.items() if k.lower() not in _HOP_HEADERS | {"host"}}
            connection.request(seen.method, seen.path, headers=headers)
            response = connection.getresponse()
            body = response.read()
            return response.status, list(response.getheaders()), body
        finally:
            connection.close()


def _combined(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Headers by name, repeated ones joined with ", " as HTTP allows (Go clients send one Accept per type)."""
    combined: dict[str, str] = {}
    for name, value in items:
        combined[name] = f"{combined[name]}, {value}" if name in combined else value
    return combined


def _handler(proxy: FaultProxy) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self._answer()

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer()

        def _answer(self) -> None:
            seen = Seen(self.command, self.path, _combined(self.headers.items()), time.monotonic())
            proxy._record(seen)
            self.close_connection = True
            try:
                proxy._fault_for(seen)(Exchange(proxy, self, seen))
            except OSError:
                return  # the client hung up (it timed out, or gave up): that is the point of most faults
            with proxy._lock:
                proxy._finished.append(seen)

        def finish(self) -> None:
            try:
                super().finish()
            except OSError:
                pass

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    return Handler


__all__ = [
    "FaultProxy", "Seen", "Exchange", "passthrough", "status", "reset_after", "truncate_after", "corrupt",
    "stall_headers", "stall_body", "drip", "redirect_to", "redirect_loop", "oversized", "endless_chunked",
    "drip_headers", "replace_body", "challenge", "hold", "hold_tail",
]  # fmt: skip
