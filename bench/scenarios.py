"""The measurements. Each scenario returns plain data (seconds, bytes, KiB) for the report and the JSON.

Every scenario runs against the real driver subprocess over its unix socket and a
real ``docker-registry`` on 127.0.0.1, in the same run, so each ratio compares
figures taken minutes apart on the same machine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from csi_wasm import mounts, syscalls
from csi_wasm._gen import csi_pb2
from csi_wasm.demo.kubelet import InlineVolume
from csi_wasm.demo.push import Pushed, Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.targets import Targets

from bench.driver import CALL_TIMEOUT, Client, DriverProcess
from bench.plan import MiB, Plan


@dataclass
class Bench:
    plan: Plan
    workdir: pathlib.Path
    registry: LocalRegistry
    pusher: Pusher
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    sizes: dict[str, int] = field(default_factory=dict)  # layer digest -> bytes, of what was pushed

    def push(self, repo: str, tag: str, size: int) -> Pushed:
        """A fresh module (content unique to this run, repo and tag) as a CNCF Wasm artifact."""
        module = make_module(size, seed=f"{self.run_id}/{repo}:{tag}")
        pushed = self.pusher.wasm_artifact(repo, tag, module)
        self.sizes[pushed.layer_digest] = size
        return pushed

    def blob_url(self, repo: str, digest: str) -> str:
        return f"http://{self.registry.host}/v2/{repo}/blobs/{digest}"

    def wait_for_blob_gets(self, repo: str, digest: str, at_least: int, timeout: float = 5.0) -> int:
        """Blob GETs of ``digest`` the registry logged (its log is read by a thread: give it a moment)."""
        deadline = time.monotonic() + timeout
        while True:
            count = self.registry.blob_gets(repo, digest)
            if count >= at_least or time.monotonic() > deadline:
                time.sleep(0.2)  # and let any late extra GET show up too
                return self.registry.blob_gets(repo, digest)
            time.sleep(0.02)


def repo_of(pushed: Pushed) -> str:
    return pushed.reference.split("/", 1)[1].rsplit(":", 1)[0]


# -- floors -----------------------------------------------------------------


class MountFloor:
    """Bind + ro remount + unmount, in this process: bare syscalls, and the driver's own LinuxMounter
    (which opens the target beneath a pods dir and attaches a read-only copy with the new mount API)."""

    def __init__(self, workdir: pathlib.Path) -> None:
        self.source = workdir / "floor" / "source"
        self.target = workdir / "floor" / "kubelet" / "pods" / "target"
        self.source.mkdir(parents=True, exist_ok=True)
        self.target.mkdir(parents=True, exist_ok=True)
        (self.source / "plugin.wasm").write_bytes(make_module(1024))
        self._targets = Targets(workdir / "floor" / "kubelet")
        self._mounter = mounts.LinuxMounter(staging_dir=workdir / "floor" / "staging")

    def bare(self) -> float:
        source, target = bytes(self.source), bytes(self.target)
        started = time.perf_counter()
        syscalls.mount(source, target, syscalls.MS_BIND)
        syscalls.mount(None, target, syscalls.MS_REMOUNT | syscalls.MS_BIND | mounts.READ_ONLY_FLAGS)
        syscalls.umount2(target, syscalls.UMOUNT_NOFOLLOW)
        return time.perf_counter() - started

    def mounter(self) -> float:
        started = time.perf_counter()
        with self._targets.open(str(self.target)) as target:
            self._mounter.bind_read_only(self.source, target)
            self._mounter.unmount(target)
        return time.perf_counter() - started


# -- warm publish -------------------------------------------------------------


def warm(bench: Bench, driver: DriverProcess, client: Client) -> dict[str, Any]:
    """Floors and warm publish/unpublish, interleaved round by round so all see the same machine."""
    plan = bench.plan
    pushed = bench.push("bench/warm", "v1", 1 * MiB)
    floor = MountFloor(bench.workdir)
    first = client.volume(pushed.reference)
    cold_first = client.publish(first)  # puts the module in the store; not a warm sample
    client.unpublish(first)
    for _ in range(plan.warm_batch):  # warm-up: connections, code paths, page cache
        client.probe()
        floor.bare()
        volume = client.volume(pushed.reference)
        client.publish(volume)
        client.unpublish(volume)
    samples: dict[str, list[float]] = {"probe": [], "mount_bare": [], "mount_mounter": [], "publish": [], "unpublish": []}
    for _ in range(plan.warm_rounds):
        samples["probe"] += [client.probe() for _ in range(plan.warm_batch)]
        samples["mount_bare"] += [floor.bare() for _ in range(plan.warm_batch)]
        samples["mount_mounter"] += [floor.mounter() for _ in range(plan.warm_batch)]
        volumes = [client.volume(pushed.reference) for _ in range(plan.warm_batch)]
        samples["publish"] += [client.publish(volume) for volume in volumes]
        samples["unpublish"] += [client.unpublish(volume) for volume in volumes]
    return {"image": pushed.reference, "module_bytes": 1 * MiB, "first_publish_s": cold_first, "samples": samples}


# -- cold publish ---------------------------------------------------------------


class OrasPull:
    """The oras library's own pull (manifest, then the layer to a file), one Registry object reused."""

    def __init__(self, host: str, outdir: pathlib.Path) -> None:
        import oras.provider

        logging.getLogger("oras").setLevel(logging.WARNING)
        self.registry = oras.provider.Registry(hostname=host, insecure=True)
        self.outdir = outdir

    def __call__(self, pushed: Pushed, size: int) -> float:
        outdir = self.outdir / pushed.layer_digest.removeprefix("sha256:")
        started = time.perf_counter()
        files = self.registry.pull(target=pushed.reference, outdir=str(outdir))
        elapsed = time.perf_counter() - started
        got = sum(os.path.getsize(f) for f in files)
        if got != size:
            raise AssertionError(f"oras pulled {got} bytes, expected {size}")
        return elapsed


