"""A registry an attacker runs: it answers exactly what a test scripts, nothing else.

Manifests are served by (repository, tag) and by digest, blobs by digest in any
repository; anything unscripted is 404. With ``require_credentials`` it challenges
with Basic auth and then accepts *any* credentials, as an attacker's registry
would ("bogus credentials"). Every request is recorded synchronously before it
is answered, so a test can count what the driver asked without racing a log
reader. Listens on 127.0.0.1 only and never connects anywhere.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any

_PATH = re.compile(r"^/v2/(?P<repo>.+)/(?P<kind>manifests|blobs)/(?P<key>[^/?]+)$")


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


@dataclass
class HostileRegistry:
    require_credentials: bool = False
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Authorization
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> HostileRegistry:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HostileRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        assert self._server is not None, "not started"
        return f"127.0.0.1:{self._server.server_address[1]}"

    # -- scripting ---------------------------------------------------------

    def manifest(self, repository: str, tag: str, body: bytes | dict[str, Any], media_type: str) -> str:
        """Serve ``body`` (bytes as given, or a dict as JSON) at ``tag`` and at its digest; return the digest."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        digest = digest_of(data)
        with self._lock:
            self.manifests[(repository, tag)] = (media_type, data)
            self.manifests[(repository, digest)] = (media_type, data)
        return digest

    def blob(self, data: bytes) -> str:
        digest = digest_of(data)
        with self._lock:
            self.blobs[digest] = data
        return digest

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        with self._lock:
            return sum(1 for method, path, _ in self.requests if regex.search(f"{method} {path}"))

    def _record(self, method: str, path: str, authorization: str | None) -> None:
        with self._lock:
            self.requests.append((method, path, authorization))

    def _lookup(self, repo: str, kind: str, key: str) -> tuple[str, bytes] | None:
        with self._lock:
            if kind == "manifests":
                return self.manifests.get((repo, key))
            data = self.blobs.get(key)
            return None if data is None else ("application/octet-stream", data)


def _handler(registry: HostileRegistry) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self._answer(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(body=False)

        def _answer(self, body: bool) -> None:
            authorization = self.headers.get("Authorization")
            registry._record(self.command, self.path, authorization)
            if registry.require_credentials and not authorization:
                self._send(401, "application/json", b'{"errors":[{"code":"UNAUTHORIZED"}]}', body,
                           {"WWW-Authenticate": 'Basic realm="anything goes"'})  # fmt: skip
                return
            if self.path in ("/v2/", "/v2"):
                self._send(200, "application/json", b"{}", body)
                return
            match = _PATH.match(self.path)
            found = registry._lookup(match["repo"], match["kind"], match["key"]) if match else None
            if found is None:
                self._send(404, "application/json", b'{"errors":[{"code":"NOT_FOUND"}]}', body)
                return
            media_type, data = found
            self._send(200, media_type, data, body, {"Docker-Content-Digest": digest_of(data)})

        def _send(
            self, status: int, media_type: str, data: bytes, body: bool, headers: dict[str, str] | None = None
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", media_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    return Handler


__all__ = ["HostileRegistry", "digest_of"]
