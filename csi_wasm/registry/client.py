"""The registry API the puller uses: manifests and blobs, across mirrors, with retries and per-scope auth.

Every call has a total deadline, request by request: a manifest, token or small blob
call ends at the calling gRPC request's deadline or after ``WHOLE_BODY_READ_TIMEOUTS``
read timeouts per attempt, whichever comes first; a blob download at
``pull.download_timeout_seconds`` (it outlives the call that started it).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import oras.container
import requests

from csi_wasm.config import NodeConfig, PullConfig
from csi_wasm.credentials import Credentials
from csi_wasm.errors import AccessDenied, DigestMismatch, ModuleNotFound, RegistryError, UnsupportedLayout
from csi_wasm.layouts import ACCEPTED_MANIFEST_TYPES
from csi_wasm.logs import event
from csi_wasm.reference import Reference
from csi_wasm.registry.auth import Authenticator
from csi_wasm.registry.bodies import parse_json
from csi_wasm.registry.mirrors import MIRROR_SKIP_SECONDS, MirrorHealth, gave_no_answer
from csi_wasm.registry.retry import Retrier
from csi_wasm.registry.transport import BlobStream, Endpoint, Exchange, Transport

T = TypeVar("T")
log = logging.getLogger("csi_wasm.registry")
_SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# A blob is read up to this much per socket read: fewer, larger chunks through the hash and the file.
BLOB_CHUNK_BYTES = 1024 * 1024
# A manifest, token or small blob exchange (headers and body) may take this many read timeouts.
WHOLE_BODY_READ_TIMEOUTS = 2


@dataclass(frozen=True)
class FetchedManifest:
    digest: str
    media_type: str
    body: dict[str, Any]
    used_credentials: bool


class RegistryClient:
    def __init__(
        self,
        node: NodeConfig,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        token_clock: Callable[[], float] | None = None,
    ) -> None:
        self._node = node
        self._pull: PullConfig = node.pull
        self._clock = clock
        self._transport = Transport(node, clock)
        # Tokens age on ``token_clock`` (default: ``clock``), a seam of its own: a test steps it past a
        # token's lifetime, while the deadlines, which the gRPC calls set on the real clock, stay on ``clock``.
        self._auth = Authenticator(self._transport.allowed_networks, token_clock or clock)
        self._retrier = Retrier(self._pull.attempts, clock, sleep)
        self._mirrors = MirrorHealth(clock)

    @property
    def node(self) -> NodeConfig:
        return self._node

    def close(self) -> None:
        """Close idle connections and stop the deadline watchdog."""
        self._transport.close()

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
        what = f"image {ref}: the manifest the registry returned"

        def attempt(endpoint: Endpoint) -> FetchedManifest:
            url = self._url(endpoint, ref, "manifests", key)
            with self._transport.exchange(self._whole_body_deadline(deadline)) as exchange:
                response, used = self._request(exchange, endpoint, ref, url, creds, {"Accept": accept})
                with contextlib.closing(response), exchange.read_whole(
                    response, self._pull.max_manifest_bytes, f"image {ref}: manifest"
                ) as raw:
                    digest = f"sha256:{hashlib.sha256(raw).hexdigest()}"
                    if key.startswith("sha256:") and digest != key:
                        raise DigestMismatch(
                            f"image {ref}: registry served a manifest with digest {digest}, not {key}"
                        )
                    body = parse_json(raw, what, UnsupportedLayout)
            if not isinstance(body, dict):
                raise UnsupportedLayout(f"{what} is not a JSON object")
            media_type = body.get("mediaType") or response.headers.get("Content-Type", "").split(";")[0]
            return FetchedManifest(digest, str(media_type), body, used)

        return self._across_endpoints(ref, attempt, deadline)

    def head_manifest(self, ref: Reference, creds: Credentials | None, deadline: float | None = None) -> str | None:
        """The digest ``ref``'s tag points at now, from a HEAD: its ``Docker-Content-Digest`` header.

        A HEAD is not counted as a pull by Docker Hub, where every GET of a manifest is; None
        when the registry sends no well-formed sha256 digest (the caller then GETs the manifest).
        """
        accept = ", ".join(ACCEPTED_MANIFEST_TYPES)

        def attempt(endpoint: Endpoint) -> str | None:
            url = self._url(endpoint, ref, "manifests", ref.manifest_key)
            with self._transport.exchange(self._whole_body_deadline(deadline)) as exchange:
                response, _ = self._request(exchange, endpoint, ref, url, creds, {"Accept": accept}, method="HEAD")
                with contextlib.closing(response):
                    digest = response.headers.get("Docker-Content-Digest", "").strip()
            return digest if _SHA256_DIGEST.fullmatch(digest) else None

        return self._across_endpoints(ref, attempt, deadline)

    def fetch_blob_bytes(
        self, ref: Reference, digest: str, creds: Credentials | None, limit: int, deadline: float | None = None
    ) -> bytes:
        """A small blob (a signature payload), read whole, capped and digest-checked."""

        def attempt(endpoint: Endpoint) -> bytes:
            url = self._url(endpoint, ref, "blobs", digest)
            with self._transport.exchange(self._whole_body_deadline(deadline)) as exchange:
                response, _ = self._request(exchange, endpoint, ref, url, creds, {})
                with contextlib.closing(response), exchange.read_whole(
                    response, limit, f"image {ref}: blob {digest}"
                ) as raw:
                    return bytes(raw)

        data = self._across_endpoints(ref, attempt, deadline)
        if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
            raise DigestMismatch(f"image {ref}: blob {digest} does not match its digest")
        return data

    @contextlib.contextmanager
    def open_blob(
        self, ref: Reference, digest: str, creds: Credentials | None, expected_size: int | None = None
    ) -> Iterator[BlobStream]:
        """Stream a blob. The download has its own deadline (it outlives the gRPC call), headers included."""
        deadline = self._clock() + self._pull.download_timeout_seconds

        def attempt(endpoint: Endpoint) -> tuple[contextlib.ExitStack, Exchange, requests.Response]:
            with contextlib.ExitStack() as stack:
                exchange = stack.enter_context(self._transport.exchange(deadline))
                response = self._request(exchange, endpoint, ref, url_of(endpoint), creds, {})[0]
                stack.callback(response.close)
                return stack.pop_all(), exchange, response  # the caller now holds the exchange open
            raise AssertionError("unreachable")

        def url_of(endpoint: Endpoint) -> str:
            return self._url(endpoint, ref, "blobs", digest)

        held, exchange, response = self._across_endpoints(ref, attempt, deadline)
        with held:
            yield exchange.stream(response, f"image {ref}", expected_size, BLOB_CHUNK_BYTES)

    # -- endpoints, retries ----------------------------------------------

    def _whole_body_deadline(self, deadline: float | None) -> float:
        own = self._clock() + self._pull.read_timeout_seconds * WHOLE_BODY_READ_TIMEOUTS
        return own if deadline is None else min(own, deadline)

    def _endpoints(self, ref: Reference) -> list[Endpoint]:
        upstream = self._node.registry(ref.registry)
        hosts = [(mirror, True) for mirror in upstream.mirrors] + [(ref.api_host, False)]
        endpoints = []
        for host, is_mirror in hosts:
            config = self._node.registry(host)
            verify: bool | str = config.ca_bundle or True
            endpoints.append(Endpoint(host, "http" if config.insecure else "https", verify, is_mirror))
        return endpoints

    def _across_endpoints(self, ref: Reference, attempt: Callable[[Endpoint], T], deadline: float | None) -> T:
        """Try each mirror in order, then the upstream; a mirror's failure falls through."""
        endpoints = self._endpoints(ref)
        for endpoint in endpoints[:-1]:
            if self._mirrors.skipped(endpoint.host):
                continue  # it gave no answer moments ago (csi_wasm.registry.mirrors)
            try:
                return self._retrier.run(lambda: attempt(endpoint), deadline, endpoint.host)
            except ModuleNotFound:
                continue
            except RegistryError as exc:
                silent = gave_no_answer(exc)
                if silent:
                    self._mirrors.down(endpoint.host)
                # an admin who configured the mirror must see it fail: the publish itself goes on upstream
                event(log, "registry.mirror_failed", logging.WARNING, mirror=endpoint.host, image=str(ref),
                      reason=exc.reason, error=str(exc), skipped_seconds=MIRROR_SKIP_SECONDS if silent else 0)  # fmt: skip
                continue
        return self._retrier.run(lambda: attempt(endpoints[-1]), deadline, endpoints[-1].host)

    # -- one request, with auth ------------------------------------------

    def _request(
        self,
        exchange: Exchange,
        endpoint: Endpoint,
        ref: Reference,
        url: str,
        creds: Credentials | None,
        headers: dict[str, str],
        method: str = "GET",
    ) -> tuple[requests.Response, bool]:
        scope = f"repository:{ref.repository}:pull"
        auth = self._auth.cached(endpoint, scope, creds)
        response, moved = exchange.send(endpoint, ref, url, headers, auth, method)
        used_credentials = False
        if response.status_code == 401:
            challenge = response.headers.get("WWW-Authenticate", "")
            response.close()
            if moved:
                raise AccessDenied(
                    f"image {ref}: registry {endpoint.host} redirected to another host that asks for "
                    "credentials; the pod's credentials are only sent to the registry itself, refused"
                )
            auth = self._auth.authenticate(exchange, endpoint, ref, challenge, scope, creds)
            used_credentials = creds is not None
            response, _ = exchange.send(endpoint, ref, url, headers, auth, method)
        elif auth is not None:
            used_credentials = creds is not None
        exchange.check_status(response, ref, endpoint, creds)
        return response, used_credentials

    def _url(self, endpoint: Endpoint, ref: Reference, kind: str, key: str) -> str:
        container = oras.container.Container(f"{endpoint.host}/{ref.repository}", registry=endpoint.host)
        path = container.manifest_url(key) if kind == "manifests" else container.get_blob_url(key)
        return f"{endpoint.scheme}://{path}"
