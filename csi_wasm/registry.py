"""Talk to OCI registries: manifests and blobs, with deadlines, bounded retries and per-scope auth.

Built on the oras library's ``Registry`` (its HTTP session, with cookies off) and
``Container`` (API URLs). What a node agent cannot leave to the library is owned
here, at those seams:

* every request has a connect and a read timeout, and a blob has a total deadline;
* retries are bounded (``pull.attempts``), with backoff and jitter, and only for
  transient failures (connection refused/reset, 429, 5xx);
* auth is per call: the pod's own credentials, Basic or Bearer tokens cached per
  registry, repository scope and credential, refreshed on expiry;
* redirects are followed by hand: never from https to http, never to link-local or
  metadata addresses, and the Authorization header is dropped when the host changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import random
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import oras.container
import oras.provider
import requests

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
)
from csi_wasm.layouts import ACCEPTED_MANIFEST_TYPES
from csi_wasm.reference import Reference

CHUNK_BYTES = 256 * 1024
MAX_REDIRECTS = 5
MAX_RETRY_AFTER_SECONDS = 10.0
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class FetchedManifest:
    digest: str
    media_type: str
    body: dict[str, Any]
    used_credentials: bool


class BlobStream:
    """An open blob response; iterate it for chunks. Closed by ``RegistryClient.open_blob``."""

    def __init__(self, response: requests.Response, deadline: float, clock: Callable[[], float], what: str) -> None:
        self._response = response
        self._deadline = deadline
        self._clock = clock
        self._what = what
        length = response.headers.get("Content-Length")
        self.content_length = int(length) if length and length.isdigit() else None

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._response.iter_content(CHUNK_BYTES):
                if self._clock() > self._deadline:
                    raise RegistryTimeout(f"{self._what}: download did not finish within the pull deadline")
                if chunk:
                    yield chunk
        except requests.exceptions.ConnectionError as exc:
            # requests reports a read timeout mid-body as a ConnectionError
            if "timed out" in str(exc).lower():
                raise RegistryTimeout(f"{self._what}: registry stopped sending data (read timeout)") from exc
            raise RegistryError(f"{self._what}: connection lost while downloading: {_short(exc)}") from exc
        except requests.exceptions.ChunkedEncodingError as exc:
            raise RegistryError(f"{self._what}: download cut short: {_short(exc)}") from exc


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

    # -- public API ------------------------------------------------------

    def fetch_manifest(self, ref: Reference, creds: Credentials | None, key: str | None = None) -> FetchedManifest:
        """GET a manifest (by tag or digest), capped in size, its digest verified when pinned."""
        key = key or ref.manifest_key
        accept = ", ".join(ACCEPTED_MANIFEST_TYPES)

        def attempt(endpoint: _Endpoint) -> FetchedManifest:
            url = self._url(endpoint, ref, "manifests", key)
            response, used = self._request(endpoint, ref, url, creds, {"Accept": accept}, stream=True)
            with contextlib.closing(response):
                raw = self._read_capped(response, self._pull.max_manifest_bytes, f"image {ref}: manifest")
            digest = f"sha256:{hashlib.sha256(raw).hexdigest()}"
            if key.startswith("sha256:") and digest != key:
                raise DigestMismatch(f"image {ref}: registry served a manifest with digest {digest}, not {key}")
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise RegistryError(f"image {ref}: the registry returned a manifest that is not JSON") from exc
            if not isinstance(body, dict):
                raise RegistryError(f"image {ref}: the registry returned a manifest that is not a JSON object")
            media_type = body.get("mediaType") or response.headers.get("Content-Type", "").split(";")[0]
            return FetchedManifest(digest, str(media_type), body, used)

        return self._across_endpoints(ref, attempt)

    @contextlib.contextmanager
    def open_blob(self, ref: Reference, digest: str, creds: Credentials | None) -> Iterator[BlobStream]:
        deadline = self._clock() + self._pull.download_timeout_seconds

        def attempt(endpoint: _Endpoint) -> requests.Response:
            url = self._url(endpoint, ref, "blobs", digest)
            return self._request(endpoint, ref, url, creds, {}, stream=True)[0]

        response = self._across_endpoints(ref, attempt)
        try:
            yield BlobStream(response, deadline, self._clock, f"image {ref}")
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

    def _across_endpoints(self, ref: Reference, attempt: Callable[[_Endpoint], Any]) -> Any:
        """Try each mirror in order, then the upstream; a mirror's failure falls through."""
        endpoints = self._endpoints(ref)
        for endpoint in endpoints[:-1]:
            try:
                return self._with_retries(lambda: attempt(endpoint))
            except (RegistryError, ModuleNotFound):
                continue
        return self._with_retries(lambda: attempt(endpoints[-1]))

    def _with_retries(self, call: Callable[[], Any]) -> Any:
        attempts = max(1, self._pull.attempts)
        for number in range(1, attempts + 1):
            try:
                return call()
            except _Transient as exc:
                if number == attempts:
                    raise RegistryError(str(exc)) from exc
                backoff = min(0.2 * 2 ** (number - 1), 2.0) * (0.5 + random.random())
                self._sleep(min(exc.retry_after, MAX_RETRY_AFTER_SECONDS) if exc.retry_after else backoff)
        raise AssertionError("unreachable")

    # -- one request, with auth and redirects ----------------------------

    def _request(
        self,
        endpoint: _Endpoint,
        ref: Reference,
        url: str,
        creds: Credentials | None,
        headers: dict[str, str],
        stream: bool,
    ) -> tuple[requests.Response, bool]:
        scope = f"repository:{ref.repository}:pull"
        auth = self._cached_auth(endpoint, scope, creds)
        response = self._send(endpoint, ref, url, headers, auth, stream)
        used_credentials = False
        if response.status_code == 401:
            challenge = response.headers.get("WWW-Authenticate", "")
            response.close()
            auth = self._authenticate(endpoint, ref, challenge, scope, creds)
            used_credentials = creds is not None
            response = self._send(endpoint, ref, url, headers, auth, stream)
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
        stream: bool,
    ) -> requests.Response:
        session = self._session(endpoint)
        origin = urllib.parse.urlsplit(url)
        for _ in range(MAX_REDIRECTS + 1):
            request_headers = dict(headers)
            if auth and urllib.parse.urlsplit(url).netloc == origin.netloc:
                request_headers["Authorization"] = auth
            try:
                response = session.session.get(
                    url,
                    headers=request_headers,
                    stream=stream,
                    verify=endpoint.verify,
                    allow_redirects=False,
                    timeout=(self._pull.connect_timeout_seconds, self._pull.read_timeout_seconds),
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
                return response
            location = response.headers.get("Location", "")
            response.close()
            url = self._follow(url, location, ref)
        raise RegistryError(f"image {ref}: registry {endpoint.host} redirected more than {MAX_REDIRECTS} times")

    def _follow(self, current: str, location: str, ref: Reference) -> str:
        target = urllib.parse.urljoin(current, location)
        old, new = urllib.parse.urlsplit(current), urllib.parse.urlsplit(target)
        if new.scheme not in ("http", "https") or (old.scheme == "https" and new.scheme == "http"):
            raise AccessDenied(f"image {ref}: registry redirected from {old.scheme} to {new.scheme}; refused")
        refuse_forbidden_host(new.hostname or "", f"image {ref}: redirect")
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
            retry_after = response.headers.get("Retry-After", "")
            raise _Transient(
                f"image {ref}: registry {endpoint.host} answered HTTP {status}{detail}",
                float(retry_after) if retry_after.isdigit() else None,
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
        self, endpoint: _Endpoint, ref: Reference, challenge: str, scope: str, creds: Credentials | None
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
            header, lifetime = self._bearer_token(endpoint, ref, challenge, scope, creds)
        else:
            raise AccessDenied(f"image {ref}: registry {endpoint.host} asks for unsupported auth {scheme!r}")
        with self._lock:
            self._tokens[key] = (header, self._clock() + lifetime)
        return header

    def _bearer_token(
        self, endpoint: _Endpoint, ref: Reference, challenge: str, scope: str, creds: Credentials | None
    ) -> tuple[str, float]:
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        realm = params.get("realm", "")
        parsed = urllib.parse.urlsplit(realm)
        if parsed.scheme not in ("https", "http") or not parsed.hostname:
            raise AccessDenied(f"image {ref}: registry {endpoint.host} sent an invalid token realm")
        if parsed.scheme == "http" and (endpoint.scheme == "https" or parsed.hostname != endpoint.host.split(":")[0]):
            raise AccessDenied(
                f"image {ref}: token realm {parsed.scheme}://{parsed.netloc} is plain http on another host; refused"
            )
        refuse_forbidden_host(parsed.hostname, f"image {ref}: token realm")
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
                timeout=(self._pull.connect_timeout_seconds, self._pull.read_timeout_seconds),
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
            try:
                payload = response.json()
                token = payload.get("token") or payload.get("access_token")
                lifetime = float(payload.get("expires_in", 60))
            except (ValueError, AttributeError, TypeError) as exc:
                raise RegistryError(f"image {ref}: token service returned an unreadable answer") from exc
        if not token:
            raise RegistryError(f"image {ref}: token service returned no token")
        # refresh a little early so a token never expires mid-request
        return f"Bearer {token}", max(lifetime - 10.0, 1.0)

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

    def _read_capped(self, response: requests.Response, limit: int, what: str) -> bytes:
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit:
            raise TooLarge(f"{what} is {length} bytes, over the node's limit of {limit}")
        data = bytearray()
        for chunk in BlobStream(response, self._clock() + self._pull.read_timeout_seconds * 2, self._clock, what):
            data += chunk
            if len(data) > limit:
                raise TooLarge(f"{what} exceeds the node's limit of {limit} bytes")
        return bytes(data)


FORBIDDEN_NETWORKS = (
    ipaddress.ip_network("169.254.0.0/16"),  # link-local, cloud metadata
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::/32"),  # AWS IPv6 metadata
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba metadata
)


def refuse_forbidden_host(host: str, what: str) -> None:
    """Refuse hosts that resolve into link-local or metadata ranges (SSRF from a hostile registry)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return  # the request itself will fail with a clear connection error
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if any(ip in network for network in FORBIDDEN_NETWORKS):
            raise AccessDenied(f"{what} points at {host} ({ip}), a link-local/metadata address; refused")


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
