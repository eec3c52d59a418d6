"""The FedDrift benchmark's results: the table over seeds, the plots, the page and the targets.

:mod:`experiments.feddrift` runs the policies; this module turns its rows into
what a person reads.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.feddrift import (
    DETECTION_TOLERANCE,
    N_CLIENTS,
    N_STEPS,
    SAMPLES,
    SHARED_DATA,
    Benchmark,
    dataset_spec,
    matrix_file,
    model_for,
    sea_source,
)
from fedge.scenarios import ConceptSchedule


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std())


def aggregate(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds, one row per (dataset, matrix, policy)."""
    keys: list[tuple[str, str, str]] = []
    for r in rows:
        key = (r["dataset"], r["matrix"], r["policy"])
        if key not in keys:
            keys.append(key)
    out = []
    for dataset, matrix, policy in keys:
        runs = [r for r in rows if (r["dataset"], r["matrix"], r["policy"]) == (dataset, matrix, policy)]
        acc = _mean_std([r["accuracy"] for r in runs])
        det = [r["detection"] for r in runs]
        out.append(
            {
                "dataset": dataset,
                "matrix": matrix,
                "policy": policy,
                "seeds": len(runs),
                "accuracy_mean": acc[0],
                "accuracy_std": acc[1],
                "rounds": float(np.mean([r["rounds"] for r in runs])),
                "model_rounds": float(np.mean([r["model_rounds"] for r in runs])),
                "mb_sent": float(np.mean([r["bytes_sent"] for r in runs])) / 1e6,
                "mb_received": float(np.mean([r["bytes_received"] for r in runs])) / 1e6,
                "detected": float(np.mean([d["detected"] for d in det])),
                "drifts": float(np.mean([d["drifts"] for d in det])),
                "false_alarms": float(np.mean([d["false_alarms"] for d in det])),
                "missed": float(np.mean([d["missed"] for d in det])),
                "mean_delay": _mean_std([d["mean_delay"] for d in det])[0],
                "accuracy_over_time": [
                    _mean_std([r["accuracy_over_time"][i] for r in runs])[0]
                    for i in range(len(runs[0]["accuracy_over_time"]))
                ],
                "seconds": float(np.mean([r["seconds"] for r in runs])),
                "detector": _detector_label(runs[0]),
                "detector_setting": runs[0].get("detector_setting", ""),
            }
        )
    return out


def _detector_label(row: Mapping[str, Any]) -> str:
    """``ADWIN(delta=0.002)``: the devices' detector of a run."""
    params = ", ".join(f"{k}={v}" for k, v in row.get("detector_params", {}).items())
    return f"{row['detector']}({params})" if "detector" in row else ""


TABLE_COLUMNS = (
    "dataset", "matrix", "policy", "accuracy (%)", "rounds", "model rounds",
    "MB sent", "MB received", "detected / drifts", "false alarms", "mean delay (ticks)",
)


