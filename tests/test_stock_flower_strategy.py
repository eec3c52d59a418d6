"""fedge's ClientApp under a stock Flower strategy: fedge-only settings default to the run's config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.serverapp.strategy import FedAvg

from clients.client_app import app as client_app
from clients.client_app import forget_devices
from fedge.contracts import model as nets
from fedge.contracts.config_load import load_config
from fedge.contracts.wire import from_arrays, to_arrays
from fedge.engines.inprocess import InProcessGrid
from fedge.runner import feed_devices


def test_a_stock_fedavg_trains_fedges_clientapp_without_fedge_config_keys(tmp_path: Path) -> None:
    overrides = [
        f'run.output_dir="{tmp_path}"',
        "scenario.clients=3",
        "scenario.ticks=4",
        "scenario.schedule.at=3",
    ]
    cfg = load_config(None, overrides)
    folder = tmp_path / "run"
    feed_devices(cfg, folder)
    run_config = {"scenario": "", "overrides": ";".join(overrides), "run-dir": str(folder)}
    grid = InProcessGrid(client_app, 3, run_config)
    start = nets.initial_weights(nets.build_model(2, 2, cfg.model.hidden, cfg.model.layers), 0)
    try:
        # The devices first take in a tick of data, as they would on fedge's first poll.
        from flwr.app import ConfigRecord, Message, RecordDict

        polls = [
            Message(RecordDict({"config": ConfigRecord({"tick": 0, "champion-version": 0})}), n,
                    "query", group_id="tick-0")
            for n in grid.get_node_ids()
        ]
        assert not any(r.has_error() for r in grid.send_and_receive(polls))
        result = FedAvg(fraction_evaluate=1.0).start(
            grid=grid, initial_arrays=to_arrays(start), num_rounds=2
        )
    finally:
        grid.close()
        forget_devices()
    final = from_arrays(result.arrays)
    assert set(final) == set(start)
    assert any(not np.array_equal(final[k], start[k]) for k in start), "the model was trained"
    accuracy = result.evaluate_metrics_clientapp[2]["eval_acc"]
    assert accuracy > 0.6, result.evaluate_metrics_clientapp
