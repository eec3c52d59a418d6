"""What secure aggregation costs: accuracy and round time, with it and without, in one run.

``python -m experiments.secagg_bench`` trains fedge's model on the SINE-2
scenario (its first, pre-drift ticks) with FedAvg over the in-process grid,
once with plaintext aggregation and once under SecAgg+, from the same seed,
and prints:

- the test accuracy of both global models;
- the time of a training round (best of a few, robust to a busy machine) at
  10, 20 and 50 devices with and without secure aggregation, as ratios
  measured side by side. The in-process grid
  runs the devices one after another, so the round time is the server's work
  plus every device's; the "deployed" ratio replaces the devices' sum by one
  device's share (devices work in parallel in a deployment).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from clients.secagg import privacy_mods, register_secagg_actions
from fedge.contracts import model as nets
from fedge.contracts.config_load import load_config
from fedge.contracts.wire import from_arrays, to_arrays
from fedge.engines.inprocess import InProcessGrid
from fedge.privacy.secagg_settings import SecAggConfig
from fedge.scenarios import Scenario, build_scenario
from strategies.secagg import secure_strategy_grid

TRAIN_TICKS = (0, 1, 2, 3)
TEST_TICKS = (4, 5)


def _clean(x: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(x).all(axis=1) & (y >= 0) & (y < n_classes)
    return x[keep], y[keep]


def _rows(scenario: Scenario, client: int, ticks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*(scenario.batch(client, t) for t in ticks), strict=True)
    return _clean(np.concatenate(xs), np.concatenate(ys), scenario.n_classes)


def scenario_for(devices: int, seed: int) -> Scenario:
    """SINE-2 with ``devices`` devices (drift after the ticks used here)."""
    cfg = load_config(
        "experiments/sine2_sudden.toml",
        [f"scenario.clients={devices}", f"scenario.seed={seed}"],
    )
    return build_scenario(cfg.scenario)


def device_app(scenario: Scenario, hidden: int, layers: int) -> ClientApp:
    """A ClientApp training fedge's model on a device's pre-drift rows, with the privacy mods."""
    app = ClientApp(mods=privacy_mods())
    register_secagg_actions(app)
    data: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if pid not in data:
            data[pid] = _rows(scenario, pid, TRAIN_TICKS)
        x, y = data[pid]
        config = msg.content.config_records["config"]
        model = nets.build_model(scenario.n_features, scenario.n_classes, hidden, layers)
        nets.set_weights(model, from_arrays(msg.content.array_records["arrays"]))
        loss = nets.train(
            model,
            x,
            y,
            epochs=2,
            lr=0.01,
            batch_size=32,
            seed=1000 * pid + int(cast(int, config["server-round"])),
        )
        metrics = MetricRecord({"num-examples": len(y), "train_loss": loss})
        content = RecordDict({"arrays": to_arrays(nets.get_weights(model)), "metrics": metrics})
        return Message(content, reply_to=msg)

    return app


@dataclass
class Run:
    """One campaign's outcome."""

    accuracy: float
    weights: dict[str, np.ndarray]
    round_seconds: list[float]
    device_seconds: list[float]


def campaign(
    devices: int, rounds: int, *, secure: SecAggConfig | None = None, seed: int = 0
) -> Run:
    """FedAvg over ``devices`` SINE-2 devices; accuracy on their later (pre-drift) rows."""
    scenario = scenario_for(devices, seed)
    hidden, layers = 32, 2
    app = device_app(scenario, hidden, layers)
    grid = InProcessGrid(app, devices, {})
    start = nets.initial_weights(
        nets.build_model(scenario.n_features, scenario.n_classes, hidden, layers), seed
    )
    times: list[float] = []
    device_times: list[float] = []

    class Timed(FedAvg):
        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            times.append(time.perf_counter() - self._t0)
            device_times.append(grid.client_seconds - self._c0)
            return super().aggregate_train(server_round, replies)

        def configure_train(self, *args: Any, **kwargs: Any) -> Any:
            self._t0, self._c0 = time.perf_counter(), grid.client_seconds
            return super().configure_train(*args, **kwargs)

    strategy = Timed(min_train_nodes=devices, min_available_nodes=devices, fraction_evaluate=0.0)
    result = strategy.start(
        grid=grid if secure is None else secure_strategy_grid(grid, config=secure),
        initial_arrays=to_arrays(start),
        num_rounds=rounds,
    )
    weights = from_arrays(cast(ArrayRecord, result.arrays))
    model = nets.set_weights(
        nets.build_model(scenario.n_features, scenario.n_classes, hidden, layers), weights
    )
    tests = [_rows(scenario, c, TEST_TICKS) for c in range(devices)]
    x = np.concatenate([t[0] for t in tests])
    y = np.concatenate([t[1] for t in tests])
    accuracy, _ = nets.evaluate(model, x, y)
    return Run(accuracy, weights, times, device_times)


def _deployed(run: Run, devices: int) -> float:
    """Round time with the devices working in parallel: the server's part plus one device's."""
    server = [t - d for t, d in zip(run.round_seconds, run.device_seconds, strict=True)]
    return min(server) + min(run.device_seconds) / devices


def main(argv: Sequence[str] | None = None) -> None:
    """Print the accuracy with SecAgg on and off, and the round-time ratios."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--accuracy-devices", type=int, default=6)
    parser.add_argument("--accuracy-rounds", type=int, default=8)
    args = parser.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)

    off = campaign(args.accuracy_devices, args.accuracy_rounds)
    on = campaign(args.accuracy_devices, args.accuracy_rounds, secure=SecAggConfig())
    one_off = campaign(args.accuracy_devices, 1)
    one_on = campaign(args.accuracy_devices, 1, secure=SecAggConfig())
    gap = max(float(np.abs(on.weights[k] - off.weights[k]).max()) for k in off.weights)
    gap1 = max(float(np.abs(one_on.weights[k] - one_off.weights[k]).max()) for k in off.weights)
    print(
        f"accuracy (SINE-2, {args.accuracy_devices} devices, {args.accuracy_rounds} rounds, "
        f"seed 0): SecAgg off {off.accuracy:.4f}, on {on.accuracy:.4f}; largest weight "
        f"difference after 1 round {gap1:.1e}, after {args.accuracy_rounds} rounds {gap:.1e}"
    )
    configs = {
        "SecAgg (num_shares=1.0)": SecAggConfig(),
        "SecAgg+ (num_shares=11)": SecAggConfig(num_shares=11),
    }
    print(f"round time, best of {args.rounds} rounds; ratio = secure / plaintext")
    header = (
        f"{'devices':>7} {'plain s':>8} {'config':>24} {'secure s':>9} {'ratio':>6} {'deployed':>9}"
    )
    print(header)
    for n in args.devices:
        plain = campaign(n, args.rounds)
        p = min(plain.round_seconds)
        for name, config in configs.items():
            secure = campaign(n, args.rounds, secure=config)
            s = min(secure.round_seconds)
            deployed = _deployed(secure, n) / _deployed(plain, n)
            print(f"{n:>7} {p:>8.3f} {name:>24} {s:>9.3f} {s / p:>6.1f} {deployed:>9.1f}")


if __name__ == "__main__":
    main()
