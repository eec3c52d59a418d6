"""Malformed or outsized client updates are refused before aggregation; the round goes on."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from fedge.contracts.wire import from_arrays, to_arrays
from fedge.engines.inprocess import InProcessGrid
from strategies.screening import UpdateScreening

BASE = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


def _toy_app(behaviour: dict[int, str]) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        weights = from_arrays(msg.content.array_records["arrays"])
        update = {k: v + 1.0 for k, v in weights.items()}  # an honest step of norm ~3
        kind = behaviour.get(pid, "honest")
        if kind == "nan":
            update["w"][0, 0] = np.nan
        elif kind == "shape":
            update["b"] = np.zeros(4, np.float32)
        elif kind == "dtype":
            update["b"] = update["b"].astype(np.float64)
        elif kind == "scaled":
            update = {k: v * 1000.0 for k, v in update.items()}
        content = RecordDict(
            {"arrays": to_arrays(update), "metrics": MetricRecord({"num-examples": 10})}
        )
        return Message(content, reply_to=msg)

    return app


def test_bad_updates_are_dropped_with_a_reason_naming_the_node(
    caplog: pytest.LogCaptureFixture,
) -> None:
    behaviour = {1: "nan", 2: "shape", 3: "dtype", 4: "scaled"}
    grid = InProcessGrid(_toy_app(behaviour), 8, {})
    strategy = UpdateScreening(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=8, min_available_nodes=8),
        name_of=lambda node: f"device {node - 1000}",
    )
    with caplog.at_level(logging.WARNING, logger="fedge.server"):
        result = strategy.start(grid=grid, initial_arrays=to_arrays(BASE), num_rounds=1,
                                train_config=ConfigRecord({}))
    agg = from_arrays(result.arrays)
    # only the 4 honest devices count: their average moved every weight by exactly 1
    np.testing.assert_allclose(agg["w"], 1.0)
    np.testing.assert_allclose(agg["b"], 1.0)
    reasons = {node - 1000: why for _, node, why in strategy.rejected}
    assert set(reasons) == {1, 2, 3, 4}
    assert "non-finite" in reasons[1]
    assert "shape" in reasons[2]
    assert "dtype" in reasons[3]
    assert "median" in reasons[4]
    assert "device 4" in caplog.text


def test_without_screening_the_scaled_update_dominates() -> None:
    grid = InProcessGrid(_toy_app({4: "scaled"}), 8, {})
    result = FedAvg(fraction_evaluate=0.0, min_train_nodes=8, min_available_nodes=8).start(
        grid=grid, initial_arrays=to_arrays(BASE), num_rounds=1, train_config=ConfigRecord({})
    )
    assert float(from_arrays(result.arrays)["w"].mean()) > 100
