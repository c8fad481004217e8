"""Six simulated nodes behind a real pull-through mirror (Debian's docker-registry with ``proxy: remoteurl:``)
in front of a real upstream registry.

    nodes (6 driver processes) --> fault proxy --> mirror (docker-registry, proxy mode) --> fault proxy --> upstream

The fault proxy in front of the upstream records every request synchronously: what the
mirror fetches to fill itself (Go's User-Agent) and what a node asks the upstream itself
(when it falls back). The one in front of the mirror takes the mirror down and brings it back.
Each test pushes modules of its own, so the nodes and the mirror can be shared by the module.
"""

from __future__ import annotations

import collections
import pathlib
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import grpc
import pytest

from csi_wasm.demo.cluster import SimulatedNode, mirrored_registry_config, start_nodes, stop_nodes
from csi_wasm.demo.kubelet import InlineVolume, new_pod_uid
from csi_wasm.demo.push import Pushed, Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module
from conftest import start_driver, stop_driver, wait_for
from csi_wasm.config import NodeConfig, PullConfig, RegistryHostConfig
from faultproxy import FaultProxy, stall_headers

NODES = 6
PODS_PER_NODE = 4
PULL = {"connect_timeout_seconds": 2.0, "read_timeout_seconds": 5.0, "attempts": 2}


@dataclass
class Fleet:
    upstream: FaultProxy  # the upstream registry as nodes and mirror reach it
    mirror_door: FaultProxy  # the mirror as nodes reach it
    mirror: LocalRegistry
    nodes: list[SimulatedNode]

    def image(self, pushed: Pushed, pinned: bool) -> str:
        """The reference a pod names: the upstream's host, as in a pod spec."""
        path = pushed.reference.split("/", 1)[1]
        return f"{self.upstream.host}/{path.rsplit(':', 1)[0]}@{pushed.manifest_digest}" if pinned else (
            f"{self.upstream.host}/{path}"
        )


