"""Prometheus metrics, on a registry of our own (never the global default).

No label carries an image, digest, pod or volume id: those are unbounded and go
to the logs. Labels are small closed sets (operation results, error reasons).
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import gc_collector, platform_collector, process_collector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from csi_wasm.config import StoreConfig
from csi_wasm.errors import DriverError

# A cached publish is sub-millisecond; a cold pull of a large module can take minutes.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
)  # fmt: skip


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, process: bool = True) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        if process:
            process_collector.ProcessCollector(registry=self.registry)
            platform_collector.PlatformCollector(registry=self.registry)
            gc_collector.GCCollector(registry=self.registry)
        r = self.registry
        self.publish_total = Counter(
            "csi_wasm_publish", "NodePublishVolume calls by result", ["result"], registry=r
        )
        self.publish_seconds = Histogram(
            "csi_wasm_publish_duration_seconds", "NodePublishVolume latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.unpublish_total = Counter(
            "csi_wasm_unpublish", "NodeUnpublishVolume calls by result", ["result"], registry=r
        )
        self.unpublish_seconds = Histogram(
            "csi_wasm_unpublish_duration_seconds", "NodeUnpublishVolume latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.pull_total = Counter(
            "csi_wasm_pulls",
            "Publishes that went to a registry (store misses), by result; joining a running download counts too",
            ["result"],
            registry=r,
        )
        self.pull_bytes = Counter("csi_wasm_pull_bytes", "Bytes downloaded from registries", registry=r)
        self.pull_seconds = Histogram(
            "csi_wasm_pull_duration_seconds", "Duration of completed module downloads", buckets=LATENCY_BUCKETS, registry=r
        )
        self.pulls_in_flight = Gauge("csi_wasm_pulls_in_flight", "Downloads running now", registry=r)
        self.pull_joins = Counter(
            "csi_wasm_pull_joins", "Publishes that joined a download already in flight", registry=r
        )
        self.cache_lookups = Counter("csi_wasm_cache_lookups", "Store lookups by outcome", ["outcome"], registry=r)
        self.gc_evictions = Counter("csi_wasm_gc_evictions", "Modules removed by garbage collection", registry=r)
        self.gc_bytes = Counter("csi_wasm_gc_freed_bytes", "Bytes freed by garbage collection", registry=r)
        self.gc_errors = Counter(
            "csi_wasm_gc_errors", "Garbage collection passes that failed (tried again at the next interval)", registry=r
        )
        self.repairs = Counter("csi_wasm_start_repairs", "Inconsistencies repaired at start", ["kind"], registry=r)
        self.ready = Gauge("csi_wasm_ready", "1 once the driver has recovered its state and serves publishes", registry=r)
        self._start_at_zero()

    def _start_at_zero(self) -> None:
        """Every known label value exists from the start, so rate() and alerts see the first event."""
        results = ["success", "internal", *sorted({cls.reason for cls in _error_classes()})]
        for counter in (self.publish_total, self.unpublish_total, self.pull_total):
            for result in results:
                counter.labels(result)
        for outcome in ("hit", "miss"):
            self.cache_lookups.labels(outcome)

    def watch_store(self, sizes: Callable[[], Mapping[str, int]], references: Callable[[], Mapping[str, int]]) -> None:
        """Report the store at scrape time (module digest -> bytes, digest -> volumes), so it is never stale."""
        self.registry.register(_StoreCollector(sizes, references))

    def watch_readiness(self, is_ready: Callable[[], bool]) -> None:
        """Readiness as a gauge (what /healthz answers), so an alert sees a driver stuck recovering."""
        self.ready.set_function(lambda: 1.0 if is_ready() else 0.0)

    def watch_store_space(self, store_root: pathlib.Path, limits: StoreConfig) -> None:
        """The store's cap and free-space floor next to the free space they are compared with."""
        self.registry.register(_StoreSpaceCollector(store_root, limits))


def _error_classes() -> list[type[DriverError]]:
    found, pending = [], [DriverError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


class _StoreCollector(Collector):
    def __init__(self, sizes: Callable[[], Mapping[str, int]], references: Callable[[], Mapping[str, int]]) -> None:
        self._sizes = sizes
        self._references = references

    def collect(self) -> Iterable[Metric]:
        sizes, references = self._sizes(), self._references()
        referenced = sum(1 for digest in sizes if references.get(digest, 0) > 0)
        yield GaugeMetricFamily("csi_wasm_store_modules", "Modules in the store", value=len(sizes))
        yield GaugeMetricFamily("csi_wasm_store_bytes", "Bytes of modules in the store", value=sum(sizes.values()))
        yield GaugeMetricFamily(
            "csi_wasm_store_referenced_modules", "Modules used by at least one volume", value=referenced
        )
        yield GaugeMetricFamily(
            "csi_wasm_mounted_volumes", "Volumes published on this node", value=sum(references.values())
        )
        yield GaugeMetricFamily(
            "csi_wasm_store_unreferenced_modules", "Modules no volume uses (GC candidates)", value=len(sizes) - referenced
        )


class _StoreSpaceCollector(Collector):
    def __init__(self, store_root: pathlib.Path, limits: StoreConfig) -> None:
        self._root = store_root
        self._limits = limits

    def collect(self) -> Iterable[Metric]:
        stats = os.statvfs(self._root)  # what the store's free-space check reads before a download
        yield GaugeMetricFamily(
            "csi_wasm_store_filesystem_free_bytes", "Bytes available to the driver on the store's filesystem",
            value=stats.f_bavail * stats.f_frsize,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "csi_wasm_store_min_free_bytes", "Free-space floor: new downloads are refused below it (0: none)",
            value=self._limits.min_free_bytes,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "csi_wasm_store_max_bytes", "Store cap: GC removes unused modules above it (0: no cap)",
            value=self._limits.max_store_bytes,
        )  # fmt: skip
