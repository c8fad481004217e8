"""Manifest resolutions shared between publishes: one registry trip per burst, per credential.

A burst of publishes of a tag not yet on the node would each ask the registry for the
manifest (a counted pull on Docker Hub). ``Resolutions`` makes that one request:
callers with the same key share one fetch (the first runs it, the others wait for its
answer, each no longer than its own deadline), and a completed answer is kept for a
short while (``keep_seconds``, the node's ``tag_cache_seconds``) so that publishes of
the same burst arriving after it, while the download is still running, make no
request either.

The key holds the credential's fingerprint ("" for none): a pod only ever shares an
answer the registry gave to the same credentials, never another pod's authenticated
one (a pod without credentials cannot ride on a private tag another pod resolved).
Failures are shared with the callers that were waiting for them, never kept.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

from csi_wasm.credentials import Credentials
from csi_wasm.errors import RegistryTimeout
from csi_wasm.reference import Reference

T = TypeVar("T")
# Answers kept at most, and the largest body kept (a Wasm manifest is well under 1 KiB; an
# index of many platforms can be larger and is then fetched again rather than held).
MAX_KEPT = 256
MAX_KEPT_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class ResolutionKey:
    registry: str
    repository: str
    request: str  # what is asked: "GET <tag or digest>" or "HEAD <tag>"
    credential: str  # the credentials' fingerprint; "" for a pod without credentials

    @classmethod
    def of(cls, ref: Reference, creds: Credentials | None, request: str) -> ResolutionKey:
        return cls(ref.registry, ref.repository, request, creds.fingerprint if creds else "")


@dataclass
class _Kept(Generic[T]):
    answer: T
    at: float


class Resolutions(Generic[T]):
    def __init__(self, keep_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self._keep_seconds = keep_seconds
        self._clock = clock
        self._flights: dict[ResolutionKey, concurrent.futures.Future[T]] = {}
        self._kept: collections.OrderedDict[ResolutionKey, _Kept[T]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, key: ResolutionKey, fetch: Callable[[], T], deadline: float | None, reuse: bool = True
    ) -> tuple[T, bool]:
        """``fetch()``'s answer for ``key``, and whether this caller made the request itself.

        ``reuse``: accept an answer completed within ``keep_seconds`` (on this object's clock, the
        puller's); otherwise only a fetch in flight is joined (pullPolicy Always still makes one
        request per burst, not one per publish). ``deadline`` is on ``time.monotonic``, as every
        gRPC call's deadline in the puller.
        """
        with self._lock:
            kept = self._kept.get(key) if reuse else None
            if kept is not None and self._clock() - kept.at <= self._keep_seconds:
                return kept.answer, False
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = concurrent.futures.Future()
                self._flights[key] = flight
        if leader:
            return self._lead(key, flight, fetch), True
        return self._follow(key, flight, deadline), False

    def remember(self, key: ResolutionKey, answer: T) -> None:
        """Keep ``answer`` for ``key`` too (a manifest fetched by tag is also the answer for its digest)."""
        if _small(answer):
            with self._lock:
                self._keep(key, answer)

    def _keep(self, key: ResolutionKey, answer: T) -> None:
        self._kept[key] = _Kept(answer, self._clock())
        self._kept.move_to_end(key)
        while len(self._kept) > MAX_KEPT:
            self._kept.popitem(last=False)

    def _lead(self, key: ResolutionKey, flight: concurrent.futures.Future[T], fetch: Callable[[], T]) -> T:
        try:
            answer = fetch()
        except BaseException as exc:
            with self._lock:
                self._flights.pop(key, None)
            flight.set_exception(exc)
            raise
        small = _small(answer)  # outside the lock: it serialises the body
        with self._lock:
            self._flights.pop(key, None)
            if small:
                self._keep(key, answer)
        flight.set_result(answer)
        return answer

    def _follow(self, key: ResolutionKey, flight: concurrent.futures.Future[T], deadline: float | None) -> T:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return flight.result(timeout=timeout)
        except concurrent.futures.TimeoutError as exc:
            raise RegistryTimeout(
                f"{key.registry}/{key.repository}: the registry has not answered {key.request.split(' ', 1)[-1]!r} "
                "within this call's deadline (another publish's request is still waiting for it); kubelet will retry"
            ) from exc


def _small(answer: object) -> bool:
    """Keep small answers only: a digest, or a manifest whose body is at most MAX_KEPT_BODY_BYTES."""
    body = getattr(answer, "body", None)
    if body is None:
        return True
    try:
        return len(json.dumps(body, separators=(",", ":"))) <= MAX_KEPT_BODY_BYTES
    except (TypeError, ValueError):
        return False
