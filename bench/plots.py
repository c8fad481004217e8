"""The two figures in docs/performance.md (matplotlib, a dev/bench-only dependency)."""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

MiB = 2**20


def _percentile_curve(samples_s: Sequence[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(samples_s)
    n = len(ordered)
    return [100.0 * (i + 1) / n for i in range(n)], [s * 1e3 for s in ordered]


def latency_plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warm = results["warm"]["samples"]
    scale = results["scale"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, samples, style in (
        ("warm publish", warm["publish"], "-"),
        ("warm unpublish", warm["unpublish"], "-"),
        (f"publish at {scale['volumes']} volumes", scale["at_count"]["publish"], "-"),
        ("floor: Probe (gRPC)", warm["probe"], "--"),
        ("floor: bind + ro remount + umount", warm["mount_bare"], "--"),
    ):
        x, y = _percentile_curve(samples)
        left.step(x, y, style, where="post", label=f"{label} (n={len(samples)})")
    left.set_title("Warm: module already on the node")
    right.set_title("Cold: pulled from a local registry (same run)")
    colours = ["tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple"]
    for colour, (mib, cold) in zip(colours, results["cold"].items()):
        s = cold["samples"]
        for what, style, label in (("driver", "-", "publish"), ("curl", "--", "curl"), ("oras", ":", "oras pull")):
            x, y = _percentile_curve(s[what])
            right.step(x, y, style, where="post", color=colour, label=f"{mib} MiB {label}")
            if len(x) < 12:
                right.plot(x, y, "o" if what == "driver" else ".", color=colour, markersize=3)
    for axis in (left, right):
        axis.set_yscale("log")
        axis.set_xlabel("percentile")
        axis.set_ylabel("latency (ms, log scale)")
        axis.set_xlim(0, 100)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, loc="upper left")
    fig.suptitle("csi-wasm NodePublishVolume latency by percentile (client side, over the unix socket)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def disk_plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = results["scale"]
    points = scale["disk"]
    pods = [p["pods"] for p in points]
    fig, axis = plt.subplots(figsize=(7.5, 4.8))
    axis.plot(pods, [p["per_pod_copy_bytes"] / MiB for p in points], "o-", color="tab:red",
              label="one copy per pod (module bytes x pods)")  # fmt: skip
    axis.plot(pods, [p["state"]["total_bytes"] / MiB for p in points], "s--", color="tab:gray",
              label="csi-wasm state dir (store + views + index + records), measured")  # fmt: skip
    axis.plot(pods, [p["store_modules"]["file_bytes"] / MiB for p in points], "o-", color="tab:blue",
              label="csi-wasm store (modules), measured")  # fmt: skip
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel(f"pods on the node (volumes over {scale['modules']} modules of "
                    f"{scale['module_bytes_each'] // MiB} MiB)")  # fmt: skip
    axis.set_ylabel("disk used (MiB, log scale)")
    axis.set_title("Disk used on one node versus pod count")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rollout_plot(results: dict[str, Any], path: pathlib.Path) -> None:
    """Upstream bytes and requests against node count per design, and latency at the largest count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    designs = list(dict.fromkeys(run["design"] for run in runs))
    styles = {"per-proxy": ("tab:red", "o--"), "csi-wasm": ("tab:blue", "s-"), "csi-wasm + mirror": ("tab:green", "^-"),
              "csi-wasm + mirror, canary first": ("tab:olive", "v-")}
    fig, (bytes_axis, requests_axis, latency_axis) = plt.subplots(1, 3, figsize=(15, 4.8))
    for design in designs:
        series = sorted((run for run in runs if run["design"] == design), key=lambda run: run["nodes"])
        colour, style = styles.get(design, ("tab:gray", "x-"))
        nodes = [run["nodes"] for run in series]
        bytes_axis.plot(nodes, [max(run["upstream"]["bytes"], 1) / MiB for run in series], style, color=colour,
                        label=design)  # fmt: skip
        requests_axis.plot(nodes, [max(run["upstream"]["total"], 1) for run in series], style, color=colour,
                           label=f"{design}: all")  # fmt: skip
        requests_axis.plot(nodes, [max(run["upstream"]["requests"]["manifest GET"], 1) for run in series], ":",
                           marker=style[0], color=colour, label=f"{design}: manifest GETs")  # fmt: skip
        largest = series[-1]
        if largest["samples_s"]:
            x, y = _percentile_curve(largest["samples_s"])
            latency_axis.step(x, y, "-", where="post", color=colour,
                              label=f"{design}, {largest['nodes']} x {largest['pods_per_node']} pods")  # fmt: skip
    pods = results["pods_per_node"]
    for axis, title in ((bytes_axis, "upstream bytes served (MiB)"), (requests_axis, "upstream requests (HEADs and pings included)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel(f"nodes ({pods} pods each switch at once)")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    latency_axis.set_yscale("log")
    latency_axis.set_xlim(0, 100)
    latency_axis.set_xlabel("percentile of pods")
    latency_axis.set_ylabel("ms, log scale")
    latency_axis.set_title("first publish call to mounted\n(per-proxy: to its copy written)", fontsize=10)
    latency_axis.grid(True, which="both", alpha=0.3)
    latency_axis.legend(fontsize=8)
    fig.suptitle(f"Rollout of a {results['module_bytes'] / MiB:g} MiB module version across simulated nodes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
