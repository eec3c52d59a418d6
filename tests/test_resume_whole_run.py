"""A run killed and resumed is one run: its MLflow runs are closed and linked, its summary is whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from inprocess_helpers import run_captured
from mlflow import MlflowClient

from fedge.runner import RunRequest, run
from fedge.tracking import TrackingError, default_tracking_uri

OVERRIDES = [
    "scenario.clients=3",
    "scenario.ticks=6",
    "scenario.schedule.at=3",
    "campaign.rounds=1",
    "campaign.initial_rounds=2",
]


def test_a_resumed_run_closes_the_killed_mlflow_run_links_it_and_summarises_every_tick(
    tmp_path: Path,
) -> None:
    overrides = [f'run.output_dir="{tmp_path}"', *OVERRIDES]
    folder = tmp_path / "run"

    class Died(Exception):
        pass

    def die_at_2(rec: Any, campaign: Any) -> None:
        if rec.tick == 2:
            raise Died

    with pytest.raises(Died):
        run_captured(overrides, folder, on_tick=die_at_2)
    summary, _ = run_captured(overrides, folder)

    assert [t["tick"] for t in summary["ticks"]] == list(range(6)), "the summary covers the whole run"
    assert summary["campaigns"][0]["tick"] == 0, "the campaign before the kill is in it"
    client = MlflowClient(default_tracking_uri(tmp_path))
    resumed = client.get_run(summary["run_id"])
    earlier = resumed.data.tags["fedge.resumed_from_run"]
    assert client.get_run(earlier).info.status == "KILLED", "no run is left RUNNING forever"
    assert resumed.info.status == "FINISHED"


def test_a_bad_tracking_uri_leaves_no_half_made_run_folder(tmp_path: Path) -> None:
    bad = f'tracking.uri="sqlite:///{tmp_path}/missing/dir/mlflow.db"'
    request = RunRequest(None, (f'run.output_dir="{tmp_path}"', *OVERRIDES, bad), "inprocess")
    with pytest.raises(TrackingError, match="does not exist"):
        run(request, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
