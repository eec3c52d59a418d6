"""A device keeps its detector, window and model across restarts, and refuses bad rows."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
from inprocess_helpers import fed_device
from signing_helpers import deploy_signed, trusting

from clients.device import Device
from fedge.contracts import model as nets
from fedge.contracts.config_load import load_config
from fedge.scenarios import build_scenario

CFG = load_config(
    None,
    [
        "scenario.clients=2",
        "scenario.ticks=12",
        "scenario.schedule.at=7",
        "scenario.bad_row_fraction=0.0",
    ],
)


def _champion(device: Device) -> dict[str, np.ndarray]:
    """A model trained on concept 0, as the server would deploy it."""
    xs, ys = zip(*(build_scenario(CFG.scenario).batch(c, t) for c in range(2) for t in range(3)))
    model = nets.build_model(2, 2, CFG.model.hidden, CFG.model.layers)
    nets.initial_weights(model, 0)
    nets.train(model, np.concatenate(xs), np.concatenate(ys), epochs=30, lr=0.02,
               batch_size=32, seed=0)
    return nets.get_weights(model)


def test_restart_keeps_detector_window_and_model(tmp_path: Path) -> None:
    cfg, signer = trusting(CFG, tmp_path)
    twin = fed_device(cfg, 0, tmp_path / "twin.sqlite")
    weights = _champion(twin)
    deploy_signed(twin, signer, 1, weights)
    expected = [asdict(twin.monitor_tick(t)) for t in range(12)]

    device = fed_device(cfg, 0, tmp_path / "device.sqlite")
    deploy_signed(device, signer, 1, weights)
    got = [asdict(device.monitor_tick(t)) for t in range(9)]
    window, samples_seen = len(device.store), device.monitor.samples_seen
    device.close()  # the device restarts after the drift at tick 7

    device = fed_device(cfg, 0, tmp_path / "device.sqlite")
    assert device.version == 1
    assert len(device.store) == window
    assert device.monitor.samples_seen == samples_seen
    got += [asdict(device.monitor_tick(t)) for t in range(9, 12)]
    assert got == expected
    assert any(r["drift"] for r in expected[7:9]), "the drift at tick 7 is detected"
    assert not any(r["drift"] for r in expected[:7]), "no alarm before it"
    assert got[-1]["drifts_total"] >= 1


def test_bad_rows_are_counted_and_good_rows_kept(tmp_path: Path) -> None:
    device = fed_device(CFG, 0, tmp_path / "d.sqlite")
    x = [[0.1, 0.2], [float("nan"), 0.3], [0.5], [0.4, float("inf")], [0.2, 0.2], [0.3, 0.1]]
    y = [0, 1, 1, 0, 7, 1]
    report = device.monitor_tick(0, x, y)
    assert report.n_samples == 2
    assert report.rejected_non_finite == 2
    assert report.rejected_wrong_width == 1
    assert report.rejected_unknown_label == 1
    assert len(device.store) == 2
