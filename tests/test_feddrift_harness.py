"""The FedDrift harness as a user drives it: matrices by name or path, generators by name."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from experiments.feddrift import SHARED_DATA, Settings, dataset_spec, matrix_file
from experiments.feddrift_sweep import SWEEP, sweep_tasks
from fedge.cli import app as cli
from fedge.scenarios import ConceptSchedule
from fedge.scenarios.generators import make_generator


def test_a_matrix_is_read_from_a_path(tmp_path: Path) -> None:
    cp = tmp_path / "mine.cp"
    cp.write_text("0 0 1\n1 0 1\n")
    assert matrix_file(str(cp), 2, tmp_path / "out") == (cp, "file")
    with pytest.raises(ValueError, match="not found"):
        matrix_file(str(tmp_path / "missing.cp"), 2, tmp_path / "out")
    with pytest.raises(ValueError, match="uses 3 concepts; the dataset has 2"):
        (tmp_path / "three.cp").write_text("0 1 2\n")
        matrix_file(str(tmp_path / "three.cp"), 2, tmp_path / "out")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="FedDrift reference data not present")
def test_a_two_concept_matrix_with_sparse_ids_is_relabelled_inside_the_given_folder(tmp_path: Path) -> None:
    path, origin = matrix_file("Z", 2, tmp_path)  # FedDrift's Z uses concepts 0 and 2
    assert origin == "feddrift" and path.parent == tmp_path
    dense = ConceptSchedule.from_cp_file(path)
    raw = ConceptSchedule.from_cp_file(SHARED_DATA / "changepoints" / "Z.cp")
    assert dense.n_concepts == 2 and dense.drift_points() == raw.drift_points()


def test_the_cli_refuses_an_unknown_matrix_in_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    out = CliRunner().invoke(
        cli, ["feddrift", "--datasets", "sine2", "--matrix", "sine2=NOPE", "--results", str(results)]
    )
    assert out.exit_code != 0
    assert "unknown matrix 'NOPE'" in out.output and "Traceback" not in out.output
    assert os.listdir(tmp_path) == [], "no results, runs, page or generated matrix anywhere"


def test_the_cli_refuses_an_unknown_generator_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(cli, ["feddrift", "--datasets", "river-nope", "--results", str(tmp_path / "r")])
    assert out.exit_code != 0 and "river-nope" in out.output and "Traceback" not in out.output


def test_generators_are_chosen_by_name_with_parameters() -> None:
    spec = dataset_spec("river-sea:concepts=0/1/2/3;noise=0.0")
    assert (spec.generator, spec.n_concepts, spec.params["noise"]) == ("river-sea", 4, "0.0")
    assert dataset_spec("river-agrawal").n_concepts == 2
    assert dataset_spec("river-stagger").n_concepts == 3
    assert dataset_spec("river-hyperplane").n_concepts == 2
    with pytest.raises(ValueError, match="unknown parameter 'colour'"):
        dataset_spec("river-stagger:colour=1")
    with pytest.raises(ValueError, match="outside 0..9"):
        dataset_spec("river-agrawal:concepts=0/12")


@pytest.mark.parametrize("name", ["river-sea", "river-stagger", "river-agrawal", "river-hyperplane"])
def test_river_concepts_are_different_functions_and_draws_are_reproducible(name: str) -> None:
    gen = make_generator(name, concepts="0,1") if name != "river-hyperplane" else make_generator(name)
    x, y0 = gen.sample(0, 400, np.random.default_rng(5))
    again, y_again = gen.sample(0, 400, np.random.default_rng(5))
    other, _ = gen.sample(0, 400, np.random.default_rng(6))
    assert np.array_equal(x, again) and np.array_equal(y0, y_again), "same seed, same rows"
    assert not np.array_equal(x, other), "another seed, other rows"
    assert float(np.abs(x).max()) <= 2.0, "features scaled for a small network"
    if name == "river-hyperplane":
        return  # its concepts differ in their plane; rows of the same seed are not comparable
    _, y1 = gen.sample(1, 400, np.random.default_rng(5))
    assert 0.05 < float(np.mean(y0 != y1)) < 0.95, "concept 1 labels the same inputs differently"


def test_the_cli_runs_the_protocol_on_a_river_generator_and_a_matrix_file_inside_the_results_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cp = tmp_path / "two.cp"
    cp.write_text("0 0 0\n0 0 1\n0 1 1\n")
    results = tmp_path / "results"
    out = CliRunner().invoke(
        cli,
        [
            "feddrift", "--datasets", "river-stagger", "--matrix", f"river-stagger={cp}",
            "--policies", "never", "--seeds", "1", "--jobs", "1", "--rounds", "2",
            "--local-epochs", "2", "--results", str(results),
        ],
    )
    assert out.exit_code == 0, out.output
    assert sorted(os.listdir(tmp_path)) == ["results", "two.cp"], "nothing outside the results folder"
    csv = (results / "results.csv").read_text()
    assert "river-stagger" in csv and (results / "feddrift.md").is_file()
    row = next(line for line in csv.splitlines()[1:] if "never" in line)
    accuracy = float(row.split(",")[csv.splitlines()[0].split(",").index("accuracy_mean")])
    assert accuracy > 0.5, "the model learnt STAGGER's concept 0"


def test_the_sweep_covers_every_matrix_the_issue_names() -> None:
    cells = set(SWEEP)
    for m in ("A", "W", "X", "Y", "Z"):
        assert {("sine2", m), ("circle2", m)} <= cells
    assert {("sea4", m) for m in ("B", "C", "D", "E", "F", *(f"R{i}" for i in range(10)))} <= cells
    assert {("digits-swap", m) for m in ("B", "R0", "R1", "R2")} <= cells
    assert {("river-agrawal", "A"), ("river-stagger", "A")} <= cells
    tasks = sweep_tasks(Path("/x"), 3, ("oracle",), Settings())
    assert len(tasks) == 3 * len(SWEEP) and [t.seed for t in tasks[: len(SWEEP)]] == [0] * len(SWEEP)
