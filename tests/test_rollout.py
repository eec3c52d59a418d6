"""Staged rollout: canary cohort, widening waves on a live A/B, rollback with the champion kept."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from inprocess_helpers import run_captured
from mlflow import MlflowClient

from fedge.contracts import protocol as p
from fedge.core.rollout import Rollout, RolloutPolicy, cohort_order, start_rollout, wave_sizes
from fedge.server.federation import FlowerFederation


def _report(device: int, version: int, correct: int, tick: int = 0) -> p.DriftReport:
    return p.DriftReport(device, tick, version, 100, 100 - correct, False, 0, 0, 100)


def _trial(policy: RolloutPolicy, n: int = 10) -> Rollout:
    return start_rollout(policy, 0, 2, {"w": np.zeros(1)}, 1, range(n))


def _tick(rollout: Rollout, tick: int, cand: int, champ: int, failed: tuple[int, ...] = ()) -> str:
    reports = [
        _report(d, 2 if d in rollout.cohort else 1, cand if d in rollout.cohort else champ, tick)
        for d in rollout.order
    ]
    return rollout.observe(tick, reports, failed, policy=POLICY).kind


POLICY = RolloutPolicy(canary=0.2, waves=2, hold_ticks=2, max_drop=0.05, failure_share=0.3, min_failures=2)


def test_the_cohorts_follow_a_stated_deterministic_order() -> None:
    assert wave_sizes(10, 0.2, 2) == [2, 6, 10]
    assert wave_sizes(4, 1, 1) == [1, 4]
    order = cohort_order(7, range(10))
    assert order == cohort_order(7, reversed(range(10))), "the same devices, whatever the order given"
    assert order != cohort_order(8, range(10)), "canary duty moves with the version"
    rollout = _trial(POLICY)
    assert rollout.cohort == set(cohort_order(2, range(10))[:2]), "the first of version 2's order"


def test_a_good_candidate_widens_wave_by_wave_and_completes() -> None:
    rollout = _trial(POLICY)
    canary = set(rollout.cohort)
    assert _tick(rollout, 1, cand=95, champ=90) == "hold"
    assert _tick(rollout, 2, cand=88, champ=90) == "widen", "2 points below holds (max_drop 5)"
    assert len(rollout.cohort) == 6 and canary < rollout.cohort
    assert _tick(rollout, 3, cand=91, champ=90) == "hold"
    assert _tick(rollout, 4, cand=91, champ=90) == "complete"


def test_a_candidate_worse_on_live_data_rolls_back_after_its_canary_wave() -> None:
    rollout = _trial(POLICY)
    assert _tick(rollout, 1, cand=70, champ=90) == "hold"
    assert _tick(rollout, 2, cand=72, champ=90) == "rollback"
    assert len(rollout.cohort) == 2, "no one outside the canary was exposed"


def test_failed_installs_abort_once_the_minimum_count_and_share_are_passed() -> None:
    rollout = _trial(POLICY)
    first, second = sorted(rollout.cohort)
    assert _tick(rollout, 1, 90, 90, failed=(first,)) == "hold", "one failure is below min_failures"
    assert _tick(rollout, 2, 90, 90, failed=(second, 99)) == "rollback"


def test_a_rollout_with_no_evidence_gives_up_and_keeps_the_champion() -> None:
    rollout = _trial(POLICY)
    kinds = [rollout.observe(t, [], (), POLICY).kind for t in range(1, 9)]
    assert kinds[:-1] == ["hold"] * 7 and kinds[-1] == "rollback"


def test_a_rollout_survives_a_restart() -> None:
    rollout = _trial(POLICY)
    _tick(rollout, 1, 95, 90)
    again = Rollout.restored(json.loads(json.dumps(rollout.saved())), rollout.weights)
    assert again.cohort == rollout.cohort and again.samples == rollout.samples
    assert _tick(again, 2, 95, 90) == "widen"


def _overrides(tmp: Path) -> list[str]:
    return [
        f'run.output_dir="{tmp}"',
        "scenario.clients=5",
        "scenario.ticks=8",
        "scenario.schedule.kind=\"stationary\"",
        "scenario.bad_row_fraction=0.0",
        "campaign.rounds=1",
        "campaign.initial_rounds=2",
        'trigger.policy="periodic"',
        "trigger.period=2",
        'rollout.mode="staged"',
        "rollout.canary=1",
        "rollout.waves=2",
        "rollout.hold_ticks=1",
        "rollout.max_drop=0.1",
        "campaign.min_improvement=-1.0",  # every candidate passes the gate: the rollout judges
    ]


def _events(summary: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    run_id = json.loads((folder / "mlflow-run.json").read_text())["run_id"]
    client = MlflowClient(summary["tracking_uri"])
    paths = sorted(a.path for a in client.list_artifacts(run_id, "events") if "rollout" in a.path)
    events = [json.loads(Path(client.download_artifacts(run_id, path)).read_text()) for path in paths]
    return sorted(events, key=lambda e: (e["tick"], e["time"]))


def _versions_run(crossed: list[Any]) -> dict[int, dict[int, int]]:
    """Per tick, per device, the model version its report was tested with."""
    out: dict[int, dict[int, int]] = {}
    for request, reply in crossed:
        if request.metadata.message_type == "query" and not reply.has_error():
            r = p.DriftReport.from_dict(reply.content[p.REPORT])
            out.setdefault(r.tick, {})[r.device] = r.model_version
    return out


def test_a_good_candidate_reaches_the_fleet_in_the_configured_waves(tmp_path: Path) -> None:
    summary, crossed = run_captured(_overrides(tmp_path), tmp_path / "run")
    steps = [(e["tick"], e["payload"]["step"], e["payload"]["version"]) for e in _events(summary, tmp_path / "run")]
    (t0, first, v), *rest = steps
    assert first == "canary" and [s for _, s, w in rest[:2] if w == v] == ["widen", "complete"], steps
    aliases = {int(x["version"]): x["aliases"] for x in summary["versions"]}
    assert "champion" in aliases[summary["champion"]]
    ran = _versions_run(crossed)
    assert sum(1 for d, w in ran[t0 + 1].items() if w == v) == 1, "the canary alone at first"
    assert sum(1 for d, w in ran[t0 + 2].items() if w == v) == 3, "then one widening wave (1 + 2)"


def test_a_bad_candidate_the_gate_let_through_is_rolled_back_with_the_champion_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poisoned aggregate whose evaluation claims it is better: only the canary ever runs it."""
    campaign = FlowerFederation.campaign

    def poisoned(self: FlowerFederation, devices: Any, start: Any, **kw: Any) -> Any:
        outcome = campaign(self, devices, start, **kw)
        if kw["tick"] != 3:
            return outcome
        # The output layer's sign flipped: it predicts the other class on every row.
        weights = {k: v.copy() for k, v in outcome.weights.items()}
        last = max(k for k in weights if k.endswith("weight"))
        weights[last] *= -1
        weights[last.replace("weight", "bias")] *= -1
        rounds = tuple(dataclasses.replace(r, eval_acc=0.99, champion_acc=0.5) for r in outcome.rounds)
        return dataclasses.replace(outcome, weights=weights, rounds=rounds)

    monkeypatch.setattr(FlowerFederation, "campaign", poisoned)
    overrides = [*_overrides(tmp_path), "trigger.period=3", "rollout.hold_ticks=2"]
    summary, crossed = run_captured(overrides, tmp_path / "run")
    bad = next(c["version"] for c in summary["campaigns"] if c["tick"] == 3)
    steps = [(e["payload"]["step"], e["payload"]["version"]) for e in _events(summary, tmp_path / "run")]
    assert ("canary", bad) in steps and ("rollback", bad) in steps and ("complete", bad) not in steps
    aliases = {int(x["version"]): x["aliases"] for x in summary["versions"]}
    assert "champion" not in aliases[bad], "the champion alias never moved to it"
    assert summary["champion"] != bad
    ran = _versions_run(crossed)
    exposed = {d for per in ran.values() for d, w in per.items() if w == bad}
    assert len(exposed) == 1, f"only the canary cohort ran v{bad}: {exposed}"
    last = max(ran)
    assert all(w != bad for w in ran[last].values()), "the canary got the champion back"
