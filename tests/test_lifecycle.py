"""Node lifecycle: garbage collection, the free-disk guard, restart recovery, kill -9, concurrency, stress,
pre-pull and the operator commands. Real mounts, real registry, the real driver."""

from __future__ import annotations

import logging
import os
import pathlib
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from typing import Callable

import grpc
import pytest

from csi_wasm.config import NodeConfig, StoreConfig
from csi_wasm.demo.kubelet import InlineVolume, Kubelet
from csi_wasm.demo.push import Pushed, Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module, sha256_digest
from csi_wasm.gc import GarbageCollector
from csi_wasm.metrics import Metrics
from csi_wasm.pins import Pins
from csi_wasm.pull import ModuleRequest, Puller
from csi_wasm.records import RecordStore
from csi_wasm.reference import parse_reference
from csi_wasm.registry import RegistryClient
from csi_wasm.store import ModuleStore, StoredModule
from csi_wasm.logs import EVENT_FIELDS
from csi_wasm import syscalls
from csi_wasm.mounts import REQUIRED_OPTIONS, LinuxMounter, unmount_path

from conftest import RunningDriver, driver_process, fast_pull_config, read_only, start_driver, stop_driver, wait_for

DAY = 24 * 3600.0


@pytest.fixture(scope="module")
def modules(pusher: Pusher) -> list[Pushed]:
    return [pusher.wasm_artifact("lifecycle/filter", f"m{n}", make_module(5000 + n, f"lifecycle-{n}")) for n in range(5)]


def _collector(csi: RunningDriver, now: float, protect_landed: bool = False, **store: float) -> GarbageCollector:
    """A collector on the running driver's store with a fake clock. Fresh downloads are protected for a
    minute of real time; tests that fake days passing leave that protection out unless they race."""
    driver = csi.driver
    config = replace(driver.config.node.store, **store)  # type: ignore[arg-type]
    protected = driver.protected_from_gc if protect_landed else driver.prepulled
    return GarbageCollector(driver.store, driver.records, driver.pins, config, driver.metrics,
                            protected=protected, clock=lambda: now)


def _sample(csi: RunningDriver, name: str, **labels: str) -> float:
    return csi.driver.metrics.registry.get_sample_value(name, labels) or 0.0


# -- garbage collection ------------------------------------------------------------


def test_gc_keeps_referenced_modules_and_unused_ones_until_the_grace_period_ends(
    csi: RunningDriver, modules: list[Pushed]
) -> None:
    used, released = csi.volume(modules[0].reference), csi.volume(modules[1].reference)
    csi.kubelet.mount(used)
    csi.kubelet.mount(released)
    csi.kubelet.unmount(released)
    now = time.time()
    report = _collector(csi, now + DAY - 60).collect()
    assert report.removed == () and report.kept_in_grace == 1 and report.kept_referenced == 1
    report = _collector(csi, now + DAY + 60).collect()
    assert report.removed == (modules[1].module_digest,)
    assert csi.driver.store.has(modules[0].module_digest) and not csi.driver.store.has(modules[1].module_digest)
    assert (csi.kubelet.target_path(used) / "plugin.wasm").read_bytes() == make_module(5000, "lifecycle-0")
    again = csi.volume(modules[1].reference)  # a collected module is fetched again when needed
    assert (csi.kubelet.mount(again) / "plugin.wasm").read_bytes() == make_module(5001, "lifecycle-1")
    csi.kubelet.unmount(again)
    csi.kubelet.unmount(used)


def test_gc_never_judges_use_by_access_time(csi: RunningDriver, modules: list[Pushed]) -> None:
    volume = csi.volume(modules[2].reference)
    target = csi.kubelet.mount(volume)
    old = time.time() - 30 * DAY  # nobody has read it for a month, but a pod still mounts it
    os.utime(csi.driver.store.module_path(modules[2].module_digest), (old, old))
    assert _collector(csi, time.time()).collect().removed == ()
    assert (target / "plugin.wasm").exists()
    csi.kubelet.unmount(volume)


