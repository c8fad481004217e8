"""A registry answering 429 with Retry-After to a rollout.

Retries honour Retry-After (never sooner, for that call and for every later call to that
registry from the node), come back spread out rather than in one synchronized wave, and
every pod is published: within the call when it can wait, otherwise after a prompt
UNAVAILABLE that kubelet's retry completes. Timings come from the fault proxy's own
record of when each request arrived.
"""

from __future__ import annotations

import pathlib
import statistics
import uuid
from typing import Iterator

import grpc
import pytest

from conftest import fast_pull_config, start_driver, stop_driver
from csi_wasm.config import NodeConfig
from csi_wasm.demo.cluster import SimulatedNode, mirrored_registry_config, start_nodes, stop_nodes
from csi_wasm.demo.kubelet import InlineVolume, new_pod_uid
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module
from faultproxy import FaultProxy, status

NODES = 6
PODS_PER_NODE = 4
RETRY_AFTER = 1.0


@pytest.fixture
def nodes(tmp_path: pathlib.Path, proxy: FaultProxy) -> Iterator[list[SimulatedNode]]:
    config = mirrored_registry_config(proxy.host, pull={"connect_timeout_seconds": 2.0, "read_timeout_seconds": 5.0})
    fleet = [SimulatedNode(f"node-{i}", tmp_path / f"node-{i}", config) for i in range(NODES)]
    start_nodes(fleet)
    yield fleet
    stop_nodes(fleet)


def test_a_429_storm_is_retried_after_retry_after_spread_out_and_every_pod_is_published(
    nodes: list[SimulatedNode], proxy: FaultProxy, pusher: Pusher
) -> None:
    """Each node asks for the same module under its own tag (so the proxy can tell the nodes apart); the
    registry turns every node's first request away with 429 and Retry-After: 1."""
    repo = f"storm/filter-{uuid.uuid4().hex[:8]}"
    module = make_module(50_000, repo)
    for index in range(NODES):
        pusher.wasm_artifact(repo, f"node-{index}", module)
    for index in range(NODES):
        proxy.add(rf"^GET /v2/{repo}/manifests/node-{index}$", status(429, {"Retry-After": "1"}), times=1)
    calls = []
    for index, node in enumerate(nodes):
        for _ in range(PODS_PER_NODE):
            volume = InlineVolume(new_pod_uid(), "pod", "default", "wasm", {"image": f"{proxy.host}/{repo}:node-{index}"})
            node.kubelet.target_path(volume).parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            calls.append((node, volume, node.kubelet.node.NodePublishVolume.future(
                node.kubelet.publish_request(volume), timeout=120)))  # fmt: skip
    for _, _, call in calls:
        call.result()  # every pod published by its first call: each node waited inside it
    assert all((node.kubelet.target_path(volume) / "plugin.wasm").read_bytes() == module
               for node, volume, _ in calls)  # fmt: skip
    waits = []
    for index in range(NODES):
        asked = proxy.seen(rf"^GET /v2/{repo}/manifests/node-{index}$")
        assert len(asked) == 2, "one request per node (its pods share it), turned away once, retried once"
        waits.append(asked[1].at - asked[0].at)
    assert min(waits) >= RETRY_AFTER, waits  # Retry-After honoured by every node
    # spread, not a synchronized wave: each node adds its own random share (up to 1 s here)
    assert max(waits) - min(waits) > 0.1, waits
    assert statistics.pstdev(waits) > 0.03, waits


def test_a_retry_after_longer_than_the_call_can_wait_is_unavailable_at_once_and_kubelets_retry_completes(
    tmp_path: pathlib.Path, registry: LocalRegistry, proxy: FaultProxy, pusher: Pusher
) -> None:
    """Retry-After: 3 against calls of 2 s: the first call answers UNAVAILABLE at once, naming the registry and
    the wait; kubelet's retries before the 3 s are answered at once too, without asking the registry; the
    first retry after them is published."""
    repo = f"storm/long-{uuid.uuid4().hex[:8]}"
    module = make_module(20_000, repo)
    pusher.wasm_artifact(repo, "v1", module)
    proxy.add(rf"^GET /v2/{repo}/manifests/", status(429, {"Retry-After": "3"}), times=1)
    running = start_driver(tmp_path, NodeConfig(pull=fast_pull_config()).with_insecure([proxy.host, registry.host]))
    try:
        volume = running.volume(f"{proxy.host}/{repo}:v1")
        with pytest.raises(grpc.RpcError) as first:
            running.kubelet.mount(volume, timeout=2.0)
        assert first.value.code() == grpc.StatusCode.UNAVAILABLE
        details = first.value.details() or ""
        assert proxy.host in details and "Retry-After" in details and "kubelet will retry" in details, details
        mounted = running.kubelet.mount_retrying(volume, timeout=2.0, initial_backoff=0.5)
        assert (mounted.target / "plugin.wasm").read_bytes() == module
        assert set(mounted.failed) <= {grpc.StatusCode.UNAVAILABLE}
        asked = proxy.seen(rf"^GET /v2/{repo}/manifests/")
        assert len(asked) == 2, [s.line for s in asked]  # kubelet's early retries never reached the registry
        assert asked[1].at - asked[0].at >= 3.0
        running.kubelet.unmount(volume)
    finally:
        stop_driver(running)
