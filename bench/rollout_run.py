"""One rollout run: N driver processes, v1 everywhere, then every pod switches to v2 at once.

Also the per-proxy design for comparison: every pod fetching its own copy of v2.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from csi_wasm.demo.cluster import SimulatedNode, mirrored_registry_config, start_nodes, stop_nodes
from csi_wasm.demo.kubelet import InlineVolume, new_pod_uid
from csi_wasm.demo.push import Pushed, Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module

from bench.stats import summary_ms
from bench.upstream import RegistryLog, fetch_own_copy, tally

REPOSITORY = "rollout/filter"


@dataclass(frozen=True)
class Setup:
    workdir: pathlib.Path
    upstream: LocalRegistry
    pusher: Pusher
    module_bytes: int
    pods_per_node: int
    run_id: str

    def push(self, tag: str) -> Pushed:
        module = make_module(self.module_bytes, seed=f"{self.run_id}/{tag}")
        return self.pusher.wasm_artifact(REPOSITORY, tag, module)


@dataclass
class PodResult:
    seconds: float
    calls: int
    error: str = ""


STORM_RETRY_AFTER_S = 2


def csi_wasm(setup: Setup, node_count: int, variant: str) -> dict[str, Any]:
    """The driver's design: N nodes, one store each, P pods per node switch to v2 at once.

    ``storm``: the registry answers the first manifest request of every node with 429 and
    ``Retry-After`` (a fault proxy in front of it), and the run reports when the retries came.
    """
    name = f"{node_count}-{variant}"
    workdir = setup.workdir / name
    mirror = None
    if variant in ("mirror", "mirror-canary"):
        mirror = LocalRegistry(workdir / "mirror", proxy_remote=f"http://{setup.upstream.host}").start()
    storm = _storm_proxy(setup, node_count) if variant == "storm" else None
    host = storm.host if storm else setup.upstream.host
    config = mirrored_registry_config(host, [mirror.host] if mirror else [])
    nodes = [SimulatedNode(f"node-{i}", workdir / f"node-{i}", config, log_format="json") for i in range(node_count)]
    log = RegistryLog(setup.upstream)
    try:
        startup = start_nodes(nodes, timeout=300.0)
        v1 = setup.push(f"v1-{name}")
        old = _switch(nodes, f"{host}/{REPOSITORY}:v1-{name}", setup.pods_per_node)
        v2 = setup.push(f"v2-{name}")
        log.settle()
        mark = log.mark()
        image = f"{host}/{REPOSITORY}:v2-{name}"
        if storm:
            storm.arm()
        started = time.perf_counter()
        canary = _canary(nodes[0], image) if variant == "mirror-canary" else []
        new = canary + _switch(nodes, image, setup.pods_per_node)
        wall = time.perf_counter() - started
        log.settle()
        upstream = tally(log.since(mark))
        downloads = [_downloads(node, v2.module_digest) for node in nodes]
        _unpublish_all(nodes, old + new)
        retries = _storm_timing(storm, f"v2-{name}", node_count) if storm else None
    finally:
        stop_nodes(nodes)
        if mirror is not None:
            mirror.stop()
        if storm is not None:
            storm.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results = [result for _, _, result in new]
    design = {"direct": "csi-wasm", "mirror": "csi-wasm + mirror", "mirror-canary": "csi-wasm + mirror, canary first",
              "storm": f"csi-wasm, 429 Retry-After {STORM_RETRY_AFTER_S} s"}  # fmt: skip
    return _summary(design[variant], node_count, setup, results, wall) | {
        "storm": retries,
        "upstream": upstream,
        "downloads_per_node": downloads,
        "startup_s": startup,
        "v1_failures": sum(1 for _, _, r in old if r.error),
        "module_digest": v2.module_digest,
        "v1_digest": v1.module_digest,
    }


def per_proxy(setup: Setup, node_count: int) -> dict[str, Any]:
    """The seed's design: every pod's proxy downloads v2 itself from the upstream (no shared copy)."""
    name = f"{node_count}-per-proxy"
    setup.push(f"v2-{name}")
    workdir = setup.workdir / name
    workdir.mkdir(parents=True, exist_ok=True)
    log = RegistryLog(setup.upstream)
    log.settle()
    mark = log.mark()
    pods = node_count * setup.pods_per_node
    barrier = threading.Barrier(pods)

    def one(index: int) -> PodResult:
        barrier.wait()
        try:
            return PodResult(fetch_own_copy(setup.upstream.host, REPOSITORY, f"v2-{name}", workdir / f"{index}.wasm"), 1)
        except Exception as exc:  # noqa: BLE001 - a failed proxy is a data point
            return PodResult(0.0, 1, f"{type(exc).__name__}: {exc}"[:200])

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=pods) as pool:
        results = list(pool.map(one, range(pods)))
    wall = time.perf_counter() - started
    log.settle()
    upstream = tally(log.since(mark))
    shutil.rmtree(workdir, ignore_errors=True)
    return _summary("per-proxy", node_count, setup, results, wall) | {"upstream": upstream}


def _summary(design: str, nodes: int, setup: Setup, results: list[PodResult], wall: float) -> dict[str, Any]:
    done = [r.seconds for r in results if not r.error]
    return {
        "design": design,
        "nodes": nodes,
        "pods_per_node": setup.pods_per_node,
        "module_bytes": setup.module_bytes,
        "latency_ms": summary_ms(done),
        "samples_s": done,
        "wall_s": wall,
        "failures": sum(1 for r in results if r.error),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "retried": sum(1 for r in results if r.calls > 1),
        "calls": sum(r.calls for r in results),
    }


Published = tuple[SimulatedNode, InlineVolume, PodResult]


def _switch(nodes: list[SimulatedNode], image: str, per_node: int) -> list[Published]:
    """Every node's ``per_node`` pods ask for ``image`` at the same moment; each retried as kubelet does."""
    work: list[tuple[SimulatedNode, InlineVolume]] = []
    for node in nodes:
        for k in range(per_node):
            work.append((node, InlineVolume(new_pod_uid(), f"pod-{k}", "rollout", "wasm", {"image": image})))
    barrier = threading.Barrier(len(work))

    def one(item: tuple[SimulatedNode, InlineVolume]) -> PodResult:
        node, volume = item
        barrier.wait()
        started = time.perf_counter()
        try:
            mounted = node.kubelet.mount_retrying(volume, give_up_after=600.0)
        except Exception as exc:  # noqa: BLE001 - a pod that never mounted is a data point
            return PodResult(time.perf_counter() - started, 0, f"{type(exc).__name__}: {exc}"[:200])
        return PodResult(time.perf_counter() - started, mounted.calls)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(work)) as pool:
        results = list(pool.map(one, work))
    return [(node, volume, result) for (node, volume), result in zip(work, results)]


