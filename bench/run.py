"""One benchmark run: registry, two driver processes (small node, then 1,000 volumes), report."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, TypeVar

import grpc

from csi_wasm import __version__
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.mounts import LinuxMounter, unmount_path

from bench import report, scenarios
from bench.driver import Client, DriverProcess
from bench.plan import FULL, QUICK

T = TypeVar("T")


def _phase(name: str, call: Callable[[], T]) -> T:
    print(f"bench: {name} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    result = call()
    print(f"bench: {name} done in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
    return result


def machine() -> dict[str, Any]:
    model = ""
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "csi_wasm"], capture_output=True, text=True).stdout
    if commit and dirty.strip():
        commit += "+uncommitted"  # the driver measured is the working tree, not the commit
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "csi_wasm": __version__,
        "commit": commit,
    }


def _unmount_all_under(root: pathlib.Path) -> None:
    for entry in sorted(LinuxMounter().mounts(), key=lambda m: m.mount_point, reverse=True):
        if entry.mount_point.startswith(f"{root}/"):
            unmount_path(pathlib.Path(entry.mount_point))  # the pods dir's shared mount, and more after a failed run


def run(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    launcher = shlex.split(args.driver) if args.driver else None
    for binary in ("curl", "docker-registry"):
        if shutil.which(binary) is None:
            print(f"python -m bench: {binary} not found (apt-get install -y curl docker-registry)", file=sys.stderr)
            return 2
    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="csi-wasm-bench-"))
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict[str, Any] = {"plan": plan.to_json(), "machine": machine()}
    registry = LocalRegistry(workdir / "registry").start()
    drivers: list[DriverProcess] = []
    try:
        bench = scenarios.Bench(plan, workdir, registry, Pusher(registry.host))
        # node A: a small node (floors, warm, cold, burst)
        node_a = DriverProcess(workdir / "node-a", registry.host, launcher)
        drivers.append(node_a)
        results["startup_empty_s"] = _phase("start driver", node_a.start)
        client = Client(node_a)
        results["warm"] = _phase("floors and warm publish", lambda: scenarios.warm(bench, node_a, client))
        results["cold"] = _phase("cold publish vs curl and oras", lambda: scenarios.cold(bench, node_a, client))
        results["burst"] = _phase("burst", lambda: scenarios.burst(bench, node_a, client))
        client.close()
        node_a.stop()
        # node B: a fresh store, then many volumes
        node_b = DriverProcess(workdir / "node-b", registry.host, launcher)
        drivers.append(node_b)
        node_b.start()
        client = Client(node_b)
        results["scale"], client = _phase(
            f"scale to {plan.scale_volumes} volumes", lambda: scenarios.scale(bench, node_b, client)
        )
        client.close()
        node_b.stop()
    finally:
        for driver in drivers:
            driver.stop()
        _unmount_all_under(workdir)
        registry.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"bench: kept {workdir}", file=sys.stderr)
    results["seconds"] = time.monotonic() - started

    figures = report.figures(results)
    items = report.targets(figures)
    results["figures"] = figures
    results["targets"] = report.targets_json(items)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    (args.out / "results.md").write_text(report.render_markdown(items, figures) + "\n")
    if not args.no_plots:
        from bench import plots

        plots.latency_plot(results, args.out / "perf-latency.png")
        plots.disk_plot(results, args.out / "perf-disk.png")
    print()
    print(f"csi-wasm benchmark ({plan.name} run, {results['seconds']:.0f}s, {results['machine']['cpus']} CPUs, "
          f"commit {results['machine']['commit']})")  # fmt: skip
    print()
    print(report.render_text(items, figures))
    print()
    print(f"raw figures: {args.out / 'results.json'}")
    failed = [t for t in items if not t.passed]
    return 1 if failed and args.strict else 0
