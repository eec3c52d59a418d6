"""Drift without labels: the device's input and confidence tests, and the triggers that use them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from inprocess_helpers import run_captured

from clients.detector_codecs import MonitorStateError
from clients.inbox import inbox_path, ingest
from clients.label_free import LabelFreeMonitor
from clients.two_sample import corrected, ks_test, mmd_test
from fedge.contracts.config import ConfigError
from fedge.contracts.config_load import load_config
from fedge.contracts.protocol import DriftReport
from fedge.core.triggers import FLOOR, DriftQuorum

SHIFT_AT = 6


def _sensor_rows(device: int, tick: int, n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Label = x0 > 0.5; from SHIFT_AT the x1 sensor reads only its upper half.

    The label never depends on x1, and the shifted readings stay inside the
    range the model was trained on, so its errors do not change: only the
    inputs' distribution does.
    """
    rng = np.random.default_rng([device, tick])
    x = rng.random((n, 2)).astype(np.float32)
    if tick >= SHIFT_AT:
        x[:, 1] = 0.5 + 0.5 * x[:, 1]
    return x, (x[:, 0] > 0.5).astype(np.int64)


def test_an_input_shift_the_label_detector_misses_starts_a_campaign(tmp_path: Path) -> None:
    folder, devices, ticks = tmp_path / "run", 4, 10
    for d in range(devices):
        store = folder / "devices" / f"device-{d}.sqlite"
        store.parent.mkdir(parents=True, exist_ok=True)
        batches = [(t, *_sensor_rows(d, t)) for t in range(ticks)]
        ingest(inbox_path(store), batches, n_features=2, n_classes=2)
    overrides = [
        f'run.output_dir="{tmp_path}"',
        # The devices' own rows (written above), no generator.
        'data.source="inbox"',
        "data.n_features=2",
        "data.n_classes=2",
        f"scenario.clients={devices}",
        f"scenario.ticks={ticks}",
        'monitor.input_test="ks"',
        'monitor.prediction="confidence"',
        "trigger.quorum=0.5",
        "trigger.cooldown=1",
        "campaign.initial_rounds=4",
        "campaign.rounds=2",
    ]
    summary, _ = run_captured(overrides, folder)
    by_tick = {t["tick"]: t for t in summary["ticks"]}
    # The premise: the model stays as good as it was, so the label-based detector is silent.
    assert all("label" not in by_tick[t]["signals"] for t in range(SHIFT_AT, ticks)), by_tick
    assert by_tick[SHIFT_AT]["accuracy"] > 0.85
    # The input test sees the shift on (almost) every device and that starts the campaign.
    assert len(by_tick[SHIFT_AT]["signals"].get("input", [])) >= 3, by_tick[SHIFT_AT]
    later = [c for c in summary["campaigns"] if c["tick"] >= 1]
    assert later and later[0]["tick"] == SHIFT_AT, summary["campaigns"]
    assert list(later[0]["signals"]) == ["input"] and "input" in later[0]["reason"]
    # No false alarm started anything before the shift.
    assert not any(c for c in summary["campaigns"] if 1 <= c["tick"] < SHIFT_AT)
    assert all(by_tick[t]["estimated_accuracy"] is not None for t in range(1, ticks))


def _stationary_false_alarms(test: str, width: int, seeds: int, n_ticks: int) -> float:
    alarms = steps = 0
    w = np.linspace(-2, 2, width)
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        monitor = LabelFreeMonitor(input_test=test, prediction="confidence", seed=seed)
        monitor.install(rng.normal(size=(500, width)).astype(np.float32))
        for _ in range(n_ticks):
            x = rng.normal(size=(100, width)).astype(np.float32)
            p1 = 1 / (1 + np.exp(-(x @ w)))
            update = monitor.observe(x, np.column_stack([1 - p1, p1]))
            alarms += int(update.drift)
            steps += 1
    return alarms / steps


@pytest.mark.parametrize(("test", "width", "seeds"), [("ks", 4, 20), ("mmd", 64, 5)])
def test_a_stationary_stream_gives_few_false_alarms(test: str, width: int, seeds: int) -> None:
    rate = _stationary_false_alarms(test, width, seeds, n_ticks=30)
    print(f"{test} on {width} features: {rate:.3f} false alarms per device-tick")
    assert rate <= 0.05


def test_the_input_tests_reject_what_differs_and_corrections_are_ordered() -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(200, 8))
    moved = rng.normal(size=(100, 8))
    moved[:, 5] += 1.2
    assert ks_test(ref, moved).p_value < 1e-3
    assert mmd_test(ref, moved, np.random.default_rng(0)).p_value <= 0.01
    same = rng.normal(size=(100, 8))
    again = mmd_test(ref, same, np.random.default_rng(0))
    assert again == mmd_test(ref, same, np.random.default_rng(0))  # seeded: repeatable
    p = np.array([0.001, 0.008, 0.012, 0.04, 0.5])
    # Bonferroni flags fewest, Holm more, BH (false discovery rate) most.
    flagged = [corrected(p, 0.05, c)[1] for c in ("bonferroni", "holm", "bh")]
    assert flagged == [2, 3, 4]


