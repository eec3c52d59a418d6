"""What privacy costs in accuracy: the demo scenario under each ``[privacy]`` setting.

    python -m experiments.privacy_utility [--clients 6] [--seed 0]

Runs the SINE-2 label flip (the demo) in-process once per setting, same seed,
and prints a Markdown table: accuracy before the drift and after its
retraining, the campaigns run or refused, and epsilon spent. Round times of
secure aggregation are measured by ``python -m experiments.secagg_bench``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from clients.client_app import app as client_app
from clients.client_app import forget_devices
from fedge.contracts.config_load import load_config
from fedge.engines.inprocess import InProcessGrid
from fedge.runner import feed_devices
from fedge.server.app import run_server

SETTINGS: list[tuple[str, list[str]]] = [
    ("plaintext", []),
    ("SecAgg+", ["privacy.secure_aggregation=true"]),
    *[
        (
            f"SecAgg+ and central DP, z={z:g}",
            [
                "privacy.secure_aggregation=true",
                'privacy.dp="central-client"',
                f"privacy.noise_multiplier={z}",
                "privacy.clipping_norm=1.0",
                "privacy.epsilon_budget=1000",
            ],
        )
        for z in (0.1, 0.3, 1.0)
    ],
    *[
        (
            f"local DP, epsilon {e:g} per release",
            ['privacy.dp="local"', f"privacy.local_epsilon={e}", "privacy.epsilon_budget=100000"],
        )
        for e in (50.0, 10.0)
    ],
]


def run_one(extra: list[str], clients: int, seed: int, out: Path) -> dict[str, Any]:
    overrides = [f'run.output_dir="{out}"', f"scenario.clients={clients}", f"scenario.seed={seed}", *extra]
    cfg = load_config(None, overrides)
    folder = out / "run"
    run_config = {"scenario": "", "overrides": ";".join(overrides), "run-dir": str(folder)}
    feed_devices(cfg, folder)
    grid = InProcessGrid(client_app, cfg.scenario.clients, run_config)
    try:
        return run_server(grid, cfg, folder, on_tick=lambda *_: None)
    finally:
        forget_devices()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(SETTINGS):
            s = run_one(extra, args.clients, args.seed, Path(tmp) / str(i))
            (rec,) = s["recoveries"] or [None]
            budget = s.get("privacy_budget")
            rows.append(
                [
                    name,
                    _fmt(rec["before"] if rec else None),
                    _fmt(rec["after_retraining"] if rec else None),
                    str(len(s["campaigns"])),
                    str(len({r["tick"] for r in s.get("refused", [])})),
                    f"{budget['epsilon_spent']:.2f}" if budget else "-",
                ]
            )
            print(f"done: {name}", flush=True)
    header = [
        "setting",
        "accuracy before drift",
        "after retraining",
        "campaigns",
        "ticks refused",
        "epsilon spent (delta 1e-5)",
    ]
    print()
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
