"""Item 2 and 6: a fedge campaign against bare Flower ``FedAvg.start`` on the same grid.

fedge: one monitoring tick (validation, store, drift monitor on every device),
a campaign of ``rounds`` rounds with evaluation of candidate and champion, the
model registered in MLflow, per-tick and per-round metrics tracked, the run
summary written. Bare: Flower's FedAvg over a hand-rolled ClientApp with the
same model, data, rounds and clients. Both run on the in-process grid. The
MLflow store is opened once before the measured runs (a long-lived store, as
in ``fedge run``); the cost of creating a fresh one is in the MLflow figures.
A third run per repeat gives the device audit log its previous durability (one
``fsync`` per message instead of group commit), to show what that cost.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from pathlib import Path
from typing import NamedTuple
from unittest import mock

from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from experiments.benchmarks import bare_app
from experiments.benchmarks.common import (
    Figure,
    flower_strategy_timer,
    small_config,
    write_bare_data,
)
from fedge.contracts import model as nets
from fedge.contracts.wire import to_arrays
from fedge.privacy.audit import AuditLog
from fedge.runner import RunRequest, feed_devices, quiet_tick
from fedge.scenarios import build_scenario


class Measured(NamedTuple):
    """One run: wall and CPU seconds of the whole run and of the strategy's rounds."""

    wall: float
    cpu: float
    rounds_wall: float
    rounds_cpu: float


def _fedge(n: int, rounds: int, out: Path, folder: Path) -> Measured:
    from clients.client_app import app as client_app
    from clients.client_app import forget_devices
    from fedge.engines.inprocess import InProcessGrid
    from fedge.server.app import run_server

    cfg, overrides = small_config(out, f"scenario.clients={n}", f"campaign.initial_rounds={rounds}")
    run_config = RunRequest(None, overrides, "inprocess").run_config(cfg, folder, "inprocess")
    feed_devices(cfg, folder)  # the rows reach both apps before the clock starts
    started, cpu = time.perf_counter(), time.process_time()
    grid = InProcessGrid(client_app, n, run_config)
    try:
        with flower_strategy_timer() as timer:
            run_server(grid, cfg, folder, on_tick=quiet_tick, engine="inprocess")
    finally:
        forget_devices()
    return Measured(
        time.perf_counter() - started, time.process_time() - cpu, timer.seconds[0], timer.cpu_seconds[0]
    )


def _bare(n: int, rounds: int, out: Path) -> Measured:
    from fedge.engines.inprocess import InProcessGrid

    cfg, _ = small_config(out, f"scenario.clients={n}", f"campaign.initial_rounds={rounds}")
    data = write_bare_data(cfg, out / "bare-data")  # the rows reach both apps before the clock
    started, cpu = time.perf_counter(), time.process_time()
    bare_app.configure(data, cfg.model.hidden, cfg.model.layers, cfg.campaign.holdout_every)
    scenario = build_scenario(cfg.scenario)
    start = nets.initial_weights(
        nets.build_model(scenario.n_features, scenario.n_classes, cfg.model.hidden, cfg.model.layers),
        cfg.scenario.seed,
    )
    grid = InProcessGrid(bare_app.app, n, {})
    c = cfg.campaign
    strategy = FedAvg(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)
    with flower_strategy_timer() as timer:
        strategy.start(
            grid=grid,
            initial_arrays=to_arrays(start),
            num_rounds=rounds,
            train_config=ConfigRecord(
                {"local-epochs": c.local_epochs, "lr": c.lr, "batch-size": c.batch_size, "seed": 0}
            ),
        )
    return Measured(
        time.perf_counter() - started, time.process_time() - cpu, timer.seconds[0], timer.cpu_seconds[0]
    )


def _best(runs: list[Measured]) -> Measured:
    """The best of each figure over the repeats."""
    return Measured(*(min(values) for values in zip(*runs, strict=True)))


def run(devices: int = 20, rounds: int = 20, repeat: int = 3) -> list[Figure]:
    """Wall and CPU time of the whole fedge run and of its rounds against bare Flower's."""
    logging.getLogger("fedge").setLevel(logging.WARNING)
    fedge_runs, bare_runs, fsync_runs = [], [], []
    with tempfile.TemporaryDirectory(prefix="fedge-bench-overhead-") as tmp:
        _bare(devices, 1, Path(tmp) / "warm-bare")
        store = Path(tmp) / "store"
        store.mkdir()
        _fedge(devices, 1, store, Path(tmp) / "warm-fedge")
        for i in range(repeat):  # interleaved, so a busy spell on the machine hits all three
            bare_runs.append(_bare(devices, rounds, Path(tmp) / f"bare-{i}"))
            fedge_runs.append(_fedge(devices, rounds, store, Path(tmp) / f"fedge-{i}"))
            with mock.patch("clients.egress.AuditLog", functools.partial(AuditLog, sync_interval=0)):
                fsync_runs.append(_fedge(devices, rounds, store, Path(tmp) / f"fedge-fsync-each-{i}"))
    f, b, old = _best(fedge_runs), _best(bare_runs), _best(fsync_runs)
    whole, whole_cpu = f.wall / b.wall - 1, f.cpu / b.cpu - 1
    per_round, per_round_cpu = f.rounds_wall / b.rounds_wall - 1, f.rounds_cpu / b.rounds_cpu - 1
    setup = f"{devices} devices, {rounds} rounds"
    return [
        Figure(
            "2 overhead",
            f"whole run, fedge vs bare Flower FedAvg.start ({setup})",
            f"{f.wall:.2f} s vs {b.wall:.2f} s (CPU {f.cpu:.2f} s vs {b.cpu:.2f} s)",
            f"{100 * whole:+.1f}% wall time ({100 * whole_cpu:+.1f}% CPU)",
            "<= +10%",
            whole <= 0.10,
            {"fedge_s": f.wall, "bare_s": b.wall, "fedge_cpu_s": f.cpu, "bare_cpu_s": b.cpu},
        ),
        Figure(
            "2 overhead",
            f"strategy rounds only, fedge vs bare ({setup})",
            (
                f"{f.rounds_wall / rounds:.3f} s vs {b.rounds_wall / rounds:.3f} s per round "
                f"(CPU {f.rounds_cpu / rounds:.3f} s vs {b.rounds_cpu / rounds:.3f} s)"
            ),
            f"{100 * per_round:+.1f}% per round ({100 * per_round_cpu:+.1f}% CPU)",
            "<= +10%; tracking never blocks a round",
            per_round <= 0.10,
            {
                "fedge_round_s": f.rounds_wall / rounds,
                "bare_round_s": b.rounds_wall / rounds,
                "fedge_round_cpu_s": f.rounds_cpu / rounds,
                "bare_round_cpu_s": b.rounds_cpu / rounds,
            },
        ),
        Figure(
            "2 overhead",
            "rounds only, audit log with one fsync per message (before group commit)",
            f"{old.rounds_wall / rounds:.3f} s vs {b.rounds_wall / rounds:.3f} s per round",
            f"{100 * (old.rounds_wall / b.rounds_wall - 1):+.1f}% per round",
            "",
            None,
            {"fsync_each_round_s": old.rounds_wall / rounds},
        ),
    ]
