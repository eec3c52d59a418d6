"""A user mistake in a scenario stops `fedge run` with one line, before anything is made.

Each case goes through the real command: exit code 2, exactly one line on
stderr, no traceback, and the output folder stays empty.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedge.cli import app
from fedge.contracts.config import MAX_CLIENTS, MAX_SEED, MAX_TICKS, ConfigError
from fedge.contracts.config_load import inside, load_config

ROOT = Path(__file__).resolve().parents[1]


def _refused(tmp_path: Path, args: list[str], expected: str) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", *args, "--output-dir", str(out), "--quiet"])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fedge: error: ")
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists(), "nothing may be created before the config is valid"


def test_binary_scenario_file(tmp_path: Path) -> None:
    bad = tmp_path / "photo.toml"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    _refused(tmp_path, [str(bad)], "not UTF-8 text (byte 0x89 at offset 0)")


def test_latin1_scenario_file(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[scenario]\nname = "caf\xe9"\n'.encode("latin-1"))
    _refused(tmp_path, [str(bad)], "not UTF-8 text")


def test_folder_given_as_scenario(tmp_path: Path) -> None:
    folder = tmp_path / "scenarios.toml"
    folder.mkdir()
    _refused(tmp_path, [str(folder)], "is a folder; give a TOML file")


def test_missing_scenario_file(tmp_path: Path) -> None:
    _refused(tmp_path, [str(tmp_path / "nope.toml")], "not found")


def test_scenario_that_is_not_a_regular_file(tmp_path: Path) -> None:
    # Reading /dev/zero would never end.
    _refused(tmp_path, ["/dev/zero"], "is not a regular file")


def test_oversized_scenario_file(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * 200_000)
    _refused(tmp_path, [str(big)], "a scenario file has at most 1000000")


def test_unreadable_scenario_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    locked = tmp_path / "locked.toml"
    locked.write_text("[scenario]\n")
    locked.chmod(0)
    _refused(tmp_path, [str(locked)], "cannot be read")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("scenario.seed=18446744073709551616", "scenario.seed: 18446744073709551616 is out of range"),
        ("scenario.seed=-1", "scenario.seed: -1 is out of range; must be between 0 and"),
        (f"scenario.seed={MAX_SEED + 1}", f"must be between 0 and {MAX_SEED}"),
        ("scenario.seed=" + "9" * 400, "scenario.seed: an integer of 400 digits is out of range"),
        (f"scenario.clients={MAX_CLIENTS + 1}", f"scenario.clients: {MAX_CLIENTS + 1} is out of range"),
        ("scenario.clients=1000000000000", "scenario.clients: 1000000000000 is out of range"),
        (f"scenario.ticks={MAX_TICKS + 1}", "scenario.ticks"),
        ("scenario.samples_per_tick=1000000000", "scenario.samples_per_tick"),
        ("model.hidden=100000000", "model.hidden: 100000000 is out of range; must be between 1 and 1024"),
        ("model.layers=1000", "model.layers"),
        ("campaign.rounds=1000000000", "campaign.rounds"),
        ("campaign.initial_rounds=1000000000", "campaign.initial_rounds"),
        ("campaign.local_epochs=1000000000", "campaign.local_epochs"),
        ("campaign.batch_size=10000000000", "campaign.batch_size"),
        ("campaign.holdout_every=10000000000", "campaign.holdout_every"),
        ("campaign.assumed_malicious=10000000000", "campaign.assumed_malicious"),
        ("campaign.min_devices=10000000000", "campaign.min_devices"),
        ("monitor.window=10000000000", "monitor.window"),
        ("monitor.params.window_size=1000000000", "monitor.params.window_size: 1000000000 is out"),
        ("trigger.period=10000000000", "trigger.period"),
        ("trigger.cooldown=10000000000", "trigger.cooldown"),
        ("trigger.quorum=1e300", "trigger.quorum"),
        ("privacy.secagg_shares=1e300", "privacy.secagg_shares"),
        ("run.workers=100000", "run.workers"),
        ("campaign.lr=" + "9" * 400, "campaign.lr: an integer of 400 digits is out of range"),
        ("scenario.schedule.at=100000000000", "scenario.schedule.at: 100000000000 is out of range"),
    ],
)
def test_huge_or_negative_counts(tmp_path: Path, override: str, expected: str) -> None:
    _refused(tmp_path, ["--set", override], expected)


def test_counts_that_are_each_fine_but_too_big_together(tmp_path: Path) -> None:
    _refused(
        tmp_path,
        ["--set", "scenario.clients=10000", "--set", "scenario.ticks=100000"],
        "scenario.clients x scenario.ticks: 10000 x 100000",
    )
    _refused(
        tmp_path,
        ["--set", "scenario.clients=1000", "--set", "scenario.ticks=1000",
         "--set", "scenario.samples_per_tick=1000"],
        "1000000000 rows is out of range",
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ('scenario.name="../../../escaped"', "scenario.name: '../../../escaped' is not a valid name"),
        ('scenario.name="/etc/cron.d"', "scenario.name: '/etc/cron.d' is not a valid name"),
        ('scenario.name="a/b"', "scenario.name: 'a/b' is not a valid name"),
        ('scenario.name="a\\\\b"', "is not a valid name"),
        ('scenario.name=".hidden"', "scenario.name: '.hidden' is not a valid name"),
        ('scenario.name=".."', "scenario.name: '..' is not a valid name"),
        ('scenario.name=""', "scenario.name: '' is not a valid name"),
        ('scenario.name="a\\u0000b"', "holds the control character '\\x00'"),
        ('scenario.name="' + "a" * 101 + '"', "is 101 characters; at most 100"),
        ('tracking.model_name="../../state"', "tracking.model_name: '../../state' is not a valid name"),
        ('tracking.model_name="/tmp/x"', "tracking.model_name: '/tmp/x' is not a valid name"),
        ('tracking.experiment="a\\nb"', "tracking.experiment: 'a\\nb' holds the control character"),
        ('tracking.experiment=""', "tracking.experiment: must not be empty"),
    ],
)
def test_names_that_would_leave_the_output_folder(tmp_path: Path, override: str, expected: str) -> None:
    before = set(tmp_path.parent.iterdir())
    _refused(tmp_path, ["--set", override], expected)
    assert set(tmp_path.parent.iterdir()) == before, "nothing written beside the output folder"


def test_a_nul_byte_in_the_output_folder_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="run.output_dir: 'out\\\\x00put' holds the control"):
        load_config(None, ['run.output_dir="out\\u0000put"'])


def test_an_mlflow_workspace_path_is_a_valid_experiment() -> None:
    cfg = load_config(None, ['tracking.experiment="/Users/me@example.com/fedge runs"'])
    assert cfg.tracking.experiment == "/Users/me@example.com/fedge runs"


def test_inside_keeps_paths_in_their_root(tmp_path: Path) -> None:
    assert inside(tmp_path, tmp_path / "a" / "b") == (tmp_path / "a" / "b").resolve()
    with pytest.raises(ConfigError, match="leaves its folder"):
        inside(tmp_path / "out", tmp_path / "out" / ".." / "elsewhere")
    with pytest.raises(ConfigError, match="leaves its folder"):
        inside(tmp_path / "out", "/etc/passwd")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="leaves its folder"):
        inside(tmp_path / "out", tmp_path / "out" / "link" / "x")
    with pytest.raises(ConfigError, match="not a usable path"):
        inside(tmp_path, tmp_path / "a\x00b")


def test_a_run_folder_is_never_made_outside_the_output_folder(tmp_path: Path) -> None:
    from fedge.contracts.config_load import new_run_dir

    cfg = load_config(None, [f"run.output_dir={str(tmp_path)!r}"])
    folder = new_run_dir(cfg)
    assert folder.parent == (tmp_path / "sine2-sudden").resolve()
    # A name that got past validation (built in code) is still stopped at the path.
    import dataclasses

    sneaky = dataclasses.replace(cfg, scenario=dataclasses.replace(cfg.scenario, name="../.."))
    with pytest.raises(ConfigError, match="leaves its folder"):
        new_run_dir(sneaky)


def test_shipped_scenarios_and_defaults_stay_within_the_limits() -> None:
    load_config(None)
    for path in sorted((ROOT / "experiments").glob("*.toml")):
        load_config(path)


def test_the_real_command_prints_one_line_for_a_binary_file(tmp_path: Path) -> None:
    bad = tmp_path / "scenario.toml"
    bad.write_bytes(bytes(range(256)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "40"}
    done = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "run", str(bad), "--output-dir", str(tmp_path / "out")],
        check=False, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr  # one line, even on a 40-column terminal
    assert done.stderr.startswith("fedge: error: scenario file")
    assert "not UTF-8 text" in done.stderr
    assert not (tmp_path / "out").exists()