def test_over_the_size_cap_unreferenced_modules_go_least_recently_used_first(
    csi: RunningDriver, modules: list[Pushed]
) -> None:
    volumes = [csi.volume(m.reference) for m in modules[:4]]
    for volume in volumes:
        csi.kubelet.mount(volume)
    for offset, volume in zip((300, 100, 200), volumes[:3]):  # release in a known order of "last used"
        csi.kubelet.unmount(volume)
        csi.driver.store.touch(modules[volumes.index(volume)].module_digest, time.time() - offset)
    sizes = {m.digest: m.size for m in csi.driver.store.modules()}
    cap = sum(sizes.values()) - sizes[modules[0].module_digest] - 1  # must free just over one module
    report = _collector(csi, time.time(), max_store_bytes=cap).collect()
    assert report.removed == (modules[0].module_digest, modules[2].module_digest)  # oldest first, until under cap
    assert csi.driver.store.has(modules[3].module_digest)  # referenced: never deleted
    tiny = _collector(csi, time.time(), max_store_bytes=1).collect()
    assert modules[3].module_digest not in tiny.removed and csi.driver.store.has(modules[3].module_digest)
    csi.kubelet.unmount(volumes[3])


def _stored_by_another_puller(csi: RunningDriver, modules: list[Pushed], node_config: NodeConfig) -> None:
    """Put modules in the driver's store as `csi-wasm pull` would: not the driver's own fresh downloads,
    which it shields from the collector for a minute, so a collection may take them at once."""
    from csi_wasm.metrics import Metrics
    from csi_wasm.pull import ModuleRequest, Puller
    from csi_wasm.reference import parse_reference
    from csi_wasm.registry import RegistryClient

    store = csi.driver.store
    puller = Puller(type(store)(store.root), RegistryClient(node_config), node_config.pull, Metrics(process=False))
    try:
        for pushed in modules:
            puller.ensure(ModuleRequest(parse_reference(pushed.reference)))
    finally:
        puller.close()


def test_gc_never_takes_a_module_a_publish_in_flight_has_pinned(
    csi: RunningDriver, modules: list[Pushed], node_config: NodeConfig
) -> None:
    """Between the store lookup and the record, a publish holds only a pin: the collector must honour it."""
    _stored_by_another_puller(csi, modules[:1], node_config)
    digest = modules[0].module_digest
    assert csi.driver.pins.pin_if_present(digest, csi.driver.store.has)
    try:
        report = _collector(csi, time.time() + 10 * DAY, gc_grace_seconds=0).collect()
        assert digest not in report.removed and csi.driver.store.has(digest)
    finally:
        csi.driver.pins.unpin(digest)
    assert digest in _collector(csi, time.time() + 10 * DAY, gc_grace_seconds=0).collect().removed


