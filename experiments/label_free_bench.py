"""Drift detection when labels are scarce or late: label-based, label-free and either.

For each scenario and label setting (share of rows labelled, ticks a label
comes late: ``scenario.label_fraction`` and ``scenario.label_delay``), each
detector configuration runs through the ServerApp and ClientApp code on the
in-process engine:

=============  ==============================================================
``reference``  label-based detector with every label on time (one run per scenario)
``label``      label-based detector under the setting's labels
``label-free`` input test (KS per feature, Holm) and confidence detector only
``either``     all three; any signal counts toward the quorum
=============  ==============================================================

Scored against the schedule (every device drifts at ``DRIFT_AT``):

- **detection delay**: per device, the first tick at or after the drift where
  a signal the configuration counts fired, minus the drift tick; median over
  the devices that detected. **campaign delay**: the first campaign at or after
  the drift, minus the drift tick (the fleet's response).
- **false alarms**: counted-signal firings per device-tick before the drift,
  over the ticks a model was deployed.
- **missed**: drifting devices that neither detected the drift by the end of
  the run nor were answered by a campaign at or after it.
- **accuracy**: the true accuracy of each device's deployed model on all of its
  tick's valid rows (every label, whether the device got it or not), measured
  by the harness after each tick, sample-weighted over devices: this is the
  user's accuracy, not what the device can measure from its few labels.

The matrix runs with ``monitor.reset_window_on_drift`` on, the product's
default; ``--keep-window`` turns it off. With it on and labels that come late, a
drift flag empties the window of the rows whose labels are still on their way,
so those labels are refused when they come; a label-free flag keeps firing
every tick (its reference is re-taken only by a new model), so the window never
again holds a row whose label arrives and no campaign can gather one. With it
off, a campaign after a concept drift trains on a window still mostly of the old
concept.

Run ``python -m experiments.label_free_bench`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedge.contracts.config import PROJECT_ROOT, FedgeConfig
from fedge.contracts.config_load import load_config

RESULTS = PROJECT_ROOT / "experiments" / "results" / "label_free"
DRIFT_AT = 7
TICKS = 14
CLIENTS = 4
SAMPLES = 100
#: (label_fraction, label_delay), as the issue asks.
SETTINGS: tuple[tuple[float, int], ...] = ((1.0, 0), (0.5, 0), (0.1, 0), (1.0, 1), (1.0, 5), (0.1, 5))
CONFIGS: tuple[str, ...] = ("label", "label-free", "either")
#: Report signals each configuration counts.
COUNTED: dict[str, frozenset[str]] = {
    "reference": frozenset({"label"}),
    "label": frozenset({"label"}),
    "label-free": frozenset({"input", "prediction"}),
    "either": frozenset({"label", "input", "prediction"}),
}

SCENARIOS: dict[str, dict[str, Any]] = {
    # Covariate drift on real data: the camera gain halves, the labels stay true.
    "segment-gain": {
        "generator": "segment-gain",
        "seed": 5,
        "generator_params": {"partitioner": "iid"},
        "schedule": {"kind": "sudden", "at": DRIFT_AT, "from_concept": 0, "to_concept": 1, "fraction": 1.0},
        "model": {"hidden": 64, "layers": 1},
    },
    # Concept drift with unchanged inputs: SINE-2's label flip.
    "sine2": {
        "generator": "sine2",
        "seed": 0,
        "generator_params": {},
        "schedule": {"kind": "sudden", "at": DRIFT_AT, "fraction": 1.0},
        "model": {},
    },
}


@dataclass(frozen=True)
class Cell:
    """One run of the matrix."""

    scenario: str
    config: str
    label_fraction: float
    label_delay: int
    seed: int = 0
    #: ``monitor.reset_window_on_drift`` (the product's default: on).
    reset_window: bool = True

    @property
    def name(self) -> str:
        return f"{self.scenario}-{self.config}-f{self.label_fraction:g}-d{self.label_delay}-s{self.seed}"


def cells(scenarios: Sequence[str], seeds: Sequence[int], reset_window: bool = True) -> list[Cell]:
    """The matrix: per scenario one reference, then each setting x configuration."""
    out: list[Cell] = []
    for seed in seeds:
        for scenario in scenarios:
            out.append(Cell(scenario, "reference", 1.0, 0, seed, reset_window))
            for fraction, delay in SETTINGS:
                for config in CONFIGS:
                    if config == "label" and (fraction, delay) == (1.0, 0):
                        continue  # that is the reference
                    out.append(Cell(scenario, config, fraction, delay, seed, reset_window))
    return out


def scenario_table(cell: Cell, folder: Path) -> dict[str, Any]:
    """The run's configuration as nested tables."""
    spec = SCENARIOS[cell.scenario]
    label_free = cell.config in ("label-free", "either")
    return {
        "scenario": {
            "name": cell.name,
            "generator": spec["generator"],
            "seed": spec["seed"] + cell.seed,
            "clients": CLIENTS,
            "ticks": TICKS,
            "samples_per_tick": SAMPLES,
            "bad_row_fraction": 0.0,
            "label_fraction": cell.label_fraction,
            "label_delay": cell.label_delay,
            "schedule": spec["schedule"],
            "generator_params": spec["generator_params"],
        },
        "monitor": {
            "detector": "ADWIN",
            # Holds a row until a label 5 ticks late comes (the device stores a tick's
            # rows before it takes that tick's late labels).
            "window": 800,
            "reset_window_on_drift": cell.reset_window,
            "input_test": "ks" if label_free else "none",
            "prediction": "confidence" if label_free else "none",
        },
        "trigger": {
            "policy": "quorum",
            "quorum": 0.5,
            "cooldown": 2,
            "signals": {"reference": "label", "label": "label"}.get(cell.config, cell.config),
        },
        "campaign": {"strategy": "fedavg", "rounds": 3, "initial_rounds": 6, "local_epochs": 2},
        "model": spec["model"],
        "tracking": {"experiment": "fedge-label-free"},
        "run": {"output_dir": str(folder), "resume": False},
    }


