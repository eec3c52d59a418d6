"""``fedge new NAME`` writes a project whose own test passes and whose ``fedge run`` works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedge.cli import app

WORKTREE = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    # The fedge being tested, whatever the machine's installed one is.
    paths = [str(WORKTREE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "COLUMNS": "200"}


def _new(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> tuple[int, str]:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["new", name])
    return result.exit_code, result.output


def test_new_project_has_its_files_and_its_test_and_run_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = _new(tmp_path, monkeypatch, "demo")
    assert code == 0, out
    project = tmp_path / "demo"
    for rel in ("demo/__init__.py", "demo/task.py", "demo/data.py", "fedge.toml", "README.md", "pyproject.toml",
                "tests/test_task.py"):
        assert (project / rel).is_file(), rel
    readme = (project / "README.md").read_text()
    assert "fedge run" in readme and "python -m pytest" in readme
    assert 'task = "demo.task"' in (project / "fedge.toml").read_text()

    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=project, env=_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert tests.returncode == 0, tests.stdout[-2000:] + tests.stderr[-2000:]
    assert "4 passed" in tests.stdout

    short = ["--set", "scenario.ticks=8", "--set", "campaign.initial_rounds=3", "--set", "campaign.rounds=2"]
    fedge_run = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "run", "--quiet", *short],
        cwd=project, env=_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert fedge_run.returncode == 0, fedge_run.stdout[-2000:] + fedge_run.stderr[-2000:]
    assert "Champion: v" in fedge_run.stdout
    # The project's own scenario, task and output folder were used.
    (summary_file,) = (project / "fedge-runs" / "demo").glob("*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["config"]["model.task"] == "demo.task"
    assert summary["versions"], "a model version was registered"
    assert any(v["tags"].get("fedge.task") == "demo.task" for v in summary["versions"])
    # The project's own data module fed the devices: no generator, so no schedule.
    assert summary["config"]["data.source"] == "python" and summary["drift_steps"] == []
    assert all(t["n_samples"] == 4 * 120 for t in summary["ticks"][1:])


def test_a_folder_that_is_not_empty_is_refused_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "notes.txt").write_text("mine")
    code, out = _new(tmp_path, monkeypatch, "demo")
    assert code == 2
    assert "exists and is not empty" in out and len(out.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["notes.txt"]


def test_an_empty_folder_is_filled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "demo").mkdir()
    code, out = _new(tmp_path, monkeypatch, "demo")
    assert code == 0, out
    assert (tmp_path / "demo" / "demo" / "task.py").is_file()


@pytest.mark.parametrize(
    ("name", "why"),
    [("My-Proj", "not a valid project name"), ("class", "Python keyword"),
     ("json", "already an importable module"), ("9lives", "not a valid project name")],
)
def test_an_invalid_name_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, why: str
) -> None:
    code, out = _new(tmp_path, monkeypatch, name)
    assert code == 2 and why in out, out
    assert len(out.strip().splitlines()) == 1
    assert not (tmp_path / name).exists()


def test_the_templates_are_package_data() -> None:
    import tomllib

    data = tomllib.loads((WORKTREE / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["fedge.templates"]
    templates = WORKTREE / "fedge" / "templates"
    shipped = {p for pattern in patterns for p in templates.glob(pattern)}
    assert shipped == set(templates.rglob("*.tmpl")), "every template ships in the wheel"
