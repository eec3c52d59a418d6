"""``flwr run .``: the ServerApp says how many devices it waits for, and fits a smaller federation."""

from __future__ import annotations

import logging

import pytest

from fedge.contracts.config import ConfigError
from fedge.contracts.config_load import load_config
from fedge.server.app import sized_to, wait_for_devices


class _Grid:
    """Devices connect one at a time, at the given (fake) times."""

    def __init__(self, clock: list[float], joins: list[float]) -> None:
        self.clock, self.joins = clock, joins

    def get_node_ids(self) -> list[int]:
        return [i for i, at in enumerate(self.joins) if at <= self.clock[0]]


def _wait(joins: list[float], expected: int, timeout: float) -> int:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += max(seconds, 0.5)

    return wait_for_devices(
        _Grid(now, joins), expected, timeout, every=5.0, clock=lambda: now[0], sleep=sleep
    )


def test_waiting_logs_progress_every_few_seconds(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="fedge"):
        assert _wait([0.0, 12.0], expected=2, timeout=600) == 2
    lines = [r.getMessage() for r in caplog.records]
    waiting = [m for m in lines if m.startswith("waiting for devices")]
    assert waiting[0] == "waiting for devices: 1 of 2 connected"
    assert 2 <= len(waiting) <= 4, lines  # about one line per 5 s over 12 s
    assert lines[-1] == "all 2 devices connected"


def test_a_smaller_federation_is_said_in_one_line_at_the_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="fedge"):
        assert _wait([0.0, 1.0], expected=6, timeout=20) == 2
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == (
        "only 2 of 6 devices connected after 20 s: the federation is smaller than the "
        "scenario (scenario.clients = 6); running with those"
    )


def test_no_line_when_every_device_is_there(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="fedge"):
        assert _wait([0.0] * 6, expected=6, timeout=600) == 6
    assert not caplog.records


def test_the_default_scenario_fits_flowers_default_federation() -> None:
    from flwr.supercore.constant import DEFAULT_SIMULATION_CONFIG

    nodes = DEFAULT_SIMULATION_CONFIG.num_supernodes  # what `flwr run .` starts locally
    cfg = load_config(None)
    assert cfg.scenario.clients != nodes, "the case this guards: 6 devices, 2 nodes"
    fitted = sized_to(cfg, nodes)
    assert fitted.scenario.clients == nodes
    assert fitted.scenario.name == cfg.scenario.name  # same run folder on both sides


def test_a_federation_too_small_for_the_config_is_a_one_line_error() -> None:
    cfg = load_config(None, ["campaign.min_devices=3"])
    with pytest.raises(ConfigError, match="campaign.min_devices"):
        sized_to(cfg, 2)


def test_a_bare_flwr_run_of_the_app_fits_flowers_two_nodes_and_shows_progress(tmp_path) -> None:
    """`flwr run .` with only Flower's defaults (2 simulated nodes): it runs, sized to them, tick by tick."""
    import json

    from fedge.engines.simulation import run_flower_simulation

    out = tmp_path / "out"
    # No run-dir: exactly what a bare `flwr run .` passes (only the output folder and a
    # short scenario are set here, so the test is quick and writes nothing in the checkout).
    run_config = {"output-dir": str(out), "overrides": "scenario.ticks=5;scenario.schedule.at=3;campaign.initial_rounds=2;campaign.rounds=1"}
    run_flower_simulation(run_config, num_supernodes=2, log_dir=tmp_path, timeout=900)
    log = (tmp_path / "flower-simulation.log").read_text(errors="replace")
    assert "the federation has 2 nodes, the scenario 6 devices: running it on 2" in log, log[-3000:]
    ticks = [line for line in log.splitlines() if "fedge.server" in line and ": tick " in line]
    assert len([t for t in ticks if "accuracy" in t]) >= 5, "one progress line per tick"
    (summary_file,) = out.glob("*/run-*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["devices"] == 2 and len(summary["ticks"]) == 5
    assert summary["ticks"][-1]["n_samples"] > 0, "the ServerApp fed the two devices' inboxes"
