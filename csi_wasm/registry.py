"""Talk to OCI registries: manifests and blobs, with deadlines, bounded retries and per-scope auth.

Built on the oras library's ``Registry`` (its HTTP session, with cookies off) and
``Container`` (API URLs). What a node agent cannot leave to the library is owned
here, at those seams:

* every request has a connect and a read timeout, every body is read one socket
  read at a time against a total deadline (a slow drip cannot outlast it), and a
  manifest fetch also ends with the gRPC call's deadline;
* retries are bounded (``pull.attempts``), with backoff and jitter, only for
  transient failures (connection refused/reset, 429, 5xx), and never sleep past
  the call's deadline; ``Retry-After`` is honoured up to a cap;
* auth is per call: the pod's own credentials, Basic or Bearer tokens cached per
  registry, repository scope and credential, refreshed on expiry;
* redirects are followed by hand: never from https to http, never to link-local or
  metadata addresses, never into a private network the registry is not itself in,
  and the Authorization header is dropped when the host changes; a host reached by
  a redirect that asks for credentials gets none (it is refused).

SSRF rule (``refuse_forbidden_host``): link-local and cloud-metadata addresses are
never contacted. Private, loopback, CGNAT and unique-local addresses are contacted
only as the registry itself (a pod may name an in-cluster registry; a loopback
registry only if the node configuration names it under ``registries``), as a place the
registry redirects to or names as its token realm *when the registry's own address
is in that same private block* (a registry on 127.0.0.1 may use a token server on
127.0.0.1; a public registry may not point the node at 10.0.0.5), or when the node
configuration lists the block in ``allowed_private_networks``.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.client
import ipaddress
import json
import random
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import oras.container
import oras.provider
import requests
import urllib3.exceptions

from csi_wasm.config import NodeConfig, PullConfig
from csi_wasm.credentials import Credentials
from csi_wasm.errors import (
    AccessDenied,
    DigestMismatch,
    DriverError,
    ModuleNotFound,
    RegistryError,
    RegistryTimeout,
    TooLarge,
    UnsupportedLayout,
)
from csi_wasm.layouts import ACCEPTED_MANIFEST_TYPES
from csi_wasm.reference import Reference

CHUNK_BYTES = 256 * 1024
MAX_REDIRECTS = 5
MAX_RETRY_AFTER_SECONDS = 10.0
BACKOFF_BASE_SECONDS = 0.2
BACKOFF_CAP_SECONDS = 2.0
# Time kept back from a call's deadline so the caller can still answer.
DEADLINE_RESERVE_SECONDS = 0.25
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class FetchedManifest:
    digest: str
    media_type: str
    body: dict[str, Any]
    used_credentials: bool


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
                raise _Transient(f"{self._what}: connection lost while downloading: {_short(exc)}") from exc
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


class _Transient(RegistryError):
    """A failure worth retrying (connection refused/reset, 429, 5xx)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class _Endpoint:
    host: str
    scheme: str
    verify: bool | str
    is_mirror: bool


