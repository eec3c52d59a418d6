"""The sweep keeps what it measured, reruns only what it lacks, and judges every matrix on paired seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import experiments.feddrift_sweep as sweep
from experiments.feddrift import Settings, Task


def _rows(task: Task, clustered: float = 0.90, oracle: float = 0.91) -> list[dict[str, Any]]:
    acc = {"never": 0.80, "window": 0.85, "oracle": oracle, "drift-triggered": 0.81, "drift-clustered": clustered}
    return [
        {
            "dataset": task.dataset, "matrix": task.matrix, "seed": task.seed, "policy": p,
            "accuracy": acc[p], "seconds": 1.0,
            "detection": {"detected": 1, "drifts": 2, "false_alarms": 0},
        }
        for p in task.policies
    ]


def _tasks(tmp_path: Path, seeds: int = 2) -> list[Task]:
    cells = [("sine2", "random-1"), ("circle2", "random-2")]
    return sweep.sweep_tasks(tmp_path / "work", seeds, ("never", "drift-triggered", "oracle", "drift-clustered"), Settings(), cells)


def test_a_stopped_sweep_keeps_its_cells_and_a_rerun_runs_only_the_rest(tmp_path: Path, monkeypatch) -> None:
    ran: list[tuple[str, int]] = []

    def fake(task: Task) -> list[dict[str, Any]]:
        if len(ran) == 3:
            raise KeyboardInterrupt  # the sweep is stopped during its fourth cell
        ran.append((task.dataset, task.seed))
        return _rows(task)

    monkeypatch.setattr(sweep, "run_task", fake)
    tasks = _tasks(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(tmp_path, tasks, jobs=1)
    assert len(sweep.load_rows(tmp_path)) == 3 * 4, "the three finished cells' rows are on disk"
    ran.clear()
    monkeypatch.setattr(sweep, "run_task", lambda t: ran.append((t.dataset, t.seed)) or _rows(t))
    rows, failed = sweep.run_sweep(tmp_path, tasks, jobs=1)
    assert ran == [("circle2", 1)] and not failed
    assert len(rows) == 4 * 4


def test_gaps_are_paired_by_seed_and_a_matrix_beyond_the_bound_is_a_miss(tmp_path: Path) -> None:
    rows = []
    for t in _tasks(tmp_path, seeds=3):
        worse = t.dataset == "circle2" and t.seed == 2
        rows += _rows(t, clustered=0.85 if worse else 0.905)
    summary = sweep.sweep_summary(rows)
    by = {s["dataset"]: s for s in summary}
    assert by["sine2"]["gap"][0] == pytest.approx(-0.5)
    assert by["circle2"]["gap"][2] == pytest.approx(-6.0), "the worst seed is reported"
    assert by["sine2"]["triggered_vs_never"][0] == pytest.approx(1.0)
    lines = sweep.sweep_targets(summary, seeds=3)
    circle = next(line for line in lines if line.startswith("- circle2"))
    sine = next(line for line in lines if line.startswith("- sine2"))
    assert circle.endswith("missed") and "1 of 1" not in circle
    assert "not run: A, W, X, Y, Z" in sine, "matrices the issue names but the sweep did not run are listed"


def test_the_sweep_writes_its_table_csv_and_plot(tmp_path: Path) -> None:
    rows = [r for t in _tasks(tmp_path) for r in _rows(t)]
    out = sweep.write_sweep(tmp_path, rows, 12.0, seeds=2)
    table = (tmp_path / "sweep.md").read_text()
    assert "| sine2 | random-1 | 2 |" in table and "-1.0 ± 0.0 (-1.0)" in table
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert len((tmp_path / "sweep.csv").read_text().splitlines()) == 1 + len(rows)
    assert out["meta"]["cells"] == 2


def test_a_regenerated_table_keeps_the_pages_hand_written_sections(tmp_path: Path) -> None:
    from experiments.feddrift_report import KEPT_MARKER, keep_sections

    page = tmp_path / "feddrift.md"
    page.write_text(f"# old table\n| a |\n\n{KEPT_MARKER}\n## Sweep\nfigures\n")
    new = keep_sections("# new table\n| b |\n", page)
    assert new.startswith("# new table") and "old table" not in new
    assert new.endswith(f"{KEPT_MARKER}\n## Sweep\nfigures\n")
    assert keep_sections("# t\n", tmp_path / "absent.md") == "# t\n"


def test_the_sweep_command_lands_every_cell_and_names_a_failed_one_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from fedge.cli import app as cli

    monkeypatch.setattr(sweep, "SWEEP", (("sine2", "random-1"), ("circle2", "random-2")))

    def fake(task: Task) -> list[dict[str, Any]]:
        if task.dataset == "circle2" and task.seed == 1:
            raise RuntimeError("device 3 replied with an error")
        return _rows(task)

    monkeypatch.setattr(sweep, "run_task", fake)
    results = tmp_path / "results"
    args = ["feddrift", "--sweep", "--seeds", "2", "--jobs", "1", "--results", str(results)]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 2, out.output
    assert "1 sweep cell(s) failed: circle2/random-2 seed 1: RuntimeError: device 3 replied" in out.output
    assert "Traceback" not in out.output
    assert "[3/4] " in out.output, "progress per cell"
    assert len(sweep.load_rows(results)) == 3 * 5, "the cells that ran are kept"
    assert (results / "sweep.md").is_file() and (results / "sweep.png").is_file()
    monkeypatch.setattr(sweep, "run_task", _rows)
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "[4/4] circle2/random-2 seed 1" in again.output, again.output


def test_a_cell_rerun_over_a_run_cut_short_starts_from_clean_devices(tmp_path: Path) -> None:
    from experiments.feddrift import run_task

    task = sweep.sweep_tasks(tmp_path / "work", 1, ("never",), Settings(), [("sine2", "random-3")])[0]
    clean = run_task(task)[0]
    stale = task.folder / "never" / "devices" / "leftover"
    stale.write_text("a run cut short")
    again = run_task(task)[0]
    assert not stale.exists(), "nothing of the earlier run is left in the policy's folder"
    assert again["accuracy"] == clean["accuracy"]
    assert again["accuracy_over_time"] == clean["accuracy_over_time"]
