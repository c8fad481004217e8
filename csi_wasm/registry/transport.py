"""One bounded exchange with a registry: send, follow redirects by hand, check the status, read the body.

* every request has a connect and a read timeout, every body is read one socket
  read at a time against a total deadline (a slow drip cannot outlast it);
* redirects are followed by hand: never from https to http, never to a forbidden
  address (``ssrf``), and the Authorization header is dropped when the host changes;
* bodies read whole are capped in size.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import oras.provider
import requests
import urllib3.exceptions

from csi_wasm.config import NodeConfig, PullConfig
from csi_wasm.credentials import Credentials
from csi_wasm.errors import AccessDenied, ModuleNotFound, RegistryError, RegistryTimeout, TooLarge
from csi_wasm.reference import Reference
from csi_wasm.registry.retry import Transient, parse_retry_after
from csi_wasm.registry.ssrf import hostname_of, refuse_forbidden_host, refuse_local_registry

CHUNK_BYTES = 256 * 1024
MAX_REDIRECTS = 5


@dataclass(frozen=True)
class Endpoint:
    """A registry host as the node reaches it: scheme and TLS verification from the node configuration."""

    host: str
    scheme: str
    verify: bool | str
    is_mirror: bool

    @property
    def hostname(self) -> str:
        return hostname_of(self.host)


class BlobStream:
    """An open response body; iterate it for chunks. Closed by whoever opened the response.

    Each chunk is one socket read (``read1``), with the socket's timeout lowered to
    what is left of the deadline, so a registry that drips a byte at a time just
    under the read timeout still cannot hold the caller past ``deadline``. At most
    ``limit`` bytes are accepted (the size the manifest declared): an endless or
    oversized body is refused as soon as it crosses it.
    """

    def __init__(
        self,
        response: requests.Response,
        deadline: float,
        clock: Callable[[], float],
        what: str,
        read_timeout: float = 30.0,
        limit: int | None = None,
    ) -> None:
        self._response = response
        self._deadline = deadline
        self._clock = clock
        self._what = what
        self._read_timeout = read_timeout
        self._limit = limit
        length = response.headers.get("Content-Length", "")
        self.content_length = int(length) if length.isdigit() else None
        if limit is not None and self.content_length is not None and self.content_length > limit:
            raise TooLarge(f"{what}: the registry announces {self.content_length} bytes, more than the {limit} expected")

    def __iter__(self) -> Iterator[bytes]:
        raw = self._response.raw
        received = 0
        while True:
            remaining = self._deadline - self._clock()
            if remaining <= 0:
                raise RegistryTimeout(f"{self._what}: download did not finish within the deadline")
            _set_read_timeout(raw, min(self._read_timeout, remaining))
            try:
                chunk = raw.read1(CHUNK_BYTES)
            except urllib3.exceptions.ReadTimeoutError as exc:
                raise RegistryTimeout(f"{self._what}: registry stopped sending data (read timeout)") from exc
            except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError, ValueError) as exc:
                raise Transient(f"{self._what}: connection lost while downloading: {short(exc)}") from exc
            if not chunk:
                return
            received += len(chunk)
            if self._limit is not None and received > self._limit:
                raise TooLarge(f"{self._what}: the registry sent more than the {self._limit} bytes expected")
            yield chunk


def _set_read_timeout(raw: Any, seconds: float) -> None:
    """Lower the socket timeout of a streamed urllib3 response (best effort: private attributes)."""
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.settimeout(max(0.01, seconds))


class Transport:
    def __init__(self, node: NodeConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._node = node
        self._pull: PullConfig = node.pull
        self._clock = clock
        self._sessions: dict[tuple[str, bool | str], oras.provider.Registry] = {}
        self._lock = threading.Lock()
        self.allowed_networks = tuple(ipaddress.ip_network(n) for n in node.allowed_private_networks)

    def timeouts(self, deadline: float | None) -> tuple[float, float]:
        connect, read = self._pull.connect_timeout_seconds, self._pull.read_timeout_seconds
        if deadline is None:
            return connect, read
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise RegistryTimeout("the call's deadline passed before the registry answered")
        return min(connect, remaining), min(read, remaining)

    def send(
        self,
        endpoint: Endpoint,
        ref: Reference,
        url: str,
        headers: dict[str, str],
        auth: str | None,
        deadline: float | None,
    ) -> tuple[requests.Response, bool]:
        """GET ``url``, following redirects by hand; also say whether it ended on another host."""
        session = self._session(endpoint)
        origin = urllib.parse.urlsplit(url)
        refuse_forbidden_host(origin.hostname or "", f"image {ref}: registry", allowed=self.allowed_networks)
        if not endpoint.is_mirror and endpoint.host not in self._node.registries:
            refuse_local_registry(origin.hostname or "", ref, self.allowed_networks)
        for _ in range(MAX_REDIRECTS + 1):
            request_headers = {"Accept-Encoding": "identity"} | headers
            same_host = urllib.parse.urlsplit(url).netloc == origin.netloc
            if auth and same_host:
                request_headers["Authorization"] = auth
            try:
                response = session.get(
                    url,
                    headers=request_headers,
                    stream=True,
                    verify=endpoint.verify,
                    allow_redirects=False,
                    timeout=self.timeouts(deadline),
                )
            except requests.exceptions.SSLError as exc:
                raise RegistryError(
                    f"image {ref}: TLS verification of {endpoint.host} failed ({short(exc)}); "
                    "give the node a ca_bundle for this registry in the node configuration"
                ) from exc
            except (requests.exceptions.ConnectTimeout, requests.exceptions.ReadTimeout) as exc:
                raise RegistryTimeout(f"image {ref}: registry {endpoint.host} timed out") from exc
            except requests.exceptions.ConnectionError as exc:
                raise Transient(f"image {ref}: cannot reach registry {endpoint.host}: {short(exc)}") from exc
            except requests.exceptions.RequestException as exc:
                raise RegistryError(f"image {ref}: request to {endpoint.host} failed: {short(exc)}") from exc
            if not response.is_redirect:
                return response, not same_host
            location = response.headers.get("Location", "")
            response.close()
            url = self._follow(url, location, ref, endpoint)
        raise RegistryError(f"image {ref}: registry {endpoint.host} redirected more than {MAX_REDIRECTS} times")

    def _follow(self, current: str, location: str, ref: Reference, endpoint: Endpoint) -> str:
        target = urllib.parse.urljoin(current, location)
        old, new = urllib.parse.urlsplit(current), urllib.parse.urlsplit(target)
        if new.scheme not in ("http", "https") or (old.scheme == "https" and new.scheme == "http"):
            raise AccessDenied(f"image {ref}: registry redirected from {old.scheme} to {new.scheme}; refused")
        refuse_forbidden_host(
            new.hostname or "", f"image {ref}: redirect", origin=endpoint.hostname, allowed=self.allowed_networks
        )
        return target

    def get(
        self,
        endpoint: Endpoint,
        url: str,
        what: str,
        params: dict[str, str],
        headers: dict[str, str],
        deadline: float | None,
    ) -> requests.Response:
        """One GET without redirects (a token service); ``what`` names it in errors."""
        try:
            return self._session(endpoint).get(
                url,
                params=params,
                headers=headers,
                verify=endpoint.verify,
                allow_redirects=False,
                stream=True,
                timeout=self.timeouts(deadline),
            )
        except requests.exceptions.Timeout as exc:
            raise RegistryTimeout(f"{what} timed out") from exc
        except requests.exceptions.RequestException as exc:
            raise Transient(f"{what} unreachable: {short(exc)}") from exc

    def check_status(
        self, response: requests.Response, ref: Reference, endpoint: Endpoint, creds: Credentials | None
    ) -> None:
        status = response.status_code
        if status < 300:
            return
        detail = _error_detail(response)
        response.close()
        if status in (401, 403):
            who = "the pod's credentials were refused" if creds else "the registry requires credentials"
            raise AccessDenied(
                f"image {ref}: {who} by {endpoint.host} (HTTP {status}{detail}); "
                "check the volume's nodePublishSecretRef"
            )
        if status == 404:
            raise ModuleNotFound(f"image {ref}: not found in registry {endpoint.host}{detail}")
        if status == 429 or status >= 500:
            raise Transient(
                f"image {ref}: registry {endpoint.host} answered HTTP {status}{detail}",
                parse_retry_after(response.headers.get("Retry-After", ""), time.time()),
            )
        raise RegistryError(f"image {ref}: registry {endpoint.host} answered HTTP {status}{detail}")

    def read_capped(self, response: requests.Response, limit: int, what: str, deadline: float | None) -> bytes:
        own = self._clock() + self._pull.read_timeout_seconds * 2
        data = bytearray()
        stream = BlobStream(
            response, min(own, deadline) if deadline else own, self._clock, what, self._pull.read_timeout_seconds
        )
        if stream.content_length is not None and stream.content_length > limit:
            raise TooLarge(f"{what} is {stream.content_length} bytes, over the node's limit of {limit}")
        for chunk in stream:
            data += chunk
            if len(data) > limit:
                raise TooLarge(f"{what} exceeds the node's limit of {limit} bytes")
        return bytes(data)

    def _session(self, endpoint: Endpoint) -> requests.Session:
        key = (endpoint.host, endpoint.verify)
        with self._lock:
            registry = self._sessions.get(key)
            if registry is None:
                registry = oras.provider.Registry(
                    hostname=endpoint.host, insecure=endpoint.scheme == "http", auth_backend="basic"
                )
                self._sessions[key] = registry
        session: requests.Session = registry.session
        return session


def _error_detail(response: requests.Response) -> str:
    try:
        errors = response.json().get("errors") or []
        codes = ", ".join(str(e.get("code")) for e in errors if isinstance(e, dict))
        return f": {codes}" if codes else ""
    except (ValueError, AttributeError):
        return ""


def short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:200] + "..."
