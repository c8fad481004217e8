"""Percentiles and summaries of latency samples (seconds in, milliseconds out)."""

from __future__ import annotations

import math
from typing import Sequence

PERCENTILES = (50, 90, 99)


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100): a value that was actually measured."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary_ms(samples: Sequence[float]) -> dict[str, float]:
    """n, p50, p90, p99, max and mean of ``samples`` (seconds), in milliseconds."""
    if not samples:
        return {"n": 0}
    out: dict[str, float] = {"n": len(samples)}
    for p in PERCENTILES:
        out[f"p{p}"] = round(percentile(samples, p) * 1e3, 3)
    out["max"] = round(max(samples) * 1e3, 3)
    out["mean"] = round(sum(samples) / len(samples) * 1e3, 3)
    return out


def median(samples: Sequence[float]) -> float:
    return percentile(samples, 50)
