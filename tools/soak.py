"""Soak, crash loop and fault table for csi-wasm (issue 8). Not part of pytest: it takes minutes.

    python tools/soak.py --minutes 5                 # soak, then the crash loop
    python tools/soak.py --minutes 0 --crash-iterations 20
    python tools/soak.py --minutes 0 --crash-iterations 0 --fault-table

Needs root (real bind mounts, in a private mount namespace it enters first) and
``docker-registry``. Everything listens on 127.0.0.1 and stops by itself.

Soak: the real driver (``python -m csi_wasm serve``, a subprocess, so its RSS and
file descriptors are its own) against two real registries, one of them behind a
fault proxy that answers a share of requests with 503s, resets, truncations and
stalls. ``--clients`` threads act as kubelet: publish new volumes (both
registries, pullPolicy IfNotPresent/Always, tags and digests) and unpublish them,
checking every mounted module's bytes. At the end every volume is unpublished and
the node must hold no mount, no record and no partial download. A failed publish
counts as expected only if its image is on the flaky registry.

Crash loop: for each phase of a publish (resolve, download, rename, stage: the
read-only mount made but not attached, mount: attached but not recorded, record
write) the driver is started with a hook that SIGKILLs it at that point, a volume
is published, the driver is restarted without the hook, and then: every stored
module hashes to its name, no partial download is left, views are hard links to
their modules, and the volume is either fully published (mounted ro,nosuid,nodev,
noexec, recorded, right bytes) or cleanly absent (no mount, no record). kubelet's
retry then publishes it and an unpublish leaves nothing.

Fault table: every case of tests/test_faults.py against the production defaults
(``PullConfig()``) with kubelet's 120 s call timeout; prints the markdown table
that docs/reliability.md carries.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import grpc  # noqa: E402
import yaml  # noqa: E402

from csi_wasm.demo.kubelet import InlineVolume, Kubelet, new_pod_uid  # noqa: E402
from csi_wasm.demo.push import Pusher  # noqa: E402
from csi_wasm.demo.registry import LocalRegistry  # noqa: E402
from csi_wasm.demo.wasm_modules import make_module  # noqa: E402
from csi_wasm.mounts import REQUIRED_OPTIONS, LinuxMounter, enter_private_mount_namespace, unmount_path  # noqa: E402
from csi_wasm.topology import share_directory  # noqa: E402

DRIVER_NAME = "csi-wasm.dev"
PHASES = ("resolve", "download", "rename", "stage", "mount", "record")


# -- the driver as a subprocess -------------------------------------------------------


@dataclass
class DriverProc:
    workdir: pathlib.Path
    config: pathlib.Path
    crash_phase: str | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return str(self.workdir / "csi" / "csi.sock")

    @property
    def kubelet_dir(self) -> pathlib.Path:
        return self.workdir / "kubelet"

    @property
    def state_dir(self) -> pathlib.Path:
        return self.workdir / "state"

    def start(self) -> DriverProc:
        share_directory(self.kubelet_dir / "pods")  # as on a node: the driver refuses a private pods dir
        pathlib.Path(self.socket).parent.mkdir(exist_ok=True)
        serve = ["--log-level", "warning", "serve", "--endpoint", f"unix://{self.socket}", "--node-id", "soak-node", "--driver-name",
                 DRIVER_NAME, "--state-dir", str(self.state_dir), "--kubelet-dir", str(self.kubelet_dir),
                 "--config", str(self.config)]  # fmt: skip
        if self.crash_phase:
            args = [sys.executable, __file__, "--crash-driver", self.crash_phase, "--", *serve]
        else:
            args = [sys.executable, "-m", "csi_wasm", *serve]
        log = open(self.workdir / "driver.log", "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=log, cwd=ROOT)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"driver exited with {self.process.returncode}; see {self.workdir}/driver.log")
            if pathlib.Path(self.socket).exists() and self._ready():
                return self
            time.sleep(0.05)
        raise RuntimeError("driver did not become ready")

    def _ready(self) -> bool:
        from csi_wasm._gen import csi_pb2, csi_pb2_grpc

        with grpc.insecure_channel(f"unix://{self.socket}") as channel:
            try:
                return bool(csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=2).ready.value)
            except grpc.RpcError:
                return False

    def kubelet(self) -> Kubelet:
        return Kubelet(self.socket, self.kubelet_dir)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(90)

    def wait_dead(self, timeout: float = 60) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def rss_kib(self) -> int:
        assert self.process is not None
        for line in pathlib.Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def fds(self) -> int:
        assert self.process is not None
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))


def write_node_config(path: pathlib.Path, insecure: list[str], **pull: Any) -> pathlib.Path:
    config = {"registries": {host: {"insecure": True} for host in insecure},
              "pull": {"connect_timeout_seconds": 2, "read_timeout_seconds": 5, "attempts": 3} | pull,
              "store": {"min_free_bytes": 0}}  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


# -- the crash hook (runs inside the driver process) ------------------------------------


def crash_driver(phase: str, serve_args: list[str]) -> int:
    """Run ``csi-wasm serve`` with a hook that SIGKILLs the process at ``phase`` of the first publish."""
    from csi_wasm import cli, mounts, registry, store, syscalls

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if phase == "resolve":  # the manifest has been fetched, nothing used yet
        fetch = registry.RegistryClient.fetch_manifest

        def fetch_then_die(self: Any, *args: Any, **kwargs: Any) -> Any:
            fetch(self, *args, **kwargs)
            die()

        registry.RegistryClient.fetch_manifest = fetch_then_die  # type: ignore[method-assign]
    elif phase == "download":  # part of the module is in tmp/
        write = store.Ingest.write

        def write_then_die(self: Any, chunk: bytes) -> None:
            write(self, chunk)
            die()

        store.Ingest.write = write_then_die  # type: ignore[method-assign]
    elif phase in ("rename", "record"):
        replace = os.replace
        marker = f"{os.sep}modules{os.sep}" if phase == "rename" else f"{os.sep}volumes{os.sep}"

        def replace_and_die(src: Any, dst: Any, **kwargs: Any) -> None:
            if marker in str(dst):
                if phase == "rename":
                    replace(src, dst, **kwargs)  # the module is in place, the manifest index not yet
                die()  # record: the temp record is written, the rename never happens
            replace(src, dst, **kwargs)

        os.replace = replace_and_die  # type: ignore[assignment]
    elif phase == "stage":  # the read-only copy of the view made (detached, or at the staging point), not attached
        mount = syscalls.mount

        def die_before_attaching(*args: Any, **kwargs: Any) -> None:
            die()

        def mount_unless_moving(source: Any, target: Any, flags: int) -> None:
            if flags & syscalls.MS_MOVE:
                die()
            mount(source, target, flags)

        syscalls.move_mount = die_before_attaching  # type: ignore[assignment]
        syscalls.mount = mount_unless_moving  # type: ignore[assignment]
    elif phase == "mount":  # attached read-only at the target, not yet recorded
        bind = mounts.LinuxMounter.bind_read_only

        def bind_then_die(self: Any, source: Any, target: Any) -> None:
            bind(self, source, target)
            die()

        mounts.LinuxMounter.bind_read_only = bind_then_die  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown phase {phase}")
    return cli.main(serve_args)


# -- checks ---------------------------------------------------------------------------


def verify_store(state_dir: pathlib.Path) -> list[str]:
    """Problems in the store: a module whose bytes do not hash to its name, a leftover partial, a bad view."""
    problems = []
    store = state_dir / "store"
    modules = store / "modules" / "sha256"
    inodes = {}
    for path in modules.iterdir() if modules.exists() else []:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != path.name:
            problems.append(f"module {path.name} hashes to {digest}")
        inodes[path.name] = path.stat().st_ino
    leftovers = list((store / "tmp").iterdir()) if (store / "tmp").exists() else []
    if leftovers:
        problems.append(f"{len(leftovers)} partial downloads left in tmp/")
    views = store / "views"
    for link in views.glob("*/*/*") if views.exists() else []:
        if link.name.startswith("."):
            continue
        if inodes.get(link.parts[-3]) != link.stat().st_ino:
            problems.append(f"view {link} is not a hard link to its module")
    return problems


def volume_state(kubelet: Kubelet, volume: InlineVolume, state_dir: pathlib.Path, module: bytes) -> str:
    """``published``, ``absent`` or a description of what is wrong."""
    target = kubelet.target_path(volume)
    entry = LinuxMounter().mount_at(target)
    key = hashlib.sha256(str(target).encode()).hexdigest()
    recorded = (state_dir / "volumes" / f"{key}.json").exists()
    if entry is None:
        return "absent" if not recorded else "recorded but not mounted"
    if not REQUIRED_OPTIONS <= entry.options:
        return f"mounted without {sorted(REQUIRED_OPTIONS - entry.options)}"
    if not recorded:
        return "mounted but not recorded"
    data = (target / volume.attributes.get("fileName", "plugin.wasm")).read_bytes()
    return "published" if data == module else "mounted with the wrong bytes"


# -- crash loop -----------------------------------------------------------------------


@dataclass
class CrashResult:
    phase: str
    iterations: int = 0
    killed: int = 0
    published_after_restart: int = 0
    absent_after_restart: int = 0
    violations: list[str] = field(default_factory=list)
    retry_failures: list[str] = field(default_factory=list)


def crash_loop(
    base: pathlib.Path, iterations: int, registry: LocalRegistry, phases: tuple[str, ...] = PHASES
) -> list[CrashResult]:
    pusher = Pusher(registry.host)
    results = []
    for phase in phases:
        result = CrashResult(phase)
        workdir = base / f"crash-{phase}"
        workdir.mkdir(parents=True)
        config = write_node_config(workdir / "node.yaml", [registry.host])
        for number in range(iterations):
            module = make_module(256 * 1024 + number, f"crash-{phase}-{number}")
            pushed = pusher.wasm_artifact(f"crash/{phase}", f"v{number}", module)
            driver = DriverProc(workdir, config, crash_phase=phase).start()
            kubelet = driver.kubelet()
            volume = InlineVolume(new_pod_uid(), "crash", "default", "wasm", {"image": pushed.reference})
            try:
                kubelet.mount(volume, timeout=60)
            except grpc.RpcError:
                pass
            kubelet.close()
            code = driver.wait_dead()
            result.iterations += 1
            result.killed += code == -signal.SIGKILL
            driver = DriverProc(workdir, config).start()
            kubelet = driver.kubelet()
            problems = verify_store(driver.state_dir)
            state = volume_state(kubelet, volume, driver.state_dir, module)
            if state == "published":
                result.published_after_restart += 1
            elif state == "absent":
                result.absent_after_restart += 1
            else:
                problems.append(f"volume {state}")
            result.violations += [f"#{number}: {p}" for p in problems]
            try:  # kubelet retries until it succeeds, then the pod goes away
                target = kubelet.mount(volume, timeout=60)
                if (target / "plugin.wasm").read_bytes() != module:
                    result.retry_failures.append(f"#{number}: retry mounted the wrong bytes")
                if volume_state(kubelet, volume, driver.state_dir, module) != "published":
                    result.retry_failures.append(f"#{number}: retry left {volume_state(kubelet, volume, driver.state_dir, module)}")
                kubelet.unmount(volume)
            except (grpc.RpcError, AssertionError) as exc:
                result.retry_failures.append(f"#{number}: {exc}")
            pods = f"{driver.kubelet_dir}/pods/"
            leftover = [m.mount_point for m in LinuxMounter().mounts() if m.mount_point.startswith(pods)]
            if leftover:
                result.violations.append(f"#{number}: mounts left after unpublish: {leftover}")
                for point in leftover:
                    unmount_path(pathlib.Path(point))
            kubelet.close()
            driver.stop()
        results.append(result)
        print(f"crash {phase}: {json.dumps(vars(result))}", flush=True)
    return results


# -- soak -----------------------------------------------------------------------------


def flaky_fault(rate: float, seed: int) -> Any:
    import faultproxy as fp

    rng = random.Random(seed)
    lock = threading.Lock()
    faults = [fp.status(503), fp.status(502), fp.reset_after(1000), fp.truncate_after(1000),
              fp.status(429, {"Retry-After": "1"}), fp.stall_body(after=16, seconds=8.0)]  # fmt: skip

    def fault(ex: Any) -> None:
        with lock:
            pick = rng.choice(faults) if rng.random() < rate else fp.passthrough
        pick(ex)

    return fault


@dataclass
class Stats:
    publishes: int = 0
    unpublishes: int = 0
    failed_flaky: dict[str, int] = field(default_factory=dict)
    failed_healthy: list[str] = field(default_factory=list)
    failed_unpublish: list[str] = field(default_factory=list)
    wrong_bytes: int = 0
    leaked_after_failure: int = 0
    lost: int = 0
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def soak(base: pathlib.Path, minutes: float, clients: int, fault_rate: float) -> dict[str, Any]:
    import faultproxy as fp

    healthy = LocalRegistry(base / "registry-a").start()
    upstream = LocalRegistry(base / "registry-b").start()
    proxy = fp.FaultProxy(upstream.host).start()
    images: list[tuple[str, bytes, bool]] = []  # reference, module, flaky?
    for index in range(6):
        for registry, flaky in ((healthy, False), (upstream, True)):
            module = make_module(random.Random(index).randint(16, 512) * 1024, f"soak-{registry.host}-{index}")
            pusher = Pusher(registry.host)
            pushed = (pusher.compat_image if index % 3 == 2 else pusher.wasm_artifact)(f"soak/m{index}", "v1", module)
            host = proxy.host if flaky else healthy.host
            images.append((pushed.reference.replace(registry.host, host, 1), module, flaky))
            images.append((pushed.pinned.replace(registry.host, host, 1), module, flaky))
    proxy.add(r"^GET /v2/", flaky_fault(fault_rate, 7))
    workdir = base / "soak"
    workdir.mkdir()
    driver = DriverProc(workdir, write_node_config(workdir / "node.yaml", [healthy.host, proxy.host])).start()
    stats = Stats()
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()
    started = time.monotonic()
    end = started + minutes * 60

    def sampler() -> None:
        while not stop.wait(5.0):
            samples.append((time.monotonic() - started, driver.rss_kib(), driver.fds()))

    def client(number: int) -> None:
        rng = random.Random(1000 + number)
        kubelet = driver.kubelet()
        mine: list[tuple[InlineVolume, bytes]] = []
        while time.monotonic() < end:
            if len(mine) < 3 or (len(mine) < 12 and rng.random() < 0.55):
                reference, module, flaky = rng.choice(images)
                policy = rng.choice(["IfNotPresent", "IfNotPresent", "Always"])
                volume = InlineVolume(new_pod_uid(), f"soak-{number}", "default", "wasm",
                                      {"image": reference, "pullPolicy": policy})  # fmt: skip
                t0 = time.monotonic()
                try:
                    target = kubelet.mount(volume, timeout=120)
                except grpc.RpcError as exc:
                    with stats.lock:
                        if flaky:
                            name = exc.code().name
                            stats.failed_flaky[name] = stats.failed_flaky.get(name, 0) + 1
                        else:
                            stats.failed_healthy.append(f"{reference}: {exc.code().name}: {exc.details()}")
                        if LinuxMounter().mount_at(kubelet.target_path(volume)) is not None:
                            stats.leaked_after_failure += 1
                    continue
                with stats.lock:
                    stats.publishes += 1
                    stats.latencies.append(time.monotonic() - t0)
                    if (target / "plugin.wasm").read_bytes() != module:
                        stats.wrong_bytes += 1
                mine.append((volume, module))
            else:
                volume, module = mine.pop(rng.randrange(len(mine)))
                unpublish(kubelet, volume, module, stats)
        for volume, module in mine:
            unpublish(kubelet, volume, module, stats)
        kubelet.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    samples.append((time.monotonic() - started, driver.rss_kib(), driver.fds()))
    leftover_mounts = [m.mount_point for m in LinuxMounter().mounts()
                       if m.mount_point.startswith(f"{driver.kubelet_dir}/pods/")]  # fmt: skip
    records = list((driver.state_dir / "volumes").glob("*.json"))
    partials = list((driver.state_dir / "store" / "tmp").iterdir())
    store_problems = verify_store(driver.state_dir)
    code = driver.stop()
    proxy.stop()
    healthy.stop()
    upstream.stop()
    warm = [s for s in samples if s[0] >= 60] or samples
    first, last = warm[: max(1, len(warm) // 5)], warm[-max(1, len(warm) // 5) :]
    return {
        "minutes": minutes, "clients": clients, "flaky_fault_rate": fault_rate,
        "publishes_ok": stats.publishes, "unpublishes_ok": stats.unpublishes,
        "failed_publishes_flaky_registry": stats.failed_flaky,
        "failed_publishes_healthy_registry": len(stats.failed_healthy),
        "failed_healthy_examples": stats.failed_healthy[:5],
        "failed_unpublishes": stats.failed_unpublish[:5], "wrong_bytes": stats.wrong_bytes,
        "lost_mounts": stats.lost, "mounts_leaked_after_failed_publish": stats.leaked_after_failure,
        "leftover_mounts": len(leftover_mounts), "leftover_records": len(records),
        "leftover_partials": len(partials), "store_problems": store_problems,
        "publish_p50_s": round(statistics.median(stats.latencies), 4) if stats.latencies else None,
        "publish_p99_s": round(sorted(stats.latencies)[int(len(stats.latencies) * 0.99)], 4) if stats.latencies else None,
        "rss_kib_start": round(statistics.median(s[1] for s in first)),
        "rss_kib_end": round(statistics.median(s[1] for s in last)),
        "rss_kib_max": max(s[1] for s in samples),
        "fds_start": round(statistics.median(s[2] for s in first)),
        "fds_end": round(statistics.median(s[2] for s in last)),
        "fds_max": max(s[2] for s in samples),
        "proxy_requests": proxy.count(), "driver_exit_code": code,
        "samples_t_rss_kib_fds": samples,
    }  # fmt: skip


def unpublish(kubelet: Kubelet, volume: InlineVolume, module: bytes, stats: Stats) -> None:
    target = kubelet.target_path(volume)
    try:
        if (target / "plugin.wasm").read_bytes() != module:
            with stats.lock:
                stats.lost += 1
    except OSError:
        with stats.lock:
            stats.lost += 1
    try:
        kubelet.unmount(volume)
        kubelet.delete_pod(volume.pod_uid)
        with stats.lock:
            stats.unpublishes += 1
    except (grpc.RpcError, AssertionError) as exc:
        with stats.lock:
            stats.failed_unpublish.append(str(exc)[:200])


# -- fault table --------------------------------------------------------------------------


def fault_table(base: pathlib.Path) -> list[dict[str, Any]]:
    import faultproxy as fp
    import test_faults as tf
    from conftest import start_driver, stop_driver
    from csi_wasm.config import NodeConfig, PullConfig

    rows = []
    with LocalRegistry(base / "fault-registry") as registry:
        pushed = Pusher(registry.host).wasm_artifact("faults/raw", "v1", tf.MODULE)
        for number, case in enumerate(tf.FAULT_CASES):
            with fp.FaultProxy(registry.host) as proxy:
                running = start_driver(base / f"fault-{number}", NodeConfig(pull=PullConfig()).with_insecure([proxy.host]))
                try:
                    production = tf.FaultCase(case.name, case.where, case.fault, case.expected, case.attempts,
                                              call_timeout=tf.KUBELET_DEADLINE_SECONDS)  # fmt: skip
                    outcome = tf.inject_and_publish(production, proxy, running, pushed)
                    attempts = proxy.count(tf.request_pattern(pushed, case.where))
                    tf.heal(case, proxy)
                    volume = running.volume(tf._proxied(pushed, proxy))
                    healed = (running.kubelet.mount(volume, timeout=120) / "plugin.wasm").read_bytes() == tf.MODULE
                    running.kubelet.unmount(volume)
                finally:
                    stop_driver(running)
            row = {"fault": case.name, "expected": case.expected.name,
                   "seen": outcome.code.name if outcome.code else "OK", "seconds": round(outcome.seconds, 2),
                   "requests": attempts if case.fault else "-", "next_publish_ok": healed}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| fault | expected | seen | time to error | requests | next publish |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['fault']} | {row['expected']} | {row['seen']} | {row['seconds']} s | {row['requests']} | "
              f"{'ok' if row['next_publish_ok'] else 'FAILED'} |")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--crash-driver"]:
        return crash_driver(argv[1], argv[3:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="soak duration (0: no soak)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--fault-rate", type=float, default=0.1, help="share of the flaky registry's requests faulted")
    parser.add_argument("--crash-iterations", type=int, default=10, help="kill -9 iterations per phase (0: none)")
    parser.add_argument("--fault-table", action="store_true", help="run the fault table with production defaults")
    parser.add_argument("--report", type=pathlib.Path, help="write the figures as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if shutil.which("docker-registry") is None:
        raise SystemExit("docker-registry is needed: apt-get install -y docker-registry")
    enter_private_mount_namespace()
    base = pathlib.Path(tempfile.mkdtemp(prefix="csi-wasm-soak-"))
    report: dict[str, Any] = {}
    ok = True
    try:
        if args.fault_table:
            report["faults"] = fault_table(base)
            ok &= all(r["expected"] == r["seen"] and r["next_publish_ok"] for r in report["faults"])
        if args.minutes > 0:
            report["soak"] = result = soak(base, args.minutes, args.clients, args.fault_rate)
            print("soak:", json.dumps(result, indent=2), flush=True)
            ok &= not (result["failed_publishes_healthy_registry"] or result["failed_unpublishes"]
                       or result["wrong_bytes"] or result["lost_mounts"] or result["leftover_mounts"]
                       or result["leftover_records"] or result["leftover_partials"] or result["store_problems"]
                       or result["mounts_leaked_after_failed_publish"])  # fmt: skip
        if args.crash_iterations > 0:
            with LocalRegistry(base / "crash-registry") as registry:
                crashes = crash_loop(base, args.crash_iterations, registry)
            report["crash"] = [vars(c) for c in crashes]
            ok &= all(not c.violations and not c.retry_failures and c.killed == c.iterations for c in crashes)
    finally:
        if args.report:
            args.report.write_text(json.dumps(report, indent=2, default=str))
        if not args.keep:
            for point in sorted((m.mount_point for m in LinuxMounter().mounts() if m.mount_point.startswith(f"{base}/")),
                                reverse=True):  # fmt: skip
                unmount_path(pathlib.Path(point))
            shutil.rmtree(base, ignore_errors=True)
    print("RESULT:", "PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
