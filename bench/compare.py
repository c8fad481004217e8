"""Compare driver builds side by side, interleaved, in one run: ``python -m bench.compare NAME=DIR ...``

Each DIR is a source tree of csi-wasm (a clone, a worktree with a patch applied);
its driver runs as ``cd DIR && python -m csi_wasm serve ...``. All builds share one
registry and one machine, and every round visits them in rotating order, so a
difference between them is not the machine's mood between two separate runs.

    python -m bench.compare base=/tmp/main fix=/tmp/fix            # warm, cold 64 MiB, bursts
    python -m bench.compare base=/tmp/main fix=/tmp/fix --volumes 1000 --cold-reps 0 --bursts 0
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
from typing import Any, Callable, Sequence


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("builds", nargs="+", metavar="NAME=DIR")
    parser.add_argument("--rounds", type=int, default=20, help="warm rounds per build (0: skip)")
    parser.add_argument("--batch", type=int, default=20, help="Probes, publishes and unpublishes per round")
    parser.add_argument("--volumes", type=int, default=0, help="volumes kept published during the warm rounds")
    parser.add_argument("--cold-reps", type=int, default=12, help="cold publishes per build (0: skip)")
    parser.add_argument("--mib", type=int, default=64, help="module size for the cold publishes")
    parser.add_argument("--bursts", type=int, default=1, help="bursts of 64 per size and build (0: skip)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from csi_wasm.mounts import enter_private_mount_namespace

    enter_private_mount_namespace()  # before any thread

    from csi_wasm.demo.push import Pusher
    from csi_wasm.demo.registry import LocalRegistry

    from bench import scenarios
    from bench.driver import Client, DriverProcess
    from bench.plan import FULL, MiB
    from bench.run import _unmount_all_under
    from bench.stats import median, summary_ms

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="csi-wasm-compare-"))
    registry = LocalRegistry(workdir / "registry").start()
    bench = scenarios.Bench(FULL, workdir, registry, Pusher(registry.host))
    builds: list[tuple[str, DriverProcess, Client]] = []
    try:
        for spec in args.builds:
            name, _, source = spec.partition("=")
            directory = pathlib.Path(source).resolve()
            launcher = ["sh", "-c", f'cd "{directory}" && exec "{sys.executable}" -m csi_wasm "$@"', "sh"]
            driver = DriverProcess(workdir / name, registry.host, launcher)
            driver.start()
            builds.append((name, driver, Client(driver)))

        def rotated(turn: int) -> list[tuple[str, DriverProcess, Client]]:
            k = turn % len(builds)
            return builds[k:] + builds[:k]

        if args.rounds:
            image = bench.push("compare/warm", "v1", 1 * MiB).reference
            kept = []
            for _, _, client in builds:
                for _ in range(args.batch):  # warm-up, and the module into each store
                    volume = client.volume(image)
                    client.publish(volume)
                    client.unpublish(volume)
                kept += [(client, client.volume(image)) for _ in range(args.volumes)]
            for client, volume in kept:  # the mount table is shared: every build sees them all
                client.publish(volume)
            warm: dict[str, dict[str, list[float]]] = {n: {"probe": [], "publish": [], "unpublish": []} for n, _, _ in builds}
            for turn in range(args.rounds):
                for name, _, client in rotated(turn):
                    warm[name]["probe"] += [client.probe() for _ in range(args.batch)]
                    volumes = [client.volume(image) for _ in range(args.batch)]
                    warm[name]["publish"] += [client.publish(v) for v in volumes]
                    warm[name]["unpublish"] += [client.unpublish(v) for v in volumes]
            for client, volume in kept:
                client.unpublish(volume)
            print(f"warm, {len(kept)} other volumes published ({args.rounds} rounds of {args.batch}):")
            for name, series in warm.items():
                cells = [f"{what} p50 {s['p50']:6.2f} p99 {s['p99']:6.2f}"
                         for what, samples in series.items() for s in [summary_ms(samples)]]  # fmt: skip
                ratio = median(series["publish"]) / median(series["probe"])
                print(f"  {name:10s} " + " | ".join(cells) + f" | publish/Probe {ratio:.2f}x")

        if args.cold_reps:
            size = args.mib * MiB
            cold: dict[str, list[float]] = {"curl": [], **{name: [] for name, _, _ in builds}}
            for rep in range(args.cold_reps):
                pushed = bench.push("compare/cold", f"r{rep}", size)
                out = workdir / "downloads" / str(rep)
                runners: list[tuple[str, Callable[[], float]]] = [
                    ("curl", lambda: scenarios.curl(bench.blob_url("compare/cold", pushed.layer_digest), out, size)[0])
                ]
                for name, _, client in builds:
                    runners.append((name, lambda c=client: c.publish(c.volume(pushed.reference))))  # type: ignore[misc]
                k = rep % len(runners)
                for name, run in runners[k:] + runners[:k]:
                    cold[name].append(run())
            print(f"cold {args.mib} MiB ({args.cold_reps} repetitions, each fetching a fresh blob):")
            for name, samples in cold.items():
                paired = median([d / c for d, c in zip(samples, cold["curl"])])
                print(f"  {name:10s} median {median(samples) * 1e3:7.1f} ms  paired ratio to curl {paired:.2f}x")

        for turn in range(args.bursts):
            for mib in FULL.burst_mib:
                pushed = bench.push(f"compare/burst-{mib}m", f"b{turn}", mib * MiB)
                cells = []
                for name, driver, client in rotated(turn):
                    result: dict[str, Any] = scenarios.burst_one(bench, driver, client, pushed)
                    cells.append(f"{name} {result['wall_s'] * 1e3:5.0f} ms ({result['blob_gets']} download)")
                print(f"burst of {FULL.burst_calls}, {mib:2d} MiB: " + " | ".join(cells))
    finally:
        for _, driver, client in builds:
            client.close()
            driver.stop()
        _unmount_all_under(workdir)
        registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
