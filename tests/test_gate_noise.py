"""The gate: a lead within the holdout's sampling noise does not promote; a tie never does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from inprocess_helpers import fed_device
from orchestrator_fakes import FakeRegistry, FakeTracker
from signing_helpers import deploy_signed, trusting

from fedge.contracts import model as nets
from fedge.contracts.config_load import load_config
from fedge.contracts.protocol import DriftReport
from fedge.core.gate import gate_margin
from fedge.core.orchestrator import Orchestrator
from fedge.core.ports import CampaignOutcome, Deployed, RoundMetrics
from fedge.core.triggers import Always


class _Fed:
    """Two devices; each retraining produces a candidate ``lead`` ahead of the champion."""

    def __init__(self, lead: float, discordant: float, champion: float = 0.77) -> None:
        self.lead, self.discordant, self.champion = lead, discordant, champion

    def poll(self, tick: int, deployment: Mapping[int, Deployed], default: Any) -> list[DriftReport]:
        model = deployment.get(0)
        version = model.version if model is not None else 0
        return [DriftReport(d, tick, version, 100, 20, False, 0, 0, 100) for d in range(2)]

    def score(self, tick: int, models: Mapping[int, Any]) -> dict[int, dict[int, float]]:
        return {}

    def campaign(
        self, devices: Sequence[int], start: Any, *, tick: int, rounds: int, first_round: int, lineage: str
    ) -> CampaignOutcome:
        cand = self.champion + self.lead
        rm = (RoundMetrics(first_round, 0.1, cand, 0.1, self.champion, len(devices), self.discordant),)
        return CampaignOutcome({"w": np.array([float(tick)])}, rm, len(devices), gate_labels=100)

    def versions(self) -> list[dict[str, Any]]:
        return []


def _promoted(lead: float, discordant: float, gate_z: float) -> list[str]:
    reg = FakeRegistry()
    orch = Orchestrator(
        _Fed(lead, discordant), reg, FakeTracker(), Always(), {"w": np.zeros(1)},
        rounds=1, initial_rounds=1, min_improvement=0.0, gate_z=gate_z,
    )
    orch.run(range(3))
    return [t["fedge.promoted"] for t in reg.tags[1:]]


def test_a_two_point_lead_on_100_holdout_samples_is_noise_and_is_not_promoted() -> None:
    assert _promoted(0.02, 0.08, gate_z=0.0) == ["true", "true"], "without a margin any lead promotes"
    assert _promoted(0.02, 0.08, gate_z=1.645) == ["false", "false"]


def test_a_clear_lead_still_promotes() -> None:
    assert _promoted(0.10, 0.12, gate_z=1.645) == ["true", "true"]


def test_a_tie_never_promotes_even_when_float_rounding_puts_the_candidate_ahead() -> None:
    # 0.77 + 1e-9: what two float32 averages of the same count can differ by.
    assert _promoted(1e-9, 0.0, gate_z=0.0) == ["false", "false"]


def test_the_paired_margin_is_smaller_when_the_models_agree_and_falls_back_when_unknown() -> None:
    paired = gate_margin(0.80, 0.78, 0.04, 100, 1.645)
    wider = gate_margin(0.80, 0.78, 0.30, 100, 1.645)
    unpaired = gate_margin(0.80, 0.78, float("nan"), 100, 1.645)
    assert paired < wider < unpaired
    assert gate_margin(0.80, 0.78, 0.04, 10_000, 1.645) == pytest.approx(paired / 10)


def test_the_device_reports_where_exactly_one_of_candidate_and_champion_is_right(tmp_path: Path) -> None:
    cfg = load_config(None, ["scenario.clients=1", "scenario.ticks=6", "scenario.schedule.at=5", "scenario.bad_row_fraction=0.0"])
    cfg, signer = trusting(cfg, tmp_path)
    device = fed_device(cfg, 0, tmp_path / "device.sqlite")
    model = nets.build_model(2, 2, cfg.model.hidden, cfg.model.layers)
    nets.initial_weights(model, 0)
    champion = nets.get_weights(model)
    deploy_signed(device, signer, 1, champion)
    for t in range(4):
        device.monitor_tick(t)
    flipped = {k: -v for k, v in champion.items()}  # another model, scored on the same samples
    out = device.evaluate(flipped)
    assert out["num-examples"] > 0 and 0.0 < out["discordant"] <= 1.0
    assert out["discordant"] >= abs(out["eval_acc"] - out["champion_acc"]) - 1e-6
    assert device.evaluate(champion)["discordant"] == 0.0, "the champion never disagrees with itself"
    device.close()
