"""An invalid scenario or config stops before anything starts, with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedge.cli import app
from fedge.contracts.config import ConfigError
from fedge.contracts.config_load import load_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trigger.sometimes=1", "trigger.sometimes: unknown key; allowed: policy, quorum"),
        ("trigger.cooldown=\"abc\"", "trigger.cooldown: expected an integer, got 'abc'"),
        ("trigger.policy=\"sometimes\"", "trigger.policy: 'sometimes' is not allowed; allowed: quorum"),
        ("monitor.detector=\"LSTM\"", "monitor.detector: unknown detector 'LSTM'; allowed: ADWIN"),
        ("campaign.rounds=0", "campaign.rounds: 0 is out of range; must be between 1 and 1000"),
        ("campaign.participants=\"some\"", "campaign.participants: 'some' is not allowed"),
        ("scenario.bad_row_fraction=2.0", "scenario.bad_row_fraction: 2.0 is out of range"),
        ("scenario.generator=\"mnist\"", "scenario.generator: 'mnist' is not allowed"),
        ("scenario.schedule.kind=\"wobbly\"", "scenario.schedule.kind"),
        ("scenario.schedule.at=40", "scenario.schedule.at"),
        ("trigger.quorum=9", "trigger.quorum: 9 devices can never agree"),
        ("monitor.params.nonsense=3", "unknown parameter 'nonsense'"),
        ("model.layers=true", "model.layers: expected an integer, got True"),
        ("campaign.lr=nan", "campaign.lr: expected a finite number, got nan"),
        ("wrong.key=1", "wrong: unknown section; allowed: scenario, monitor"),
    ],
)
def test_each_mistake_names_key_value_and_what_is_allowed(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(EXPERIMENTS / "sine2_sudden.toml", [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_missing_and_malformed_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[scenario\nname=")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_every_shipped_scenario_is_valid() -> None:
    files = sorted(EXPERIMENTS.glob("*.toml"))
    assert len(files) >= 4
    for path in files:
        load_config(path)


def test_cli_reports_config_error_without_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["run", str(EXPERIMENTS / "sine2_sudden.toml"), "--set", "trigger.policy=sometimes",
         "--output-dir", str(tmp_path)],
    )
    assert result.exit_code == 2
    assert "trigger.policy: 'sometimes' is not allowed" in result.output
    assert "Traceback" not in result.output
    assert not any(tmp_path.iterdir()), "nothing may start before the config is valid"


def test_cli_rejects_unknown_engine(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["run", "--engine", "warp", "--output-dir", str(tmp_path), "--quiet"]
    )
    assert result.exit_code == 2
    assert "engine: 'warp' is not allowed" in result.output


def test_run_dir_of_a_finished_run_is_refused_in_one_line(tmp_path: Path) -> None:
    finished = tmp_path / "run1"
    finished.mkdir()
    (finished / "summary.json").write_text("{}")
    result = CliRunner().invoke(
        app, ["run", "--output-dir", str(tmp_path), "--run-dir", str(finished), "--quiet"]
    )
    assert result.exit_code == 2
    assert "holds a finished run" in " ".join(result.output.split())
    assert not (finished / "devices").exists(), "nothing was started in the finished folder"