def run_cell(cell: Cell, folder: Path) -> dict[str, Any]:
    """Run one cell in-process and score it."""
    from clients import client_app as apps
    from experiments.feddrift import to_toml
    from fedge.engines.inprocess import InProcessGrid
    from fedge.runner import feed_devices
    from fedge.scenarios import build_scenario
    from fedge.server.app import run_server

    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_dir = folder / cell.name
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = run_dir / "scenario.toml"
    path.write_text(to_toml(scenario_table(cell, folder)))
    cfg = load_config(path)
    scenario = build_scenario(cfg.scenario)
    run_config = {"scenario": str(path), "overrides": "", "output-dir": str(folder),
                  "run-dir": str(run_dir), "engine": "inprocess"}
    feed_devices(cfg, run_dir)
    truth: dict[int, tuple[int, int]] = {}

    def measure(rec: Any, _campaign: Any) -> None:
        # The deployed models are those that predicted this tick (the next tick's
        # poll deploys a campaign's model): score them on every valid row of the tick.
        right = total = 0
        for device in apps._DEVICES.values():
            device.sync()
            if device.version <= 0:
                continue
            x, y = scenario.batch(device.device_id, rec.tick)
            predicted = device.task.predict(device._model, device._shaped(x))
            right += int(np.sum(np.asarray(predicted) == y))
            total += len(y)
        truth[rec.tick] = (right, total)

    grid = InProcessGrid(apps.app, cfg.scenario.clients, run_config)
    started = time.perf_counter()
    try:
        summary = run_server(grid, cfg, run_dir, on_tick=measure, engine="inprocess")
    finally:
        grid.close()
        apps.forget_devices()
    seconds = time.perf_counter() - started
    return score(cell, cfg, summary, truth, seconds)


def score(
    cell: Cell,
    cfg: FedgeConfig,
    summary: Mapping[str, Any],
    truth: Mapping[int, tuple[int, int]],
    seconds: float,
) -> dict[str, Any]:
    """The cell's detection and accuracy figures."""
    counted = COUNTED[cell.config]
    fired: dict[int, set[int]] = {}
    for t in summary["ticks"]:
        devices = {int(d) for name, ds in t.get("signals", {}).items() if name in counted for d in ds}
        fired[int(t["tick"])] = devices
    campaigns = sorted(int(c["tick"]) for c in summary["campaigns"])
    first_model = campaigns[0] + 1 if campaigns else TICKS
    response = next((t for t in campaigns if t >= DRIFT_AT), None)
    delays: list[int] = []
    missed = 0
    for device in range(cfg.scenario.clients):
        hit = next((t for t in range(DRIFT_AT, TICKS) if device in fired.get(t, set())), None)
        if hit is not None:
            delays.append(hit - DRIFT_AT)
        elif response is None:
            missed += 1  # neither its own signal nor a campaign answered this device's drift
    before = range(first_model, DRIFT_AT)
    alarms = sum(len(fired.get(t, set())) for t in before)
    device_ticks = len(before) * cfg.scenario.clients
    accuracy = [truth[t][0] / truth[t][1] if truth.get(t, (0, 0))[1] else None for t in range(TICKS)]
    after = [a for a in accuracy[DRIFT_AT:] if a is not None]
    return {
        "scenario": cell.scenario,
        "config": cell.config,
        "label_fraction": cell.label_fraction,
        "label_delay": cell.label_delay,
        "seed": cell.seed,
        "median_delay": statistics.median(delays) if delays else None,
        "detected": len(delays),
        "campaign_delay": None if response is None else response - DRIFT_AT,
        "false_alarms": round(alarms / device_ticks, 4) if device_ticks else None,
        "device_ticks_before": device_ticks,
        "missed": missed,
        "devices": cfg.scenario.clients,
        "accuracy_after": round(float(np.mean(after)), 4) if after else None,
        "campaigns": len(campaigns),
        "accuracy_over_time": accuracy,
        "seconds": round(seconds, 1),
    }


