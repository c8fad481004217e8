"""Profile the driver subprocess under one benchmark workload with py-spy (``pip install py-spy``).

    python -m bench.profile warm   [--calls 600] [--out bench-results/profile]
    python -m bench.profile cold   [--mib 64 --calls 5]
    python -m bench.profile burst  [--mib 16 --calls 3]
    python -m bench.profile scale  [--volumes 1000 --calls 300]

py-spy samples every thread of the driver, waiting ones too (a thread blocked in
fsync or in a socket read is time a call waits for); ``--cpu`` keeps on-CPU samples only. The raw stacks go to
``<out>/<workload>.txt`` (collapsed format, for flamegraph tools) and a summary of
where the request threads spent their samples is printed.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

# frames of threads that are only waiting for work (not part of any call's latency)
IDLE_LEAVES = ("_worker (concurrent/futures/thread.py", "wait (threading.py", "_wait_once", "poll_for_event",
               "_serve (grpc/_server.py", "_read_log", "serve (csi_wasm/server.py", "_run (grpc")  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("workload", choices=["warm", "cold", "burst", "scale"])
    parser.add_argument("--calls", type=int, default=None, help="publishes (warm, scale), pulls (cold), bursts")
    parser.add_argument("--mib", type=int, default=None, help="module size for cold (64) and burst (16)")
    parser.add_argument("--volumes", type=int, default=1000, help="volumes in place for the scale workload")
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-results/profile"))
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--cpu", action="store_true", help="on-CPU samples only (default: waits count too)")
    parser.add_argument("--driver", default=None, metavar="COMMAND",
                        help="how to launch the driver (default: python -m csi_wasm); 'serve ...' is appended")
    return parser.parse_args(argv)


def summarize(raw: pathlib.Path, top: int) -> str:
    """Inclusive and self sample counts per function, over stacks that are not idle waiting."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")[1:]  # first: the thread
        if not frames or any(frames[-1].startswith(idle) or idle in frames[-1] for idle in IDLE_LEAVES):
            continue
        count = int(count_text)
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    lines = [f"{total} busy samples (request threads, download threads)", "", "inclusive:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    lines += ["", "self:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("py-spy") is None:
        print("python -m bench.profile: py-spy not found (pip install py-spy)", file=sys.stderr)
        return 2
    from csi_wasm.mounts import enter_private_mount_namespace

    enter_private_mount_namespace()  # before any thread

    from csi_wasm.demo.push import Pusher
    from csi_wasm.demo.registry import LocalRegistry

    from bench import scenarios
    from bench.driver import Client, DriverProcess
    from bench.plan import FULL, MiB

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="csi-wasm-profile-"))
    args.out.mkdir(parents=True, exist_ok=True)
    raw = (args.out / f"{args.workload}.txt").resolve()
    registry = LocalRegistry(workdir / "registry").start()
    driver = DriverProcess(workdir / "node", registry.host, shlex.split(args.driver) if args.driver else None)
    try:
        bench = scenarios.Bench(FULL, workdir, registry, Pusher(registry.host))
        driver.start()
        client = Client(driver)
        workload: Callable[[], None]
        if args.workload in ("warm", "scale"):
            image = bench.push("profile/warm", "v1", 1 * MiB).reference
            keep = [client.volume(image) for _ in range(args.volumes if args.workload == "scale" else 1)]
            for volume in keep:
                client.publish(volume)
            calls = args.calls or (300 if args.workload == "scale" else 600)

            def workload() -> None:
                for _ in range(calls):
                    volume = client.volume(image)
                    client.publish(volume)
                    client.unpublish(volume)

        elif args.workload == "cold":
            size = (args.mib or 64) * MiB
            pushed = [bench.push("profile/cold", f"r{i}", size) for i in range(args.calls or 5)]

            def workload() -> None:
                for p in pushed:
                    client.publish(client.volume(p.reference))

        else:
            size = (args.mib or 16) * MiB
            pushed = [bench.push("profile/burst", f"r{i}", size) for i in range(args.calls or 3)]

            def workload() -> None:
                for p in pushed:
                    requests = [client.publish_request(client.volume(p.reference)) for _ in range(64)]
                    calls = [client.kubelet.node.NodePublishVolume.future(r, timeout=120) for r in requests]
                    for call in calls:
                        call.result()

        spy = subprocess.Popen(["py-spy", "record", "--pid", str(driver.pid), "--rate", str(args.rate),
                                *([] if args.cpu else ["--idle"]), "--format", "raw", "--output", str(raw)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(1.0)  # py-spy attaches
        started = time.perf_counter()
        workload()
        elapsed = time.perf_counter() - started
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
        client.close()
    finally:
        driver.stop()
        from bench.run import _unmount_all_under

        _unmount_all_under(workdir)
        registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{args.workload}: workload ran {elapsed:.2f}s; raw stacks in {raw}")
    print(summarize(raw, args.top))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
