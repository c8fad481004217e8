"""Prometheus metrics, on a registry of our own (never the global default).

No label carries an image, digest, pod or volume id: those are unbounded and go
to the logs. Labels are small closed sets (operation results, error reasons).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import gc_collector, platform_collector, process_collector

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
        self.pull_total = Counter("csi_wasm_pulls", "Module downloads by result", ["result"], registry=r)
        self.pull_bytes = Counter("csi_wasm_pull_bytes", "Bytes downloaded from registries", registry=r)
        self.pull_seconds = Histogram(
            "csi_wasm_pull_duration_seconds", "Module download duration", buckets=LATENCY_BUCKETS, registry=r
        )
        self.pulls_in_flight = Gauge("csi_wasm_pulls_in_flight", "Downloads running now", registry=r)
        self.pull_joins = Counter(
            "csi_wasm_pull_joins", "Publishes that joined a download already in flight", registry=r
        )
        self.cache_lookups = Counter("csi_wasm_cache_lookups", "Store lookups by outcome", ["outcome"], registry=r)
        self.store_modules = Gauge("csi_wasm_store_modules", "Modules in the store", registry=r)
        self.store_bytes = Gauge("csi_wasm_store_bytes", "Bytes of modules in the store", registry=r)
        self.referenced_modules = Gauge(
            "csi_wasm_store_referenced_modules", "Modules referenced by at least one volume", registry=r
        )
        self.gc_evictions = Counter("csi_wasm_gc_evictions", "Modules removed by garbage collection", registry=r)
        self.gc_bytes = Counter("csi_wasm_gc_freed_bytes", "Bytes freed by garbage collection", registry=r)
        self.repairs = Counter("csi_wasm_start_repairs", "Inconsistencies repaired at start", ["kind"], registry=r)
        self.mounted_volumes = Gauge("csi_wasm_mounted_volumes", "Volumes published on this node", registry=r)
