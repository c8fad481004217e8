"""Availability guards no other test reached alone (found by the mutation pass).

* A manifest exchange ends at the calling request's deadline when that comes before its own (two read
  timeouts): here the read timeout is ten minutes and the registry drips the manifest over 20 s, so
  only the call's 1.5 s deadline can end it. With the call's deadline ignored the manifest arrives
  whole and no error is raised; nothing here measures time.
* Admission in all (``pull.max_pulling_publishes``), not only per registry: publishes waiting on two
  registries fill the node's total while neither registry is at its own cap, and the next publish is
  refused at once, naming the total.
"""

from __future__ import annotations

import pathlib
import threading
import time
from dataclasses import replace

import grpc
import pytest

import faultproxy as fp
from conftest import fast_pull_config, start_driver, stop_driver, wait_for
from csi_wasm.config import NodeConfig, PullConfig
from csi_wasm.demo.push import Pushed, Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.errors import RegistryTimeout
from csi_wasm.reference import parse_reference
from csi_wasm.registry import RegistryClient

CALL_TIMEOUT = 120.0


def _through(pushed: Pushed, proxy: fp.FaultProxy) -> str:
    return pushed.reference.replace(pushed.reference.split("/", 1)[0], proxy.host, 1)


def test_a_manifest_exchange_ends_at_the_calls_deadline_before_its_own(proxy: fp.FaultProxy, pusher: Pusher) -> None:
    pushed = pusher.wasm_artifact("guard/deadline", "v1", make_module(2000, "guard-deadline"))
    proxy.add(r"^GET /v2/guard/deadline/manifests/", fp.drip(20.0, pieces=200))  # 0.1 s between pieces
    pull = PullConfig(connect_timeout_seconds=2.0, read_timeout_seconds=600.0, attempts=1)
    client = RegistryClient(NodeConfig(pull=pull).with_insecure([proxy.host]))
    try:
        with pytest.raises(RegistryTimeout, match="deadline"):
            client.fetch_manifest(parse_reference(_through(pushed, proxy)), None, deadline=time.monotonic() + 1.5)
        assert proxy.count(r"^GET /v2/guard/deadline/manifests/") == 1
    finally:
        proxy.clear()
        client.close()


def test_the_nodes_total_admission_holds_across_registries(
    tmp_path: pathlib.Path, pusher: Pusher, proxy: fp.FaultProxy, registry: LocalRegistry
) -> None:
    """Limits 3 in all, 2 per registry: two publishes wait on registry A, one on B; a second one for B
    (under B's own cap) is refused at once by the total. Then the registries answer and all three finish."""
    images = {name: pusher.wasm_artifact(f"guard/admission-{name}", "v1", make_module(3000, f"guard-{name}"))
              for name in ("a1", "a2", "b1", "b2")}  # fmt: skip
    with fp.FaultProxy(registry.host) as other:
        pull = replace(fast_pull_config(), read_timeout_seconds=120.0, max_pulling_publishes=3,
                       max_pulling_publishes_per_registry=2)  # fmt: skip
        running = start_driver(tmp_path, NodeConfig(pull=pull).with_insecure([proxy.host, other.host]))
        held = r"^GET /v2/guard/admission-\w+/manifests/"
        proxy.add(held, fp.hold())
        other.add(held, fp.hold())
        via = {"a1": proxy, "a2": proxy, "b1": other, "b2": other}
        volumes = {name: running.volume(_through(images[name], via[name])) for name in images}
        outcomes: dict[str, grpc.StatusCode | None] = {}

        def publish(name: str) -> None:
            try:
                running.kubelet.mount(volumes[name], timeout=CALL_TIMEOUT)
                outcomes[name] = None
            except grpc.RpcError as exc:
                outcomes[name] = exc.code()

        waiting = [threading.Thread(target=publish, args=(name,), daemon=True) for name in ("a1", "a2", "b1")]
        try:
            for thread in waiting:
                thread.start()
            # each admitted publish has asked its registry for its manifest, which the registry holds
            assert wait_for(lambda: proxy.count(held) == 2 and other.count(held) == 1, timeout=30), (
                proxy.seen(), other.seen())
            with pytest.raises(grpc.RpcError) as refused:
                running.kubelet.mount(volumes["b2"], timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "(pull.max_pulling_publishes)" in (refused.value.details() or ""), refused.value.details()
            assert other.count(r"^GET /v2/guard/admission-b2/") == 0
        finally:
            proxy.clear()
            other.clear()
            for thread in waiting:
                thread.join(CALL_TIMEOUT)
        try:
            assert outcomes == {"a1": None, "a2": None, "b1": None}
            for name in ("a1", "a2", "b1"):
                running.kubelet.unmount(volumes[name])
        finally:
            stop_driver(running)
