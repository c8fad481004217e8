"""Garbage collection of the module store.

A module is collectable only when no volume record names it, no publish has it
pinned, and it is not a configured pre-pull; and only once it has been unused
for the grace period (``store.gc_grace_seconds``, default 24 h). Use is judged
from publish/unpublish (the module's mtime is set at each), never from access
time: Istio's access-time purge deleted modules still in use. Over the store
cap (``store.max_store_bytes``) unreferenced modules go at once, least recently
used first; a referenced module is never deleted.

Then the store's index follows its modules: a manifest entry whose module is gone,
and a tag entry whose manifest entry is gone, are useless and removed (under the
store's index lock, which a pull's writes take too, so a collection never removes
an entry a pull has just written for a module it has just stored).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator, Protocol

from csi_wasm.config import StoreConfig
from csi_wasm.logs import event
from csi_wasm.metrics import Metrics
from csi_wasm.records import RecordStore
from csi_wasm.store import ModuleStore

log = logging.getLogger("csi_wasm.gc")


class PinGuard(Protocol):
    def exclusive(self) -> ContextManager[frozenset[str]]:
        """Hold off new pins while deleting; yield the modules pinned by publishes in progress."""
        ...


class NoPublishes:
    """The guard for an offline store (the driver is not running, so nothing can be pinned)."""

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[frozenset[str]]:
        yield frozenset()


@dataclass(frozen=True)
class GcReport:
    removed: tuple[str, ...] = ()
    freed_bytes: int = 0
    kept_referenced: int = 0
    kept_in_grace: int = 0
    store_bytes: int = 0
    manifest_entries_removed: int = 0
    tag_entries_removed: int = 0


@dataclass
class GarbageCollector:
    store: ModuleStore
    records: RecordStore
    pins: PinGuard
    config: StoreConfig
    metrics: Metrics
    protected: Callable[[], set[str]] = set
    clock: Callable[[], float] = time.time
    _wake: threading.Event = field(default_factory=threading.Event)

    def collect(self) -> GcReport:
        modules = sorted(self.store.modules(), key=lambda m: m.last_used)
        references = self.records.references()
        total = sum(m.size for m in modules)
        excess = total - self.config.max_store_bytes if self.config.max_store_bytes else 0
        now, protected = self.clock(), self.protected()
        removed, freed, referenced, in_grace = [], 0, 0, 0
        for module in modules:
            if references[module.digest] or module.digest in protected:
                referenced += 1
                continue
            if now - module.last_used < self.config.gc_grace_seconds and excess <= 0:
                in_grace += 1
                continue
            with self.pins.exclusive() as pinned:
                if self.records.references()[module.digest] or module.digest in pinned:
                    referenced += 1
                    continue
                self.store.remove(module.digest)
            # counted as each goes: a pass that fails on a later module has still freed these
            self.metrics.gc_evictions.inc()
            self.metrics.gc_bytes.inc(module.size)
            removed.append(module.digest)
            freed += module.size
            excess -= module.size
            event(log, "gc.evicted", digest=module.digest, bytes=module.size,
                  unused_seconds=round(now - module.last_used), over_cap=excess + module.size > 0)  # fmt: skip
        manifests = self.store.forget_orphan_manifests()  # after the modules: their entries go with them
        tags = self.store.forget_orphan_tags()  # after the manifest entries, for the same reason
        report = GcReport(tuple(removed), freed, referenced, in_grace, total - freed, manifests, tags)
        event(log, "gc", removed=len(removed), freed_bytes=freed, kept_referenced=referenced,
              kept_in_grace=in_grace, store_bytes=report.store_bytes, manifest_entries_removed=manifests,
              tag_entries_removed=tags)  # fmt: skip
        return report

    def trigger(self) -> None:
        """Ask the background loop to collect now (SIGUSR1 from `csi-wasm store gc`)."""
        self._wake.set()

    def run_forever(self, interval: float, stop: threading.Event) -> None:
        while not stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if stop.is_set():
                return
            self._collect_or_count_the_failure(interval)

    def _collect_or_count_the_failure(self, interval: float) -> None:
        """One pass of the loop. The loop must outlive any pass (a store on a filesystem gone read-only,
        a module file something holds): a failure is counted, logged with its trace, and tried again."""
        try:
            self.collect()
        except Exception as exc:  # noqa: BLE001 - whatever it was, the next interval tries again
            self.metrics.gc_errors.inc()
            event(log, "gc.failed", logging.ERROR, trace=True, error=f"{type(exc).__name__}: {exc}",
                  retry_in_seconds=interval)  # fmt: skip