@pytest.fixture(scope="module")
def fleet(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with FaultProxy(registry.host) as upstream:
        work = tmp_path_factory.mktemp("fleet")
        with LocalRegistry(work / "mirror", proxy_remote=f"http://{upstream.host}") as mirror:
            with FaultProxy(mirror.host) as door:
                config = mirrored_registry_config(upstream.host, [door.host], PULL)
                nodes = [SimulatedNode(f"node-{i}", work / f"node-{i}", config) for i in range(NODES)]
                start_nodes(nodes)
                try:
                    yield Fleet(upstream, door, mirror, nodes)
                finally:
                    stop_nodes(nodes)


def _push(pusher: Pusher, name: str) -> tuple[Pushed, bytes]:
    module = make_module(200_000, f"{name}-{uuid.uuid4()}")
    return pusher.wasm_artifact(f"fleet/{name}", "v1", module), module


def _tally(proxy: FaultProxy, since: int, repository: str) -> collections.Counter[str]:
    """Requests the upstream got after the ``since``-th one: 'GET manifest', 'HEAD blob', ... and
    who asked ('mirror' for the pull-through cache, 'node' for a driver that came itself)."""
    kinds: collections.Counter[str] = collections.Counter()
    for seen in proxy.seen()[since:]:
        if f"/v2/{repository}/" not in seen.path:
            continue
        what = "manifest" if "/manifests/" in seen.path else "blob"
        who = "mirror" if seen.headers.get("User-Agent", "").startswith("Go-http-client") else "node"
        kinds[f"{seen.method} {what} by {who}"] += 1
    return kinds


def _publish(node: SimulatedNode, image: str, count: int) -> list[InlineVolume]:
    """``count`` pods on ``node`` asking for ``image`` at once; every call must mount."""
    volumes = [InlineVolume(new_pod_uid(), f"pod-{k}", "default", "wasm", {"image": image}) for k in range(count)]
    for volume in volumes:
        node.kubelet.target_path(volume).parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    calls = [node.kubelet.node.NodePublishVolume.future(node.kubelet.publish_request(v), timeout=120) for v in volumes]
    for call in calls:
        call.result()
    return volumes


def _burst(nodes: list[SimulatedNode], image: str, per_node: int) -> list[tuple[SimulatedNode, InlineVolume]]:
    """Every node publishes ``per_node`` pods of ``image``, all nodes at once."""
    calls = []
    for node in nodes:
        for k in range(per_node):
            volume = InlineVolume(new_pod_uid(), f"pod-{k}", "default", "wasm", {"image": image})
            node.kubelet.target_path(volume).parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            request = node.kubelet.publish_request(volume)
            calls.append((node, volume, node.kubelet.node.NodePublishVolume.future(request, timeout=120)))
    for _, _, call in calls:
        call.result()
    return [(node, volume) for node, volume, _ in calls]


def _unpublish(published: list[tuple[SimulatedNode, InlineVolume]]) -> None:
    for node, volume in published:
        node.kubelet.unmount(volume)


def _module_of(node: SimulatedNode, volume: InlineVolume) -> bytes:
    return (node.kubelet.target_path(volume) / "plugin.wasm").read_bytes()


@pytest.mark.parametrize("pinned", [False, True], ids=["tag", "digest"])
def test_one_mirror_fill_serves_every_node(fleet: Fleet, pusher: Pusher, pinned: bool) -> None:
    pushed, module = _push(pusher, f"fill-{'digest' if pinned else 'tag'}")
    repository = pushed.reference.split("/", 1)[1].rsplit(":", 1)[0]
    image = fleet.image(pushed, pinned)
    first, rest = fleet.nodes[0], fleet.nodes[1:]

    start = fleet.upstream.count()
    volumes = _publish(first, image, 1)
    # distribution 2.8 fetches a blob it does not hold twice: once to stream it to the node, once (in
    # the background) to store it. Wait for the second before counting what the fill cost.
    assert wait_for(lambda: _tally(fleet.upstream, start, repository)["GET blob by mirror"] >= 2)
    fill = _tally(fleet.upstream, start, repository)
    # one mirror fill: the manifest once (a tag is first checked with a HEAD), the blob checked with a
    # HEAD, then fetched twice
    expected_fill = {"GET manifest by mirror": 1, "HEAD blob by mirror": 1, "GET blob by mirror": 2}
    if not pinned:
        expected_fill["HEAD manifest by mirror"] = 1
    assert dict(fill) == expected_fill

    start = fleet.upstream.count()
    published = _burst(rest, image, PODS_PER_NODE)
    added = _tally(fleet.upstream, start, repository)
    assert all(_module_of(node, volume) == module for node, volume in published)
    # the other nodes add no GET at all, and nothing of their own: the mirror serves them
    assert not [kind for kind in added if kind.startswith("GET") or kind.endswith("by node")], added
    if pinned:
        assert not added, "a digest the mirror holds is served without asking the upstream"
    else:
        # distribution's proxy re-checks a tag with the upstream (a HEAD, which Docker Hub does not
        # count against its pull limit) each time it is asked for it: once per node, whose pods share
        # one resolution
        assert dict(added) == {"HEAD manifest by mirror": len(rest)}
    _unpublish(published + [(first, v) for v in volumes])


@pytest.mark.parametrize("pinned", [False, True], ids=["tag", "digest"])
def test_upstream_down_nodes_publish_what_the_mirror_holds(fleet: Fleet, pusher: Pusher, pinned: bool) -> None:
    pushed, module = _push(pusher, f"upstream-down-{'digest' if pinned else 'tag'}")
    never_filled, _ = _push(pusher, f"never-filled-{'digest' if pinned else 'tag'}")
    image = fleet.image(pushed, pinned)
    first, rest = fleet.nodes[0], fleet.nodes[1:]
    volumes = _publish(first, image, 1)  # the mirror fills itself
    fleet.upstream.refuse()
    try:
        published = _burst(rest, image, 2)
        assert all(_module_of(node, volume) == module for node, volume in published)
        # what the mirror never held cannot be had: a clear UNAVAILABLE naming the upstream
        with pytest.raises(grpc.RpcError) as failure:
            rest[0].kubelet.mount(InlineVolume(new_pod_uid(), "p", "default", "wasm",
                                               {"image": fleet.image(never_filled, pinned)}))  # fmt: skip
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert fleet.upstream.host in (failure.value.details() or "")
    finally:
        fleet.upstream.accept()
    _unpublish(published + [(first, v) for v in volumes])


def test_mirror_down_nodes_fall_back_to_the_upstream(fleet: Fleet, pusher: Pusher) -> None:
    pushed, module = _push(pusher, "mirror-down")
    repository = pushed.reference.split("/", 1)[1].rsplit(":", 1)[0]
    image = fleet.image(pushed, pinned=False)
    fleet.mirror_door.refuse()
    start = fleet.upstream.count()
    logged = [len(node.log()) for node in fleet.nodes]
    try:
        started = time.monotonic()
        published = _burst(fleet.nodes, image, 2)
        elapsed = time.monotonic() - started
    finally:
        fleet.mirror_door.accept()
    assert all(_module_of(node, volume) == module for node, volume in published)
    # the admin sees why: every node logged the mirror's failure, and that it skips the mirror for a while
    for node, offset in zip(fleet.nodes, logged):
        failures = [line for line in node.log()[offset:].splitlines() if "registry.mirror_failed" in line]
        assert failures, node.name
        assert all(f"mirror={fleet.mirror_door.host}" in line and "skipped_seconds=60" in line for line in failures), failures
    added = _tally(fleet.upstream, start, repository)
    assert not [kind for kind in added if kind.endswith("by mirror")]
    # each node went to the upstream itself: one download per node, however many pods asked
    assert added["GET blob by node"] == len(fleet.nodes)
    # the fallback is bounded by the node config: per registry request, `attempts` connection
    # refusals and the backoff between them (at most 0.3 s here), so the burst ends in seconds,
    # far inside kubelet's 2 minutes
    assert elapsed < 30, elapsed
    _unpublish(published)


def test_each_node_keeps_its_own_state(fleet: Fleet) -> None:
    """The simulated nodes share nothing but the registries: state dirs, sockets, pods dirs are their own."""
    paths = [(n.state_dir, n.socket_path, n.pods_dir) for n in fleet.nodes]
    assert len({p for triple in paths for p in triple}) == 3 * len(fleet.nodes)
    assert all(pathlib.Path(n.socket_path).is_socket() for n in fleet.nodes)
    assert len({n.process.pid for n in fleet.nodes if n.process}) == len(fleet.nodes)


def test_a_mirror_that_gives_no_answer_is_skipped_for_a_while(
    tmp_path: pathlib.Path, registry: LocalRegistry, pusher: Pusher
) -> None:
    """A mirror that accepts connections and never answers costs the node one read timeout, once: the rest
    of that pull and the next modules go straight to the upstream (for MIRROR_SKIP_SECONDS)."""
    with FaultProxy(registry.host) as hung:  # stands for the mirror
        hung.add(r"", stall_headers(60))
        node = NodeConfig(
            registries={registry.host: RegistryHostConfig(insecure=True, mirrors=(hung.host,)),
                        hung.host: RegistryHostConfig(insecure=True)},
            pull=PullConfig(connect_timeout_seconds=2.0, read_timeout_seconds=2.0, attempts=2),
        )  # fmt: skip
        running = start_driver(tmp_path, node)
        try:
            first, first_module = _push(pusher, "hung-mirror-a")
            second, second_module = _push(pusher, "hung-mirror-b")
            for pushed, module in ((first, first_module), (second, second_module)):
                volume = running.volume(pushed.reference)
                assert (running.kubelet.mount(volume, timeout=60) / "plugin.wasm").read_bytes() == module
                running.kubelet.unmount(volume)
            assert [seen.line.split(" ")[0] for seen in hung.seen()] == ["GET"]  # the first manifest request only
            assert "manifests" in hung.seen()[0].path
        finally:
            stop_driver(running)
