"""Admission of publishes that must wait on a registry, so gRPC workers are never all parked on one.

A publish answered from the store needs no admission. A publish that must pull
(resolve a tag, download, or wait for a download another publish started) holds a
gRPC worker until the registry answers, which a hostile registry can make last as
long as kubelet waits. So at most ``total`` publishes may be pulling at once, and
at most ``per_registry`` from one registry; the next one answers UNAVAILABLE at
once (kubelet retries with backoff) instead of queueing behind them. The gRPC
server has workers beyond ``total`` (``server.FAST_WORKERS``), so Probe,
capabilities, unpublish and publishes of stored modules always find one.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import Iterator

from csi_wasm.errors import Overloaded


class Admission:
    def __init__(self, total: int, per_registry: int) -> None:
        self.total = max(1, total)
        self.per_registry = max(1, min(per_registry, self.total))
        self._pulling: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def pulling(self, registry: str, image: str) -> Iterator[None]:
        with self._lock:
            if self._pulling[registry] >= self.per_registry:
                raise Overloaded(
                    f"image {image}: {self._pulling[registry]} publishes on this node are already waiting on "
                    f"registry {registry[:100]} (pull.max_pulling_publishes_per_registry); retry shortly"
                )
            if sum(self._pulling.values()) >= self.total:
                raise Overloaded(
                    f"image {image}: {self.total} publishes on this node are already waiting on registries "
                    "(pull.max_pulling_publishes); retry shortly"
                )
            self._pulling[registry] += 1
        try:
            yield
        finally:
            with self._lock:
                self._pulling[registry] -= 1
                if not self._pulling[registry]:
                    del self._pulling[registry]

    def pulling_now(self, registry: str | None = None) -> int:
        with self._lock:
            return sum(self._pulling.values()) if registry is None else self._pulling[registry]
