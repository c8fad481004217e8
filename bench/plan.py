"""How much each scenario measures: the full run (a few minutes on 2 cores) and ``--quick`` (a smoke run)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MiB = 1024 * 1024


@dataclass(frozen=True)
class Plan:
    name: str = "full"
    # floors and warm publish: rounds of `batch` Probes, mount cycles, publishes then unpublishes, interleaved
    warm_rounds: int = 30
    warm_batch: int = 20
    # cold publish: module size (MiB) -> repetitions; each repetition pushes a fresh module
    cold_reps: dict[int, int] = field(default_factory=lambda: {1: 20, 16: 10, 64: 9})
    # burst: concurrent publishes of one cold module, for each of these sizes (MiB)
    burst_calls: int = 64
    burst_mib: tuple[int, ...] = (1, 16, 64)
    # scale: volumes spread over modules of this size, then publish/unpublish cycles at that count
    scale_volumes: int = 1000
    scale_modules: int = 10
    scale_module_mib: int = 1
    scale_cycles: int = 200
    scale_checkpoints: tuple[int, ...] = (1, 5, 10, 25, 50, 100, 250, 500, 750, 1000)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


FULL = Plan()
QUICK = Plan(
    name="quick",
    warm_rounds=5,
    warm_batch=10,
    cold_reps={1: 3, 16: 2, 64: 2},
    scale_volumes=100,
    scale_cycles=30,
    scale_checkpoints=(1, 10, 50, 100),
)
