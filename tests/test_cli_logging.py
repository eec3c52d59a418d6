"""fedge's warnings reach the person running `fedge run`, whatever MLflow did to logging."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from fedge.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_a_moved_aside_device_store_is_reported_on_the_command_line(tmp_path: Path) -> None:
    import mlflow.pytorch  # noqa: F401  (it sets the root logger to ERROR, as in a real run)

    assert logging.getLogger().getEffectiveLevel() >= logging.WARNING
    folder = tmp_path / "run"
    (folder / "devices").mkdir(parents=True)
    (folder / "devices" / "device-0.sqlite").write_bytes(b"not a database at all " * 200)
    result = CliRunner().invoke(
        app,
        [
            "run", "--run-dir", str(folder), "--output-dir", str(tmp_path / "out"), "--quiet",
            "--set", "scenario.clients=2", "--set", "scenario.ticks=3",
            "--set", "scenario.schedule.at=2", "--set", "scenario.samples_per_tick=30",
            "--set", "campaign.rounds=1", "--set", "campaign.initial_rounds=1",
            "--set", "campaign.local_epochs=1",
        ],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    warned = [line for line in result.stderr.splitlines() if "device store" in line]
    assert warned, result.stderr
    assert warned[0].startswith("fedge: WARNING fedge.device: device store ")
    assert "moved it to" in warned[0]
    assert list((folder / "devices").glob("device-0.sqlite.corrupt-*")), "the file was kept aside"
    # The command's logging is undone when it ends (the CLI may run inside a program).
    assert logging.getLogger("fedge").propagate


def test_verbose_shows_info_and_a_bad_level_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--log-level", "loud", "scenarios"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "fedge: error: --log-level: 'loud' is not allowed; allowed: debug, info, warning, error"
    )


def test_the_command_turns_flower_and_mlflow_telemetry_off(tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items()
        if k not in ("FLWR_TELEMETRY_ENABLED", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK",
                     "FEDGE_TELEMETRY")
    }
    env["PYTHONPATH"] = str(ROOT)
    code = (
        "import os, sys; sys.argv = ['fedge', '--help']\n"
        "import fedge.cli\n"
        "from flwr.supercore import telemetry\n"
        "from mlflow.telemetry.utils import is_telemetry_disabled\n"
        "print(json.dumps([telemetry.FLWR_TELEMETRY_ENABLED, is_telemetry_disabled(),"
        " os.environ.get('MLFLOW_DISABLE_TELEMETRY')]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", "import json\n" + code],
        check=False, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    flower, mlflow_off, raw = json.loads(done.stdout.strip().splitlines()[-1])
    assert flower == "0"
    assert mlflow_off is True
    assert raw == "true"
    # A user who opted in keeps their choice.
    env["FLWR_TELEMETRY_ENABLED"] = "1"
    env["FEDGE_TELEMETRY"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", "import json\n" + code],
        check=False, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])[0] == "1"
