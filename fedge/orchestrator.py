"""monitor -> trigger -> campaign -> gate -> promote, in plain Python.

The :class:`Orchestrator` drives one run tick by tick. It knows the devices
only through a :class:`Federation` (Flower in production, anything in tests),
the model registry through a :class:`Registry` and metrics through a
:class:`Tracker`; it imports neither Flower nor MLflow.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from fedge.protocol import DriftReport
from fedge.triggers import Decision, TriggerPolicy

log = logging.getLogger("fedge.server")

Weights = dict[str, np.ndarray]


class CampaignRefused(RuntimeError):
    """A federation declines to start a campaign (e.g. the privacy budget is spent).

    The message is one line saying why; the orchestrator records it, registers
    nothing and keeps monitoring.
    """


@dataclass(frozen=True)
class RoundMetrics:
    """Aggregated metrics of one strategy round."""

    round: int
    train_loss: float
    eval_acc: float
    eval_loss: float
    champion_acc: float
    n_devices: int


@dataclass(frozen=True)
class CampaignOutcome:
    """What a federation returns after a campaign's strategy rounds."""

    weights: Weights
    rounds: tuple[RoundMetrics, ...]
    n_devices: int
    #: Extra lineage tags for the model version (e.g. aggregation and DP settings).
    tags: Mapping[str, str] = field(default_factory=dict)
    #: Extra run metrics logged at the campaign's tick (e.g. epsilon spent).
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def candidate_acc(self) -> float:
        """Federated accuracy of the final global model on the devices' holdout."""
        return self.rounds[-1].eval_acc if self.rounds else float("nan")

    @property
    def champion_acc(self) -> float:
        """Federated accuracy of the deployed champion on the same holdout."""
        return self.rounds[-1].champion_acc if self.rounds else float("nan")


class Federation(Protocol):
    """The devices, as the orchestrator sees them."""

    def poll(self, tick: int, champion: tuple[int, Weights] | None) -> list[DriftReport]:
        """Monitoring tick: deploy ``champion`` where stale, collect drift reports."""
        ...

    def campaign(
        self, devices: Sequence[int], start: Weights, *, tick: int, rounds: int, first_round: int
    ) -> CampaignOutcome:
        """Run ``rounds`` strategy rounds over ``devices`` starting from ``start``."""
        ...


class Registry(Protocol):
    """Model versions and the champion alias."""

    def register(self, weights: Weights, tags: Mapping[str, str]) -> int:
        """Register a model version, return its number."""
        ...

    def promote(self, version: int) -> None:
        """Move the champion alias to ``version``."""
        ...

    def champion(self) -> tuple[int, Weights] | None:
        """The current champion, if any."""
        ...


class Tracker(Protocol):
    """Metrics and events of the run."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at ``step``."""
        ...

    def log_event(self, kind: str, tick: int, payload: Mapping[str, Any]) -> None:
        """Record an event with its evidence."""
        ...


@dataclass(frozen=True)
class CampaignRecord:
    """One retraining campaign and the gate's verdict."""

    tick: int
    reason: str
    devices: tuple[int, ...]
    version: int
    parent: int
    promoted: bool
    candidate_acc: float
    champion_acc: float
    rounds: int


@dataclass(frozen=True)
class TickRecord:
    """One monitoring tick, summed over devices."""

    tick: int
    accuracy: float | None
    drift_fraction: float
    drifted: tuple[int, ...]
    rejected: int
    n_samples: int
    champion: int
    #: Why a triggered campaign did not start (e.g. the privacy budget), else empty.
    refused: str = ""


@dataclass
class RunRecord:
    """Everything a run did, for summaries and tests."""

    ticks: list[TickRecord] = field(default_factory=list)
    campaigns: list[CampaignRecord] = field(default_factory=list)
    champion: int = 0
    resumed_from: int = 0
    refused: list[dict[str, Any]] = field(default_factory=list)

    def accuracy(self, tick: int) -> float | None:
        """Prequential accuracy at ``tick`` (None before any model)."""
        for rec in self.ticks:
            if rec.tick == tick:
                return rec.accuracy
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return {
            "ticks": [asdict(t) for t in self.ticks],
            "campaigns": [asdict(c) for c in self.campaigns],
            "champion": self.champion,
            "resumed_from": self.resumed_from,
            "refused": list(self.refused),
        }