def curl(url: str, out: pathlib.Path, size: int) -> tuple[float, float]:
    """(wall seconds around the curl process, curl's own time_total)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    done = subprocess.run(
        ["curl", "-sS", "--fail", "-o", str(out), "-w", "%{time_total}", url], capture_output=True, text=True, check=True
    )
    elapsed = time.perf_counter() - started
    got = out.stat().st_size
    if got != size:
        raise AssertionError(f"curl downloaded {got} bytes, expected {size}")
    return elapsed, float(done.stdout.strip())


def sha256_seconds(path: pathlib.Path) -> float:
    """Time to sha256 a file just downloaded (in the page cache), 256 KiB at a time like the driver."""
    started = time.perf_counter()
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(256 * 1024):
            digest.update(chunk)
    return time.perf_counter() - started


def fsync_seconds(path: pathlib.Path) -> float:
    """Time to fsync a file just downloaded (all of it still dirty in the page cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        started = time.perf_counter()
        os.fsync(fd)
        return time.perf_counter() - started
    finally:
        os.close(fd)


def cold(bench: Bench, driver: DriverProcess, client: Client) -> dict[str, Any]:
    """Per size: curl, oras and the driver each fetch the same fresh blob; order rotates per repetition.

    Like the driver's store, what curl and oras download is kept until the size is done, so each of
    the three writes into fresh page cache (none reuses pages the previous repetition freed).
    """
    downloads = bench.workdir / "downloads"
    oras_pull = OrasPull(bench.registry.host, downloads / "oras")
    results: dict[str, Any] = {}
    for mib, reps in bench.plan.cold_reps.items():
        size = mib * MiB
        series: dict[str, list[float]] = {
            "driver": [], "curl": [], "curl_time_total": [], "sha256": [], "fsync": [], "oras": [], "rss_growth_kib": [],
        }  # fmt: skip
        driver_gets: list[int] = []
        volumes: list[InlineVolume] = []
        digests: list[str] = []
        for rep in range(reps):
            pushed = bench.push(f"bench/cold-{mib}m", f"r{rep}", size)
            digests.append(pushed.layer_digest)
            repo = repo_of(pushed)
            volume = client.volume(pushed.reference)
            volumes.append(volume)

            def run_curl() -> None:
                out = downloads / "curl" / pushed.layer_digest.removeprefix("sha256:")
                wall, own = curl(bench.blob_url(repo, pushed.layer_digest), out, size)
                series["curl"].append(wall)
                series["curl_time_total"].append(own)
                # what curl leaves out: verifying the bytes, and making them durable
                series["sha256"].append(sha256_seconds(out))
                series["fsync"].append(fsync_seconds(out))

            def run_oras() -> None:
                series["oras"].append(oras_pull(pushed, size))

            def run_driver() -> None:
                before = driver.reset_peak()
                series["driver"].append(client.publish(volume))
                series["rss_growth_kib"].append(driver.status_kib("VmHWM") - before)

            runners: list[Callable[[], None]] = [run_curl, run_oras, run_driver]
            for runner in runners[rep % 3 :] + runners[: rep % 3]:
                runner()
            # curl, oras and the driver each GET the blob once: the driver's share is the rest
            driver_gets.append(bench.wait_for_blob_gets(repo, pushed.layer_digest, 3) - 2)
        for volume in volumes:
            client.unpublish(volume)
        shutil.rmtree(downloads, ignore_errors=True)
        results[str(mib)] = {"bytes": size, "samples": series, "driver_blob_gets": driver_gets,
                             "steps": pull_steps(driver.log_path, digests)}  # fmt: skip
    return results


_PULL_DONE = re.compile(
    r"pull\.done .*digest=(sha256:[0-9a-f]{64}) .*seconds=([\d.]+) headers_s=([\d.]+) read_s=([\d.]+) commit_s=([\d.]+)"
)


def pull_steps(log_path: pathlib.Path, digests: list[str]) -> dict[str, list[float]]:
    """The driver's own breakdown of each cold pull (its ``pull.done`` log line), in seconds."""
    found: dict[str, tuple[float, ...]] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        match = _PULL_DONE.search(line)
        if match:
            found[match.group(1)] = tuple(float(g) for g in match.groups()[1:])
    steps: dict[str, list[float]] = {"pull": [], "headers": [], "read": [], "commit": []}
    for digest in digests:
        if digest in found:
            for name, value in zip(steps, found[digest]):
                steps[name].append(value)
    return steps


# -- burst ------------------------------------------------------------------------


def burst(bench: Bench, driver: DriverProcess, client: Client) -> dict[str, Any]:
    """``burst_calls`` concurrent publishes (distinct pods) of one module not yet on the node, per size.

    Two floors are measured alongside: the same number of concurrent Probes (the gRPC floor of a
    burst), and the same number of concurrent publishes of a module already in the store.
    """
    calls = bench.plan.burst_calls
    probes = [client.kubelet.identity.Probe.future(csi_pb2.ProbeRequest(), timeout=CALL_TIMEOUT) for _ in range(calls)]
    for probe in probes:  # warm-up round
        probe.result()
    started = time.perf_counter()
    probes = [client.kubelet.identity.Probe.future(csi_pb2.ProbeRequest(), timeout=CALL_TIMEOUT) for _ in range(calls)]
    for probe in probes:
        probe.result()
    probe_wall = time.perf_counter() - started
    warm = bench.push("bench/burst-warm", "v1", 1 * MiB)
    first = client.volume(warm.reference)
    client.publish(first)  # now in the store
    client.unpublish(first)
    results: dict[str, Any] = {"probe_wall_s": probe_wall, "warm": burst_one(bench, driver, client, warm)}
    for mib in bench.plan.burst_mib:
        results[str(mib)] = burst_one(bench, driver, client, bench.push(f"bench/burst-{mib}m", "v1", mib * MiB))
    return results


def _stamp(slots: list[float], index: int) -> Callable[[object], None]:
    def done(_call: object) -> None:
        slots[index] = time.perf_counter()

    return done


def burst_one(bench: Bench, driver: DriverProcess, client: Client, pushed: Pushed) -> dict[str, Any]:
    calls_wanted = bench.plan.burst_calls
    repo = repo_of(pushed)
    gets_before = bench.registry.blob_gets(repo, pushed.layer_digest)
    manifest_pattern = rf"method=GET .*uri=\"?/v2/{repo}/manifests/"
    manifests_before = bench.registry.requests_matching(manifest_pattern)
    volumes = [client.volume(pushed.reference) for _ in range(calls_wanted)]
    requests = [client.publish_request(volume) for volume in volumes]
    rss_before = driver.reset_peak()
    finished: list[float] = [0.0] * len(requests)
    started = time.perf_counter()
    calls = [client.kubelet.node.NodePublishVolume.future(request, timeout=CALL_TIMEOUT) for request in requests]
    for index, call in enumerate(calls):
        call.add_done_callback(_stamp(finished, index))
    failures = [str(call.exception()) for call in calls if call.exception() is not None]  # waits for each
    while not all(finished):  # a done-callback may lag its future by a moment
        time.sleep(0.001)
    wall = max(finished) - started
    rss_growth = driver.status_kib("VmHWM") - rss_before
    gets = bench.wait_for_blob_gets(repo, pushed.layer_digest, gets_before + 1) - gets_before
    manifest_gets = bench.registry.requests_matching(manifest_pattern) - manifests_before
    inodes = {os.stat(client.kubelet.target_path(v) / "plugin.wasm").st_ino for v in volumes} if not failures else set()
    for volume in volumes:
        client.unpublish(volume)
    return {
        "calls": calls_wanted,
        "bytes": bench.sizes[pushed.layer_digest],
        "wall_s": wall,
        "latencies_s": [t - started for t in finished],
        "failures": failures,
        "blob_gets": gets,
        "manifest_gets": manifest_gets,
        "distinct_inodes": len(inodes),
        "rss_growth_kib": rss_growth,
    }


# -- scale ------------------------------------------------------------------------


def disk_usage(root: pathlib.Path) -> dict[str, int]:
    """Allocated bytes (st_blocks * 512) under ``root``, each inode counted once (hard links share one)."""
    seen: set[tuple[int, int]] = set()
    files = apparent = dirs = 0
    for directory, subdirs, names in os.walk(root):
        for name in [*subdirs, *names]:
            info = os.lstat(os.path.join(directory, name))
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            if name in subdirs:
                dirs += info.st_blocks * 512
            else:
                files += info.st_blocks * 512
                apparent += info.st_size
    return {"file_bytes": files, "file_apparent_bytes": apparent, "dir_bytes": dirs, "total_bytes": files + dirs}


def scale(bench: Bench, driver: DriverProcess, client: Client) -> tuple[dict[str, Any], Client]:
    """Many volumes over a few modules on one node: disk, latency at that count, memory, restart."""
    plan = bench.plan
    size = plan.scale_module_mib * MiB
    modules = [bench.push(f"bench/scale-{k}", "v1", size) for k in range(plan.scale_modules)]
    store = driver.state_dir / "store"
    ramp: list[float] = []
    disk: list[dict[str, Any]] = []
    volumes: list[InlineVolume] = []
    modules_in_use: set[str] = set()
    for index in range(plan.scale_volumes):
        module = modules[index % len(modules)]
        volume = client.volume(module.reference, name=f"pod-{index}")
        ramp.append(client.publish(volume))
        volumes.append(volume)
        modules_in_use.add(module.module_digest)
        pods = index + 1
        if pods in plan.scale_checkpoints or pods == plan.scale_volumes:
            disk.append({
                "pods": pods,
                "module_bytes": len(modules_in_use) * size,  # the distinct modules those pods use
                "per_pod_copy_bytes": pods * size,  # one copy per pod (bytes x pods)
                "store_modules": disk_usage(store / "modules"),
                "store": disk_usage(store),  # modules + hard-linked views + manifest/tag index
                "state": disk_usage(driver.state_dir),  # + the volume records
            })  # fmt: skip
    rss_kib = driver.status_kib("VmRSS")
    hwm_kib = driver.status_kib("VmHWM")
    inodes = {os.stat(client.kubelet.target_path(v) / "plugin.wasm").st_ino for v in volumes}
    at_count: dict[str, list[float]] = {"publish": [], "unpublish": []}
    for cycle in range(plan.scale_cycles):
        volume = client.volume(modules[cycle % len(modules)].reference, name="extra")
        at_count["publish"].append(client.publish(volume))
        at_count["unpublish"].append(client.unpublish(volume))
    rss_after_cycles_kib = driver.status_kib("VmRSS")
    mount_lines = len(pathlib.Path("/proc/self/mountinfo").read_text().splitlines())

    # restart with every record and mount in place: time until Probe says ready
    client.close()
    driver.stop()
    startup_s = driver.start()
    rss_restarted_kib = driver.status_kib("VmRSS")
    client = Client(driver)
    # the first publish after a restart: tag cache and views as a restarted driver finds them
    extra = client.volume(modules[0].reference, name="after-restart")
    after_restart = client.publish(extra)
    client.unpublish(extra)
    unpublish_all = [client.unpublish(volume) for volume in volumes]
    leftover = [m.mount_point for m in mounts.LinuxMounter().mounts() if m.mount_point.startswith(f"{driver.kubelet_dir}/pods/")]
    return {
        "volumes": plan.scale_volumes,
        "modules": plan.scale_modules,
        "module_bytes_each": size,
        "ramp_publish_s": ramp,
        "disk": disk,
        "distinct_inodes": len(inodes),
        "mountinfo_lines": mount_lines,
        "at_count": at_count,
        "rss_kib": rss_kib,
        "hwm_kib": hwm_kib,
        "rss_after_cycles_kib": rss_after_cycles_kib,
        "startup_s": startup_s,
        "rss_restarted_kib": rss_restarted_kib,
        "first_publish_after_restart_s": after_restart,
        "unpublish_all_s": unpublish_all,
        "leftover_mounts": len(leftover),
    }, client

