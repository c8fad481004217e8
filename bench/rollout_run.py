"""One rollout run: N driver processes, v1 everywhere, then every pod switches to v2 at once.

Also the per-proxy design for comparison: every pod fetching its own copy of v2.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import shutil
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


def csi_wasm(setup: Setup, node_count: int, variant: str) -> dict[str, Any]:
    """The driver's design: N nodes, one store each, P pods per node switch to v2 at once."""
    name = f"{node_count}-{variant}"
    workdir = setup.workdir / name
    mirror = None
    if variant in ("mirror", "mirror-canary"):
        mirror = LocalRegistry(workdir / "mirror", proxy_remote=f"http://{setup.upstream.host}").start()
    config = mirrored_registry_config(setup.upstream.host, [mirror.host] if mirror else [])
    nodes = [SimulatedNode(f"node-{i}", workdir / f"node-{i}", config, log_format="json") for i in range(node_count)]
    log = RegistryLog(setup.upstream)
    try:
        startup = start_nodes(nodes, timeout=300.0)
        v1 = setup.push(f"v1-{name}")
        old = _switch(nodes, f"{setup.upstream.host}/{REPOSITORY}:v1-{name}", setup.pods_per_node)
        v2 = setup.push(f"v2-{name}")
        log.settle()
        mark = log.mark()
        image = f"{setup.upstream.host}/{REPOSITORY}:v2-{name}"
        started = time.perf_counter()
        canary = _canary(nodes[0], image) if variant == "mirror-canary" else []
        new = canary + _switch(nodes, image, setup.pods_per_node)
        wall = time.perf_counter() - started
        log.settle()
        upstream = tally(log.since(mark))
        downloads = [_downloads(node, v2.module_digest) for node in nodes]
        _unpublish_all(nodes, old + new)
    finally:
        stop_nodes(nodes)
        if mirror is not None:
            mirror.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results = [result for _, _, result in new]
    design = {"direct": "csi-wasm", "mirror": "csi-wasm + mirror", "mirror-canary": "csi-wasm + mirror, canary first"}
    return _summary(design[variant], node_count, setup, results, wall) | {
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
