"""The monitor -> trigger -> campaign -> gate -> promote loop, without Flower or MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedge.contracts.protocol import DriftReport
from fedge.core.orchestrator import Orchestrator
from fedge.core.ports import CampaignOutcome, RoundMetrics
from fedge.core.records import drift_recoveries
from fedge.core.state import JsonState, state_path
from fedge.core.triggers import Always, DriftQuorum, Never, Periodic


class FakeFederation:
    """Devices whose drift flags and holdout accuracies follow a script."""

    def __init__(self, n: int, drift_at: dict[int, set[int]], candidate_acc: float = 0.9) -> None:
        self.n = n
        self.drift_at = drift_at
        self.candidate_acc = candidate_acc
        self.campaigns: list[tuple[int, tuple[int, ...]]] = []
        self.deployed: list[int] = []

    def poll(self, tick: int, deployment: Any, default: Any) -> list[DriftReport]:
        version = default.version if default else 0
        self.deployed.append(version)
        drifted = self.drift_at.get(tick, set())
        return [
            DriftReport(d, tick, version, 100, 10, d in drifted, int(d in drifted), 0, 100)
            for d in range(self.n)
        ]

    def campaign(
        self,
        devices: Sequence[int],
        start: Any,
        *,
        tick: int,
        rounds: int,
        first_round: int,
        lineage: str = "champion",
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

    def set_alias(self, version: int, alias: str) -> None:
        self.alias = version

    def load(self, alias: str) -> Any:
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
        "import sys; import fedge.core.orchestrator, fedge.core.pool, fedge.core.triggers, fedge.contracts.protocol,"
        " fedge.contracts.config;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('flwr', 'mlflow')];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


class Crash(Exception):
    """Stands for the server process dying."""


class MemoryState:
    def __init__(self) -> None:
        self.saved: dict[str, Any] | None = None
        self.saves = 0

    def load(self) -> dict[str, Any] | None:
        return None if self.saved is None else dict(self.saved)

    def save(self, state: Mapping[str, Any]) -> None:
        self.saved = json.loads(json.dumps(dict(state)))  # what a file would keep
        self.saves += 1


class LedgerRegistry:
    """A registry that lists its versions and serves the champion, as MLflow does."""

    def __init__(self) -> None:
        self.tags: list[dict[str, str]] = []
        self.weights: list[Any] = []
        self.alias = 0
        self.fail_promote_once = False

    def register(self, weights: Any, tags: Mapping[str, str]) -> int:
        self.weights.append(weights)
        self.tags.append(dict(tags))
        return len(self.tags)

    def set_alias(self, version: int, alias: str) -> None:
        if self.fail_promote_once:
            self.fail_promote_once = False
            raise Crash("died between registering and promoting")
        self.alias = version

    def load(self, alias: str) -> Any:
        return (self.alias, self.weights[self.alias - 1]) if self.alias else None

    def versions(self) -> list[dict[str, Any]]:
        return [{"version": i + 1, "tags": dict(t)} for i, t in enumerate(self.tags)]


class DyingFederation(FakeFederation):
    """Dies when polled for ``die_at`` (once)."""

    def __init__(self, *args: Any, die_at: int | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.die_at = die_at
        self.polled: list[int] = []
        self.first_rounds: list[int] = []

    def poll(self, tick: int, deployment: Any, default: Any) -> list[DriftReport]:
        if tick == self.die_at:
            self.die_at = None
            raise Crash(f"died at tick {tick}")
        self.polled.append(tick)
        return super().poll(tick, deployment, default)

    def campaign(self, devices: Sequence[int], start: Any, *, tick: int, rounds: int,
                 first_round: int, lineage: str = "champion") -> CampaignOutcome:
        self.first_rounds.append(first_round)
        return super().campaign(devices, start, tick=tick, rounds=rounds, first_round=first_round)


def _restartable(fed: FakeFederation, reg: LedgerRegistry, state: MemoryState,
                 run_id: str = "runs/a") -> Orchestrator:
    return Orchestrator(fed, reg, FakeTracker(), DriftQuorum(quorum=0.5, cooldown=3),
                        {"w": np.zeros(2)}, rounds=3, initial_rounds=5, state=state, run_id=run_id)


def test_restarted_orchestrator_continues_at_the_next_tick_with_its_counters() -> None:
    reg, state = LedgerRegistry(), MemoryState()
    drift = {4: {0, 1, 2}, 6: {0, 1, 2}, 8: {0, 1, 2}}
    first = DyingFederation(3, drift, die_at=6)
    try:
        _restartable(first, reg, state).run(range(10))
    except Crash:
        pass
    assert first.polled == [0, 1, 2, 3, 4, 5] and state.saved is not None
    assert state.saved["tick"] == 5 and state.saved["rounds_done"] == 8
    assert state.saved["last_campaign"] == 4 and not state.saved["finished"]

    again = DyingFederation(3, drift)
    orch = _restartable(again, reg, state)
    record = orch.run(range(10))
    assert again.polled == [6, 7, 8, 9], "continues at the next tick"
    assert record.resumed_at == 6 and record.resumed_from == 2
    # Drift at 6 is within the cooldown of the campaign at 4 (saved), the one at 8 is not.
    assert [c.tick for c in record.campaigns] == [8]
    assert again.first_rounds == [9], "round numbers continue after the 5 + 3 rounds before"
    assert orch.rounds_done == 11
    assert [v["fedge.trigger_tick"] for v in reg.tags] == ["0", "4", "8"]
    assert len({v["fedge.run_key"] for v in reg.tags}) == 1, "one run across the restart"
    assert state.saved["finished"] and state.saved["tick"] == 9


def test_campaign_registered_before_a_crash_is_adopted_not_registered_again() -> None:
    reg, state = LedgerRegistry(), MemoryState()
    drift = {4: {0, 1, 2}}
    first = DyingFederation(3, drift)
    reg_crash = _restartable(first, reg, state)
    reg.fail_promote_once = False
    orch_ticks = range(8)
    # Die after tick 4's version is registered but before it is promoted and saved.
    original = reg.register

    def register_then_arm(weights: Any, tags: Mapping[str, str]) -> int:
        version = original(weights, tags)
        reg.fail_promote_once = tags["fedge.trigger_tick"] == "4"
        return version

    reg.register = register_then_arm  # type: ignore[method-assign]
    try:
        reg_crash.run(orch_ticks)
    except Crash:
        pass
    reg.register = original  # type: ignore[method-assign]
    assert [v["fedge.trigger_tick"] for v in reg.tags] == ["0", "4"]
    assert reg.alias == 1 and state.saved is not None and state.saved["tick"] == 3

    again = DyingFederation(3, drift)
    orch = _restartable(again, reg, state)
    record = orch.run(orch_ticks)
    assert [v["fedge.trigger_tick"] for v in reg.tags] == ["0", "4"], "v2 not registered twice"
    assert reg.alias == 2, "the landed version's promotion is completed"
    assert record.recovered == [{"tick": 4, "version": 2}]
    assert again.polled == [5, 6, 7], "tick 4 finished with its campaign"
    assert orch.rounds_done == 8 and orch.last_campaign == 4
    assert again.deployed == [2, 2, 2], "the adopted champion is deployed"


def test_a_new_run_does_not_take_over_another_runs_state() -> None:
    reg, state = LedgerRegistry(), MemoryState()
    first = DyingFederation(3, {}, die_at=4)
    try:
        _restartable(first, reg, state, run_id="runs/a").run(range(6))
    except Crash:
        pass
    other = DyingFederation(3, {})
    record = _restartable(other, reg, state, run_id="runs/b").run(range(6))
    assert other.polled == list(range(6)) and record.resumed_at is None
    assert record.resumed_from == 1, "it still starts from the registry's champion"
    assert state.saved is not None and state.saved["run_id"] == "runs/b"


class LateFederation(FakeFederation):
    """Device 1 is unreachable for ticks 3-5 and delivers their reports at tick 6."""

    def __init__(self, late_drift_at: int) -> None:
        super().__init__(3, {})
        self.late_drift_at = late_drift_at
        self.tick = 0

    def poll(self, tick: int, deployment: Any, default: Any) -> list[DriftReport]:
        self.tick = tick
        reports = super().poll(tick, deployment, default)
        return [r for r in reports if not (r.device == 1 and 3 <= tick <= 5)]

    def late_reports(self) -> list[DriftReport]:
        if self.tick != 6:
            return []
        return [
            DriftReport(1, t, 1, 100, 60 if t >= self.late_drift_at else 5,
                        t == self.late_drift_at, int(t == self.late_drift_at), 1, 100)
            for t in (3, 4, 5)
        ]


def test_late_reports_are_logged_at_their_own_ticks_and_an_unanswered_drift_counts() -> None:
    fed = LateFederation(late_drift_at=4)
    orch, _, tr = _orchestrator(fed, DriftQuorum(quorum=1, cooldown=0))
    record = orch.run(range(8))
    assert [c.tick for c in record.campaigns] == [0, 6], "the drift of tick 4 starts a campaign"
    assert record.campaigns[1].devices == (0, 1, 2)
    assert [t.late_reports for t in record.ticks] == [0, 0, 0, 0, 0, 0, 3, 0]
    assert [t.drifted for t in record.ticks][6] == (1,)
    assert [(r.tick, r.arrived, r.devices) for r in record.late] == [
        (3, 6, (1,)), (4, 6, (1,)), (5, 6, (1,))
    ]
    assert record.late[0].accuracy == 0.95 and record.late[1].drifted == (1,)
    late_steps = [s for s, m in tr.metrics if "late/devices" in m]
    assert late_steps == [3, 4, 5]
    (event,) = [e for e in tr.events if e[0] == "late_reports"]
    assert event[1] == 6 and [r["tick"] for r in event[2]["reports"]] == [3, 4, 5]


def test_a_late_drift_already_answered_by_a_campaign_starts_none() -> None:
    fed = LateFederation(late_drift_at=4)
    fed.drift_at = {5: {0, 2}}  # the others drifted at 5 and were retrained then
    orch, _, _ = _orchestrator(fed, DriftQuorum(quorum=1, cooldown=0))
    record = orch.run(range(8))
    assert [c.tick for c in record.campaigns] == [0, 5]


def test_state_file_is_replaced_whole_and_a_damaged_one_is_moved_aside(tmp_path: Path) -> None:
    path = state_path(tmp_path, "fedge-sine2/sudden")
    assert path.parent == tmp_path / "state" and "/" not in path.name
    state = JsonState(path)
    assert state.load() is None
    state.save({"tick": 4, "rounds_done": 9})
    state.save({"tick": 5, "rounds_done": 9})
    assert state.load() == {"tick": 5, "rounds_done": 9}
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file is left"
    path.write_text('{"tick": 6, "rounds')  # torn by hand
    assert state.load() is None
    assert not path.exists() and len(list(path.parent.glob("*.corrupt-*"))) == 1