FIELDS = ("scenario", "config", "label_fraction", "label_delay", "seed", "median_delay", "detected",
          "campaign_delay", "false_alarms", "device_ticks_before", "missed", "devices",
          "accuracy_after", "campaigns", "seconds")


def write_outputs(rows: Sequence[Mapping[str, Any]], out: Path, reset_window: bool = True) -> None:
    """CSV, markdown table, JSON (with accuracy over time) and the plot under ``out``.

    The files are named ``label_free*`` with the window reset on drift (the
    default), ``keep_window*`` without it, so both runs can share a folder.
    """
    out.mkdir(parents=True, exist_ok=True)
    stem = "label_free" if reset_window else "keep_window"
    with (out / f"{stem}.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{stem}.json").write_text(json.dumps(list(rows), indent=1))
    (out / f"{stem}.md").write_text(markdown(rows))
    plot(rows, out / f"{stem}_accuracy.png")


def _show(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The results as one markdown table per scenario."""
    lines: list[str] = []
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        lines += [f"**{scenario}** (drift at tick {DRIFT_AT}, {CLIENTS} devices x {TICKS} ticks)", "",
                  ("| labels | delay | config | seed | median delay (devices) | campaign delay "
                   "| false alarms / device-tick | missed | accuracy after drift | campaigns |"),
                  "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        mine = [r for r in rows if r["scenario"] == scenario]
        order = {key: i for i, key in enumerate(dict.fromkeys(
            (r["label_fraction"], r["label_delay"], r["config"]) for r in mine))}
        # The seeds of one setting side by side, so their spread reads at a glance.
        for r in sorted(mine, key=lambda r: (order[(r["label_fraction"], r["label_delay"], r["config"])], r["seed"])):
            lines.append(
                f"| {r['label_fraction']:.0%} | {r['label_delay']} | {r['config']} | {r['seed']} "
                f"| {_show(r['median_delay'], 1)} ({r['detected']}) "
                f"| {_show(r['campaign_delay'])} | {_show(r['false_alarms'], 3)} | {r['missed']}/{r['devices']} "
                f"| {_show(r['accuracy_after'], 3)} | {r['campaigns']} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(rows: Sequence[Mapping[str, Any]], target: Path) -> None:
    """Accuracy over time: one panel per scenario and configuration, one line per label setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    fig, axes = plt.subplots(len(scenarios), len(CONFIGS), figsize=(4.2 * len(CONFIGS), 3.2 * len(scenarios)),
                             sharey=True, squeeze=False)
    for i, scenario in enumerate(scenarios):
        ref = next((r for r in rows if r["scenario"] == scenario and r["config"] == "reference"), None)
        for j, config in enumerate(CONFIGS):
            ax = axes[i][j]
            if ref is not None:
                ax.plot(_xy(ref)[0], _xy(ref)[1], "k--", lw=2, label="reference (label, 100%, 0)")
            for r in rows:
                if r["scenario"] == scenario and r["config"] == config:
                    # One colour per label setting in every panel.
                    colour = f"C{SETTINGS.index((r['label_fraction'], r['label_delay']))}"
                    ax.plot(*_xy(r), marker=".", color=colour,
                            label=f"{r['label_fraction']:.0%}, delay {r['label_delay']}")
            ax.axvline(DRIFT_AT, color="grey", lw=0.8)
            ax.set_title(f"{scenario}: {config}", fontsize=9)
            ax.set_xlabel("tick")
            if j == 0:
                ax.set_ylabel("true accuracy")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def _xy(row: Mapping[str, Any]) -> tuple[list[int], list[float]]:
    pts = [(t, a) for t, a in enumerate(row["accuracy_over_time"]) if a is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the matrix (or part of it) and write the results."""
    parser = argparse.ArgumentParser(prog="python -m experiments.label_free_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                        help="scenario to run (repeatable; default both)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per cell (default 1)")
    parser.add_argument("--only", help="run only the cell with this name (e.g. sine2-reference-f1-d0-s0)")
    parser.add_argument("--keep-window", action="store_true",
                        help="run with monitor.reset_window_on_drift off (default: on, as the product)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    todo = cells(args.scenario or list(SCENARIOS), range(args.seeds), not args.keep_window)
    if args.only:
        todo = [c for c in todo if c.name == args.only]
        if not todo:
            parser.error(f"--only: no cell named {args.only!r}")
    logging.basicConfig(level=logging.ERROR)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedge-label-free-") as tmp:
        for i, cell in enumerate(todo, 1):
            row = run_cell(cell, Path(tmp))
            rows.append(row)
            print(f"[{i}/{len(todo)}] {cell.name}: delay {row['median_delay']} campaign {row['campaign_delay']} "
                  f"fa {row['false_alarms']} missed {row['missed']} acc {row['accuracy_after']} "
                  f"({row['seconds']} s)", flush=True)
    write_outputs(rows, args.out, not args.keep_window)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
