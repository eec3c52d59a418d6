"""The same scenario and seed give the same numbers in-process and on Flower's simulation."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fedge.runner import RunRequest, quiet_tick, run

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SMALL = (
    "scenario.clients=3",
    "scenario.ticks=6",
    "scenario.schedule.at=3",
    "campaign.rounds=2",
    "campaign.initial_rounds=3",
)


def _flower_processes() -> list[str]:
    """Live (not zombie) Flower and Ray processes."""
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True, check=True).stdout
    me = str(os.getpid())
    rows = [line.split(None, 2) for line in out.splitlines()[1:]]
    return [
        row[2] for row in rows
        if len(row) == 3 and not row[1].startswith("Z") and row[0] != me
        and any(name in row[2] for name in ("flower-superlink", "flwr-simulation", "ray::"))
    ]


def test_inprocess_and_flower_simulation_agree(tmp_path: Path) -> None:
    before = _flower_processes()
    results = {}
    for engine in ("inprocess", "simulation"):
        overrides = (*SMALL, f'run.output_dir="{tmp_path / engine}"')
        request = RunRequest(EXPERIMENTS / "sine2_sudden.toml", overrides, engine)
        results[engine] = run(request, on_tick=quiet_tick)
    ours, flower = results["inprocess"], results["simulation"]
    assert flower["engine"] == "simulation"
    assert [t["accuracy"] for t in ours["ticks"]] == [t["accuracy"] for t in flower["ticks"]]
    keys = ("tick", "reason", "devices", "version", "promoted", "rounds")
    assert [{k: c[k] for k in keys} for c in ours["campaigns"]] == [
        {k: c[k] for k in keys} for c in flower["campaigns"]
    ]
    assert [c["candidate_acc"] for c in ours["campaigns"]] == pytest.approx(
        [c["candidate_acc"] for c in flower["campaigns"]], abs=1e-6
    )
    assert len(ours["campaigns"]) >= 2, "the drift at tick 3 is retrained on both engines"
    assert _flower_processes() == before, "the simulation leaves no Flower or Ray process behind"