def test_gc_racing_publishes_never_breaks_a_publish(
    csi: RunningDriver, modules: list[Pushed], node_config: NodeConfig
) -> None:
    _stored_by_another_puller(csi, modules, node_config)
    assert all(csi.driver.store.has(m.module_digest) for m in modules)
    stop = threading.Event()
    collector = _collector(csi, time.time() + 10 * DAY, protect_landed=True, gc_grace_seconds=0)
    removed: list[str] = []

    def collect_forever() -> None:
        start.wait()
        while not stop.is_set():
            removed.extend(collector.collect().removed)

    errors: list[BaseException] = []
    start = threading.Barrier(5)

    def churn(seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()
            for _ in range(25):
                pushed = rng.choice(modules)
                volume = csi.volume(pushed.reference)
                target = csi.kubelet.mount(volume)
                assert sha256_digest((target / "plugin.wasm").read_bytes()) == pushed.module_digest
                csi.kubelet.unmount(volume)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    gc_thread = threading.Thread(target=collect_forever)
    gc_thread.start()
    workers = [threading.Thread(target=churn, args=(n,)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    stop.set()
    gc_thread.join(30)
    assert errors == []
    assert removed, "the collector never took a module while the publishes ran: nothing was raced"
    # what it took was fetched again by the publishes that needed it; what it left was never downloaded
    downloads = _sample(csi, "csi_wasm_pull_duration_seconds_count")
    assert 1 <= downloads <= len(removed), (downloads, removed)
    assert csi.mounts_under_kubelet() == [] and csi.driver.records.all() == []


class _StoreCollectingOnArrival(ModuleStore):
    """The real store, with the worst interleaving forced: a garbage collection runs the moment a module
    appears under its name, before the download that brought it returns."""

    collect: Callable[[], object] = staticmethod(lambda: None)

    def adopt(self, temp_path: pathlib.Path, digest: str, size: int) -> StoredModule:
        stored = super().adopt(temp_path, digest, size)
        self.collect()
        return stored


@pytest.mark.parametrize("layout", ["raw", "compat"])
def test_a_download_is_shielded_from_the_collector_before_it_appears_in_the_store(
    tmp_path: pathlib.Path, pusher: Pusher, node_config: NodeConfig, layout: str
) -> None:
    module = make_module(5100, f"arrival-{layout}")
    pushed = (pusher.wasm_artifact("lifecycle/arrival", "v1", module) if layout == "raw"
              else pusher.compat_image("lifecycle/arrival-compat", "v1", module))  # fmt: skip
    store = _StoreCollectingOnArrival(tmp_path / "store")
    metrics = Metrics(process=False)
    puller = Puller(store, RegistryClient(node_config), node_config.pull, metrics)
    pins = Pins()
    config = replace(node_config.store, gc_grace_seconds=0)  # nothing unreferenced is kept for its age
    collector = GarbageCollector(store, RecordStore(tmp_path / "volumes"), pins, config, metrics,
                                 protected=puller.recently_landed)  # fmt: skip
    removed: list[str] = []
    store.collect = lambda: removed.extend(collector.collect().removed)
    try:
        resolved = puller.ensure_pinned(ModuleRequest(parse_reference(pushed.reference)), pins)
    finally:
        puller.close()
    assert removed == [] and store.has(resolved.digest) and sha256_digest(module) == resolved.digest
    assert metrics.registry.get_sample_value("csi_wasm_pull_duration_seconds_count") == 1  # downloaded once


class Recorded(logging.Handler):
    """The log records of one logger while a test runs (whatever the log format and level configured)."""

    def __init__(self, logger: str) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._logger = logging.getLogger(logger)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def events(self, name: str) -> list[logging.LogRecord]:
        return [record for record in self.records if record.getMessage() == name]

    def __enter__(self) -> Recorded:
        self._logger.addHandler(self)
        self._level = self._logger.level
        self._logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)


def test_a_failed_gc_pass_is_counted_and_logged_and_the_next_one_collects(
    csi: RunningDriver, modules: list[Pushed]
) -> None:
    store = csi.driver.store
    for pushed in modules[:2]:
        volume = csi.volume(pushed.reference)
        csi.kubelet.mount(volume)
        csi.kubelet.unmount(volume)
    first, held = modules[0].module_digest, modules[1].module_digest
    store.touch(first, time.time() - 200)  # collected first (least recently used)...
    store.touch(held, time.time() - 100)
    held_path = store.module_path(held)
    syscalls.mount(bytes(held_path), bytes(held_path), syscalls.MS_BIND)  # ...then this one: a mount point, EBUSY
    collector = _collector(csi, time.time() + DAY, gc_grace_seconds=0)
    stop = threading.Event()
    loop = threading.Thread(target=collector.run_forever, args=(3600.0, stop), name="gc-under-test")
    try:
        with Recorded("csi_wasm.gc") as log:
            loop.start()
            collector.trigger()
            assert wait_for(lambda: log.events("gc.failed") != [])  # logged once counted
            assert _sample(csi, "csi_wasm_gc_errors_total") == 1
            (failed,) = log.events("gc.failed")
            fields = getattr(failed, EVENT_FIELDS)
            assert "Errno 16" in fields["error"] and fields["retry_in_seconds"] == 3600.0 and failed.exc_info
            assert loop.is_alive()
            # the module removed before the failure is gone and counted; the held one stays
            assert not store.has(first) and store.has(held)
            assert _sample(csi, "csi_wasm_gc_evictions_total") == 1
            assert _sample(csi, "csi_wasm_gc_freed_bytes_total") == 5000
            unmount_path(held_path)
            collector.trigger()  # the next pass (the interval's, woken early)
            assert wait_for(lambda: _sample(csi, "csi_wasm_gc_evictions_total") == 2)
        assert not store.has(held) and store.modules() == []
        assert _sample(csi, "csi_wasm_gc_freed_bytes_total") == 5000 + 5001
        assert _sample(csi, "csi_wasm_gc_errors_total") == 1 and len(log.events("gc.failed")) == 1
    finally:
        stop.set()
        collector.trigger()
        loop.join(30)
        if LinuxMounter().mount_at(held_path) is not None:
            unmount_path(held_path)


def test_a_download_that_would_cross_the_free_space_floor_is_resource_exhausted(
    tmp_path: pathlib.Path, registry: LocalRegistry, modules: list[Pushed]
) -> None:
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    node = NodeConfig(store=StoreConfig(min_free_bytes=free + 10**9), pull=fast_pull_config())
    running = start_driver(tmp_path, node.with_insecure([registry.host]))
    try:
        with pytest.raises(grpc.RpcError) as failure:
            running.kubelet.mount(running.volume(modules[0].reference))
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "floor" in (failure.value.details() or "")
        assert running.driver.store.modules() == [] and not any(running.driver.store.tmp_dir.iterdir())
    finally:
        stop_driver(running)


# -- concurrency ---------------------------------------------------------------------


def test_a_second_call_for_a_busy_target_is_aborted(csi: RunningDriver, modules: list[Pushed]) -> None:
    volume = csi.volume(modules[0].reference)
    target = pathlib.Path(csi.kubelet.target_path(volume))
    with csi.driver.publisher._claim(target):  # an operation on this target is in flight
        with pytest.raises(grpc.RpcError) as failure:
            csi.kubelet.mount(volume)
        assert failure.value.code() == grpc.StatusCode.ABORTED
        with pytest.raises(grpc.RpcError) as failure:
            csi.kubelet.unmount(volume)
        assert failure.value.code() == grpc.StatusCode.ABORTED
    other = csi.volume(modules[0].reference)
    with csi.driver.publisher._claim(target):  # other targets are not held up
        csi.kubelet.mount(other)
    csi.kubelet.mount(volume)
    csi.kubelet.unmount(volume)
    csi.kubelet.unmount(other)


def test_stress_random_publish_and_unpublish_leaves_nothing_behind(csi: RunningDriver, modules: list[Pushed]) -> None:
    threads, targets_per_thread, seconds = 8, 25, 6.0
    pods = [[csi.volume(random.Random(t * 100 + n).choice(modules).reference) for n in range(targets_per_thread)]
            for t in range(threads)]  # fmt: skip
    published: list[set[int]] = [set() for _ in range(threads)]
    errors: list[BaseException] = []
    operations = [0]
    deadline = time.monotonic() + seconds

    def worker(index: int) -> None:
        rng = random.Random(index)
        try:
            while time.monotonic() < deadline:
                n = rng.randrange(targets_per_thread)
                if n in published[index]:
                    csi.kubelet.unmount(pods[index][n])
                    published[index].discard(n)
                else:
                    csi.kubelet.mount(pods[index][n])
                    published[index].add(n)
                operations[0] += 1
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert errors == [] and operations[0] > threads
    expected: dict[str, int] = {}
    for index, numbers in enumerate(published):
        for n in numbers:
            digest = sha256_digest(make_module(5000 + int(pods[index][n].attributes["image"][-1]),
                                               f"lifecycle-{pods[index][n].attributes['image'][-1]}"))  # fmt: skip
            expected[digest] = expected.get(digest, 0) + 1
    assert dict(csi.driver.records.references()) == expected
    assert len(csi.mounts_under_kubelet()) == sum(expected.values())
    for index, numbers in enumerate(published):
        for n in numbers:
            csi.kubelet.unmount(pods[index][n])
    assert csi.mounts_under_kubelet() == [] and csi.driver.records.all() == []
    assert not any((csi.config.state_dir / "volumes").glob("*.json"))


# -- restart recovery ----------------------------------------------------------------


def test_restart_repairs_records_mounts_and_temp_files(tmp_path: pathlib.Path, node_config: NodeConfig,
                                                       modules: list[Pushed]) -> None:  # fmt: skip
    running = start_driver(tmp_path, node_config)
    kept, lost = running.volume(modules[0].reference), running.volume(modules[1].reference)
    orphan = running.volume(modules[2].reference)
    half = running.volume(modules[3].reference)
    for volume in (kept, lost, orphan, half):
        running.kubelet.mount(volume)
    stop_driver_keeping_mounts(running)
    unmount_path(running.kubelet.target_path(lost))  # its mount vanished while the driver was down
    os.rmdir(running.kubelet.target_path(lost))
    records_dir = running.config.state_dir / "volumes"
    from csi_wasm.records import record_key

    (records_dir / f"{record_key(str(running.kubelet.target_path(orphan)))}.json").unlink()  # mount without record
    (records_dir / "garbage.json").write_text("{not json")
    # what a driver before issue 12 left when killed between its bind and its read-only remount: a
    # writable bind of a shared module, no record. Recovery must neither keep it writable nor take the
    # module away from the pod: it covers it with a read-only bind.
    half_target = running.kubelet.target_path(half)
    unmount_path(half_target)
    (records_dir / f"{record_key(str(half_target))}.json").unlink()
    view = running.driver.store.view(modules[3].module_digest, "plugin.wasm")
    syscalls.mount(bytes(view), bytes(half_target), syscalls.MS_BIND)  # no read-only remount
    (running.config.state_dir / "store" / "tmp" / "interrupted.partial").write_bytes(b"\0asm")

    restarted = start_driver(tmp_path, node_config)
    try:
        assert restarted.driver.store.sweep_temp_files() == 0  # already swept at start
        samples = {s.labels["kind"]: s.value for m in restarted.driver.metrics.registry.collect()
                   if m.name == "csi_wasm_start_repairs" for s in m.samples if s.name.endswith("_total")}  # fmt: skip
        assert samples == {"temp_file": 1, "unreadable_record": 1, "record_without_mount": 1, "adopted_mount": 2,
                           "writable_mount": 1}  # fmt: skip
        on_top = LinuxMounter().mount_at(half_target)
        assert on_top is not None and REQUIRED_OPTIONS <= on_top.options  # covered, still published
        assert restarted.mounts_under_kubelet().count(str(half_target)) == 2
        assert (half_target / "plugin.wasm").read_bytes() == make_module(5003, "lifecycle-3")
        targets = {r.target_path for r in restarted.driver.records.all()}
        assert targets == {str(restarted.kubelet.target_path(v)) for v in (kept, orphan, half)}
        for volume in (kept, orphan, lost, half):
            restarted.kubelet.unmount(volume)  # half: both the writable bind and its cover go
        assert restarted.mounts_under_kubelet() == [] and restarted.driver.records.all() == []
    finally:
        stop_driver(restarted)


def stop_driver_keeping_mounts(running: RunningDriver) -> None:
    running.kubelet.close()
    running.server.stop()


def test_kill_minus_9_mid_download_and_after_publish(
    tmp_path: pathlib.Path, registry: LocalRegistry, pusher: Pusher
) -> None:
    big = make_module(96 * 1024 * 1024, "kill-mid-download")
    large = pusher.wasm_artifact("lifecycle/large", "v1", big)
    small = pusher.wasm_artifact("lifecycle/small", "v1", make_module(4000, "kill-small"))
    driver = driver_process(tmp_path, "--insecure-registry", registry.host).start()
    kubelet = Kubelet(driver.socket, tmp_path / "kubelet")
    survivor = InlineVolume("pod-survivor", "survivor", "default", "wasm", {"image": small.reference})
    kubelet.mount(survivor)
    victim = InlineVolume("pod-victim", "victim", "default", "wasm", {"image": large.reference})
    tmp_dir = tmp_path / "state" / "store" / "tmp"
    publisher = threading.Thread(target=_try_mount, args=(kubelet, victim))
    publisher.start()
    assert wait_for(lambda: any(tmp_dir.glob("*.partial")), timeout=30), "download never started"
    driver.kill()  # kill -9 while the module streams into the store
    publisher.join(30)
    kubelet.close()
    assert (kubelet.target_path(survivor) / "plugin.wasm").read_bytes() == make_module(4000, "kill-small")

    driver = driver_process(tmp_path, "--insecure-registry", registry.host).start()
    kubelet = Kubelet(driver.socket, tmp_path / "kubelet")
    try:
        assert not any(tmp_dir.iterdir()), "temp files of the interrupted download survived the restart"
        assert (kubelet.mount(victim) / "plugin.wasm").stat().st_size == len(big)  # republish works
        verify = subprocess.run([sys.executable, "-m", "csi_wasm", "store", "verify", "--state-dir",
                                 str(tmp_path / "state")], capture_output=True, text=True)  # fmt: skip
        assert verify.returncode == 0 and "2 ok, 0 corrupt" in verify.stdout, verify.stdout
        kubelet.unmount(survivor)  # published before the kill, unpublished after the restart
        kubelet.unmount(victim)
    finally:
        kubelet.close()
        assert driver.terminate() == 0
    assert not pathlib.Path(driver.socket).exists()


def _try_mount(kubelet: Kubelet, volume: InlineVolume) -> None:
    try:
        kubelet.mount(volume)
    except grpc.RpcError:
        pass  # the driver was killed under it


# -- pre-pull and operator commands -------------------------------------------------------


def test_prepull_at_start_warms_the_store_and_protects_it_from_gc(
    tmp_path: pathlib.Path, registry: LocalRegistry, modules: list[Pushed]
) -> None:
    node = replace(NodeConfig(pull=fast_pull_config()), prepull=(modules[3].reference,)).with_insecure([registry.host])
    running = start_driver(tmp_path, node)
    try:
        assert wait_for(lambda: running.driver.store.has(modules[3].module_digest), timeout=30)
        assert wait_for(lambda: modules[3].module_digest in running.driver.prepulled())
        report = _collector(running, time.time() + 10 * DAY, gc_grace_seconds=0).collect()
        assert modules[3].module_digest not in report.removed
        volume = running.volume(modules[3].reference, pullPolicy="Never")
        assert (running.kubelet.mount(volume) / "plugin.wasm").exists()
        running.kubelet.unmount(volume)
    finally:
        stop_driver(running)


def test_prepull_failures_are_logged_one_by_one_and_the_driver_serves_anyway(
    tmp_path: pathlib.Path, registry: LocalRegistry, pusher: Pusher, modules: list[Pushed]
) -> None:
    not_wasm = pusher.wasm_artifact("lifecycle/notwasm", "v1", b"a text file, not a module\n" * 40)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        down = f"127.0.0.1:{probe.getsockname()[1]}"  # nothing listens there once the socket is closed
    failing = {f"{registry.host}/lifecycle/missing:v1": "not_found", f"{down}/lifecycle/down:v1": "unavailable",
               not_wasm.reference: "invalid_wasm", "Not A Reference": "invalid_argument"}  # fmt: skip
    # the good one last: the modules are pre-pulled in order, so once it is stored every failure was met
    node = replace(NodeConfig(pull=replace(fast_pull_config(), attempts=1)),
                   prepull=(*failing, modules[2].reference)).with_insecure([registry.host, down])  # fmt: skip
    with Recorded("csi_wasm.server") as log:
        running = start_driver(tmp_path, node)
        try:
            assert running.driver.is_ready()
            assert wait_for(lambda: modules[2].module_digest in running.driver.prepulled(), timeout=30)
            failed = [getattr(record, EVENT_FIELDS) for record in log.events("prepull.failed")]
            assert {fields["image"]: fields["reason"] for fields in failed} == failing
            assert all(fields["image"] in fields["error"] for fields in failed), failed  # each names its image
            assert {record.levelno for record in log.events("prepull.failed")} == {logging.WARNING}
            for reason in ("not_found", "unavailable", "invalid_wasm", "success"):
                assert _sample(running, "csi_wasm_pulls_total", result=reason) == 1, reason
            served = running.volume(modules[2].reference, pullPolicy="Never")
            assert (running.kubelet.mount(served) / "plugin.wasm").read_bytes() == make_module(5002, "lifecycle-2")
            running.kubelet.unmount(served)
        finally:
            stop_driver(running)


def test_an_unforeseen_prepull_failure_is_logged_and_the_rest_is_still_pre_pulled(
    tmp_path: pathlib.Path, registry: LocalRegistry, modules: list[Pushed]
) -> None:
    node = NodeConfig(pull=fast_pull_config()).with_insecure([registry.host])
    warm = _cli("pull", "--state-dir", str(tmp_path / "state"), "--insecure-registry", registry.host,
                modules[2].reference)  # fmt: skip
    assert warm.returncode == 0, warm.stderr
    node = replace(node, prepull=(modules[3].reference, modules[2].reference))  # a download, then a stored one
    with Recorded("csi_wasm.server") as log, read_only(tmp_path / "state" / "store" / "tmp"):
        running = start_driver(tmp_path, node)
        try:
            assert wait_for(lambda: modules[2].module_digest in running.driver.prepulled(), timeout=30)
            (failed,) = log.events("prepull.failed")
            fields = getattr(failed, EVENT_FIELDS)
            assert fields["image"] == modules[3].reference and fields["reason"] == "internal"
            assert "Read-only file system" in fields["error"] and failed.exc_info and failed.levelno == logging.ERROR
            assert not running.driver.store.has(modules[3].module_digest)
        finally:
            stop_driver(running)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "csi_wasm", *args], capture_output=True, text=True, timeout=60)


