"""Simulated scenarios with scarce and late labels (``scenario.label_fraction`` and ``label_delay``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from inprocess_helpers import run_captured

from clients.inbox import Inbox, inbox_path
from fedge.contracts.config import ConfigError
from fedge.contracts.config_load import load_config
from fedge.contracts.protocol import DriftReport
from fedge.scenarios.feed import feed_scenario

BASE = [
    "scenario.clients=2",
    "scenario.ticks=8",
    "scenario.schedule.at=4",
    "scenario.samples_per_tick=100",
    "campaign.initial_rounds=1",
    "campaign.rounds=1",
    "trigger.cooldown=100",
]


def _reports(overrides: list[str], folder: Path) -> tuple[dict, list[DriftReport]]:
    summary, crossed = run_captured([f'run.output_dir="{folder}"', *BASE, *overrides], folder / "run")
    reports = [
        DriftReport.from_dict(reply.content["report"])
        for request, reply in crossed
        if request.metadata.message_type == "query" and reply.has_content() and "report" in reply.content
    ]
    return summary, reports


def test_a_tenth_of_the_rows_come_with_a_label_and_none_is_rejected_for_lacking_one(tmp_path: Path) -> None:
    summary, reports = _reports(["scenario.label_fraction=0.1", "scenario.bad_row_fraction=0.0"], tmp_path)
    assert reports and all(r.n_samples == 100 for r in reports), "unlabelled rows are kept"
    assert all(t["rejected"] == 0 for t in summary["ticks"])
    labelled = [r.n_labelled for r in reports]
    assert all(0 < n < 25 for n in labelled), labelled
    assert 0.07 <= np.mean(labelled) / 100 <= 0.13, labelled
    assert all(r.late_labels == 0 for r in reports)


def test_labels_five_ticks_late_arrive_five_ticks_late_and_score_their_own_rows(tmp_path: Path) -> None:
    # The window holds the rows until their labels come (100 rows a tick, 6 ticks).
    overrides = ["scenario.label_delay=5", "scenario.bad_row_fraction=0.0", "monitor.window=1000"]
    summary, reports = _reports(overrides, tmp_path)
    assert all(r.n_labelled == 0 for r in reports), "every row arrives without its label"
    early = [r for r in reports if r.tick < 5]
    late = [r for r in reports if r.tick >= 5]
    assert early and all(r.late_labels == 0 and r.n_scored == 0 for r in early)
    # Tick t brings the 100 labels of tick t - 5, each scored against the prediction made then.
    assert late and all(r.late_labels == 100 and r.label_delay == pytest.approx(5.0) for r in late)
    assert all(r.labels_rejected == 0 for r in reports)
    # No device holds a label before tick 5, so the first model is trained then.
    assert [c["tick"] for c in summary["campaigns"]][:1] == [5], summary["campaigns"]


def test_bad_rows_are_still_dropped_and_a_late_label_never_names_one(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [*BASE, "scenario.bad_row_fraction=0.2", "scenario.label_fraction=0.5", "scenario.label_delay=2"],
    )
    path = inbox_path(tmp_path / "device-0.sqlite")
    receipts = feed_scenario(cfg, 0, path)
    assert [r.rejected["total"] for r in receipts] == [20] * 8, "the scenario's bad rows are dropped"
    with Inbox(path) as inbox:
        rows = inbox.take()
        labels = inbox.take_labels()
    kept = set(rows.ids.tolist())
    # Labels of ticks 0..5 arrive at 2..7; those of ticks 6 and 7 would come after the run.
    assert sorted(set(labels.ticks.tolist())) == list(range(2, 8))
    per_tick = np.bincount(labels.ticks, minlength=8)[2:]
    assert all(25 <= n <= 55 for n in per_tick), per_tick  # about half of the 80 good rows
    assert set(labels.ids.tolist()) <= kept, "a label only for a row the inbox kept"
    # Feeding again stores nothing twice (rows or labels).
    assert feed_scenario(cfg, 0, path) == []
    with Inbox(path) as inbox:
        assert len(inbox.take_labels().ids) == len(labels.ids)


def test_label_fraction_and_delay_out_of_bounds_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="label_fraction"):
        load_config(None, ["scenario.label_fraction=1.5"])
    with pytest.raises(ConfigError, match="label_delay"):
        load_config(None, ["scenario.label_delay=-1"])


def test_the_benchmark_scores_delay_false_alarms_and_misses_against_the_schedule() -> None:
    from experiments import label_free_bench as bench

    cfg = load_config(None, [f"scenario.clients={bench.CLIENTS}", f"scenario.ticks={bench.TICKS}",
                             f"scenario.schedule.at={bench.DRIFT_AT}"])
    at = bench.DRIFT_AT
    ticks = [{"tick": t, "signals": {}} for t in range(bench.TICKS)]
    ticks[2]["signals"] = {"input": [1]}  # a false alarm before the drift
    ticks[at]["signals"] = {"input": [0], "label": [2]}
    ticks[at + 2]["signals"] = {"prediction": [1]}
    summary = {"ticks": ticks, "campaigns": [{"tick": 0}]}
    truth = {t: (90, 100) if t < at else (60, 100) for t in range(bench.TICKS)}
    free = bench.score(bench.Cell("segment-gain", "label-free", 0.1, 0), cfg, summary, truth, 1.0)
    # Devices 0 and 1 detect (delays 0 and 2); no campaign answers 2 and 3, so they are missed.
    assert (free["median_delay"], free["detected"], free["missed"]) == (1.0, 2, 2)
    assert free["false_alarms"] == pytest.approx(1 / ((at - 1) * bench.CLIENTS), abs=1e-4)
    assert free["accuracy_after"] == pytest.approx(0.6)
    label = bench.score(bench.Cell("segment-gain", "label", 0.1, 0), cfg, summary, truth, 1.0)
    assert (label["median_delay"], label["detected"], label["false_alarms"]) == (0, 1, 0.0)
    answered = {**summary, "campaigns": [{"tick": 0}, {"tick": at + 1}]}
    label = bench.score(bench.Cell("segment-gain", "label", 0.1, 0), cfg, answered, truth, 1.0)
    assert (label["missed"], label["campaign_delay"]) == (0, 1), "a campaign answers every device's drift"