class RegistryClient:
    def __init__(
        self,
        node: NodeConfig,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._node = node
        self._pull: PullConfig = node.pull
        self._clock = clock
        self._sleep = sleep
        self._sessions: dict[tuple[str, bool | str], oras.provider.Registry] = {}
        self._tokens: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._allowed_networks = tuple(ipaddress.ip_network(n) for n in node.allowed_private_networks)

    @property
    def node(self) -> NodeConfig:
        return self._node

    # -- public API ------------------------------------------------------

    def fetch_manifest(
        self, ref: Reference, creds: Credentials | None, key: str | None = None, deadline: float | None = None
    ) -> FetchedManifest:
        """GET a manifest (by tag or digest), capped in size, its digest verified when pinned.

        ``deadline`` (on this client's clock) is the calling gRPC request's: no request,
        body read or retry sleep goes past it.
        """
        key = key or ref.manifest_key
        accept = ", ".join(ACCEPTED_MANIFEST_TYPES)

        def attempt(endpoint: _Endpoint) -> FetchedManifest:
            url = self._url(endpoint, ref, "manifests", key)
            response, used = self._request(endpoint, ref, url, creds, {"Accept": accept}, deadline)
            with contextlib.closing(response):
                raw = self._read_capped(response, self._pull.max_manifest_bytes, f"image {ref}: manifest", deadline)
            digest = f"sha256:{hashlib.sha256(raw).hexdigest()}"
            if key.startswith("sha256:") and digest != key:
                raise DigestMismatch(f"image {ref}: registry served a manifest with digest {digest}, not {key}")
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise UnsupportedLayout(f"image {ref}: the registry returned a manifest that is not JSON") from exc
            if not isinstance(body, dict):
                raise UnsupportedLayout(f"image {ref}: the registry returned a manifest that is not a JSON object")
            media_type = body.get("mediaType") or response.headers.get("Content-Type", "").split(";")[0]
            return FetchedManifest(digest, str(media_type), body, used)

        return self._across_endpoints(ref, attempt, deadline)  # type: ignore[no-any-return]

    def fetch_blob_bytes(
        self, ref: Reference, digest: str, creds: Credentials | None, limit: int, deadline: float | None = None
    ) -> bytes:
        """A small blob (a signature payload), read whole, capped and digest-checked."""

        def attempt(endpoint: _Endpoint) -> bytes:
            url = self._url(endpoint, ref, "blobs", digest)
            response, _ = self._request(endpoint, ref, url, creds, {}, deadline)
            with contextlib.closing(response):
                return self._read_capped(response, limit, f"image {ref}: blob {digest}", deadline)

        data: bytes = self._across_endpoints(ref, attempt, deadline)
        if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
            raise DigestMismatch(f"image {ref}: blob {digest} does not match its digest")
        return data

    @contextlib.contextmanager
    def open_blob(
        self, ref: Reference, digest: str, creds: Credentials | None, expected_size: int | None = None
    ) -> Iterator[BlobStream]:
        """Stream a blob. The download has its own deadline (it outlives the gRPC call)."""
        deadline = self._clock() + self._pull.download_timeout_seconds

        def attempt(endpoint: _Endpoint) -> requests.Response:
            url = self._url(endpoint, ref, "blobs", digest)
            return self._request(endpoint, ref, url, creds, {}, deadline)[0]

        response = self._across_endpoints(ref, attempt, deadline)
        try:
            yield BlobStream(
                response, deadline, self._clock, f"image {ref}", self._pull.read_timeout_seconds, expected_size
            )
        finally:
            response.close()

    # -- endpoints, retries ----------------------------------------------

    def _endpoints(self, ref: Reference) -> list[_Endpoint]:
        upstream = self._node.registry(ref.registry)
        hosts = [(mirror, True) for mirror in upstream.mirrors] + [(ref.api_host, False)]
        endpoints = []
        for host, is_mirror in hosts:
            config = self._node.registry(host)
            verify: bool | str = config.ca_bundle or True
            endpoints.append(_Endpoint(host, "http" if config.insecure else "https", verify, is_mirror))
        return endpoints

    def _across_endpoints(self, ref: Reference, attempt: Callable[[_Endpoint], Any], deadline: float | None) -> Any:
        """Try each mirror in order, then the upstream; a mirror's failure falls through."""
        endpoints = self._endpoints(ref)
        for endpoint in endpoints[:-1]:
            try:
                return self._with_retries(lambda: attempt(endpoint), deadline)
            except (RegistryError, ModuleNotFound):
                continue
        return self._with_retries(lambda: attempt(endpoints[-1]), deadline)

    def _with_retries(self, call: Callable[[], Any], deadline: float | None = None) -> Any:
        """Run ``call``; retry transient failures a bounded number of times, inside ``deadline``."""
        attempts = max(1, self._pull.attempts)
        for number in range(1, attempts + 1):
            try:
                return call()
            except _Transient as exc:
                if number == attempts:
                    raise RegistryError(f"{exc} (gave up after {attempts} attempts)") from exc
                pause = self.backoff(number, exc.retry_after)
                if deadline is not None and self._clock() + pause > deadline - DEADLINE_RESERVE_SECONDS:
                    raise RegistryError(
                        f"{exc} (not retried: waiting {pause:.1f}s would pass the call's deadline)"
                    ) from exc
                self._sleep(pause)
        raise AssertionError("unreachable")

    @staticmethod
    def backoff(number: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt ``number + 1``: Retry-After (capped), else jittered exponential."""
        if retry_after is not None:
            return float(min(max(retry_after, 0.0), MAX_RETRY_AFTER_SECONDS))
        base = min(BACKOFF_BASE_SECONDS * 2.0 ** (number - 1), BACKOFF_CAP_SECONDS)
        return base * (0.5 + random.random())

    def _timeouts(self, deadline: float | None) -> tuple[float, float]:
        connect, read = self._pull.connect_timeout_seconds, self._pull.read_timeout_seconds
        if deadline is None:
            return connect, read
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise RegistryTimeout("the call's deadline passed before the registry answered")
        return min(connect, remaining), min(read, remaining)

    # -- one request, with auth and redirects ----------------------------

    def _request(
        self,
        endpoint: _Endpoint,
        ref: Reference,
        url: str,
        creds: Credentials | None,
        headers: dict[str, str],
        deadline: float | None,
    ) -> tuple[requests.Response, bool]:
        scope = f"repository:{ref.repository}:pull"
        auth = self._cached_auth(endpoint, scope, creds)
        response, moved = self._send(endpoint, ref, url, headers, auth, deadline)
        used_credentials = False
        if response.status_code == 401:
            challenge = response.headers.get("WWW-Authenticate", "")
            response.close()
            if moved:
                raise AccessDenied(
                    f"image {ref}: registry {endpoint.host} redirected to another host that asks for "
                    "credentials; the pod's credentials are only sent to the registry itself, refused"
                )
            auth = self._authenticate(endpoint, ref, challenge, scope, creds, deadline)
            used_credentials = creds is not None
            response, _ = self._send(endpoint, ref, url, headers, auth, deadline)
        elif auth is not None:
            used_credentials = creds is not None
        self._check_status(response, ref, endpoint, creds)
        return response, used_credentials

    def _send(
        self,
        endpoint: _Endpoint,
        ref: Reference,
        url: str,
        headers: dict[str, str],
        auth: str | None,
        deadline: float | None,
    ) -> tuple[requests.Response, bool]:
        """GET ``url``, following redirects by hand; also say whether it ended on another host."""
        session = self._session(endpoint)
        origin = urllib.parse.urlsplit(url)
        refuse_forbidden_host(origin.hostname or "", f"image {ref}: registry", allowed=self._allowed_networks)
        if not endpoint.is_mirror and endpoint.host not in self._node.registries:
            refuse_local_registry(origin.hostname or "", ref, self._allowed_networks)
        for _ in range(MAX_REDIRECTS + 1):
            request_headers = {"Accept-Encoding": "identity"} | headers
            same_host = urllib.parse.urlsplit(url).netloc == origin.netloc
            if auth and same_host:
                request_headers["Authorization"] = auth
            try:
                response = session.session.get(
                    url,
                    headers=request_headers,
                    stream=True,
                    verify=endpoint.verify,
                    allow_redirects=False,
                    timeout=self._timeouts(deadline),
                )
            except requests.exceptions.SSLError as exc:
                raise RegistryError(
                    f"image {ref}: TLS verification of {endpoint.host} failed ({_short(exc)}); "
                    "give the node a ca_bundle for this registry in the node configuration"
                ) from exc
            except (requests.exceptions.ConnectTimeout, requests.exceptions.ReadTimeout) as exc:
                raise RegistryTimeout(f"image {ref}: registry {endpoint.host} timed out") from exc
            except requests.exceptions.ConnectionError as exc:
                raise _Transient(f"image {ref}: cannot reach registry {endpoint.host}: {_short(exc)}") from exc
            except requests.exceptions.RequestException as exc:
                raise RegistryError(f"image {ref}: request to {endpoint.host} failed: {_short(exc)}") from exc
            if not response.is_redirect:
                return response, not same_host
            location = response.headers.get("Location", "")
            response.close()
            url = self._follow(url, location, ref, endpoint)
        raise RegistryError(f"image {ref}: registry {endpoint.host} redirected more than {MAX_REDIRECTS} times")

    def _follow(self, current: str, location: str, ref: Reference, endpoint: _Endpoint) -> str:
        target = urllib.parse.urljoin(current, location)
        old, new = urllib.parse.urlsplit(current), urllib.parse.urlsplit(target)
        if new.scheme not in ("http", "https") or (old.scheme == "https" and new.scheme == "http"):
            raise AccessDenied(f"image {ref}: registry redirected from {old.scheme} to {new.scheme}; refused")
        refuse_forbidden_host(
            new.hostname or "", f"image {ref}: redirect", origin=_hostname(endpoint), allowed=self._allowed_networks
        )
        return target

    def _check_status(
        self, response: requests.Response, ref: Reference, endpoint: _Endpoint, creds: Credentials | None
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
            raise _Transient(
                f"image {ref}: registry {endpoint.host} answered HTTP {status}{detail}",
                parse_retry_after(response.headers.get("Retry-After", ""), time.time()),
            )
        raise RegistryError(f"image {ref}: registry {endpoint.host} answered HTTP {status}{detail}")

    # -- auth --------------------------------------------------------------

    def _cached_auth(self, endpoint: _Endpoint, scope: str, creds: Credentials | None) -> str | None:
        key = (endpoint.host, scope, creds.fingerprint if creds else "")
        with self._lock:
            cached = self._tokens.get(key)
        if cached and cached[1] > self._clock():
            return cached[0]
        return None

    def _authenticate(
        self,
        endpoint: _Endpoint,
        ref: Reference,
        challenge: str,
        scope: str,
        creds: Credentials | None,
        deadline: float | None,
    ) -> str:
        scheme = challenge.split(" ", 1)[0].lower()
        key = (endpoint.host, scope, creds.fingerprint if creds else "")
        if scheme == "basic":
            if creds is None:
                raise AccessDenied(
                    f"image {ref}: registry {endpoint.host} requires credentials; "
                    "set nodePublishSecretRef on the volume"
                )
            header, lifetime = creds.basic_header(), 3600.0
        elif scheme == "bearer":
            header, lifetime = self._bearer_token(endpoint, ref, challenge, scope, creds, deadline)
        else:
            raise AccessDenied(f"image {ref}: registry {endpoint.host} asks for unsupported auth {scheme[:20]!r}")
        with self._lock:
            self._tokens[key] = (header, self._clock() + lifetime)
        return header

    def _bearer_token(
        self,
        endpoint: _Endpoint,
        ref: Reference,
        challenge: str,
        scope: str,
        creds: Credentials | None,
        deadline: float | None,
    ) -> tuple[str, float]:
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        realm = params.get("realm", "")
        try:
            parsed = urllib.parse.urlsplit(realm)
            hostname = parsed.hostname
            parsed.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise AccessDenied(f"image {ref}: registry {endpoint.host} sent an invalid token realm") from None
        if parsed.scheme not in ("https", "http") or not hostname:
            raise AccessDenied(f"image {ref}: registry {endpoint.host} sent an invalid token realm")
        if parsed.scheme == "http" and (endpoint.scheme == "https" or hostname != _hostname(endpoint)):
            raise AccessDenied(
                f"image {ref}: token realm {parsed.scheme}://{parsed.netloc} is plain http on another host "
                f"or a downgrade from https; refused"
            )
        refuse_forbidden_host(
            hostname, f"image {ref}: token realm", origin=_hostname(endpoint), allowed=self._allowed_networks
        )
        query = {"scope": scope}
        if "service" in params:
            query["service"] = params["service"]
        headers = {"Authorization": creds.basic_header()} if creds else {}
        try:
            response = self._session(endpoint).session.get(
                realm,
                params=query,
                headers=headers,
                verify=endpoint.verify,
                allow_redirects=False,
                stream=True,
                timeout=self._timeouts(deadline),
            )
        except requests.exceptions.Timeout as exc:
            raise RegistryTimeout(f"image {ref}: token service {parsed.netloc} timed out") from exc
        except requests.exceptions.RequestException as exc:
            raise _Transient(f"image {ref}: token service {parsed.netloc} unreachable: {_short(exc)}") from exc
        with contextlib.closing(response):
            if response.status_code in (401, 403):
                raise AccessDenied(
                    f"image {ref}: token service {parsed.netloc} refused the "
                    f"{'pod' if creds else 'anonymous'} credentials; check nodePublishSecretRef"
                )
            if response.status_code >= 500 or response.status_code == 429:
                raise _Transient(f"image {ref}: token service answered HTTP {response.status_code}")
            if response.status_code != 200:
                raise RegistryError(f"image {ref}: token service answered HTTP {response.status_code}")
            raw = self._read_capped(response, MAX_TOKEN_RESPONSE_BYTES, f"image {ref}: token response", deadline)
            try:
                payload = json.loads(raw)
                token = payload.get("token") or payload.get("access_token")
                lifetime = float(payload.get("expires_in", 60))
            except (ValueError, AttributeError, TypeError) as exc:
                raise RegistryError(f"image {ref}: token service returned an unreadable answer") from exc
        if not token or not isinstance(token, str) or not _TOKEN.match(token):
            raise RegistryError(f"image {ref}: token service returned no usable token")
        if not 0 < lifetime < float("inf"):
            lifetime = 60.0
        # refresh a little early so a token never expires mid-request
        return f"Bearer {token}", max(min(lifetime, 24 * 3600.0) - 10.0, 1.0)

    # -- plumbing ----------------------------------------------------------

    def _session(self, endpoint: _Endpoint) -> oras.provider.Registry:
        key = (endpoint.host, endpoint.verify)
        with self._lock:
            registry = self._sessions.get(key)
            if registry is None:
                registry = oras.provider.Registry(
                    hostname=endpoint.host, insecure=endpoint.scheme == "http", auth_backend="basic"
                )
                self._sessions[key] = registry
        return registry

    def _url(self, endpoint: _Endpoint, ref: Reference, kind: str, key: str) -> str:
        container = oras.container.Container(f"{endpoint.host}/{ref.repository}", registry=endpoint.host)
        path = container.manifest_url(key) if kind == "manifests" else container.get_blob_url(key)
        return f"{endpoint.scheme}://{path}"

    def _read_capped(self, response: requests.Response, limit: int, what: str, deadline: float | None) -> bytes:
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


MAX_TOKEN_RESPONSE_BYTES = 64 * 1024
# a bearer token goes into a header: printable ASCII without spaces
_TOKEN = re.compile(r"^[\x21-\x7e]{1,8192}\Z")


def parse_retry_after(value: str, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(int(value)) if len(value) < 10 else 1e9
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    try:
        return max(0.0, when.timestamp() - now)
    except (OverflowError, ValueError, OSError):
        return None


def _hostname(endpoint: _Endpoint) -> str:
    return urllib.parse.urlsplit(f"//{endpoint.host}").hostname or endpoint.host


FORBIDDEN_NETWORKS = (
    ipaddress.ip_network("169.254.0.0/16"),  # link-local, cloud metadata
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::/32"),  # AWS IPv6 metadata
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba metadata
)
# Contacted only as the registry itself, or when the registry is in the same block,
# or when the node configuration allows the block (allowed_private_networks).
PRIVATE_NETWORKS = (
    ipaddress.ip_network("0.0.0.0/8"),  # "this host": 0.0.0.0 reaches loopback services on Linux
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("100.64.0.0/10"),  # carrier-grade NAT, also some cluster networks
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("172.16.0.0/12"),
    ipaddress.ip_network("192.168.0.0/16"),
    ipaddress.ip_network("198.18.0.0/15"),  # benchmarking, used inside some clouds
    ipaddress.ip_network("::/128"),
    ipaddress.ip_network("::1/128"),
    ipaddress.ip_network("fc00::/7"),  # unique local
)
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def resolve(host: str) -> set[IPAddress]:
    """Every address ``host`` resolves to (an IP literal resolves to itself); empty if it does not."""
    host = host.strip("[]")
    try:
        literal = ipaddress.ip_address(host.split("%", 1)[0])
        return {_unmapped(literal)}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError, ValueError):
        return set()
    found: set[IPAddress] = set()
    for info in infos:
        with contextlib.suppress(ValueError):
            found.add(_unmapped(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])))
    return found


def _unmapped(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def forbidden_reason(
    addresses: Iterable[IPAddress], origin: Iterable[IPAddress] | None, allowed: Iterable[IPNetwork] = ()
) -> str | None:
    """Why these destination addresses may not be contacted, or None. Pure: tests drive it directly.

    ``origin`` is the registry's own addresses when the destination was named by the
    registry (a redirect or a token realm); None when the destination is the registry.
    """
    allowed = tuple(allowed)
    origin = tuple(origin) if origin is not None else None
    for ip in addresses:
        if any(ip in network for network in FORBIDDEN_NETWORKS):
            return f"{ip} is a link-local/metadata address"
        if origin is None or any(ip in network for network in allowed if network.version == ip.version):
            continue
        block = next((n for n in PRIVATE_NETWORKS if n.version == ip.version and ip in n), None)
        if block is not None and not any(o.version == ip.version and o in block for o in origin):
            return f"{ip} is in the private block {block}, which the registry itself is not in"
    return None


LOCAL_NETWORKS = tuple(
    ipaddress.ip_network(n) for n in ("0.0.0.0/8", "127.0.0.0/8", "::/128", "::1/128")
)


def refuse_local_registry(host: str, ref: Reference, allowed: Iterable[IPNetwork] = ()) -> None:
    """A pod may not point the privileged driver at the node's own loopback services.

    Loopback registries are for admins: naming the registry under ``registries`` in the
    node configuration (or its block in ``allowed_private_networks``) allows it.
    """
    allowed = tuple(allowed)
    for ip in resolve(host):
        if any(ip in n for n in LOCAL_NETWORKS) and not any(ip in n for n in allowed if n.version == ip.version):
            raise AccessDenied(
                f"image {ref}: registry {host[:100]} is a loopback address ({ip}); a pod may not name one. "
                "A cluster admin can allow it by listing the registry under `registries` in the node configuration"
            )


def refuse_forbidden_host(
    host: str, what: str, origin: str | None = None, allowed: Iterable[IPNetwork] = ()
) -> None:
    """Refuse to contact ``host`` if it resolves to a forbidden address (SSRF from a hostile registry).

    A host that does not resolve is let through: the request itself then fails with
    a clear connection error.
    """
    addresses = resolve(host)
    reason = forbidden_reason(addresses, resolve(origin) if origin is not None else None, allowed)
    if reason is not None:
        raise AccessDenied(f"{what} points at {host[:100]} ({reason}); refused")


def _error_detail(response: requests.Response) -> str:
    try:
        errors = response.json().get("errors") or []
        codes = ", ".join(str(e.get("code")) for e in errors if isinstance(e, dict))
        return f": {codes}" if codes else ""
    except (ValueError, AttributeError):
        return ""


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:200] + "..."


__all__ = ["RegistryClient", "FetchedManifest", "BlobStream", "DriverError"]