def test_store_commands_list_verify_and_gc(tmp_path: pathlib.Path, csi: RunningDriver, modules: list[Pushed]) -> None:
    state = str(csi.config.state_dir)
    used, released = csi.volume(modules[0].reference), csi.volume(modules[1].reference)
    csi.kubelet.mount(used)
    csi.kubelet.mount(released)
    csi.kubelet.unmount(released)
    listing = _cli("store", "list", "--state-dir", state)
    assert listing.returncode == 0
    lines = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:]}
    assert lines[modules[0].module_digest][2] == "1" and lines[modules[1].module_digest][2] == "0"
    corrupt = csi.driver.store.module_path(modules[1].module_digest)
    corrupt.write_bytes(b"\0asm\x01\0\0\0bitrot")
    verify = _cli("store", "verify", "--state-dir", state)
    assert verify.returncode == 1 and f"CORRUPT {modules[1].module_digest}" in verify.stdout
    assert not csi.driver.store.has(modules[1].module_digest)
    assert any(csi.driver.store.quarantine_dir.iterdir())
    csi.kubelet.unmount(used)
    config = tmp_path / "gc.yaml"
    config.write_text("store: {gc_grace_seconds: 0}\n")
    csi.server.stop()  # offline gc: the in-process driver is gone, the CLI collects itself
    gc = _cli("store", "gc", "--state-dir", state, "--config", str(config))
    assert gc.returncode == 0 and "removed 1 modules" in gc.stdout, gc.stdout + gc.stderr
    assert csi.driver.store.modules() == []


