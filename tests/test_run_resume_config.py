"""A run folder remembers its configuration; resuming it cannot quietly turn it into another run."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedge.cli import app
from fedge.contracts.config import ConfigError
from fedge.contracts.config_load import load_config
from fedge.core.orchestrator import CampaignRecord, TickRecord
from fedge.runner import CONFIG_FILE, RunRequest, plan_run, run, write_config

SMALL = (
    "scenario.clients=3",
    "scenario.ticks=4",
    "scenario.schedule.at=1",
    "scenario.samples_per_tick=40",
    "campaign.rounds=1",
    "campaign.initial_rounds=1",
    "campaign.local_epochs=1",
)


class Stop(Exception):
    """Stands for the process being killed in the middle of a run."""


def _stopped_run(tmp_path: Path) -> Path:
    """A run of 4 ticks that stopped after its tick 1."""
    folder = tmp_path / "run"

    def on_tick(rec: TickRecord, campaign: CampaignRecord | None) -> None:
        if rec.tick == 1:
            raise Stop

    overrides = (*SMALL, f"run.output_dir={json.dumps(str(tmp_path / 'out'))}")
    with pytest.raises(Stop):
        run(RunRequest(None, overrides), on_tick=on_tick, run_dir=folder)
    assert not (folder / "summary.json").exists()
    return folder


def _resume(folder: Path, *args: str) -> Any:
    return CliRunner().invoke(app, ["run", "--run-dir", str(folder), "--quiet", *args])


def test_config_is_stored_owner_only_and_reads_back_the_same(tmp_path: Path) -> None:
    cfg = load_config(None, [*SMALL, 'privacy.dp="local"', "monitor.params.delta=0.01"])
    path = write_config(cfg, tmp_path / "run")
    assert path.name == CONFIG_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = load_config(path)
    assert again.output_dir == cfg.output_dir
    assert dataclasses.replace(again, run=cfg.run) == cfg


def test_resume_refuses_a_conflicting_override_and_names_both_values(tmp_path: Path) -> None:
    folder = _stopped_run(tmp_path)
    stored = (folder / CONFIG_FILE).read_bytes()
    devices = sorted(p.name for p in (folder / "devices").iterdir())

    # Before: ticks=2 was no more than the ticks already done, the loop ended at once and
    # the run was written up as finished.
    result = _resume(folder, "--set", "scenario.ticks=2")
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line
    assert "scenario.ticks is 4 in this run, 2 was asked for" in line
    assert "Traceback" not in result.output
    assert not (folder / "summary.json").exists(), "the stopped run is not marked finished"
    assert (folder / CONFIG_FILE).read_bytes() == stored
    assert sorted(p.name for p in (folder / "devices").iterdir()) == devices

    result = _resume(folder, "--output-dir", str(tmp_path / "elsewhere"))
    assert result.exit_code == 2
    assert "run.output_dir is" in result.stderr and "elsewhere" in result.stderr
    assert not (tmp_path / "elsewhere").exists()


def test_resume_without_overrides_uses_the_stored_config(tmp_path: Path) -> None:
    folder = _stopped_run(tmp_path)
    # No --set at all: the defaults would be 6 clients and 16 ticks.
    result = _resume(folder, "--set", "run.reply_timeout=300")
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads((folder / "summary.json").read_text())
    assert [t["tick"] for t in summary["ticks"]][-1] == 3, "the run's own 4 ticks"
    assert summary["resumed_at"] >= 1, "it carried on rather than starting over"
    assert sorted(p.name for p in (folder / "devices").glob("device-?.sqlite")) == [
        "device-0.sqlite", "device-1.sqlite", "device-2.sqlite",
    ]
    assert load_config(folder / CONFIG_FILE).scenario.ticks == 4


def test_resume_with_the_same_scenario_file_is_accepted(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text('[scenario]\nclients = 3\nticks = 5\n[scenario.schedule]\nkind = "sudden"\nat = 2\n')
    cfg = load_config(scenario, [f"run.output_dir={json.dumps(str(tmp_path))}"])
    folder = tmp_path / "run"
    write_config(cfg, folder)
    same = RunRequest(scenario, (f"run.output_dir={json.dumps(str(tmp_path))}",))
    plan = plan_run(same, folder)
    assert plan.resumed and plan.cfg == cfg
    scenario.write_text(scenario.read_text().replace("ticks = 5", "ticks = 9"))
    with pytest.raises(ConfigError, match="scenario.ticks is 5 in this run, 9 was asked for"):
        plan_run(same, folder)


def test_a_damaged_stored_config_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / CONFIG_FILE).write_bytes(b"\xff\xfe garbage")
    result = _resume(folder)
    assert result.exit_code == 2
    assert f"its {CONFIG_FILE} is unusable" in result.stderr
    assert "\n" not in result.stderr.strip()
