"""The run summary reports the drifts the devices detected, beside the truth where it is known.

A built-in generator knows its schedule: each device's detections are scored
against it (caught within a few ticks, missed, false alarm). Rows the user put
into the devices' inboxes have no known schedule: only the detections appear.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clients.inbox import Inbox, inbox_path
from fedge.console import console, print_summary
from fedge.contracts.config import ConfigError
from fedge.core.records import LateRecord, RunRecord, TickRecord
from fedge.runner import RunRequest, quiet_tick, run
from fedge.scenarios.generators import sine2_labels
from fedge.server.summary import detected_drifts, score_detections

CLIENTS, TICKS, DRIFT_AT, ROWS = 3, 9, 4, 150
SMALL = (
    'scenario.name="drift-summary"',
    f"scenario.clients={CLIENTS}",
    f"scenario.ticks={TICKS}",
    f"scenario.schedule.at={DRIFT_AT}",
    f"scenario.samples_per_tick={ROWS}",
    "scenario.bad_row_fraction=0.0",
    "campaign.rounds=2",
    "campaign.initial_rounds=4",
)


def _tick(tick: int, drifted: tuple[int, ...]) -> TickRecord:
    return TickRecord(tick, 0.9, len(drifted) / 3, drifted, 0, 100, 1)


def test_detections_come_from_the_reports_including_late_ones() -> None:
    record = RunRecord(
        ticks=[_tick(0, ()), _tick(1, (2,)), _tick(2, (0, 2)), _tick(3, ())],
        late=[LateRecord(tick=1, arrived=3, devices=(1,), accuracy=0.5, drifted=(1,))],
    )
    assert detected_drifts(record) == {0: [2], 1: [1], 2: [1, 2]}


def test_detections_are_scored_caught_missed_and_false_alarm() -> None:
    detected = {0: [5], 1: [2, 9], 2: [4]}
    truth = [(0, 4), (1, 4), (2, 4), (3, 4)]
    scored = score_detections(detected, truth, within=3)
    by_device = {d["device"]: d for d in scored["devices"]}
    assert by_device[0]["caught"] == [{"drift": 4, "detected": 5, "delay": 1}]
    assert by_device[2]["caught"] == [{"drift": 4, "detected": 4, "delay": 0}]
    # Before the drift and more than 3 ticks after it: both false alarms, the drift missed.
    assert by_device[1]["caught"] == [] and by_device[1]["missed"] == [4]
    assert by_device[1]["false_alarms"] == [2, 9]
    assert by_device[3]["missed"] == [4] and by_device[3]["false_alarms"] == []
    assert (scored["caught"], scored["missed"], scored["false_alarms"]) == (2, 2, 2)


def test_a_detection_catches_only_the_drift_before_it() -> None:
    # Two drifts two ticks apart: the one detection at 7 belongs to the drift at 6.
    scored = score_detections({0: [7]}, [(0, 4), (0, 6)], within=3)
    (device,) = scored["devices"]
    assert device["missed"] == [4]
    assert device["caught"] == [{"drift": 6, "detected": 7, "delay": 1}]


def _printed(summary: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(console, "width", 240)
    with console.capture() as cap:
        print_summary(summary)
    return cap.get()


def test_a_generator_scenario_scores_detections_against_its_schedule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = run(
        RunRequest(None, (*SMALL, f'run.output_dir="{tmp_path}"')), on_tick=quiet_tick
    )
    truth = summary["drift_truth"]
    assert truth is not None
    assert summary["drift_steps"] == [DRIFT_AT]
    assert [d["true"] for d in truth["devices"]] == [[DRIFT_AT]] * CLIENTS
    # The label flip is plain to every device's detector.
    assert truth["caught"] >= CLIENTS - 1, truth
    for d in truth["devices"]:
        for c in d["caught"]:
            assert c["detected"] in summary["detected_drifts"][str(d["device"])]
    text = _printed(summary, monkeypatch)
    assert "against the scenario's schedule" in text
    assert f"{truth['caught']} caught, {truth['missed']} missed" in text
    assert "Accuracy around each true drift" in text


def _write_own_rows(folder: Path) -> None:
    """Each device's own SINE-2 rows; from ``DRIFT_AT`` on, the labels flip."""
    rng = np.random.default_rng(5)
    for device in range(CLIENTS):
        path = inbox_path(folder / "devices" / f"device-{device}.sqlite")
        with Inbox(path, n_features=2, n_classes=2) as inbox:
            for tick in range(TICKS):
                x = rng.uniform(0, 1, size=(ROWS, 2)).astype(np.float32)
                y = sine2_labels(x, 1 if tick >= DRIFT_AT else 0)
                inbox.append(tick, x, y, source="sensor.csv")


def test_own_data_shows_only_what_the_devices_detected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "run"
    _write_own_rows(folder)
    # The scenario's schedule says "no drift"; the user's rows do drift. Neither is the truth,
    # and rows of the user's own are refused unless the run says they are.
    overrides = (*SMALL, 'scenario.schedule={kind="stationary"}', f'run.output_dir="{tmp_path}"')
    with pytest.raises(ConfigError, match="holds the device application's own rows, but data.source"):
        run(RunRequest(None, overrides), on_tick=quiet_tick, run_dir=folder)
    assert not (folder / "config.toml").exists(), "the refused run left no run behind"
    own = (*overrides, 'data.source="inbox"', "data.n_features=2", "data.n_classes=2")
    summary = run(RunRequest(None, own), on_tick=quiet_tick, run_dir=folder)
    assert summary["drift_truth"] is None
    assert summary["drift_steps"] == [] and summary["recoveries"] == []
    detected = summary["detected_drifts"]
    assert detected, "the label flip in the user's rows is detected"
    assert all(min(ticks) >= DRIFT_AT for ticks in detected.values()), detected
    text = _printed(summary, monkeypatch)
    assert "Drifts the devices detected" in text and "no known schedule" in text
    assert "against the scenario's schedule" not in text
    assert "Accuracy around each true drift" not in text