def test_store_gc_on_a_live_node_asks_the_running_driver(tmp_path: pathlib.Path, registry: LocalRegistry,
                                                         modules: list[Pushed]) -> None:  # fmt: skip
    config = tmp_path / "node.yaml"
    config.write_text("store: {gc_grace_seconds: 0, gc_interval_seconds: 3600}\n")
    # warmed by `csi-wasm pull` (not a download of the driver's own, which it shields for a minute)
    warm = _cli("pull", "--state-dir", str(tmp_path / "state"), "--insecure-registry", registry.host,
                modules[4].reference)  # fmt: skip
    assert warm.returncode == 0, warm.stderr
    driver = driver_process(tmp_path, "--insecure-registry", registry.host, "--config", str(config)).start()
    kubelet = Kubelet(driver.socket, tmp_path / "kubelet")
    try:
        volume = InlineVolume("pod-gc", "gc", "default", "wasm", {"image": modules[4].reference})
        kubelet.mount(volume)
        kubelet.unmount(volume)
        module = tmp_path / "state" / "store" / "modules" / "sha256" / modules[4].module_digest[7:]
        assert module.exists()
        gc = _cli("store", "gc", "--state-dir", str(tmp_path / "state"))
        assert gc.returncode == 0 and "asked it to collect" in gc.stdout
        assert wait_for(lambda: not module.exists(), timeout=10)
    finally:
        kubelet.close()
        assert driver.terminate() == 0