def table_rows(summary: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """The results table as text cells."""
    out = []
    for s in summary:
        delay = "-" if math.isnan(s["mean_delay"]) else f"{s['mean_delay']:.2f}"
        out.append(
            [
                s["dataset"],
                s["matrix"],
                s["policy"],
                f"{100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_std']:.1f}",
                f"{s['rounds']:.0f}",
                f"{s['model_rounds']:.0f}",
                f"{s['mb_sent']:.2f}",
                f"{s['mb_received']:.2f}",
                f"{s['detected']:.1f} / {s['drifts']:.0f}",
                f"{s['false_alarms']:.1f}",
                delay,
            ]
        )
    return out


def markdown_table(summary: Sequence[Mapping[str, Any]]) -> str:
    """The results table in Markdown."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summary)]
    return "\n".join(lines) + "\n"


def csv_table(summary: Sequence[Mapping[str, Any]]) -> str:
    """The results table as CSV (numbers unformatted)."""
    buf = io.StringIO()
    fields = [k for k in summary[0] if k != "accuracy_over_time"] if summary else []
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for s in summary:
        writer.writerow(s)
    return buf.getvalue()


def plot_results(
    summary: Sequence[Mapping[str, Any]], folder: Path, matrices: Mapping[str, Path]
) -> list[Path]:
    """Accuracy over time per policy (drifts marked) per dataset, and rounds per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    datasets = list(dict.fromkeys((s["dataset"], s["matrix"]) for s in summary))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.4), squeeze=False)
    for ax, (dataset, matrix) in zip(axes[0], datasets, strict=True):
        for s in summary:
            if (s["dataset"], s["matrix"]) != (dataset, matrix):
                continue
            steps = list(range(1, len(s["accuracy_over_time"]) + 1))
            ax.plot(steps, s["accuracy_over_time"], marker="o", markersize=3, label=s["policy"])
        cp = matrices.get(f"{dataset}-{matrix}")
        if cp is not None:
            schedule = ConceptSchedule.from_cp_file(cp)
            counts: dict[int, int] = {}
            for _, step in schedule.drift_points():
                counts[step] = counts.get(step, 0) + 1
            for step, n in counts.items():
                ax.axvline(step, color="red", alpha=min(0.15 + 0.1 * n, 0.8), linestyle="--")
        ax.set_title(f"{dataset} / {matrix}")
        ax.set_xlabel("test step (red: drifts, darker = more clients)")
        ax.set_ylim(0.3, 1.02)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path = folder / "accuracy_over_time.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(8, 3.4))
    policies = list(dict.fromkeys(s["policy"] for s in summary))
    width = 0.8 / max(1, len(policies))
    for i, policy in enumerate(policies):
        vals = [
            next((s["rounds"] for s in summary if (s["dataset"], s["matrix"], s["policy"]) == (d, m, policy)), 0)
            for d, m in datasets
        ]
        ax.bar(np.arange(len(datasets)) + i * width, vals, width, label=policy)
    ax.set_xticks(np.arange(len(datasets)) + width * (len(policies) - 1) / 2)
    ax.set_xticklabels([f"{d}/{m}" for d, m in datasets])
    ax.set_ylabel("training rounds used")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = folder / "rounds.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths


