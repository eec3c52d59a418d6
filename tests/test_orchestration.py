"""The monitor -> trigger -> campaign -> gate -> promote loop, without Flower or MLflow."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedge.orchestrator import CampaignOutcome, Orchestrator, RoundMetrics, drift_recoveries
from fedge.protocol import DriftReport
from fedge.triggers import Always, DriftQuorum, Never, Periodic


class FakeFederation:
    """Devices whose drift flags and holdout accuracies follow a script."""

    def __init__(self, n: int, drift_at: dict[int, set[int]], candidate_acc: float = 0.9) -> None:
        self.n = n
        self.drift_at = drift_at
        self.candidate_acc = candidate_acc
        self.campaigns: list[tuple[int, tuple[int, ...]]] = []
        self.deployed: list[int] = []

    def poll(self, tick: int, champion: Any) -> list[DriftReport]:
        self.deployed.append(champion[0] if champion else 0)
        drifted = self.drift_at.get(tick, set())
        version = champion[0] if champion else 0
        return [
            DriftReport(d, tick, version, 100, 10, d in drifted, int(d in drifted), 0, 100)
            for d in range(self.n)
        ]

    def campaign(
        self, devices: Sequence[int], start: Any, *, tick: int, rounds: int, first_round: int
    ) -> CampaignOutcome:
        self.campaigns.append((tick, tuple(devices)))
        metrics = tuple(
            RoundMetrics(first_round + r, 0.5, self.candidate_acc, 0.3, 0.6, len(devices))
            for r in range(rounds)
        )
        return CampaignOutcome({"w": np.full(2, float(tick))}, metrics, len(devices))


class FakeRegistry:
    def __init__(self) -> None:
        self.versions: list[Mapping[str, str]] = []
        self.alias = 0

    def register(self, weights: Any, tags: Mapping[str, str]) -> int:
        self.versions.append(dict(tags))
        return len(self.versions)

    def promote(self, version: int) -> None:
        self.alias = version

    def champion(self) -> Any:
        return None


class FakeTracker:
    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.events: list[tuple[str, int, Mapping[str, Any]]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_event(self, kind: str, tick: int, payload: Mapping[str, Any]) -> None:
        self.events.append((kind, tick, payload))


def _orchestrator(fed: FakeFederation, policy: Any, **kw: Any) -> tuple[Orchestrator, FakeRegistry, FakeTracker]:
    reg, tr = FakeRegistry(), FakeTracker()
    orch = Orchestrator(fed, reg, tr, policy, {"w": np.zeros(2)}, rounds=3, initial_rounds=5, **kw)
    return orch, reg, tr


def test_quorum_starts_campaign_only_when_enough_devices_drift() -> None:
    fed = FakeFederation(10, {4: {1, 2}, 7: {1, 2, 3, 4}})
    orch, _, tr = _orchestrator(fed, DriftQuorum(quorum=0.3, cooldown=1))
    record = orch.run(range(10))
    assert [c.tick for c in record.campaigns] == [0, 7]
    assert record.campaigns[1].reason.startswith("drift quorum: 4/10")
    triggers = [e for e in tr.events if e[0] == "drift_trigger"]
    assert [t for _, t, _ in triggers] == [0, 7]
    assert len(triggers[1][2]["reports"]) == 10


def test_cooldown_suppresses_back_to_back_campaigns() -> None:
    drifting = {t: {0, 1, 2, 3} for t in range(3, 9)}
    fed = FakeFederation(4, drifting)
    orch, _, _ = _orchestrator(fed, DriftQuorum(quorum=0.5, cooldown=2))
    record = orch.run(range(9))
    assert [c.tick for c in record.campaigns] == [0, 3, 6]


def test_drifted_participants_train_only_drifted_devices() -> None:
    fed = FakeFederation(6, {5: {2, 4}})
    orch, _, _ = _orchestrator(fed, DriftQuorum(quorum=2), participants="drifted")
    orch.run(range(7))
    assert fed.campaigns == [(0, (0, 1, 2, 3, 4, 5)), (5, (2, 4))]


def test_gate_promotes_only_a_better_candidate_and_champion_is_deployed_next_poll() -> None:
    fed = FakeFederation(3, {3: {0, 1, 2}}, candidate_acc=0.5)  # worse than champion 0.6
    orch, reg, _ = _orchestrator(fed, DriftQuorum(quorum=0.5))
    record = orch.run(range(6))
    assert [c.promoted for c in record.campaigns] == [True, False]
    assert reg.alias == 1
    assert [v["fedge.promoted"] for v in reg.versions] == ["true", "false"]
    assert reg.versions[1]["fedge.parent_version"] == "1"
    assert fed.deployed == [0, 1, 1, 1, 1, 1]


def test_lineage_tags_describe_the_campaign() -> None:
    fed = FakeFederation(4, {3: {0, 1, 2, 3}})
    orch, reg, _ = _orchestrator(fed, DriftQuorum(quorum=0.5), strategy="fedprox")
    orch.run(range(5))
    tags = reg.versions[1]
    assert tags["fedge.parent_version"] == "1"
    assert tags["fedge.trigger_tick"] == "3"
    assert tags["fedge.campaign_rounds"] == "3"
    assert tags["fedge.participating_devices"] == "4"
    assert tags["fedge.strategy"] == "fedprox"
    assert tags["fedge.trigger_reason"].startswith("drift quorum")
    assert reg.versions[0]["fedge.parent_version"] == "none"
    assert reg.versions[0]["fedge.campaign_rounds"] == "5"


def test_baseline_policies() -> None:
    for policy, expected in [
        (Never(), [0]),
        (Always(), [0, 1, 2, 3, 4, 5]),
        (Periodic(period=2), [0, 2, 4]),
    ]:
        fed = FakeFederation(2, {3: {0, 1}})
        orch, _, _ = _orchestrator(fed, policy)
        assert [c.tick for c in orch.run(range(6)).campaigns] == expected, policy


def test_per_tick_and_per_round_metrics_are_logged() -> None:
    fed = FakeFederation(2, {})
    orch, _, tr = _orchestrator(fed, Never())
    orch.run(range(3))
    ticks = [s for s, m in tr.metrics if "drift_fraction" in m]
    rounds = [s for s, m in tr.metrics if "round/train_loss" in m]
    assert ticks == [0, 1, 2]
    assert rounds == [1, 2, 3, 4, 5]
    assert any("prequential_accuracy" in m for _, m in tr.metrics)


def test_recoveries_read_accuracy_around_each_drift() -> None:
    fed = FakeFederation(2, {4: {0, 1}})
    orch, _, _ = _orchestrator(fed, DriftQuorum(quorum=1))
    record = orch.run(range(7))
    (rec,) = drift_recoveries(record, [4])
    assert rec.retrained_at == 4
    assert rec.before == record.accuracy(3)
    assert rec.after_retraining == record.accuracy(5)


def test_core_imports_neither_flower_nor_mlflow() -> None:
    code = (
        "import sys; import fedge.orchestrator, fedge.multimodel, fedge.triggers, fedge.protocol,"
        " fedge.config;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('flwr', 'mlflow')];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