# -- the store's index: manifest and tag entries follow their modules -------------------------------


def test_gc_collects_manifest_and_tag_entries_whose_modules_are_gone(
    csi: RunningDriver, pusher: Pusher, node_config: NodeConfig
) -> None:
    from csi_wasm.metrics import Metrics
    from csi_wasm.pull import ModuleRequest, Puller, PullPolicy
    from csi_wasm.reference import parse_reference
    from csi_wasm.registry import RegistryClient

    images = [pusher.wasm_artifact("lifecycle/index", f"t{n}", make_module(3000 + n, f"index-{n}")) for n in range(12)]
    kept = csi.volume(images[0].reference)
    csi.kubelet.mount(kept)
    for pushed in images[1:]:
        for image in (pushed.reference, pushed.pinned):
            volume = csi.volume(image)
            csi.kubelet.mount(volume)
            csi.kubelet.unmount(volume)
    store = csi.driver.store
    assert len(list(store.manifests_dir.iterdir())) == len(list(store.tags_dir.iterdir())) == 12
    report = _collector(csi, time.time() + DAY, gc_grace_seconds=0).collect()
    assert len(report.removed) == 11
    assert (report.manifest_entries_removed, report.tag_entries_removed) == (11, 11)
    assert [p.name for p in store.manifests_dir.iterdir()] == [f"{images[0].manifest_digest[7:]}.json"]
    assert [store.tag(images[0].reference)] == [_tag_record(p) for p in store.tags_dir.iterdir()]
    # what is left still serves pullPolicy Never in a fresh process (no in-memory tag or manifest)
    fresh = Puller(type(store)(store.root), RegistryClient(node_config), node_config.pull, Metrics(process=False))
    try:
        module = fresh.ensure(ModuleRequest(parse_reference(images[0].reference), PullPolicy.NEVER))
        assert module.digest == images[0].module_digest
    finally:
        fresh.close()
    csi.kubelet.unmount(kept)


