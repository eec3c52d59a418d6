"""The FedDrift sweep: every matrix issue 13 names, per dataset, the same policies and seeds.

``fedge feddrift --sweep`` runs it; :data:`SWEEP` lists the cells in the order
they run (the 2-concept matrices first, so a cut-short sweep still covers them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from experiments.feddrift import Settings, Task, _slug

#: (dataset, matrix) cells of the sweep, cheapest and most asked-for first.
SWEEP: tuple[tuple[str, str], ...] = (
    *((d, m) for m in ("A", "W", "X", "Y", "Z") for d in ("sine2", "circle2")),
    ("river-agrawal", "A"),
    ("river-stagger", "A"),
    *(("sea4", m) for m in ("B", "C", "D", "E", "F", *(f"R{i}" for i in range(10)))),
    *(("digits-swap", m) for m in ("B", "R0", "R1", "R2")),
)


def sweep_tasks(
    folder: Path,
    seeds: int,
    policies: Sequence[str],
    settings: Settings,
    cells: Sequence[tuple[str, str]] = SWEEP,
) -> list[Task]:
    """One task per cell and seed, seed-major: every cell's seed 0 runs before any seed 1."""
    return [
        Task(d, m, seed, tuple(policies), folder / "runs" / f"{_slug(d)}-{_slug(m)}-s{seed}", settings)
        for seed in range(seeds)
        for d, m in cells
    ]
