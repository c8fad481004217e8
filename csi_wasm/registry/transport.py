"""One bounded exchange with a registry: send, follow redirects by hand, check the status, read the body.

An ``Exchange`` is the requests of one attempt of a call under one total deadline:

* the watchdog (``watchdog``) shuts the exchange's sockets when the deadline
  passes, so headers, a TLS handshake or a body dripped a byte at a time under the
  read timeout cannot outlast it; socket timeouts still bound each read (a stall);
* redirects are followed by hand: never from https to http, never to a forbidden
  address (``ssrf``), and the Authorization header is dropped when the host changes;
* a body read whole is capped in size and counted against the node's memory budget
  (``bodies``); an error body is read only up to ``ERROR_BODY_BYTES``, undecoded;
* a streamed body (``BlobStream``) is cut at the size the manifest declared.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Iterator

import requests
import urllib3.exceptions

from csi_wasm.config import NodeConfig, PullConfig
from csi_wasm.credentials import Credentials
from csi_wasm.errors import AccessDenied, DriverError, ModuleNotFound, RegistryError, RegistryTimeout, TooLarge
from csi_wasm.reference import Reference
from csi_wasm.registry.bodies import BUFFER_FACTOR, ERROR_BODY_BYTES, MemoryBudget, error_codes
from csi_wasm.registry.retry import Transient, Unreachable, parse_retry_after
from csi_wasm.registry.sessions import SessionPool
from csi_wasm.registry.ssrf import hostname_of, refuse_forbidden_host, refuse_local_registry
from csi_wasm.registry.watchdog import Watch, Watchdog, WatchSlot

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

    Each chunk is one socket read (``read1``, undecoded); the exchange's watch ends
    a read blocked past the deadline. At most ``limit`` bytes are accepted (the size
    the manifest declared): an endless or oversized body is refused as soon as it
    crosses it.
    """

    def __init__(
        self,
        response: requests.Response,
        watch: Watch,
        clock: Callable[[], float],
        what: str,
        limit: int | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self._response = response
        self._watch = watch
        self._clock = clock
        self._what = what
        self._limit = limit
        self._chunk_bytes = chunk_bytes
        length = response.headers.get("Content-Length", "")
        self.content_length = int(length) if length.isdigit() else None
        if limit is not None and self.content_length is not None and self.content_length > limit:
            raise TooLarge(
                f"{what}: the registry announces {self.content_length} bytes, more than the {limit} expected"
            )

    def __iter__(self) -> Iterator[bytes]:
        raw = self._response.raw
        received = 0
        while True:
            self._check_deadline()
            try:
                chunk = raw.read1(self._chunk_bytes, decode_content=False)
            except urllib3.exceptions.ReadTimeoutError as exc:
                self._check_deadline()
                raise RegistryTimeout(f"{self._what}: registry stopped sending data (read timeout)") from exc
            except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError, ValueError) as exc:
                self._check_deadline()
                raise Transient(f"{self._what}: connection lost while downloading: {short(exc)}") from exc
            if not chunk:
                self._check_deadline()  # a body without a length ends at EOF: the watchdog's too
                with contextlib.suppress(Exception):
                    raw.release_conn()  # read to the end: the connection may serve the next request
                return
            received += len(chunk)
            if self._limit is not None and received > self._limit:
                raise TooLarge(f"{self._what}: the registry sent more than the {self._limit} bytes expected")
            yield chunk

    def _check_deadline(self) -> None:
        if self._watch.expired or self._clock() >= self._watch.deadline:
            raise RegistryTimeout(f"{self._what}: the registry did not finish sending within the deadline")