def test_a_poor_stable_champion_triggers_the_accuracy_floor() -> None:
    def report(device: int, errors: int, estimate: float = -1.0) -> DriftReport:
        return DriftReport(device, 7, 3, 100, errors, False, 0, 0, 500, estimated_accuracy=estimate)

    poor = [report(0, 60), report(1, 55)]
    off = DriftQuorum(quorum=0.5, cooldown=2)
    assert not off.decide(7, poor, has_model=True, last_campaign=1).retrain
    floor = DriftQuorum(quorum=0.5, cooldown=2, accuracy_floor=0.7)
    decision = floor.decide(7, poor, has_model=True, last_campaign=1)
    assert decision.retrain and decision.reason.startswith("accuracy floor: either accuracy 0.425")
    assert decision.signals == {FLOOR: (0, 1)}
    assert not floor.decide(7, poor, has_model=True, last_campaign=6).retrain  # cooldown
    assert not floor.decide(7, [report(0, 10)], has_model=True, last_campaign=1).retrain
    estimated = DriftQuorum(accuracy_floor=0.7, accuracy_source="estimated")
    assert estimated.decide(7, [report(0, 5, 0.55)], has_model=True, last_campaign=1).retrain
    assert not estimated.decide(7, [report(0, 60, 0.9)], has_model=True, last_campaign=1).retrain


def test_a_champion_poor_from_the_start_is_retrained_in_a_run(tmp_path: Path) -> None:
    overrides = [
        f'run.output_dir="{tmp_path}"',
        "scenario.clients=3",
        "scenario.ticks=5",
        'scenario.schedule.kind="stationary"',
        "campaign.initial_rounds=1",
        "campaign.local_epochs=1",
        "campaign.lr=0.000001",  # the initial model stays the random one
        "campaign.min_improvement=-1.0",
        "trigger.accuracy_floor=0.8",
        "trigger.cooldown=1",
    ]
    summary, _ = run_captured(overrides, tmp_path / "run")
    by_tick = {t["tick"]: t for t in summary["ticks"]}
    assert by_tick[1]["accuracy"] < 0.8 and not by_tick[1]["signals"]  # poor, nothing drifts
    floors = [c for c in summary["campaigns"] if FLOOR in c["signals"]]
    assert floors and floors[0]["tick"] == 2, summary["campaigns"]  # after the cooldown
    assert floors[0]["reason"].startswith("accuracy floor")


def test_the_signals_counted_toward_the_quorum_are_chosen() -> None:
    def report(device: int, label: bool, inputs: bool) -> DriftReport:
        return DriftReport(device, 5, 1, 100, 3, label, int(label), 0, 100, drift_input=inputs)

    reports = [report(0, False, True), report(1, False, True), report(2, True, False)]
    label = DriftQuorum(quorum=2, signals="label").decide(5, reports, has_model=True, last_campaign=0)
    free = DriftQuorum(quorum=2, signals="label-free").decide(5, reports, has_model=True, last_campaign=0)
    assert not label.retrain and label.drifted == (2,)
    assert free.retrain and free.drifted == (0, 1) and free.signals == {"input": (0, 1)}
    with pytest.raises(ValueError, match="trigger.signals"):
        DriftQuorum(signals="labels")


def test_monitor_state_round_trips_through_json_and_tampering_is_refused() -> None:
    rng = np.random.default_rng(0)
    monitor = LabelFreeMonitor(input_test="mmd", prediction="entropy", seed=4, reference_size=50)
    probs = rng.dirichlet([1, 1, 1], size=40)
    monitor.install(rng.normal(size=(80, 5)), probs, rng.random(40) < 0.7)
    monitor.observe(rng.normal(size=(60, 5)), rng.dirichlet([1, 1, 1], size=60))
    state, reference = monitor.to_bytes(), monitor.reference_bytes()
    assert json.loads(state)["format"] == "fedge.label_free_monitor"  # data, not a pickle
    copy = LabelFreeMonitor.from_bytes(state, reference)
    x, p = rng.normal(size=(60, 5)) + 0.3, rng.dirichlet([5, 1, 1], size=60)
    assert copy.observe(x, p) == monitor.observe(x, p)  # it continues exactly where it was
    assert copy.to_bytes() == monitor.to_bytes()

    changed = bytearray(reference)
    changed[-1] ^= 1
    with pytest.raises(MonitorStateError, match="reference is not the one saved"):
        LabelFreeMonitor.from_bytes(state, bytes(changed))
    for key, value in [("tests", -1), ("calibration", [2.0] * 10), ("seed", "x"), ("extra", 1)]:
        data = {**json.loads(state), key: value}
        with pytest.raises(MonitorStateError):
            LabelFreeMonitor.from_bytes(json.dumps(data).encode(), reference)
    with pytest.raises(MonitorStateError):
        LabelFreeMonitor.from_bytes(b"\x80\x04pickle", reference)


def test_bad_label_free_settings_are_one_line_config_errors() -> None:
    for override, fragment in [
        ('monitor.input_test="chi2"', "monitor.input_test"),
        ("monitor.input_alpha=0.9", "monitor.input_alpha"),
        ('monitor.prediction_detector="DDM"', "monitor.prediction_detector"),
        ("monitor.reference_size=5", "monitor.reference_size"),
        ('trigger.signals="labels"', "trigger.signals"),
        ("trigger.accuracy_floor=1.5", "trigger.accuracy_floor"),
    ]:
        with pytest.raises(ConfigError, match=fragment) as info:
            load_config(None, [override])
        assert "\n" not in str(info.value)