def tick_accuracy(reports: Sequence[DriftReport]) -> float | None:
    """Sample-weighted prequential accuracy over the devices that had a model."""
    scored = [r for r in reports if r.accuracy is not None]
    n = sum(r.n_samples for r in scored)
    if n == 0:
        return None
    return 1.0 - sum(r.n_errors for r in scored) / n


class Orchestrator:
    """Runs the loop for ``ticks`` monitoring ticks.

    Parameters
    ----------
    federation, registry, tracker
        The ports described above.
    policy : TriggerPolicy
        Decides when a campaign starts.
    initial_weights : dict of ndarray
        Starting point of the first campaign when the registry has no champion.
    rounds : int
        Strategy rounds per retraining campaign.
    initial_rounds : int
        Strategy rounds of the first campaign (from scratch).
    participants : {"all", "drifted"}
        Which devices train in a campaign; "drifted" falls back to all devices
        when none reported drift (initial and periodic campaigns).
    min_improvement : float
        The candidate is promoted only if its federated accuracy exceeds the
        champion's by more than this.
    strategy : str
        Name recorded in the lineage tags.
    resume : bool
        Start from the registry's champion when there is one.
    warm_start : bool
        Retraining campaigns start from the champion's weights (True) or from
        the seeded initial weights (False: the old concept is forgotten at once).
    on_tick : callable, optional
        Called with each :class:`TickRecord` (progress display).
    """

    def __init__(
        self,
        federation: Federation,
        registry: Registry,
        tracker: Tracker,
        policy: TriggerPolicy,
        initial_weights: Weights,
        *,
        rounds: int = 4,
        initial_rounds: int = 8,
        participants: str = "all",
        min_improvement: float = 0.0,
        strategy: str = "fedavg",
        resume: bool = True,
        warm_start: bool = True,
        on_tick: Callable[[TickRecord, CampaignRecord | None], None] | None = None,
    ) -> None:
        if participants not in ("all", "drifted"):
            raise ValueError(f"campaign.participants: {participants!r}; allowed: all, drifted")
        self.federation = federation
        self.registry = registry
        self.tracker = tracker
        self.policy = policy
        self.initial_weights = initial_weights
        self.rounds = rounds
        self.initial_rounds = initial_rounds
        self.participants = participants
        self.min_improvement = min_improvement
        self.strategy = strategy
        self.resume = resume
        self.warm_start = warm_start
        self.on_tick = on_tick
        self.record = RunRecord()
        self.champion: tuple[int, Weights] | None = None
        self.last_campaign: int | None = None
        self.rounds_done = 0
        self.last_refusal = ""

    def run(self, ticks: Sequence[int]) -> RunRecord:
        """Run the given monitoring ticks and return the record."""
        if self.resume and self.champion is None:
            self.champion = self.registry.champion()
            if self.champion is not None:
                self.record.resumed_from = self.champion[0]
                self.record.champion = self.champion[0]
        for tick in ticks:
            self.step(tick)
        return self.record

    def step(self, tick: int) -> TickRecord:
        """One tick: poll, decide, maybe run a campaign and the gate."""
        reports = self.federation.poll(tick, self.champion)
        decision = self.policy.decide(
            tick, reports, has_model=self.champion is not None, last_campaign=self.last_campaign
        )
        acc = tick_accuracy(reports)
        rec = TickRecord(
            tick=tick,
            accuracy=acc,
            drift_fraction=len(decision.drifted) / len(reports) if reports else 0.0,
            drifted=decision.drifted,
            rejected=sum(r.rejected for r in reports),
            n_samples=sum(r.n_samples for r in reports),
            champion=self.champion[0] if self.champion else 0,
        )
        self.record.ticks.append(rec)
        metrics = {
            "drift_fraction": rec.drift_fraction,
            "rejected_rows": float(rec.rejected),
            "devices_reporting": float(len(reports)),
            "champion_version": float(rec.champion),
        }
        if acc is not None:
            metrics["prequential_accuracy"] = acc
        self.tracker.log_metrics(metrics, step=tick)
        campaign = None
        if decision.retrain and reports:
            try:
                campaign = self._campaign(tick, decision, reports)
            except CampaignRefused as exc:
                self._refused(tick, decision, str(exc))
                rec = replace(rec, refused=str(exc))
                self.record.ticks[-1] = rec
        if self.on_tick is not None:
            self.on_tick(rec, campaign)
        return rec

    def _campaign(
        self, tick: int, decision: Decision, reports: Sequence[DriftReport]
    ) -> CampaignRecord:
        everyone = tuple(sorted(r.device for r in reports))
        devices = decision.drifted if self.participants == "drifted" and decision.drifted else everyone
        self.tracker.log_event(
            "drift_trigger",
            tick,
            {
                "reason": decision.reason,
                "devices": list(devices),
                "reports": [r.to_dict() for r in reports],
            },
        )
        parent = self.champion[0] if self.champion else 0
        start = self.champion[1] if self.champion and self.warm_start else self.initial_weights
        rounds = self.rounds if self.champion else self.initial_rounds
        outcome = self.federation.campaign(
            devices, start, tick=tick, rounds=rounds, first_round=self.rounds_done + 1
        )
        for rm in outcome.rounds:
            self.tracker.log_metrics(
                {
                    "round/train_loss": rm.train_loss,
                    "round/eval_acc": rm.eval_acc,
                    "round/eval_loss": rm.eval_loss,
                    "round/champion_acc": rm.champion_acc,
                    "round/devices": float(rm.n_devices),
                },
                step=rm.round,
            )
        self.rounds_done += len(outcome.rounds)
        promoted = self._gate(outcome)
        tags = {
            "fedge.parent_version": str(parent) if parent else "none",
            "fedge.trigger_reason": decision.reason,
            "fedge.trigger_tick": str(tick),
            "fedge.campaign_rounds": str(len(outcome.rounds)),
            "fedge.participating_devices": str(outcome.n_devices),
            "fedge.devices": ",".join(str(d) for d in devices),
            "fedge.strategy": self.strategy,
            "fedge.candidate_acc": f"{outcome.candidate_acc:.4f}",
            "fedge.champion_acc": f"{outcome.champion_acc:.4f}",
            "fedge.promoted": str(promoted).lower(),
            **outcome.tags,
        }
        if outcome.metrics:
            self.tracker.log_metrics(dict(outcome.metrics), step=tick)
        version = self.registry.register(outcome.weights, tags)
        if promoted:
            self.registry.promote(version)
            self.champion = (version, outcome.weights)
            self.record.champion = version
        self.last_campaign = tick
        record = CampaignRecord(
            tick=tick,
            reason=decision.reason,
            devices=devices,
            version=version,
            parent=parent,
            promoted=promoted,
            candidate_acc=outcome.candidate_acc,
            champion_acc=outcome.champion_acc,
            rounds=len(outcome.rounds),
        )
        self.record.campaigns.append(record)
        self.tracker.log_event("campaign", tick, asdict(record))
        return record

    def _refused(self, tick: int, decision: Decision, reason: str) -> None:
        """Record a campaign the federation declined; said once per distinct reason."""
        self.record.refused.append({"tick": tick, "reason": reason})
        self.tracker.log_event("campaign_refused", tick, {"reason": reason, "trigger": decision.reason})
        if reason != self.last_refusal:
            log.warning("tick %d: no campaign: %s", tick, reason)
            self.last_refusal = reason

    def _gate(self, outcome: CampaignOutcome) -> bool:
        if self.champion is None:
            return True
        cand, champ = outcome.candidate_acc, outcome.champion_acc
        if math.isnan(cand):
            return False
        if math.isnan(champ):
            return True
        return cand > champ + self.min_improvement


@dataclass(frozen=True)
class DriftRecovery:
    """Accuracy around one scheduled drift."""

    step: int
    before: float | None
    right_after: float | None
    after_retraining: float | None
    retrained_at: int | None


def drift_recoveries(record: RunRecord, drift_steps: Sequence[int]) -> list[DriftRecovery]:
    """Accuracy before, right after and after the retraining of each drift.

    "After retraining" is the accuracy at the tick following the first promoted
    campaign at or after the drift (the tick that model is deployed in).
    """
    out = []
    for step in drift_steps:
        promoted = [c.tick for c in record.campaigns if c.promoted and c.tick >= step]
        retrained_at = promoted[0] if promoted else None
        next_drift = min((s for s in drift_steps if s > step), default=None)
        after = None
        if retrained_at is not None and (next_drift is None or retrained_at + 1 < next_drift):
            after = record.accuracy(retrained_at + 1)
        out.append(
            DriftRecovery(
                step=step,
                before=record.accuracy(step - 1),
                right_after=record.accuracy(step),
                after_retraining=after,
                retrained_at=retrained_at,
            )
        )
    return out
