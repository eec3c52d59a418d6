"""A quorum of devices that drift at different ticks: ``trigger.memory`` lets it form."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from orchestrator_fakes import FakeRegistry, FakeTracker

from fedge.contracts.config import ConfigError
from fedge.contracts.config_load import load_config
from fedge.contracts.protocol import DriftReport
from fedge.core.orchestrator import Orchestrator
from fedge.core.ports import CampaignOutcome, Deployed, RoundMetrics
from fedge.core.triggers import DriftMemory, DriftQuorum


class _Staggered:
    """Six devices; device ``d`` drifts at tick ``d + 1`` and its detector fires once, then."""

    def __init__(self) -> None:
        self.campaign_ticks: list[int] = []
        self.trained: list[tuple[int, ...]] = []

    def poll(self, tick: int, deployment: Mapping[int, Deployed], default: Any) -> list[DriftReport]:
        model = deployment.get(0)
        version = model.version if model is not None else 0
        return [DriftReport(d, tick, version, 100, 5, tick == d + 1, int(tick == d + 1), 0, 100) for d in range(6)]

    def score(self, tick: int, models: Mapping[int, Any]) -> dict[int, dict[int, float]]:
        return {}

    def campaign(
        self, devices: Sequence[int], start: Any, *, tick: int, rounds: int, first_round: int, lineage: str
    ) -> CampaignOutcome:
        self.campaign_ticks.append(tick)
        self.trained.append(tuple(devices))
        rm = tuple(RoundMetrics(first_round + r, 0.1, 0.9, 0.1, 0.5, len(devices)) for r in range(rounds))
        return CampaignOutcome({"w": np.array([float(tick)])}, rm, len(devices))

    def versions(self) -> list[dict[str, Any]]:
        return []


def _run(memory: int, participants: str = "all") -> tuple[_Staggered, Orchestrator]:
    fed = _Staggered()
    orch = Orchestrator(
        fed, FakeRegistry(), FakeTracker(), DriftQuorum(quorum=3, cooldown=0, memory=memory), {"w": np.zeros(1)},
        rounds=1, initial_rounds=1, participants=participants,
    )
    orch.run(range(8))
    return fed, orch


def test_staggered_drifts_never_make_a_one_tick_quorum() -> None:
    fed, _ = _run(memory=1)
    assert fed.campaign_ticks == [0], "one firing per tick never reaches a quorum of 3"


def test_with_memory_the_quorum_forms_and_firings_before_the_campaign_no_longer_count() -> None:
    fed, orch = _run(memory=4)
    # Devices 0, 1, 2 fire at ticks 1, 2, 3: the quorum forms at tick 3. Devices 3, 4, 5
    # fire at 4, 5, 6; the earlier firings came before that campaign, so the next is at 6.
    assert fed.campaign_ticks == [0, 3, 6]
    reasons = [c.reason for c in orch.record.campaigns]
    assert "3/6 devices within 4 ticks" in reasons[1]
    drifted = {t.tick: t.drifted for t in orch.record.ticks}
    assert drifted[3] == (2,), "the tick record keeps this tick's firings only (what detection is scored on)"


def test_the_remembered_devices_are_the_ones_a_drifted_only_campaign_trains() -> None:
    fed, _ = _run(memory=4, participants="drifted")
    assert fed.trained[1] == (0, 1, 2)


def test_a_firing_older_than_the_memory_does_not_count() -> None:
    policy = DriftQuorum(quorum=2, cooldown=0, memory=2)
    memory = DriftMemory()
    memory.update(1, [DriftReport(0, 1, 1, 100, 40, True, 1, 1, 100)])
    reports = [DriftReport(d, 3, 1, 100, 40, d == 1, int(d == 1), 0, 100) for d in range(3)]
    memory.update(3, reports)
    decision = policy.decide(3, reports, has_model=True, last_campaign=0, recent=memory.last)
    assert not decision.retrain and decision.counted == (1,)
    decision = DriftQuorum(quorum=2, cooldown=0, memory=3).decide(
        3, reports, has_model=True, last_campaign=0, recent=memory.last
    )
    assert decision.retrain and decision.counted == (0, 1)


def test_the_memory_survives_a_restart_through_the_saved_state() -> None:
    _, orch = _run(memory=4)
    saved = json.loads(json.dumps(orch.snapshot()))
    assert DriftMemory(saved["drift_memory"]).last == orch.drift_memory.last
    assert orch.drift_memory.last[5] == {"label": 6}


def test_a_memory_below_one_tick_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("[trigger]\nmemory = 0\n")
    with pytest.raises(ConfigError, match="trigger.memory"):
        load_config(path)
