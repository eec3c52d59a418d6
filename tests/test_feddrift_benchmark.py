"""The FedDrift harness, reduced: one seed, a small staggered matrix, the ordering that must hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from experiments.feddrift import Settings, Task, matrix_file, run_task, score_detections
from experiments.feddrift_report import aggregate, markdown_table
from fedge.scenarios import ConceptSchedule
from fedge.tracking import default_tracking_uri, list_model_versions

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "feddrift"

# 4 clients, steps 0..5; clients drift to concept 1 one after another, one comes back.
STAGGERED = """\
0 0 0 0
0 0 0 0
1 0 0 0
1 1 0 0
1 1 1 0
0 1 1 0
"""


@pytest.fixture(scope="module")
def reduced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Task, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("feddrift")
    cp = tmp / "staggered.cp"
    cp.write_text(STAGGERED)
    task = Task(
        "sine2", "staggered", 0, ("never", "oracle", "drift-clustered"), tmp / "run",
        Settings(rounds=3, local_epochs=3), cp_file=cp,
    )
    return task, run_task(task)


def test_clustered_beats_never_and_oracle_stays_on_top(
    reduced: tuple[Task, list[dict[str, Any]]],
) -> None:
    _, rows = reduced
    acc = {r["policy"]: r["accuracy"] for r in rows}
    assert acc["oracle"] >= acc["drift-clustered"] > acc["never"], acc
    assert acc["drift-clustered"] - acc["never"] > 0.1, "a second model pays off on a label flip"
    for r in rows:
        assert len(r["accuracy_over_time"]) == 5, "tested on steps 1..5"
        assert r["bytes_sent"] > 0 and r["bytes_received"] > 0
    table = markdown_table(aggregate(rows))
    assert table.count("\n") == 2 + 3 and "drift-clustered" in table


def test_each_cluster_model_is_a_registered_version_with_lineage(
    reduced: tuple[Task, list[dict[str, Any]]],
) -> None:
    task, _ = reduced
    uri = default_tracking_uri(task.folder)
    versions = list_model_versions(uri, "fedge-feddrift-sine2-staggered-drift-clustered-s0")
    clusters = {v["tags"]["fedge.cluster"] for v in versions}
    assert len(clusters) >= 2, "the drifted clients got their own model"
    aliases = {a for v in versions for a in v["aliases"]}
    assert {f"cluster-{c}" for c in clusters} <= aliases
    by_number = {v["version"]: v["tags"] for v in versions}
    for v in versions:
        parent = v["tags"]["fedge.parent_version"]
        if parent != "none":
            lineage = {v["tags"]["fedge.cluster"], v["tags"]["fedge.split_from"]}
            assert by_number[int(parent)]["fedge.cluster"] in lineage


def test_detections_are_scored_against_the_matrix() -> None:
    sched = ConceptSchedule([[0, 0], [1, 0], [1, 0], [1, 1]])
    fires = {1: [0], 2: [1], 3: [1]}  # client 0 on time, client 1 false alarm then on time
    out = score_detections(fires, sched)
    assert out["drifts"] == 2 and out["detected"] == 2 and out["missed"] == 0
    assert out["false_alarms"] == 1
    assert out["delays"] == {"0": [0], "1": [0]}
    missed = score_detections({}, sched)
    assert missed["missed"] == 2 and missed["detected"] == 0


@pytest.mark.skipif(not SHARED.is_dir(), reason="FedDrift reference data not present")
def test_paper_matrix_a_is_read_from_the_shared_data(tmp_path: Path) -> None:
    path, origin = matrix_file("A", 2, tmp_path)
    assert origin == "feddrift" and path.parent == SHARED / "changepoints"
    schedule = ConceptSchedule.from_cp_file(path)
    assert (schedule.n_steps, schedule.n_clients, len(schedule.drift_points())) == (11, 10, 16)


def test_a_staggered_matrix_of_our_own_is_generated_only_when_asked_for(tmp_path: Path) -> None:
    path, origin = matrix_file("random-3", 4, tmp_path)
    assert origin == "generated" and path.parent == tmp_path
    schedule = ConceptSchedule.from_cp_file(path)
    assert (schedule.n_steps, schedule.n_clients) == (11, 10)
    assert schedule.n_concepts <= 4 and schedule.drift_points(), "staggered drifts"
    with pytest.raises(ValueError, match="unknown matrix 'no-such-matrix'"):
        matrix_file("no-such-matrix", 4, tmp_path / "other")
    assert not (tmp_path / "other").exists(), "an unknown name writes nothing"