@dataclass
class _Storm:
    """A fault proxy in front of the upstream (tests/faultproxy.py, as tools/soak.py uses it) that answers
    the first manifest request of every node with 429 and Retry-After, once armed."""

    proxy: Any
    node_count: int
    fault: Any  # faultproxy.status(429, ...)

    @property
    def host(self) -> str:
        return str(self.proxy.host)

    def arm(self) -> None:
        self.proxy.add(r"^GET /v2/.*/manifests/v2-", self.fault, times=self.node_count)

    def seen(self, pattern: str) -> list[Any]:
        return list(self.proxy.seen(pattern))

    def stop(self) -> None:
        self.proxy.stop()


def _storm_proxy(setup: Setup, node_count: int) -> _Storm:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    import faultproxy  # type: ignore[import-not-found]  # tests/ is on the path now

    fault = faultproxy.status(429, {"Retry-After": str(STORM_RETRY_AFTER_S)})
    return _Storm(faultproxy.FaultProxy(setup.upstream.host).start(), node_count, fault)


def _storm_timing(proxy: _Storm, tag: str, node_count: int) -> dict[str, Any]:
    """When the 429s went out and when the retries came: the herd's width before and after."""
    asked = [seen.at for seen in proxy.seen(rf"^GET /v2/.*/manifests/{tag}")]
    refused, retried = asked[:node_count], asked[node_count:]
    if not refused or not retried:
        return {"refused": len(refused), "retried": len(retried)}
    return {
        "retry_after_s": STORM_RETRY_AFTER_S,
        "refused": len(refused),
        "retried": len(retried),
        "refused_spread_s": max(refused) - min(refused),
        "retry_spread_s": max(retried) - min(retried),
        "first_retry_after_first_429_s": min(retried) - min(refused),
        "first_retry_after_last_429_s": min(retried) - max(refused),
        "retry_offsets_s": sorted(t - min(refused) for t in retried),
    }


def _canary(node: SimulatedNode, image: str) -> list[Published]:
    """One pod first, so the mirror fills itself once before the fleet asks (a staged rollout)."""
    volume = InlineVolume(new_pod_uid(), "canary", "rollout", "wasm", {"image": image})
    started = time.perf_counter()
    mounted = node.kubelet.mount_retrying(volume, give_up_after=600.0)
    return [(node, volume, PodResult(time.perf_counter() - started, mounted.calls))]


def _unpublish_all(nodes: list[SimulatedNode], published: list[Published]) -> None:
    def one(item: Published) -> None:
        node, volume, result = item
        if not result.error:
            node.kubelet.unmount(volume)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(nodes) * 2)) as pool:
        list(pool.map(one, published))


def _downloads(node: SimulatedNode, digest: str) -> int:
    """Downloads of ``digest`` this node's driver logged (its ``pull.done`` events)."""
    count = 0
    for line in node.log().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "pull.done" and record.get("digest") == digest:
            count += 1
    return count