def write_results(
    rows: Sequence[Mapping[str, Any]],
    folder: Path,
    seconds: float,
    bench: Benchmark,
    tracking_dir: Path,
) -> dict[str, Any]:
    """Table (Markdown, CSV), per-run JSON and plots in ``folder``; an MLflow run holding them.

    The MLflow store is a SQLite file in ``tracking_dir`` (each run's own store,
    with its registered model versions, is in its task folder beside it).
    """
    from fedge.tracking import Tracker, default_tracking_uri

    folder.mkdir(parents=True, exist_ok=True)
    summary = aggregate(rows)
    (folder / "results.md").write_text(markdown_table(summary))
    (folder / "results.csv").write_text(csv_table(summary))
    (folder / "runs.json").write_text(json.dumps(list(rows), indent=1))
    meta = {
        "seconds": round(seconds, 1),
        "cpu_seconds": round(sum(float(r.get("cpu_seconds", 0.0)) for r in rows), 1),
        "jobs": bench.jobs,
        "cpus": os.cpu_count(),
        "seeds": bench.seeds,
        "settings": bench.settings.__dict__,
        "protocol": {"clients": N_CLIENTS, "steps": N_STEPS, "samples_per_step": SAMPLES},
        "data": {
            "changepoints": "feddrift" if (SHARED_DATA / "changepoints").is_dir() else "generated",
            "sea": "feddrift csv" if sea_source() else "generated",
        },
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    matrices = {}
    for d, name in dict.fromkeys((r["dataset"], r["matrix"]) for r in rows):
        cp, _ = matrix_file(name, dataset_spec(d).n_concepts, folder / "matrices")
        matrices[f"{d}-{name}"] = cp
    plots = plot_results(summary, folder, matrices)
    tracking_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(
        default_tracking_uri(tracking_dir), "fedge-feddrift", "fedge-feddrift-summary", run_name="table"
    )
    tracker.start({**{f"settings.{k}": v for k, v in bench.settings.__dict__.items()}, "seeds": bench.seeds})
    try:
        for i, s in enumerate(summary):
            tag = f"{s['dataset']}-{s['matrix']}/{s['policy']}"
            tracker.log_metrics(
                {f"{tag}/accuracy": s["accuracy_mean"], f"{tag}/rounds": s["rounds"]}, step=i
            )
        tracker.log_metrics({"wall_seconds": seconds}, step=0)
        for path in [folder / "results.md", folder / "results.csv", folder / "meta.json", *plots]:
            tracker.log_artifact(path)
        tracker.end("FINISHED")
    except Exception:
        tracker.end("FAILED")
        raise
    return {"summary": summary, "meta": meta, "plots": [str(p) for p in plots]}


def check_targets(summary: Sequence[Mapping[str, Any]]) -> list[str]:
    """The issue's targets, each as one line saying met or missed and by how much."""
    by = {(s["dataset"], s["policy"]): s for s in summary}
    lines = []
    for dataset in ("sine2", "circle2", "sea4"):
        c, o, w = (by.get((dataset, p)) for p in ("drift-clustered", "oracle", "window"))
        if c and o and w:
            gap = 100 * (o["accuracy_mean"] - c["accuracy_mean"])
            lead = 100 * (c["accuracy_mean"] - w["accuracy_mean"])
            ok = gap <= 2.0 and lead > 2.0
            lines.append(
                f"{dataset}: drift-clustered {gap:+.1f} points below oracle, {lead:+.1f} above window"
                f" -> {'met' if ok else 'missed'}"
            )
    for dataset in dict.fromkeys(s["dataset"] for s in summary):
        t, w = by.get((dataset, "drift-triggered")), by.get((dataset, "window"))
        if t and w:
            gap = 100 * (w["accuracy_mean"] - t["accuracy_mean"])
            share = t["rounds"] / w["rounds"] if w["rounds"] else float("nan")
            ok = gap <= 1.0 and share <= 0.3
            lines.append(
                f"{dataset}: drift-triggered {gap:+.1f} points below window with {100 * share:.0f}%"
                f" of its rounds -> {'met' if ok else 'missed'}"
            )
    return lines


PAGE_INTRO = """\
# FedDrift benchmark

`fedge feddrift` runs the protocol of *Federated Learning under Distributed
Concept Drift* (Jothimurugesan et al., AISTATS 2023) on fedge's own ServerApp
and ClientApp (in-process engine): 10 clients, time steps 0..10, 100 samples
per client per step; models train on step t and are tested on step t+1; the
accuracy is sample-weighted over clients and averaged over test steps 1..10.

| policy | what it does |
| --- | --- |
| `never` | trains once at step 0 |
| `window` | one model, retrained every step on the latest step (the paper's FedAvg baseline) |
| `oracle` | one model per true concept; each client trains and is served by the model of its concept at step t (the reference: it knows the concepts, not the future) |
| `drift-triggered` | one model, retrained (all devices, warm start) only when at least {quorum:.0%} of the devices' detectors fired within the last {memory} steps (after the last campaign), at most once every {cooldown_plus} steps; the candidate is promoted only if it beats the champion on the devices' held-out samples by more than {gate_z:g} standard errors of the paired difference; the champion it replaces stays on standby and serves again when it leads by {gate_z:g} standard errors on the devices' newest samples |
| `drift-clustered` | several models: a device that no model in the pool fits about as well as that model fits its other devices (a z-test on the accuracy gap at the scores' binomial noise; a firing detector lowers the bar) gets a new model; a device moves to a model that fits its latest data clearly better; models that fit each other's devices equally are merged; every cluster trains on its own devices, all clusters of a tick in the same round slots (`fedge/core/clustering.py`) |

Training budget, the same for every policy: {rounds} Flower rounds per
campaign, {local_epochs} local epochs, Adam with learning rate {lr}, batch
{batch_size}; devices train on the 90 % of step t's samples that are not held
out for the federated evaluation. Models: {models}. Detector: river's
{detector} on each device's 0/1 error stream, restarted when the device is
served a new model version (single-model policies) or another cluster's model
(multi-model policies); so `window` detects nothing by construction. "rounds" counts Flower rounds
(clusters train in the same rounds); "model rounds" counts one per model per
round. Bytes are the records the server sent and received (models, configs,
reports, metrics). Detection is scored against the concept matrix: a firing
within {tolerance} steps of a client's drift detects it (delay in steps), any
other firing is a false alarm.

Concept matrices: {matrices}. SEA-4 data: {sea}.

Reading the table:

- No policy that learns from the past can score a client right at the step it
  drifts. On SINE-2 a drift flips every label, so matrix A's 16 client drifts
  (of 100 scored client-steps) cap every policy, the oracle included, near 84 %.
- SEA-4's concepts differ only where ``f2 + f3`` lies between two of the
  thresholds 7, 8 and 9 (7.5 % to 16 % of the inputs) under 10 % label noise,
  and concepts 1 and 3 are the same concept; with 90 training samples per
  client and step, a single model is within about a point of the oracle, so
  nothing can be far above `window` there.
- `window` beats `never` mostly by training longer (every step adds rounds),
  not by adapting: on a population that mixes concepts one model can only
  follow the majority.
"""


def render_page(out: Mapping[str, Any], bench: Benchmark, results_link: str) -> str:
    """The Markdown page with the latest table, the targets and the plots."""
    s = bench.settings
    meta = out["meta"]
    cells = list(dict.fromkeys((r["dataset"], r["matrix"]) for r in out["summary"]))
    datasets = list(dict.fromkeys(d for d, _ in cells))
    models = ", ".join(f"{d} {model_for(d)['layers']}x{model_for(d)['hidden']} hidden ReLU" for d in datasets)
    intro = PAGE_INTRO.format(
        quorum=s.quorum,
        cooldown_plus=s.cooldown + 1,
        memory=s.memory,
        gate_z=s.gate_z,
        rounds=s.rounds,
        local_epochs=s.local_epochs,
        lr=s.lr,
        batch_size=s.batch_size,
        models=models,
        detector=s.detector or ("ADWIN" if s.delta is not None else "detector of each dataset's calibration"
                                " (`experiments/feddrift_calibration.json`; ADWIN, delta 0.002, where none),"),
        tolerance=DETECTION_TOLERANCE,
        matrices=", ".join(f"{d}: {m}" for d, m in cells)
        + f" (from {meta['data']['changepoints']})",
        sea=meta["data"]["sea"],
    )
    lines = [
        intro,
        (
            f"## Latest table ({bench.seeds} seeds, mean ± std; {meta['seconds'] / 60:.1f} min wall"
            f" on {meta['jobs']} worker processes, {meta['cpus']} CPUs"
            + (
                f", {meta['cpu_seconds'] / 60:.1f} CPU-minutes)"
                if meta.get("cpu_seconds")
                else ")"
            )
        ),
        "",
        markdown_table(out["summary"]),
        "## Targets",
        "",
        *[f"- {line}" for line in check_targets(out["summary"])],
        "",
        "## Plots",
        "",
        f"![accuracy over time]({results_link}/accuracy_over_time.png)",
        "",
        f"![training rounds]({results_link}/rounds.png)",
        "",
        (
            "CSV, per-run JSON (accuracy per step, per-client detection delays) and the plots: "
            f"[{results_link}]({results_link}). Every run is also an MLflow run with its "
            "registered model versions (one alias per cluster)."
        ),
        "",
    ]
    return "\n".join(lines)


#: Everything from this line on in a published page survives a regenerated table.
KEPT_MARKER = "<!-- kept when the table is regenerated -->"


def keep_sections(page: str, target: Path) -> str:
    """``page`` with the hand-written sections of ``target`` (from :data:`KEPT_MARKER` on) appended."""
    old = target.read_text() if target.is_file() else ""
    at = old.find(KEPT_MARKER)
    return page if at < 0 else page.rstrip("\n") + "\n\n" + old[at:]
