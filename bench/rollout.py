"""``python -m bench.rollout``: N simulated nodes x P pods switch to a new module version at once.

    python -m bench.rollout --nodes 4,8,16 --pods 8 --mib 1            # no mirror, and behind a mirror
    python -m bench.rollout --nodes 32 --pods 8 --variants direct      # one variant only

Each node is a real driver process (``csi_wasm.demo.cluster.SimulatedNode``: its own state
dir, kubelet dir and socket) and every pod a real NodePublishVolume through a kubelet-shaped
client that retries as kubelet does. Per run: every node publishes P pods of v1, then v2 is
pushed and all N x P pods ask for it at once. Reported: what the upstream registry served
(requests by kind and bytes, from its own log), downloads per node, the time from the first
publish call to mounted (p50/p99/max, kubelet's retries included) and failures. Variants:
``direct`` (nodes pull from the upstream) and ``mirror`` (nodes behind a fresh pull-through
cache, Debian's docker-registry in proxy mode). For each N the per-proxy design of the
project's seed runs too: N x P proxies each download v2 themselves.

Needs root (real mounts, in a private mount namespace it enters first) and ``docker-registry``.
Writes ``rollout.json``, ``rollout.md`` and ``rollout.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Sequence

MiB = 1024 * 1024
KUBELET_DEADLINE_S = 120.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.rollout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--nodes", default="4,8", help="comma-separated node counts, one run each (default: 4,8)")
    parser.add_argument("--pods", type=int, default=8, help="pods per node that switch to v2 (default: 8)")
    parser.add_argument("--mib", type=float, default=1.0, help="module size in MiB (default: 1)")
    parser.add_argument("--variants", default="direct,mirror,mirror-canary",
                        help="any of direct, mirror, mirror-canary, storm (default: the first three)")
    parser.add_argument("--no-per-proxy", action="store_true", help="skip the per-proxy design")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-results/rollout"))
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (driver logs)")
    parser.add_argument("--report", nargs="+", type=pathlib.Path, metavar="ROLLOUT_JSON",
                        help="run nothing: merge the runs of earlier rollout.json files into one table and plot")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        return write_report([json.loads(path.read_text()) for path in args.report], args.out)
    if os.geteuid() != 0:
        print("python -m bench.rollout: needs root (real mounts, in a private mount namespace)", file=sys.stderr)
        return 2
    if shutil.which("docker-registry") is None:
        print("python -m bench.rollout: docker-registry not found (apt-get install -y docker-registry)", file=sys.stderr)
        return 2
    from csi_wasm.mounts import enter_private_mount_namespace

    enter_private_mount_namespace()  # before any thread
    return run(args)


def run(args: argparse.Namespace) -> int:
    from csi_wasm.demo.push import Pusher
    from csi_wasm.demo.registry import LocalRegistry

    from bench import report, rollout_run
    from bench.run import machine

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="csi-wasm-rollout-"))
    size = int(args.mib * MiB)
    node_counts = [int(n) for n in args.nodes.split(",") if n.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    results: dict[str, Any] = {"machine": machine(), "pods_per_node": args.pods, "module_bytes": size,
                               "load_before": os.getloadavg(), "others": busy_processes(), "runs": []}  # fmt: skip
    started = time.monotonic()
    upstream = LocalRegistry(workdir / "upstream").start()
    try:
        setup = rollout_run.Setup(workdir, upstream, Pusher(upstream.host), size, args.pods, uuid.uuid4().hex[:8])
        for nodes in node_counts:
            for variant in variants:
                print(f"rollout: {nodes} nodes x {args.pods} pods, {variant} ...", file=sys.stderr, flush=True)
                results["runs"].append(rollout_run.csi_wasm(setup, nodes, variant))
                _progress(results["runs"][-1])
            if not args.no_per_proxy:
                print(f"rollout: {nodes} nodes x {args.pods} pods, per-proxy ...", file=sys.stderr, flush=True)
                results["runs"].append(rollout_run.per_proxy(setup, nodes))
                _progress(results["runs"][-1])
    finally:
        upstream.stop()
        if args.keep:
            print(f"rollout: kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = time.monotonic() - started
    results["load_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rollout.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    table = rollout_table(results)
    write_report([results], args.out)
    print()
    print(f"csi-wasm rollout ({results['seconds']:.0f}s, {results['machine']['cpus']} CPUs, commit "
          f"{results['machine']['commit']}, load {results['load_before'][0]:.1f} -> {results['load_after'][0]:.1f})")  # fmt: skip
    print()
    print(report.text_table(*table))
    print()
    print(f"raw figures: {args.out / 'rollout.json'}; plot: {args.out / 'rollout.png'}")
    return 0


def write_report(runs_of: list[dict[str, Any]], out: pathlib.Path) -> int:
    """rollout.md and rollout.png of one or more runs' results (the first one's settings name the plot)."""
    from bench import plots, report

    merged = dict(runs_of[0]) | {"runs": [run for results in runs_of for run in results["runs"]]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "rollout.md").write_text(report.markdown_table(*rollout_table(merged)) + "\n")
    plots.rollout_plot(merged, out / "rollout.png")
    return 0


def _progress(run: dict[str, Any]) -> None:
    latency = run["latency_ms"]
    print(f"rollout:   {run['failures']} failed, p50 {latency.get('p50', 0):.0f} ms, max {latency.get('max', 0):.0f} ms, "
          f"upstream {run['upstream']['total']} requests, {run['upstream']['bytes'] / MiB:.1f} MiB", file=sys.stderr)  # fmt: skip


def busy_processes(limit: int = 8) -> list[str]:
    """What else is using the CPU when the run starts (the machine is shared)."""
    listing = subprocess.run(["ps", "-eo", "pcpu,etimes,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    mine = {str(os.getpid()), str(os.getppid())}
    rows = [line.strip()[:140] for line in listing.splitlines()[1:] if line.strip()]
    return [row for row in rows if not any(f" {pid} " in f" {row} " for pid in mine)][:limit]


ROLLOUT_HEADER = ["nodes x pods", "design", "upstream requests", "manifest GET", "blob GET", "HEAD", "upstream MiB",
                  "downloads per node", "p50 ms", "p99 ms", "max ms", "retried", "failed"]  # fmt: skip


def rollout_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for run in results["runs"]:
        up = run["upstream"]
        counts = up["requests"]
        latency = run["latency_ms"]
        downloads = run.get("downloads_per_node")
        rows.append([
            f"{run['nodes']} x {run['pods_per_node']}", run["design"], str(up["total"]),
            str(counts["manifest GET"]), str(counts["blob GET"]), str(counts["manifest HEAD"] + counts["blob HEAD"]),
            f"{up['bytes'] / MiB:.1f}",
            f"{min(downloads)}-{max(downloads)}" if downloads else "n/a (one per pod)",
            f"{latency.get('p50', 0):.0f}", f"{latency.get('p99', 0):.0f}", f"{latency.get('max', 0):.0f}",
            str(run["retried"]), str(run["failures"]),
        ])  # fmt: skip
    return ROLLOUT_HEADER, rows


if __name__ == "__main__":
    raise SystemExit(main())
