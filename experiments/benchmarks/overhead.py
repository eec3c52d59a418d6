"""Item 2 and 6: a fedge campaign against bare Flower ``FedAvg.start`` on the same grid.

fedge: one monitoring tick (validation, store, drift monitor on every device),
a campaign of ``rounds`` rounds with evaluation of candidate and champion, the
model registered in MLflow, per-tick and per-round metrics tracked, the run
summary written. Bare: Flower's FedAvg over a hand-rolled ClientApp with the
same model, data, rounds and clients. Both run on the in-process grid. The
MLflow store is opened once before the measured runs (a long-lived store, as
in ``fedge run``); the cost of creating a fresh one is in the MLflow figures.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from pathlib import Path
from unittest import mock

from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from experiments.benchmarks import bare_app
from experiments.benchmarks.common import Figure, flower_strategy_timer, small_config
from fedge import model as nets
from fedge.audit import AuditLog
from fedge.runner import RunRequest, quiet_tick
from fedge.scenarios import build_scenario
from fedge.wire import to_arrays


def _fedge(n: int, rounds: int, out: Path, folder: Path) -> tuple[float, float]:
    from clients.client_app import app as client_app
    from clients.client_app import forget_devices
    from fedge.engines.inprocess import InProcessGrid
    from fedge.server_app import run_server

    cfg, overrides = small_config(out, f"scenario.clients={n}", f"campaign.initial_rounds={rounds}")
    run_config = RunRequest(None, overrides, "inprocess").run_config(cfg, folder, "inprocess")
    started = time.perf_counter()
    grid = InProcessGrid(client_app, n, run_config)
    try:
        with flower_strategy_timer() as timer:
            run_server(grid, cfg, folder, on_tick=quiet_tick, engine="inprocess")
    finally:
        forget_devices()
    return time.perf_counter() - started, timer.seconds[0]


def _bare(n: int, rounds: int, out: Path) -> tuple[float, float]:
    from fedge.engines.inprocess import InProcessGrid

    cfg, _ = small_config(out, f"scenario.clients={n}", f"campaign.initial_rounds={rounds}")
    started = time.perf_counter()
    bare_app.configure(cfg)
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
    return time.perf_counter() - started, timer.seconds[0]


def run(devices: int = 20, rounds: int = 20, repeat: int = 2) -> list[Figure]:
    """Wall time of the whole fedge run and of its rounds against bare Flower's."""
    logging.getLogger("fedge").setLevel(logging.WARNING)
    fedge_wall, fedge_rounds, bare_wall, bare_rounds = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="fedge-bench-overhead-") as tmp:
        _bare(devices, 1, Path(tmp) / "warm-bare")
        store = Path(tmp) / "store"
        store.mkdir()
        _fedge(devices, 1, store, Path(tmp) / "warm-fedge")
        for i in range(repeat):
            wall, rnds = _bare(devices, rounds, Path(tmp) / f"bare-{i}")
            bare_wall.append(wall)
            bare_rounds.append(rnds)
            wall, rnds = _fedge(devices, rounds, store, Path(tmp) / f"fedge-{i}")
            fedge_wall.append(wall)
            fedge_rounds.append(rnds)
        with mock.patch("clients.egress.AuditLog", functools.partial(AuditLog, fsync=False)):
            _, no_fsync = _fedge(devices, rounds, store, Path(tmp) / "fedge-no-fsync")
    fw, bw, fr, br = min(fedge_wall), min(bare_wall), min(fedge_rounds), min(bare_rounds)
    whole = fw / bw - 1
    per_round = fr / br - 1
    setup = f"{devices} devices, {rounds} rounds"
    return [
        Figure(
            "2 overhead",
            f"whole run, fedge vs bare Flower FedAvg.start ({setup})",
            f"{fw:.2f} s vs {bw:.2f} s",
            f"{100 * whole:+.1f}% wall time",
            "<= +10%",
            whole <= 0.10,
            {"fedge_s": fw, "bare_s": bw},
        ),
        Figure(
            "2 overhead",
            f"strategy rounds only, fedge vs bare ({setup})",
            f"{fr / rounds:.3f} s vs {br / rounds:.3f} s per round",
            f"{100 * per_round:+.1f}% per round",
            "<= +10%; tracking never blocks a round",
            per_round <= 0.10,
            {"fedge_round_s": fr / rounds, "bare_round_s": br / rounds},
        ),
        Figure(
            "2 overhead",
            "rounds only, audit log without fsync per message (diagnostic)",
            f"{no_fsync / rounds:.3f} s vs {br / rounds:.3f} s per round",
            f"{100 * (no_fsync / br - 1):+.1f}% per round",
            "",
            None,
        ),
    ]