def _tag_record(path: pathlib.Path) -> tuple[str, float] | None:
    from csi_wasm.store import _tag_record as read

    return read(path)


def test_a_tag_entry_is_written_only_once_its_module_is_stored(
    tmp_path: pathlib.Path, proxy: object, pusher: Pusher, node_config: NodeConfig
) -> None:
    """A collection while the download runs finds no tag entry to judge; the entry appears with the
    manifest entry, so pullPolicy Never still finds the module after a restart. (When the tag entry was
    written before the download, the collector removed it as an orphan and the pull never wrote it again.)"""
    import faultproxy as fp

    from csi_wasm.metrics import Metrics
    from csi_wasm.pull import ModuleRequest, Puller, PullPolicy
    from csi_wasm.reference import parse_reference
    from csi_wasm.registry import RegistryClient

    assert isinstance(proxy, fp.FaultProxy)
    pushed = pusher.wasm_artifact("lifecycle/slowtag", "v1", make_module(4000, "slowtag"))
    proxy.add(rf"/blobs/{pushed.layer_digest}", fp.drip(600.0, pieces=600))  # until released
    running = start_driver(tmp_path, NodeConfig(pull=fast_pull_config()).with_insecure([proxy.host]))
    image = f"{proxy.host}/lifecycle/slowtag:v1"
    try:
        volume = running.volume(image)
        publish = threading.Thread(target=lambda: running.kubelet.mount(volume, timeout=60))
        publish.start()
        assert wait_for(lambda: proxy.count(rf"/blobs/{pushed.layer_digest}") == 1, 30)  # resolved, downloading
        report = _collector(running, time.time() + DAY, gc_grace_seconds=0).collect()
        assert report.tag_entries_removed == 0
        proxy.clear()
        publish.join(60)
        store = running.driver.store
        assert store.tag(image) is not None and store.tag(image)[0] == pushed.manifest_digest  # type: ignore[index]
        node = NodeConfig(pull=fast_pull_config()).with_insecure([proxy.host])
        fresh = Puller(type(store)(store.root), RegistryClient(node), node.pull, Metrics(process=False))
        try:
            assert fresh.ensure(ModuleRequest(parse_reference(image), PullPolicy.NEVER)).digest == pushed.module_digest
        finally:
            fresh.close()
        running.kubelet.unmount(volume)
    finally:
        proxy.clear()
        stop_driver(running)


