"""Item 3: weighted averaging of many large updates against Flower's and the memory bandwidth."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords as flower_aggregate

from experiments.benchmarks.common import Figure, best_of
from strategies.aggregation import aggregate_arrayrecords


def _records(n_updates: int, n_params: int) -> list[RecordDict]:
    rng = np.random.default_rng(0)
    return [
        RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(rng.standard_normal(n_params, dtype=np.float32))}),
                "metrics": MetricRecord({"num-examples": int(rng.integers(10, 1000))}),
            }
        )
        for _ in range(n_updates)
    ]


def copy_bandwidth(n_bytes: int, repeat: int = 5) -> float:
    """Bytes per second moved by a NumPy copy of ``n_bytes`` (read plus write)."""
    src = np.ones(n_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    return 2 * src.nbytes / best_of(lambda: np.copyto(dst, src), repeat)


def run(n_updates: int = 50, n_params: int = 1_000_000, repeat: int = 5) -> list[Figure]:
    """Time of ours and Flower's on the same records, and the bandwidth bound."""
    records = _records(n_updates, n_params)
    ours = best_of(lambda: aggregate_arrayrecords(records, "num-examples"), repeat)
    flowers = best_of(lambda: flower_aggregate(records, "num-examples"), repeat)
    moved = (n_updates + 1) * n_params * 4  # every update read once, the result written once
    bandwidth = copy_bandwidth(moved)
    bound = moved / bandwidth
    a = aggregate_arrayrecords(records, "num-examples")["w"].numpy()
    b = flower_aggregate(records, "num-examples")["w"].numpy()
    error = float(np.abs(a - b).max())
    shape = f"{n_updates} x {n_params / 1e6:g}M float32"
    return [
        Figure(
            "3 aggregation",
            f"weighted average of {shape}: ours vs Flower",
            f"{1e3 * ours:.1f} ms vs {1e3 * flowers:.1f} ms (max diff {error:.1e})",
            f"{flowers / ours:.1f}x faster",
            "at least as fast as Flower",
            ours <= flowers,
        ),
        Figure(
            "3 aggregation",
            "ours against the memory-bandwidth bound",
            f"bound {1e3 * bound:.1f} ms (numpy copy {bandwidth / 1e9:.1f} GB/s)",
            f"{100 * bound / ours:.0f}% of bound (Flower {100 * bound / flowers:.0f}%)",
            ">= 50% of bound",
            bound / ours >= 0.5,
        ),
    ]
