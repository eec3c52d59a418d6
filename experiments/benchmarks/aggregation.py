"""Item 3: weighted averaging of many large updates against Flower's and the memory bandwidth.

The bound is the time the bytes that must move take at the speed one core
streams them, measured in the same run on the same buffers: every update read
once (a BLAS dot product over each update's own bytes, in place) plus the
result written once (filling a buffer of the result's size). Both kernels
and the bound run on one core. A NumPy copy's bandwidth is printed beside it
for reference.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords as flower_aggregate
from scipy.linalg import blas
from threadpoolctl import threadpool_limits

from experiments.benchmarks.common import Figure, best_of
from strategies.aggregation import aggregate_arrayrecords, array_view


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
    src = np.ones(n_bytes // 16, dtype=np.float64)
    dst = np.empty_like(src)
    return 2 * src.nbytes / best_of(lambda: np.copyto(dst, src), repeat)


def read_seconds(records: list[RecordDict], repeat: int = 5) -> float:
    """Time to read every update's array once, in place (one BLAS dot per array)."""
    views = [array_view(a) for r in records for a in r.array_records["arrays"].values()]
    dot = {np.dtype(np.float32): blas.sdot, np.dtype(np.float64): blas.ddot}
    return best_of(lambda: [dot[v.dtype](v, v) for v in views], repeat)


def write_seconds(n_bytes: int, repeat: int = 5) -> float:
    """Time to write ``n_bytes`` once (a buffer of the result's size, filled)."""
    out = np.empty(n_bytes, dtype=np.uint8)
    return best_of(lambda: out.fill(1), repeat)


def run(n_updates: int = 50, n_params: int = 1_000_000, repeat: int = 5) -> list[Figure]:
    """Time of ours and Flower's on the same records, and the bandwidth bound."""
    records = _records(n_updates, n_params)
    with threadpool_limits(limits=1, user_api="blas"):
        ours = best_of(lambda: aggregate_arrayrecords(records, "num-examples"), repeat)
        flowers = best_of(lambda: flower_aggregate(records, "num-examples"), repeat)
        read = read_seconds(records, repeat)
    read_bytes, write_bytes = n_updates * n_params * 4, n_params * 4
    write = write_seconds(write_bytes, repeat)
    bound = read + write
    copy = copy_bandwidth(read_bytes + write_bytes)
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
            {"ours_s": ours, "flower_s": flowers},
        ),
        Figure(
            "3 aggregation",
            "ours against the memory-bandwidth bound (one core)",
            (
                f"bound {1e3 * bound:.1f} ms: read {read_bytes / 1e6:.0f} MB at "
                f"{read_bytes / read / 1e9:.1f} GB/s + write {write_bytes / 1e6:.0f} MB "
                f"(numpy copy {copy / 1e9:.1f} GB/s)"
            ),
            f"{100 * bound / ours:.0f}% of bound (Flower {100 * bound / flowers:.0f}%)",
            ">= 50% of bound",
            bound / ours >= 0.5,
            {"bound_s": bound, "read_s": read, "write_s": write},
        ),
    ]
