"""Turn raw results into targets (PASS/FAIL), a printed table, Markdown and JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from bench.stats import median, summary_ms

KiB_PER_MiB = 1024


@dataclass(frozen=True)
class Target:
    name: str
    measured: float
    limit: str
    unit: str
    passed: bool
    detail: str = ""

    def value_text(self) -> str:
        if math.isnan(self.measured):
            return "n/a"
        if self.unit == "x":
            return f"{self.measured:.2f}x"
        if self.unit == "count":
            return f"{self.measured:.0f}"
        return f"{self.measured:.2f} {self.unit}"


def _ms(seconds: float) -> float:
    return seconds * 1e3


def figures(results: dict[str, Any]) -> dict[str, Any]:
    """The summary figures every target and table row is computed from (all latencies in ms)."""
    warm = results["warm"]["samples"]
    out: dict[str, Any] = {
        "startup_empty_s": results["startup_empty_s"],
        "probe": summary_ms(warm["probe"]),
        "mount_bare": summary_ms(warm["mount_bare"]),
        "mount_mounter": summary_ms(warm["mount_mounter"]),
        "warm_publish": summary_ms(warm["publish"]),
        "warm_unpublish": summary_ms(warm["unpublish"]),
        "cold": {},
    }
    for mib, cold in results["cold"].items():
        s = cold["samples"]
        out["cold"][mib] = {
            "driver": summary_ms(s["driver"]),
            "curl": summary_ms(s["curl"]),
            "curl_time_total": summary_ms(s["curl_time_total"]),
            "oras": summary_ms(s["oras"]),
            # paired: each repetition's driver and curl fetched the same blob moments apart
            "driver_over_curl": median([d / c for d, c in zip(s["driver"], s["curl"])]),
            "driver_minus_curl_ms": _ms(median([d - c for d, c in zip(s["driver"], s["curl"])])),
            "driver_over_curl_of_medians": median(s["driver"]) / median(s["curl"]),
            "driver_over_curl_time_total": median(s["driver"]) / median(s["curl_time_total"]),
            "driver_over_oras": median(s["driver"]) / median(s["oras"]),
            "sha256": summary_ms(s["sha256"]),
            "fsync": summary_ms(s["fsync"]),
            # a download that also verifies and persists, done one step after another
            "serial_floor_over_curl": median([(c + h + y) / c for c, h, y in zip(s["curl"], s["sha256"], s["fsync"])]),
            "driver_mib_per_s": cold["bytes"] / 2**20 / median(s["driver"]),
            "curl_mib_per_s": cold["bytes"] / 2**20 / median(s["curl_time_total"]),
            "oras_mib_per_s": cold["bytes"] / 2**20 / median(s["oras"]),
            "rss_growth_kib_max": max(s["rss_growth_kib"]),
            "driver_blob_gets": cold["driver_blob_gets"],
            "steps": {name: summary_ms(values) for name, values in cold.get("steps", {}).items() if values},
        }
    bursts = results["burst"]
    warm_wall_ms = _ms(bursts["warm"]["wall_s"])
    out["burst"] = {"probe_wall_ms": _ms(bursts["probe_wall_s"]), "warm_wall_ms": warm_wall_ms,
                    "warm": summary_ms(bursts["warm"]["latencies_s"]), "sizes": {}}  # fmt: skip
    for mib, burst in bursts.items():
        if mib in ("probe_wall_s", "warm"):
            continue
        single = results["cold"].get(mib)
        single_ms = _ms(median(single["samples"]["driver"])) if single else math.nan
        out["burst"]["sizes"][mib] = {
            "calls": burst["calls"],
            "bytes": burst["bytes"],
            "wall_ms": _ms(burst["wall_s"]),
            "single_cold_ms": single_ms,
            "wall_over_single": _ms(burst["wall_s"]) / single_ms,
            "latency": summary_ms(burst["latencies_s"]),
            "blob_gets": burst["blob_gets"],
            "manifest_gets": burst["manifest_gets"],
            "failures": len(burst["failures"]),
            "distinct_inodes": burst["distinct_inodes"],
            "rss_growth_kib": burst["rss_growth_kib"],
        }
    scale = results["scale"]
    final = scale["disk"][-1]
    out["scale"] = {
        "volumes": scale["volumes"],
        "modules": scale["modules"],
        "module_bytes_each": scale["module_bytes_each"],
        "ramp_publish": summary_ms(scale["ramp_publish_s"]),
        "publish_at_count": summary_ms(scale["at_count"]["publish"]),
        "unpublish_at_count": summary_ms(scale["at_count"]["unpublish"]),
        "unpublish_all": summary_ms(scale["unpublish_all_s"]),
        "store_ratios": [d["store_modules"]["file_bytes"] / d["module_bytes"] for d in scale["disk"]],
        "store_bytes": final["store_modules"]["file_bytes"],
        "store_total_bytes": final["store"]["total_bytes"],
        "state_total_bytes": final["state"]["total_bytes"],
        "per_pod_copy_bytes": final["per_pod_copy_bytes"],
        "saving_x": final["per_pod_copy_bytes"] / final["store_modules"]["file_bytes"],
        "distinct_inodes": scale["distinct_inodes"],
        "mountinfo_lines": scale["mountinfo_lines"],
        "rss_mib": scale["rss_kib"] / KiB_PER_MiB,
        "rss_after_cycles_mib": scale["rss_after_cycles_kib"] / KiB_PER_MiB,
        "rss_restarted_mib": scale["rss_restarted_kib"] / KiB_PER_MiB,
        "startup_s": scale["startup_s"],
        "first_publish_after_restart_ms": _ms(scale["first_publish_after_restart_s"]),
        "leftover_mounts": scale["leftover_mounts"],
    }
    return out


def targets(f: dict[str, Any]) -> list[Target]:
    probe, publish = f["probe"], f["warm_publish"]
    cold_64, cold_1 = f["cold"].get("64"), f["cold"].get("1")
    burst, scale = f["burst"], f["scale"]  # fmt: skip
    ratio = publish["p50"] / probe["p50"]
    out = [
        Target("warm publish p50 / Probe p50", ratio, "<= 3x", "x", ratio <= 3.0,
               f"{publish['p50']:.2f} ms vs {probe['p50']:.2f} ms"),
        Target("warm publish p50", publish["p50"], "< 2 ms", "ms", publish["p50"] < 2.0, f"n={publish['n']}"),
        Target("warm publish p99", publish["p99"], "< 10 ms", "ms", publish["p99"] < 10.0, f"n={publish['n']}"),
    ]  # fmt: skip
    if cold_64:
        r = cold_64["driver_over_curl"]
        out.append(Target("cold publish 64 MiB / curl", r, "<= 1.2x", "x", r <= 1.2,
                          f"median of {cold_64['driver']['n']} paired runs; medians {cold_64['driver']['p50']:.0f} vs {cold_64['curl']['p50']:.0f} ms"))  # fmt: skip
    if cold_1:
        d = cold_1["driver_minus_curl_ms"]
        out.append(Target("cold publish 1 MiB - curl", d, "<= 50 ms", "ms", d <= 50.0,
                          f"median of {cold_1['driver']['n']} paired runs; medians {cold_1['driver']['p50']:.1f} vs {cold_1['curl']['p50']:.1f} ms"))  # fmt: skip
    bursts = list(burst["sizes"].values())
    calls = bursts[0]["calls"]
    sizes = "/".join(mib for mib in burst["sizes"])
    gets = max(b["blob_gets"] for b in bursts)
    out.append(Target(f"burst of {calls} ({sizes} MiB): blob downloads", gets, "== 1 each", "count",
                      all(b["blob_gets"] == 1 and b["failures"] == 0 for b in bursts),
                      ", ".join(f"{b['blob_gets']}" for b in bursts) + f"; {sum(b['failures'] for b in bursts)} failed calls"))
    manifests = max(b["manifest_gets"] for b in bursts)
    out.append(Target(f"burst of {calls} ({sizes} MiB): manifest GETs", manifests, "== 1 each", "count",
                      all(b["manifest_gets"] == 1 for b in bursts),
                      ", ".join(f"{b['manifest_gets']}" for b in bursts) + " (counted in the registry's log)"))
    # Only the large module keeps a wall-time target: for small ones the burst's wall time is Python's
    # per-call CPU for 64 calls, not anything a user waits on; the registry-trip counts above replace it.
    large = burst["sizes"].get("64")
    if large:
        out.append(Target(f"burst of {calls} wall / one cold publish, 64 MiB", large["wall_over_single"], "<= 1.5x",
                          "x", large["wall_over_single"] <= 1.5,
                          f"{large['wall_ms']:.0f} vs {large['single_cold_ms']:.0f} ms; {calls} publishes of a stored "
                          f"module at once: {burst['warm_wall_ms']:.0f} ms"))
    worst = max(scale["store_ratios"], key=lambda r: abs(r - 1.0))
    out += [
        Target("store bytes / module bytes (every pod count)", worst, "= 1.0", "x",
               all(abs(r - 1.0) < 0.01 for r in scale["store_ratios"]),
               f"{len(scale['store_ratios'])} pod counts up to {scale['volumes']}"),
        Target(f"publish p99 at {scale['volumes']} volumes", scale["publish_at_count"]["p99"], "< 10 ms", "ms",
               scale["publish_at_count"]["p99"] < 10.0, f"p50 {scale['publish_at_count']['p50']:.2f} ms"),
        Target(f"driver RSS at {scale['volumes']} volumes", max(scale["rss_mib"], scale["rss_after_cycles_mib"]),
               "< 80 MiB", "MiB", max(scale["rss_mib"], scale["rss_after_cycles_mib"]) < 80.0,
               f"after restart {scale['rss_restarted_mib']:.1f} MiB"),
    ]  # fmt: skip
    if cold_64:
        growth = cold_64["rss_growth_kib_max"] / KiB_PER_MiB
        out.append(Target("RSS growth during a 64 MiB pull", growth, "< 8 MiB", "MiB", growth < 8.0,
                          "peak (VmHWM) minus RSS before, worst repetition"))  # fmt: skip
    out.append(Target(f"start-up to ready with {scale['volumes']} records", scale["startup_s"], "< 2 s", "s",
                      scale["startup_s"] < 2.0, "spawn to Probe ready=true"))  # fmt: skip
    return out


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [_row(header, widths), _row(["-" * w for w in widths], widths)]
    lines += [_row(r, widths) for r in rows]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def target_rows(items: list[Target]) -> list[list[str]]:
    return [[t.name, t.value_text(), t.limit, "PASS" if t.passed else "FAIL", t.detail] for t in items]


TARGET_HEADER = ["target", "measured", "limit", "result", "detail"]
FIGURE_HEADER = ["figure", "p50 ms", "p99 ms", "n", "note"]


def figure_rows(f: dict[str, Any]) -> list[list[str]]:
    def row(name: str, s: dict[str, float], note: str = "") -> list[str]:
        return [name, f"{s['p50']:.3f}", f"{s['p99']:.3f}", str(s["n"]), note]

    probe = f["probe"]["p50"]
    rows = [
        row("Probe (gRPC floor)", f["probe"]),
        row("bind + ro remount + umount (syscalls)", f["mount_bare"]),
        row("LinuxMounter: target walk, read-only copy attached, unmount", f["mount_mounter"]),
        row("warm publish", f["warm_publish"], f"{f['warm_publish']['p50'] / probe:.2f}x Probe"),
        row("warm unpublish", f["warm_unpublish"], f"{f['warm_unpublish']['p50'] / probe:.2f}x Probe"),
    ]
    for mib, c in f["cold"].items():
        rows += [
            row(f"cold publish {mib} MiB", c["driver"],
                f"{c['driver_mib_per_s']:.0f} MiB/s; {c['driver_over_curl']:.2f}x curl, {c['driver_over_oras']:.2f}x oras"),
            row(f"  curl {mib} MiB (wall)", c["curl"], f"time_total p50 {c['curl_time_total']['p50']:.1f} ms"),
            row(f"  oras pull {mib} MiB", c["oras"], f"{c['oras_mib_per_s']:.0f} MiB/s"),
            row(f"  sha256 of those {mib} MiB (page cache)", c["sha256"]),
            row(f"  fsync of those {mib} MiB (all dirty)", c["fsync"],
                f"curl + sha256 + fsync = {c['serial_floor_over_curl']:.2f}x curl"),
        ]  # fmt: skip
        steps = c.get("steps", {})
        if "pull" in steps:
            rows += [
                row(f"  in the driver: the pull of {mib} MiB", steps["pull"], "download worker, from request to stored"),
                row("    registry answer (connect, headers)", steps["headers"]),
                row("    socket reads", steps["read"], "hash and file writes run beside them"),
                row("    commit (last of the hash, fsync, rename)", steps["commit"]),
            ]  # fmt: skip
    s = f["scale"]
    b = f["burst"]
    rows.append(row(f"burst, module in store: each of {calls_of(f)} publishes", b["warm"],
                    f"wall {b['warm_wall_ms']:.0f} ms; {calls_of(f)} Probes at once {b['probe_wall_ms']:.0f} ms"))
    for mib, b in f["burst"]["sizes"].items():
        rows.append(row(f"burst {mib} MiB: each of {b['calls']} publishes", b["latency"],
                        f"wall {b['wall_ms']:.0f} ms; {b['manifest_gets']} manifest GETs; {b['distinct_inodes']} inode"))
    rows += [
        row(f"ramp: publishes 1..{s['volumes']}", s["ramp_publish"], f"{s['modules']} modules; first of each cold"),
        row(f"publish at {s['volumes']} volumes", s["publish_at_count"], f"{s['mountinfo_lines']} mountinfo lines"),
        row(f"unpublish at {s['volumes']} volumes", s["unpublish_at_count"]),
        row(f"unpublish all {s['volumes']} after restart", s["unpublish_all"]),
    ]  # fmt: skip
    return rows


def calls_of(f: dict[str, Any]) -> int:
    return int(next(iter(f["burst"]["sizes"].values()))["calls"])


def other_rows(f: dict[str, Any]) -> list[list[str]]:
    s = f["scale"]
    mib = 2**20
    return [
        ["start-up to ready, empty state", f"{f['startup_empty_s']:.2f} s"],
        [f"start-up to ready, {s['volumes']} records", f"{s['startup_s']:.2f} s"],
        [f"store (modules) at {s['volumes']} pods", f"{s['store_bytes'] / mib:.1f} MiB"],
        ["  + views, manifest and tag index", f"{s['store_total_bytes'] / mib:.1f} MiB"],
        ["  + volume records (whole state dir)", f"{s['state_total_bytes'] / mib:.1f} MiB"],
        [f"one copy per pod at {s['volumes']} pods", f"{s['per_pod_copy_bytes'] / mib:.0f} MiB ({s['saving_x']:.0f}x the store)"],
        [f"distinct inodes across {s['volumes']} pods", str(s["distinct_inodes"])],
        [f"RSS at {s['volumes']} volumes / after cycles / restarted",
         f"{s['rss_mib']:.1f} / {s['rss_after_cycles_mib']:.1f} / {s['rss_restarted_mib']:.1f} MiB"],
        *[[f"RSS growth during the {size} MiB burst", f"{b['rss_growth_kib'] / 1024:.1f} MiB"]
          for size, b in f["burst"]["sizes"].items()],
        ["first publish after restart", f"{s['first_publish_after_restart_ms']:.2f} ms"],
        ["mounts left after unpublishing all", str(s["leftover_mounts"])],
    ]  # fmt: skip


def render_text(items: list[Target], f: dict[str, Any]) -> str:
    passed = sum(t.passed for t in items)
    return "\n\n".join([
        f"TARGETS ({passed}/{len(items)} pass)\n" + text_table(TARGET_HEADER, target_rows(items)),
        "LATENCIES\n" + text_table(FIGURE_HEADER, figure_rows(f)),
        "DISK, MEMORY, START-UP\n" + text_table(["figure", "value"], other_rows(f)),
    ])  # fmt: skip


def render_markdown(items: list[Target], f: dict[str, Any]) -> str:
    return "\n\n".join([
        markdown_table(TARGET_HEADER, target_rows(items)),
        markdown_table(FIGURE_HEADER, figure_rows(f)),
        markdown_table(["figure", "value"], other_rows(f)),
    ])  # fmt: skip


def targets_json(items: list[Target]) -> list[dict[str, Any]]:
    return [asdict(t) for t in items]


__all__ = ["Target", "figures", "targets", "render_text", "render_markdown"]
