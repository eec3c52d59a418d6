"""The FedDrift sweep: every matrix issue 13 names, per dataset, the same policies and seeds.

``fedge feddrift --sweep`` runs it; :data:`SWEEP` lists the cells in the order
they run (the 2-concept matrices first, so a cut-short sweep still covers them).
Each finished cell's rows are appended to ``rows.jsonl`` in the results folder
as it lands, so a sweep that is stopped keeps what it measured, and a sweep
started again over the same folder runs only the cells it lacks.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from experiments.feddrift import Settings, Task, _slug, dataset_spec, matrix_file, run_task

#: (dataset, matrix) cells of the sweep, cheapest and most asked-for first.
SWEEP: tuple[tuple[str, str], ...] = (
    *((d, m) for m in ("A", "W", "X", "Y", "Z") for d in ("sine2", "circle2")),
    ("river-agrawal", "A"),
    ("river-stagger", "A"),
    *(("sea4", m) for m in ("B", "C", "D", "E", "F", *(f"R{i}" for i in range(10)))),
    *(("digits-swap", m) for m in ("B", "R0", "R1", "R2")),
)

#: Issue 13's bound on drift-clustered below the oracle (accuracy points), per dataset.
TARGET_GAP: dict[str, float] = {
    "sine2": 2.0,
    "circle2": 2.0,
    "sea4": 0.5,
    "digits-swap": 2.0,
    "river-agrawal": 2.0,
    "river-stagger": 2.0,
}
ROWS_FILE = "rows.jsonl"


def sweep_tasks(
    folder: Path,
    seeds: int,
    policies: Sequence[str],
    settings: Settings,
    cells: Sequence[tuple[str, str]] | None = None,
) -> list[Task]:
    """One task per cell (default :data:`SWEEP`) and seed, seed-major: every cell's seed 0 runs before any seed 1."""
    return [
        Task(
            d,
            m,
            seed,
            tuple(policies),
            folder / "runs" / f"{_slug(d)}-{_slug(m)}-s{seed}",
            settings,
        )
        for seed in range(seeds)
        for d, m in (SWEEP if cells is None else cells)
    ]


