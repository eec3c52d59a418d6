"""The FedDrift detector calibration, and the harness running what it chose."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from experiments import feddrift, feddrift_detector
from experiments.feddrift import (
    N_CLIENTS,
    N_STEPS,
    SAMPLES,
    Settings,
    Task,
    dataset_spec,
    scenario_table,
)
from experiments.feddrift_calibrate import (
    FALSE_ALARM_BOUND,
    Setting,
    calibrate_dataset,
    measure,
    train_fedavg,
    write_outputs,
)
from experiments.feddrift_detector import data_key


def detector_setting(dataset: str, settings: Settings, path: Path | None = None) -> tuple[str, dict[str, Any], str]:
    """What the harness runs for ``dataset`` under ``settings``."""
    spec = dataset_spec(dataset)
    return feddrift_detector.detector_setting(dataset, spec.generator, spec.params, settings.detector,
                                              settings.delta, path)


def test_a_tiny_calibration_picks_the_best_detection_that_keeps_false_alarms_within_the_bound(
    tmp_path: Path,
) -> None:
    grid = [
        Setting("PageHinkley", (("threshold", 3.0), ("mode", "up"))),  # fires on noise
        Setting("PageHinkley", (("threshold", 10.0), ("mode", "up"))),
        Setting("ADWIN", (("delta", 0.002),)),
    ]
    entry = calibrate_dataset("circle2", [0], grid)
    rows, chosen = entry["grid"], entry["chosen"]
    assert any(r["false_alarms_per_client_step"] > FALSE_ALARM_BOUND for r in rows), "the bound binds"
    assert chosen["bound_met"] and chosen["false_alarms_per_client_step"] <= FALSE_ALARM_BOUND
    better = [r for r in rows if r["detected_within_one_step"] > chosen["detected_within_one_step"]]
    assert all(r["false_alarms_per_client_step"] > FALSE_ALARM_BOUND for r in better)
    assert 0 < chosen["detected_within_one_step"] <= 1 and chosen["mean_delay_steps"] is not None
    doc = write_outputs({"format": "fedge.feddrift_calibration", "datasets": {"circle2": entry}},
                        tmp_path / "c.json", tmp_path / "c.csv")
    assert detector_setting("circle2", Settings(), tmp_path / "c.json")[:2] == (
        chosen["detector"], chosen["params"])
    lines = (tmp_path / "c.csv").read_text().splitlines()
    assert len(lines) == 1 + len(grid) and sum(line.endswith("True") for line in lines) == 1
    assert doc["datasets"]["circle2"]["seeds"] == [0]


def _stationary(seed: int, rate: float = 0.15) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((1, 1, N_CLIENTS, N_STEPS, SAMPLES)) < rate)


def test_a_large_adwin_delta_raises_more_false_alarms_on_a_stationary_stream_than_a_small_one() -> None:
    def alarms(delta: float) -> int:
        setting = Setting("ADWIN", (("delta", delta),))
        return sum(measure(setting, _stationary(seed), seed)["false_alarms"] for seed in range(20))

    small, large = alarms(1e-4), alarms(1.0)
    assert large > small
    assert large > 0


def _calibration_file(tmp_path: Path, dataset: str, detector: str, params: dict[str, Any],
                      data: dict[str, Any] | None = None) -> Path:
    path = tmp_path / "calibration.json"
    spec = dataset_spec(dataset)
    entry = {"data": data or data_key(spec.generator, spec.params), "chosen": {"detector": detector, "params": params}}
    path.write_text(json.dumps({"format": "fedge.feddrift_calibration", "datasets": {dataset: entry}}))
    return path


def _monitor(tmp_path: Path, dataset: str, settings: Settings | None = None) -> dict[str, Any]:
    cp = tmp_path / "m.cp"
    cp.write_text("0 0\n1 0\n")
    task = Task(dataset, "m", 0, ("never",), tmp_path, settings or Settings(), cp_file=cp)
    return scenario_table(task, "never", cp)["monitor"]


def test_the_harness_runs_the_calibrated_setting_and_flags_the_default_for_a_dataset_not_calibrated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _calibration_file(tmp_path, "sine2", "PageHinkley", {"threshold": 12.5, "mode": "up"})
    monkeypatch.setattr(feddrift_detector, "CALIBRATION_FILE", path)
    calibrated = _monitor(tmp_path, "sine2")
    assert (calibrated["detector"], calibrated["params"]) == ("PageHinkley", {"threshold": 12.5, "mode": "up"})
    assert detector_setting("sine2", Settings())[2] == "calibrated"
    default = _monitor(tmp_path, "circle2")
    assert (default["detector"], default["params"]) == ("ADWIN", {"delta": 0.002})
    assert detector_setting("circle2", Settings())[2] == "default"
    given = _monitor(tmp_path, "sine2", Settings(delta=0.05))
    assert (given["detector"], given["params"]) == ("ADWIN", {"delta": 0.05})
    assert detector_setting("sine2", Settings(delta=0.05))[2] == "given"


def test_a_calibration_measured_on_other_data_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = {"generator": "sea4", "params": {"noise": 0.3}}
    path = _calibration_file(tmp_path, "sea4", "PageHinkley", {"threshold": 12.5}, data=other)
    monkeypatch.setattr(feddrift_detector, "CALIBRATION_FILE", path)
    monitor = _monitor(tmp_path, "sea4")
    assert (monitor["detector"], monitor["params"]) == ("ADWIN", {"delta": 0.002})
    assert detector_setting("sea4", Settings())[2] == "default"


def test_each_run_row_says_which_detector_setting_it_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _calibration_file(tmp_path, "sine2", "ADWIN", {"delta": 0.3})
    monkeypatch.setattr(feddrift_detector, "CALIBRATION_FILE", path)
    monkeypatch.setattr(feddrift, "run_policy", lambda task, policy, cp: {"accuracy": 1.0})
    cp = tmp_path / "m.cp"
    cp.write_text("0 0\n1 0\n")
    rows = [
        *feddrift.run_task(Task("sine2", "m", 0, ("never",), tmp_path, Settings(), cp_file=cp)),
        *feddrift.run_task(Task("circle2", "m", 0, ("never",), tmp_path, Settings(), cp_file=cp)),
    ]
    assert [(r["dataset"], r["detector_setting"], r["detector_params"]) for r in rows] == [
        ("sine2", "calibrated", {"delta": 0.3}),
        ("circle2", "default", {"delta": 0.002}),
    ]


def test_the_committed_calibration_is_what_the_harness_runs_for_sine2() -> None:
    doc = json.loads(feddrift_detector.CALIBRATION_FILE.read_text())
    chosen = doc["datasets"]["sine2"]["chosen"]
    assert chosen["bound_met"] and len(doc["seeds"]) >= 5
    assert detector_setting("sine2", Settings()) == (chosen["detector"], chosen["params"], "calibrated")


def test_the_side_by_side_fedavg_is_the_clients_trained_one_after_the_other() -> None:
    from fedge.contracts import model as nets
    from fedge.scenarios.generators import make_generator

    gen = make_generator("sine2")
    rng = np.random.default_rng(0)
    batches = [gen.sample(0, SAMPLES, rng) for _ in range(N_CLIENTS)]
    budget = Settings(rounds=2, local_epochs=2)
    stacked = nets.get_weights(train_fedavg("sine2", gen, batches, 3, budget))
    model = nets.build_model(gen.n_features, gen.n_classes, **feddrift.model_for("sine2"))
    weights = nets.initial_weights(model, 3)
    keep = np.ones(SAMPLES, dtype=bool)
    keep[9::10] = False
    for rnd in range(budget.rounds):
        updates = []
        for c, (x, y) in enumerate(batches):
            nets.set_weights(model, weights)
            nets.train(model, x[keep], y[keep], epochs=budget.local_epochs, lr=budget.lr,
                       batch_size=budget.batch_size, seed=3 * 1000 + rnd * N_CLIENTS + c)
            updates.append(nets.get_weights(model))
        weights = {k: np.mean([u[k] for u in updates], axis=0) for k in weights}
    assert all(np.allclose(stacked[k], weights[k], atol=1e-5) for k in weights)