class Transport:
    """What every exchange shares: sessions, the watchdog, the memory budget, the node's address rules."""

    def __init__(self, node: NodeConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.node = node
        self.pull: PullConfig = node.pull
        self.clock = clock
        self.allowed_networks = tuple(ipaddress.ip_network(n) for n in node.allowed_private_networks)
        self.budget = MemoryBudget(node.pull.max_buffered_bytes, clock)
        self._slot = WatchSlot()
        self._watchdog = Watchdog(clock)
        self.sessions = SessionPool(self._slot, clock)

    @contextlib.contextmanager
    def exchange(self, deadline: float) -> Iterator[Exchange]:
        with self._watchdog.watching(deadline) as watch, self._slot.active(watch):
            yield Exchange(self, watch)

    def close(self) -> None:
        self.sessions.close()
        self._watchdog.close()


class Exchange:
    """Requests under one total deadline (one attempt of a call)."""

    def __init__(self, transport: Transport, watch: Watch) -> None:
        self._transport = transport
        self.watch = watch
        self.deadline = watch.deadline

    def timeouts(self) -> tuple[float, float]:
        pull = self._transport.pull
        remaining = self.deadline - self._transport.clock()
        if remaining <= 0:
            raise RegistryTimeout("the call's deadline passed before the registry answered")
        return min(pull.connect_timeout_seconds, remaining), min(pull.read_timeout_seconds, remaining)

    def send(
        self,
        endpoint: Endpoint,
        ref: Reference,
        url: str,
        headers: dict[str, str],
        auth: str | None,
        method: str = "GET",
    ) -> tuple[requests.Response, bool]:
        """GET (or HEAD) ``url``, following redirects by hand; also say whether it ended on another host."""
        transport = self._transport
        origin = urllib.parse.urlsplit(url)
        refuse_forbidden_host(origin.hostname or "", f"image {ref}: registry", allowed=transport.allowed_networks)
        if not endpoint.is_mirror and endpoint.host not in transport.node.registries:
            refuse_local_registry(origin.hostname or "", ref, transport.allowed_networks)
        for _ in range(MAX_REDIRECTS + 1):
            request_headers = {"Accept-Encoding": "identity"} | headers
            same_host = urllib.parse.urlsplit(url).netloc == origin.netloc
            if auth and same_host:
                request_headers["Authorization"] = auth
            response = self._get(endpoint, url, request_headers, f"image {ref}: registry {endpoint.host}", method=method)
            if not response.is_redirect:
                return response, not same_host
            location = response.headers.get("Location", "")
            response.close()
            url = self._follow(url, location, ref, endpoint)
        raise RegistryError(f"image {ref}: registry {endpoint.host} redirected more than {MAX_REDIRECTS} times")

    def get(
        self, endpoint: Endpoint, url: str, what: str, params: dict[str, str], headers: dict[str, str]
    ) -> requests.Response:
        """One GET without redirects (a token service); ``what`` names it in errors."""
        return self._get(endpoint, url, {"Accept-Encoding": "identity"} | headers, what, params)

    def _get(
        self,
        endpoint: Endpoint,
        url: str,
        headers: dict[str, str],
        what: str,
        params: dict[str, str] | None = None,
        method: str = "GET",
    ) -> requests.Response:
        parts = urllib.parse.urlsplit(url)
        try:
            with self._transport.sessions.use(parts.scheme, parts.netloc, endpoint.verify) as session:
                response = session.request(
                    method,
                    url,
                    params=params,
                    headers=headers,
                    stream=True,
                    verify=endpoint.verify,
                    allow_redirects=False,
                    timeout=self.timeouts(),
                )
        except requests.exceptions.RequestException as exc:
            if self.watch.expired:
                raise RegistryTimeout(f"{what} did not answer within the deadline") from exc
            if isinstance(exc, requests.exceptions.SSLError):
                raise RegistryError(
                    f"{what}: TLS verification failed ({short(exc)}); "
                    "give the node a ca_bundle for this registry in the node configuration"
                ) from exc
            if isinstance(exc, (requests.exceptions.ConnectTimeout, requests.exceptions.ReadTimeout)):
                raise RegistryTimeout(f"{what} timed out") from exc
            if isinstance(exc, requests.exceptions.ConnectionError):
                raise Unreachable(f"{what} cannot be reached: {short(exc)}") from exc
            raise RegistryError(f"{what}: request failed: {short(exc)}") from exc
        if self.watch.expired:  # cut off mid-headers, what arrived can still parse as a short answer
            response.close()
            raise RegistryTimeout(f"{what} did not answer within the deadline")
        return response

    def _follow(self, current: str, location: str, ref: Reference, endpoint: Endpoint) -> str:
        target = urllib.parse.urljoin(current, location)
        old, new = urllib.parse.urlsplit(current), urllib.parse.urlsplit(target)
        if new.scheme not in ("http", "https") or (old.scheme == "https" and new.scheme == "http"):
            raise AccessDenied(f"image {ref}: registry redirected from {old.scheme} to {new.scheme}; refused")
        refuse_forbidden_host(
            new.hostname or "",
            f"image {ref}: redirect",
            origin=endpoint.hostname,
            allowed=self._transport.allowed_networks,
        )
        return target

    def check_status(
        self, response: requests.Response, ref: Reference, endpoint: Endpoint, creds: Credentials | None
    ) -> None:
        status = response.status_code
        if status < 300:
            return
        detail = self.error_detail(response)
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

    def error_detail(self, response: requests.Response) -> str:
        """The OCI error codes of an error answer: at most ``ERROR_BODY_BYTES`` read, never decoded."""
        data = bytearray()
        with contextlib.suppress(DriverError):  # a body that fails to arrive never hides the status
            for chunk in self.stream(response, "error body", chunk_bytes=ERROR_BODY_BYTES):
                data += chunk
                if len(data) >= ERROR_BODY_BYTES:
                    break
        codes = error_codes(data[:ERROR_BODY_BYTES])
        return f": {codes}" if codes else ""

    def stream(
        self, response: requests.Response, what: str, limit: int | None = None, chunk_bytes: int = CHUNK_BYTES
    ) -> BlobStream:
        return BlobStream(response, self.watch, self._transport.clock, what, limit, chunk_bytes)

    @contextlib.contextmanager
    def read_whole(self, response: requests.Response, limit: int, what: str) -> Iterator[bytearray]:
        """The whole body, at most ``limit`` bytes, held against the memory budget until the caller is done."""
        stream = self.stream(response, what)
        announced = stream.content_length
        if announced is not None and announced > limit:
            raise TooLarge(f"{what} is {announced} bytes, over the node's limit of {limit}")
        worst = (announced if announced is not None else limit) * BUFFER_FACTOR
        with self._transport.budget.reserve(worst, self.deadline, what):
            data = bytearray()
            for chunk in self.stream(response, what, announced):
                data += chunk
                if len(data) > limit:
                    raise TooLarge(f"{what} exceeds the node's limit of {limit} bytes")
            yield data


def short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:200] + "..."
