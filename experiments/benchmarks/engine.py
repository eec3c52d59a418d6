"""Item 1: the same ServerApp, ClientApp and seed on the in-process engine and on Flower's Ray.

Each run is one monitoring tick (every device receives and stores its rows) and
one campaign of ``rounds`` FedAvg rounds over all devices. The time per round
is Flower's own strategy clock on both engines (the rounds only: no process or
Ray start-up, no MLflow); the accuracies of all runs must be identical. The
in-process engine runs twice: in one process, and with one worker process per
core (as many as Ray's simulation uses here). It is warmed up once (imports,
first torch calls), as it is in any process that runs more than one campaign.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from experiments.benchmarks.common import (
    Figure,
    flower_strategy_timer,
    small_config,
    strategy_seconds,
)
from fedge.runner import RunRequest, feed_devices, quiet_tick


def _inprocess(n: int, rounds: int, out: Path, workers: int = 1) -> tuple[float, float, dict[str, Any]]:
    """Seconds per round, the devices' handler seconds per round (train and evaluate), summary."""
    from clients.client_app import app as client_app
    from clients.client_app import forget_devices
    from fedge.engines.inprocess import InProcessGrid
    from fedge.server.app import run_server

    cfg, overrides = small_config(out, f"scenario.clients={n}", f"campaign.initial_rounds={rounds}")
    folder = out / "run"
    run_config = RunRequest(None, overrides, "inprocess").run_config(cfg, folder, "inprocess")
    feed_devices(cfg, folder)
    with InProcessGrid(client_app, n, run_config, workers=workers) as grid:
        try:
            with flower_strategy_timer() as timer:
                summary = run_server(grid, cfg, folder, on_tick=quiet_tick, engine="inprocess")
        finally:
            forget_devices()
        by_type = grid.client_seconds_by_type
        device_seconds = (by_type.get("train", 0.0) + by_type.get("evaluate", 0.0)) / rounds
    return timer.seconds[0] / rounds, device_seconds, summary


def _ray(n: int, rounds: int, out: Path) -> tuple[float, dict[str, Any]]:
    from fedge.engines.simulation import run_flower_simulation

    cfg, overrides = small_config(out, f"scenario.clients={n}", f"campaign.initial_rounds={rounds}")
    folder = out / "run"
    folder.mkdir(parents=True, exist_ok=True)
    run_config = RunRequest(None, overrides, "simulation").run_config(cfg, folder, "simulation")
    feed_devices(cfg, folder)
    run_flower_simulation(run_config, num_supernodes=n, log_dir=folder)
    import json

    summary = json.loads((folder / "summary.json").read_text())
    seconds = strategy_seconds((folder / "flower-simulation.log").read_text(errors="replace"))
    return seconds[0] / rounds, summary


def _same_numbers(a: dict[str, Any], b: dict[str, Any]) -> bool:
    acc_a = [t["accuracy"] for t in a["ticks"]] + [c["candidate_acc"] for c in a["campaigns"]]
    acc_b = [t["accuracy"] for t in b["ticks"]] + [c["candidate_acc"] for c in b["campaigns"]]
    return len(acc_a) == len(acc_b) and all(
        (x is None and y is None) or (x is not None and y is not None and abs(x - y) < 1e-9)
        for x, y in zip(acc_a, acc_b, strict=True)
    )


def run(sizes: tuple[int, ...] = (10, 100, 1000), rounds: int = 2) -> list[Figure]:
    """Seconds per round on every engine at each size, their ratio, and whether the numbers agree."""
    logging.getLogger("fedge").setLevel(logging.WARNING)
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    figures = []
    with tempfile.TemporaryDirectory(prefix="fedge-bench-engine-") as tmp:
        _inprocess(2, 1, Path(tmp) / "warm-up")  # imports and first-call costs, paid once per process
        for n in sizes:
            serial, device_s, serial_summary = _inprocess(n, rounds, Path(tmp) / f"inprocess-{n}")
            pooled, _, pooled_summary = _inprocess(n, rounds, Path(tmp) / f"pooled-{n}", workers)
            ray, ray_summary = _ray(n, rounds, Path(tmp) / f"ray-{n}")
            same = _same_numbers(serial_summary, ray_summary) and _same_numbers(pooled_summary, ray_summary)
            speedup = ray / min(pooled, serial)
            target = "in-process >= 10x faster, identical metrics" if n <= 100 else "(where does Ray win?)"
            figures.append(
                Figure(
                    "1 engine",
                    f"s/round at {n} devices: in-process ({workers} workers; 1 process) vs Ray",
                    (
                        f"{pooled:.3f} s; {serial:.3f} s vs {ray:.3f} s; metrics "
                        f"{'identical' if same else 'DIFFER'}; device handlers {device_s:.2f} s/round, "
                        f"so at most {ray / (device_s / workers):.1f}x on {workers} cores"
                    ),
                    (
                        f"{ray / pooled:.1f}x faster in-process with {workers} workers, "
                        f"{ray / serial:.1f}x in 1 process"
                    ),
                    target,
                    (speedup >= 10 and same) if n <= 100 else None,
                    {
                        "devices": n,
                        "inprocess_s": serial,
                        "pooled_s": pooled,
                        "workers": workers,
                        "ray_s": ray,
                        "device_handler_s": device_s,
                        "identical": same,
                    },
                )
            )
    return figures