def test_a_collection_never_removes_a_manifest_entry_a_pull_has_just_written(tmp_path: pathlib.Path) -> None:
    """The collector has found the entry's module missing; the pull lands the module and records the entry;
    only then does the collector act. Both take the store's index lock, so the entry survives."""
    from csi_wasm.store import ManifestEntry, ModuleStore

    store = ModuleStore(tmp_path / "store")
    entry = ManifestEntry("sha256:" + "a" * 64, "sha256:" + "b" * 64, 8, "cncf-wasm-artifact", False)
    store.remember_manifest(entry)  # an entry left by an earlier pull, its module since collected
    looked, carry_on = threading.Event(), threading.Event()
    has = store.has

    def pausing_has(digest: str) -> bool:
        found = has(digest)
        if threading.current_thread().name == "collector":
            looked.set()
            carry_on.wait(10)
        return found

    store.has = pausing_has  # type: ignore[method-assign]
    collector = threading.Thread(target=store.forget_orphan_manifests, name="collector")
    collector.start()
    assert looked.wait(10)
    store.module_path(entry.module_digest).write_bytes(b"\0asm\x01\0\0\0")  # the pull lands the module...
    writer = threading.Thread(target=store.remember_manifest_once, args=(entry,))
    writer.start()  # ...and records its manifest (it waits for the collector's lock)
    writer.join(1.0)
    carry_on.set()
    collector.join(10)
    writer.join(10)
    assert store.manifest(entry.manifest_digest) == entry
    assert ModuleStore(store.root).manifest(entry.manifest_digest) == entry  # on disk too