def load_rows(results: Path) -> list[dict[str, Any]]:
    """The rows a sweep over ``results`` has measured so far (a torn last line is skipped)."""
    path = results / ROWS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def run_sweep(
    results: Path,
    tasks: Sequence[Task],
    jobs: int,
    *,
    on_task: Callable[[list[dict[str, Any]], int, int], None] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Run the tasks ``results`` has no rows for; append each cell's rows as it finishes.

    Returns every row (earlier and new) and one line per cell that failed.
    """
    results.mkdir(parents=True, exist_ok=True)
    have = {(r["dataset"], r["matrix"], int(r["seed"])) for r in load_rows(results)}
    todo = [t for t in tasks if (t.dataset, t.matrix, t.seed) not in have]
    for t in todo:  # an unknown matrix fails here, before any run
        matrix_file(t.matrix, dataset_spec(t.dataset).n_concepts, t.folder.parent / "matrices")
    failed: list[str] = []

    def land(rows: list[dict[str, Any]]) -> None:
        with (results / ROWS_FILE).open("a") as out:
            for r in rows:
                out.write(json.dumps(r) + "\n")
        if on_task is not None:
            on_task(rows, len(have) + done, len(have) + len(todo))

    done = 0
    if jobs <= 1:
        for t in todo:
            try:
                rows = run_task(t)
            except Exception as exc:  # noqa: BLE001 (as below: reported, the others still run)
                failed.append(f"{t.dataset}/{t.matrix} seed {t.seed}: {type(exc).__name__}: {exc}")
                continue
            done += 1
            land(rows)
        return load_rows(results), failed
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(run_task, t): t for t in todo}
        for future in as_completed(futures):
            t = futures[future]
            try:
                rows = future.result()
            except Exception as exc:  # noqa: BLE001 (one cell's failure is reported, the others still land)
                failed.append(f"{t.dataset}/{t.matrix} seed {t.seed}: {type(exc).__name__}: {exc}")
                continue
            done += 1
            land(rows)
    return load_rows(results), failed


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan"), 0
    return float(arr.mean()), float(arr.std()), int(arr.size)


def sweep_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, matrix): each policy's accuracy over seeds and the paired gaps that judge it.

    ``gap`` is drift-clustered minus oracle, seed by seed (mean, std, worst);
    ``triggered_vs_never`` is drift-triggered minus never, seed by seed.
    """
    cells: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    seconds: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        key = (r["dataset"], r["matrix"])
        cells.setdefault(key, {}).setdefault(int(r["seed"]), {})[r["policy"]] = 100 * float(
            r["accuracy"]
        )
        seconds.setdefault(key, []).append(float(r.get("seconds", 0.0)))
    order = {cell: i for i, cell in enumerate(SWEEP)}
    out = []
    for key in sorted(cells, key=lambda k: (order.get(k, len(order)), k)):
        per_seed = cells[key]
        policies = sorted({p for s in per_seed.values() for p in s})
        entry: dict[str, Any] = {"dataset": key[0], "matrix": key[1], "seeds": sorted(per_seed)}
        for p in policies:
            entry[p] = _stats([s.get(p, float("nan")) for s in per_seed.values()])
        gaps = [
            s["drift-clustered"] - s["oracle"]
            for s in per_seed.values()
            if {"drift-clustered", "oracle"} <= set(s)
        ]
        trig = [
            s["drift-triggered"] - s["never"]
            for s in per_seed.values()
            if {"drift-triggered", "never"} <= set(s)
        ]
        entry["gap"] = (*_stats(gaps)[:2], min(gaps) if gaps else float("nan"))
        entry["triggered_vs_never"] = (*_stats(trig)[:2], min(trig) if trig else float("nan"))
        entry["seconds"] = sum(seconds[key])
        out.append(entry)
    return out


def _pm(stat: tuple[float, float, int]) -> str:
    mean, std, _n = stat
    return "-" if math.isnan(mean) else f"{mean:.1f} ± {std:.1f}"


POLICY_COLUMNS = ("oracle", "window", "never", "drift-triggered", "drift-clustered")


def sweep_markdown(summary: Sequence[Mapping[str, Any]]) -> str:
    """The sweep's table: accuracy mean ± std over seeds, the paired gaps."""
    head = [
        "dataset",
        "matrix",
        "seeds",
        *POLICY_COLUMNS,
        "clustered - oracle (worst seed)",
        "triggered - never (worst)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        gap, trig = s["gap"], s["triggered_vs_never"]
        lines.append(
            "| "
            + " | ".join(
                [
                    s["dataset"],
                    s["matrix"],
                    str(len(s["seeds"])),
                    *(_pm(s.get(p, (float("nan"), 0.0, 0))) for p in POLICY_COLUMNS),
                    f"{gap[0]:+.1f} ± {gap[1]:.1f} ({gap[2]:+.1f})",
                    f"{trig[0]:+.1f} ({trig[2]:+.1f})",
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def sweep_targets(summary: Sequence[Mapping[str, Any]], seeds: int = 3) -> list[str]:
    """Issue 13's targets, per dataset: every matrix, judged on the mean over seeds."""
    lines = []
    for dataset, bound in TARGET_GAP.items():
        cells = [s for s in summary if s["dataset"] == dataset]
        wanted = [m for d, m in SWEEP if d == dataset]
        if not cells:
            lines.append(f"- {dataset}: not measured")
            continue
        worst = min(cells, key=lambda s: s["gap"][0])
        met = [s for s in cells if s["gap"][0] >= -bound]
        partial = [s["matrix"] for s in cells if len(s["seeds"]) < seeds]
        missing = [m for m in wanted if m not in {s["matrix"] for s in cells}]
        verdict = (
            "met"
            if len(met) == len(cells) and not missing and not partial
            else "missed"
            if len(met) < len(cells)
            else "met so far"
        )
        lines.append(
            f"- {dataset}: drift-clustered within {bound:g} of the oracle on {len(met)} of {len(cells)} matrices "
            f"(worst {worst['matrix']}: {worst['gap'][0]:+.1f})"
            + (f"; fewer than {seeds} seeds on {', '.join(partial)}" if partial else "")
            + (f"; not run: {', '.join(missing)}" if missing else "")
            + f" -> {verdict}"
        )
    below = [
        f"{s['dataset']}/{s['matrix']} ({s['triggered_vs_never'][0]:+.2f})"
        for s in summary
        if s["triggered_vs_never"][0] < 0
    ]
    lines.append(
        "- drift-triggered never below never (mean over seeds): "
        + ("met on every measured matrix" if not below else "missed on " + ", ".join(below))
    )
    return lines


def plot_sweep(summary: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """drift-clustered minus oracle per matrix, the seeds' spread as error bars, the bound as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{s['dataset']}/{s['matrix']}" for s in summary]
    gaps = [s["gap"][0] for s in summary]
    spread = [s["gap"][1] for s in summary]
    bounds = [TARGET_GAP.get(s["dataset"], 2.0) for s in summary]
    fig, ax = plt.subplots(figsize=(max(8, 0.35 * len(labels)), 4))
    x = np.arange(len(labels))
    colors = ["tab:green" if g >= -b else "tab:red" for g, b in zip(gaps, bounds)]
    ax.bar(x, gaps, yerr=spread, color=colors, capsize=2)
    ax.hlines(
        [-b for b in bounds],
        x - 0.45,
        x + 0.45,
        colors="black",
        linestyles="--",
        linewidth=1,
        label="bound (issue 13)",
    )
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(x, labels, rotation=70, fontsize=7)
    ax.set_ylabel("drift-clustered - oracle (points)")
    ax.set_title("FedDrift sweep: mean over seeds, error bar = std")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_sweep(
    results: Path, rows: Sequence[Mapping[str, Any]], seconds: float, seeds: int
) -> dict[str, Any]:
    """``sweep.md``, ``sweep.csv`` and ``sweep.png`` in ``results``."""
    summary = sweep_summary(rows)
    (results / "sweep.md").write_text(
        sweep_markdown(summary) + "\n" + "\n".join(sweep_targets(summary, seeds)) + "\n"
    )
    with (results / "sweep.csv").open("w") as out:
        out.write("dataset,matrix,seed,policy,accuracy_pct,seconds,detected,drifts,false_alarms\n")
        for r in sorted(rows, key=lambda r: (r["dataset"], r["matrix"], r["seed"], r["policy"])):
            d = r["detection"]
            out.write(
                f"{r['dataset']},{r['matrix']},{r['seed']},{r['policy']},{100 * r['accuracy']:.1f},"
                f"{r['seconds']},{d['detected']},{d['drifts']},{d['false_alarms']}\n"
            )
    plot = plot_sweep(summary, results / "sweep.png") if summary else None
    meta = {"seconds": round(seconds, 1), "cells": len(summary), "runs": len(rows), "seeds": seeds}
    (results / "sweep-meta.json").write_text(json.dumps(meta, indent=2))
    return {
        "summary": summary,
        "plot": plot,
        "meta": meta,
        "started": time.strftime("%Y-%m-%d %H:%M"),
    }


def cell_line(rows: Sequence[Mapping[str, Any]], done: int, total: int, seconds: float) -> str:
    """``[3/93] sine2/W seed 0: never 39.2  window 78.0 ...  (212 s)``."""
    first = rows[0]
    accs = "  ".join(f"{r['policy']} {100 * r['accuracy']:.1f}" for r in rows)
    return f"[{done}/{total}] {first['dataset']}/{first['matrix']} seed {first['seed']}: {accs}  ({seconds:.0f} s)"


def sweep_command(
    results: Path, work: Path, seeds: int, jobs: int, bench: Any, emit: Callable[[str], None]
) -> list[str]:
    """``fedge feddrift --sweep``: run what ``results`` lacks, write the table; the failed cells."""
    started = time.perf_counter()
    tasks = sweep_tasks(work, seeds, bench.policies, bench.settings)

    def on_task(rows: list[dict[str, Any]], done: int, total: int) -> None:
        emit(cell_line(rows, done, total, time.perf_counter() - started))

    rows, failed = run_sweep(results, tasks, jobs, on_task=on_task)
    out = write_sweep(results, rows, time.perf_counter() - started, seeds)
    for line in sweep_targets(out["summary"], seeds):
        emit(line)
    emit(f"Sweep table, CSV and plot: {results}/sweep.md, sweep.csv, sweep.png")
    return failed
