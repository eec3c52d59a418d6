"""A new SQLite store starts from the cached empty store and behaves like one MLflow made."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mlflow import MlflowClient

from fedge.tracking import Tracker, default_tracking_uri


def test_new_stores_work_and_point_their_default_experiment_at_their_own_folder(
    tmp_path: Path,
) -> None:
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        uri = default_tracking_uri(folder)
        with Tracker(uri, "exp", "model") as tracker:
            run_id = tracker.start({"a": 1})
            tracker.log_metrics({"acc": 0.5}, step=3)
        history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "acc")
        assert [(m.step, m.value) for m in history] == [(3, 0.5)]
        with sqlite3.connect(folder / "mlflow.db") as conn:
            rows = dict(conn.execute("SELECT name, artifact_location FROM experiments").fetchall())
        assert rows["Default"] == (folder / "mlartifacts").as_uri()
        assert rows["exp"] == (folder / "mlartifacts").as_uri()
        assert not list(folder.glob(".*.seed"))
