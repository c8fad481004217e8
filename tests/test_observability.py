"""Metrics (exact samples from the scrape endpoint), structured logs, health, and the dashboard."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import socket
import subprocess
import threading
import urllib.request
from dataclasses import replace
from typing import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from csi_wasm.config import DriverConfig, NodeConfig, RegistryHostConfig, StoreConfig
from csi_wasm.demo.kubelet import InlineVolume, Kubelet
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module, sha256_digest
from csi_wasm.gc import GarbageCollector
from csi_wasm.http import MetricsServer
from csi_wasm.server import Driver
from csi_wasm.mounts import unmount_path
from csi_wasm.topology import share_directory

import faultproxy as fp
from conftest import DRIVER_NAME, PRIVATE_AUTH, RunningDriver, driver_process, fast_pull_config, start_driver, stop_driver
from conftest import read_only, wait_for
from faultproxy import FaultProxy

ROOT = pathlib.Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
ALLOWED_LABELS = {"result", "outcome", "kind", "le"}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def observed(
    tmp_path: pathlib.Path, registry: LocalRegistry, private_registry: LocalRegistry,
    tls_files: tuple[pathlib.Path, pathlib.Path],
) -> Iterator[tuple[RunningDriver, str]]:  # fmt: skip
    down = f"127.0.0.1:{_closed_port()}"
    node = NodeConfig(
        registries={registry.host: RegistryHostConfig(insecure=True), down: RegistryHostConfig(insecure=True),
                    private_registry.host: RegistryHostConfig(ca_bundle=str(tls_files[0]))},
        pull=replace(fast_pull_config(), max_module_bytes=100_000, attempts=1),
    )  # fmt: skip
    running = start_driver(tmp_path, node)
    server = MetricsServer("127.0.0.1", 0, running.driver.metrics.registry, running.driver.is_ready).start()
    yield running, f"http://127.0.0.1:{server.port}"
    server.stop()
    stop_driver(running)


def _scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _fail(running: RunningDriver, volume: InlineVolume) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failure:
        running.kubelet.mount(volume)
    return failure.value.code()


def test_publishes_of_every_outcome_are_counted_exactly(
    observed: tuple[RunningDriver, str], pusher: Pusher, private_pusher: Pusher
) -> None:
    running, base = observed
    good = pusher.wasm_artifact("metrics/good", "v1", make_module(4000, "metrics-good"))
    not_wasm = pusher.wasm_artifact("metrics/notwasm", "v1", b"plain text, not a module" * 10)
    huge = pusher.wasm_artifact("metrics/huge", "v1", make_module(200_000, "metrics-huge"))
    private = private_pusher.wasm_artifact("metrics/private", "v1", make_module(3000, "metrics-private"))
    down = next(h for h, c in running.config.node.registries.items() if c.insecure and h != pusher.host)

    ok_a, ok_b = running.volume(good.reference), running.volume(good.reference)
    running.kubelet.mount(ok_a)
    running.kubelet.mount(ok_b)  # a cache hit: no second pull
    cases = {
        "invalid_argument": running.volume("NOT A REFERENCE"),
        "not_found": running.volume(f"{pusher.host}/metrics/missing:v1"),
        "unauthorized": running.inline({"image": private.reference}, {"username": "x", "password": "y"}),
        "unavailable": running.volume(f"{down}/metrics/down:v1"),
        "invalid_wasm": running.volume(not_wasm.reference),
        "too_large": running.volume(huge.reference),
        "digest_mismatch": running.volume(good.reference, moduleDigest=sha256_digest(b"something else")),
    }
    for volume in cases.values():
        _fail(running, volume)
    running.kubelet.unmount(ok_a)

    samples = _scrape(base)
    assert _value(samples, "csi_wasm_publish_total", result="success") == 2
    for reason in cases:
        assert _value(samples, "csi_wasm_publish_total", result=reason) == 1, reason
    assert _value(samples, "csi_wasm_publish_duration_seconds_count") == 2 + len(cases)
    assert _value(samples, "csi_wasm_unpublish_total", result="success") == 1
    # pulls: one per trip to the registry (the digest-mismatch publish is a cache hit, then refused)
    assert _value(samples, "csi_wasm_pulls_total", result="success") == 1
    for reason in ("not_found", "unauthorized", "unavailable", "invalid_wasm", "too_large"):
        assert _value(samples, "csi_wasm_pulls_total", result=reason) == 1, reason
    assert _value(samples, "csi_wasm_pull_bytes_total") >= 4000 + 24 * 10
    assert _value(samples, "csi_wasm_pull_duration_seconds_count") == 1  # completed downloads only
    assert _value(samples, "csi_wasm_cache_lookups_total", outcome="hit") == 2
    assert _value(samples, "csi_wasm_store_modules") == 1
    assert _value(samples, "csi_wasm_store_bytes") == 4000
    assert _value(samples, "csi_wasm_store_referenced_modules") == 1
    assert _value(samples, "csi_wasm_store_unreferenced_modules") == 0
    assert _value(samples, "csi_wasm_mounted_volumes") == 1
    assert _value(samples, "csi_wasm_pulls_in_flight") == 0
    assert _value(samples, "process_resident_memory_bytes") > 0
    running.kubelet.unmount(ok_b)
    assert _value(_scrape(base), "csi_wasm_store_unreferenced_modules") == 1


def test_no_label_carries_an_image_digest_pod_or_volume(observed: tuple[RunningDriver, str], pusher: Pusher) -> None:
    running, base = observed
    volume = running.volume(pusher.wasm_artifact("metrics/labels", "v1", make_module(2000, "labels")).reference)
    running.kubelet.mount(volume)
    running.kubelet.unmount(volume)
    for (name, labels), _ in _scrape(base).items():
        if name.startswith("csi_wasm_"):
            assert {key for key, _ in labels} <= ALLOWED_LABELS, (name, labels)
            assert not any("sha256" in value or "/" in value for _, value in labels), (name, labels)


def test_healthz_answers_once_ready(observed: tuple[RunningDriver, str]) -> None:
    _, base = observed
    response = urllib.request.urlopen(f"{base}/healthz", timeout=5)
    assert response.status == 200 and response.read() == b"ok\n"


def test_json_logs_carry_the_event_fields_and_never_secrets(
    tmp_path: pathlib.Path, private_registry: LocalRegistry, private_pusher: Pusher,
    tls_files: tuple[pathlib.Path, pathlib.Path],
) -> None:  # fmt: skip
    pushed = private_pusher.wasm_artifact("logs/private", "v1", make_module(3000, "logs"))
    config = tmp_path / "node.yaml"
    config.write_text(json.dumps({"registries": {private_registry.host: {"ca_bundle": str(tls_files[0])}}}))
    driver = driver_process(tmp_path, "--config", str(config), "--metrics-address", "127.0.0.1:0",
                            global_args=("--log-format", "json", "--log-level", "debug")).start()  # fmt: skip
    kubelet = Kubelet(driver.socket, tmp_path / "kubelet")
    secrets = {"username": PRIVATE_AUTH.username, "password": PRIVATE_AUTH.password}
    volume = InlineVolume("pod-logs", "web-0", "shop", "wasm", {"image": pushed.reference}, secrets)
    kubelet.mount(volume)
    denied = InlineVolume("pod-denied", "web-1", "shop", "wasm", {"image": pushed.reference},
                          {"username": "mallory", "password": "Guess-Secret-123"})  # fmt: skip
    with pytest.raises(grpc.RpcError):
        kubelet.mount(denied)
    assert driver.process is not None and driver.process.stderr is not None
    kubelet.unmount(volume)
    kubelet.close()
    assert driver.terminate() == 0
    output = driver.process.stderr.read().decode()
    lines = [json.loads(line) for line in output.splitlines()]  # every line is JSON
    metrics_port = next(line["address"] for line in lines if line["event"] == "metrics")
    assert re.match(r"127\.0\.0\.1:\d+$", metrics_port)
    publish = [line for line in lines if line["event"] == "publish"]
    assert {p["result"] for p in publish} == {"success", "unauthorized"}
    ok = next(p for p in publish if p["result"] == "success")
    assert ok["volume_id"] == volume.volume_id and ok["pod"] == "shop/web-0" and ok["image"] == pushed.reference
    assert ok["digest"] == pushed.module_digest and ok["seconds"] >= 0 and ok["level"] == "info"
    unpublish = next(line for line in lines if line["event"] == "unpublish")
    assert unpublish["digest"] == pushed.module_digest and unpublish["pod"] == "shop/web-0"
    assert any(line["event"] == "pull.done" and line["bytes"] == 3000 for line in lines)
    for secret in (PRIVATE_AUTH.password, "Guess-Secret-123"):
        assert secret not in output


def test_readiness_is_a_gauge_that_turns_on_once_state_is_recovered(tmp_path: pathlib.Path) -> None:
    config = DriverConfig(DRIVER_NAME, "test-node", f"unix://{tmp_path}/csi.sock", tmp_path / "state",
                          tmp_path / "kubelet", NodeConfig())  # fmt: skip
    share_directory(config.kubelet_dir / "pods")
    driver = Driver(config)
    server = MetricsServer("127.0.0.1", 0, driver.metrics.registry, driver.is_ready).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert _value(_scrape(base), "csi_wasm_ready") == 0  # what the DriverNotReady alert watches
        driver.recover()
        assert _value(_scrape(base), "csi_wasm_ready") == 1
    finally:
        server.stop()
        driver.close()
        unmount_path(config.kubelet_dir / "pods")


def test_store_space_gauges_show_the_floor_the_driver_enforces(
    tmp_path: pathlib.Path, registry: LocalRegistry, pusher: Pusher
) -> None:
    """The store on a filesystem of its own (a small tmpfs): free space is exact, and crossing the floor is real."""
    node_fs = tmp_path / "node"
    node_fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "csi-wasm-test", str(node_fs)], check=True)
    running = None
    try:
        limits = StoreConfig(max_store_bytes=3 * MiB, min_free_bytes=7 * MiB)
        running = start_driver(node_fs, NodeConfig(store=limits, pull=fast_pull_config()).with_insecure([registry.host]))
        server = MetricsServer("127.0.0.1", 0, running.driver.metrics.registry, running.driver.is_ready).start()
        base = f"http://127.0.0.1:{server.port}"
        big = pusher.wasm_artifact("metrics/space", "v1", make_module(2 * MiB, "metrics-space"))
        with pytest.raises(grpc.RpcError) as refused:
            running.kubelet.mount(running.volume(big.reference))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        before = os.statvfs(running.config.state_dir)
        samples = _scrape(base)
        after = os.statvfs(running.config.state_dir)
        server.stop()
        assert before.f_bavail == after.f_bavail  # nothing wrote in between: the free space is exact
        free = before.f_bavail * before.f_frsize
        assert _value(samples, "csi_wasm_store_filesystem_free_bytes") == free
        assert _value(samples, "csi_wasm_store_min_free_bytes") == 7 * MiB
        assert _value(samples, "csi_wasm_store_max_bytes") == 3 * MiB
        # the conditions the store alerts compare: under 1 GiB above the floor, and a publish refused for it
        assert free - 7 * MiB < 1024 * MiB
        assert _value(samples, "csi_wasm_publish_total", result="resource_exhausted") == 1
    finally:
        if running is not None:
            stop_driver(running)
        subprocess.run(["umount", "-l", str(node_fs)], check=True)


# -- counters that only move in one scenario: each driven into it and read from /metrics -----------------


@pytest.fixture
def proxied(tmp_path: pathlib.Path, proxy: FaultProxy) -> Iterator[tuple[RunningDriver, str]]:
    running = start_driver(tmp_path, NodeConfig(pull=fast_pull_config()).with_insecure([proxy.host]))
    server = MetricsServer("127.0.0.1", 0, running.driver.metrics.registry, running.driver.is_ready).start()
    yield running, f"http://127.0.0.1:{server.port}"
    server.stop()
    stop_driver(running)


def test_a_publish_that_joins_a_download_in_flight_is_counted_once(
    proxied: tuple[RunningDriver, str], proxy: FaultProxy, pusher: Pusher
) -> None:
    running, base = proxied
    module = make_module(64 * 1024, "metrics-join")
    pushed = pusher.wasm_artifact("metrics/join", "v1", module)
    blob = rf"^GET /v2/metrics/join/blobs/{pushed.layer_digest}"
    proxy.add(blob, fp.drip(600.0, pieces=600))  # the download stays in flight until the proxy is cleared
    image = f"{proxy.host}/metrics/join:v1"
    first, second = running.volume(image), running.volume(image)
    outcomes: list[BaseException | None] = []

    def publish(volume: InlineVolume) -> None:
        try:
            running.kubelet.mount(volume, timeout=60)
            outcomes.append(None)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            outcomes.append(exc)

    threads = [threading.Thread(target=publish, args=(volume,)) for volume in (first, second)]
    threads[0].start()
    assert wait_for(lambda: proxy.count(blob) == 1, timeout=30)  # the first publish is downloading
    threads[1].start()
    assert wait_for(lambda: _value(_scrape(base), "csi_wasm_pull_joins_total") == 1, timeout=30)
    proxy.clear()
    for thread in threads:
        thread.join(60)
    assert outcomes == [None, None]
    samples = _scrape(base)
    assert _value(samples, "csi_wasm_pull_joins_total") == 1
    assert _value(samples, "csi_wasm_pull_duration_seconds_count") == 1  # one download...
    assert proxy.count(blob) == 1  # ...one blob request...
    assert _value(samples, "csi_wasm_pull_bytes_total") == len(module)  # ...its bytes counted once
    assert _value(samples, "csi_wasm_publish_total", result="success") == 2
    paths = [running.kubelet.target_path(volume) / "plugin.wasm" for volume in (first, second)]
    assert paths[0].stat().st_ino == paths[1].stat().st_ino
    for volume in (first, second):
        running.kubelet.unmount(volume)


def test_garbage_collection_counts_what_it_evicts_and_frees(observed: tuple[RunningDriver, str], pusher: Pusher) -> None:
    running, base = observed
    sizes = {"a": 3000, "b": 4500}
    for name, size in sizes.items():
        volume = running.volume(pusher.wasm_artifact("metrics/gc", name, make_module(size, f"metrics-gc-{name}")).reference)
        running.kubelet.mount(volume)
        running.kubelet.unmount(volume)
    kept = running.volume(pusher.wasm_artifact("metrics/gc", "kept", make_module(2000, "metrics-gc-kept")).reference)
    running.kubelet.mount(kept)  # referenced: never evicted, never counted
    driver = running.driver  # a collector without the "just downloaded" protection, grace over
    collector = GarbageCollector(driver.store, driver.records, driver.pins, replace(driver.config.node.store,
                                 gc_grace_seconds=0), driver.metrics)  # fmt: skip
    assert _value(_scrape(base), "csi_wasm_gc_evictions_total") == 0
    assert len(collector.collect().removed) == 2
    samples = _scrape(base)
    assert _value(samples, "csi_wasm_gc_evictions_total") == 2
    assert _value(samples, "csi_wasm_gc_freed_bytes_total") == sum(sizes.values())
    assert _value(samples, "csi_wasm_store_bytes") == 2000
    assert collector.collect().removed == ()  # nothing left to take: the counters stay
    again = _scrape(base)
    assert (_value(again, "csi_wasm_gc_evictions_total"), _value(again, "csi_wasm_gc_freed_bytes_total")) == (2, 7500)
    assert _value(again, "csi_wasm_gc_errors_total") == 0
    running.kubelet.unmount(kept)


class KeptRecords(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_an_unforeseen_error_is_internal_counted_and_logged_with_its_trace(
    observed: tuple[RunningDriver, str], pusher: Pusher
) -> None:
    """What the CsiWasmPublishErrors alert watches: result="internal", here from a store whose filesystem
    went read-only under the driver (nothing the driver foresees, so nothing with a code of its own). The
    publish fails at its download, before anything is mounted or recorded."""
    running, base = observed
    pushed = pusher.wasm_artifact("metrics/internal", "v1", make_module(3000, "metrics-internal"))
    volume = running.volume(pushed.reference)
    handler = KeptRecords(logging.ERROR)
    logging.getLogger("csi_wasm.servicers").addHandler(handler)
    try:
        with read_only(running.driver.store.tmp_dir):
            with pytest.raises(grpc.RpcError) as failure:
                running.kubelet.mount(volume)
    finally:
        logging.getLogger("csi_wasm.servicers").removeHandler(handler)
    assert failure.value.code() == grpc.StatusCode.INTERNAL
    assert failure.value.details() == "NodePublishVolume: internal error, see the driver's log"
    assert _value(_scrape(base), "csi_wasm_publish_total", result="internal") == 1
    traced = [r for r in handler.records if r.getMessage() == "unexpected error in NodePublishVolume" and r.exc_info]
    assert len(traced) == 1 and "Read-only file system" in str(traced[0].exc_info[1])  # type: ignore[index]
    assert running.mounts_under_kubelet() == [] and running.driver.records.all() == []
    assert not any(running.driver.store.tmp_dir.iterdir())
    assert (running.kubelet.mount(volume) / "plugin.wasm").read_bytes() == make_module(3000, "metrics-internal")
    assert _value(_scrape(base), "csi_wasm_publish_total", result="internal") == 1
    running.kubelet.unmount(volume)
