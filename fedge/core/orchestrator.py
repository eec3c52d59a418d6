"""monitor -> trigger -> campaign -> gate -> promote, in plain Python.

The :class:`Orchestrator` drives one run tick by tick. It knows the devices
only through a :class:`Federation` (Flower in production, anything in tests),
the model registry through a :class:`Registry` and metrics through a
:class:`Tracker`; it imports neither Flower nor MLflow.

Faults it survives:

- **A restart.** With a :class:`StateStore` the orchestrator saves its counters
  after every tick (last tick, rounds, last campaign, champion, last registered
  version). Restarted on the same run with ``resume``, it continues at the next
  tick; a campaign whose model version landed in the registry before the crash
  (found by the run's ``fedge.run_key`` tag) is adopted, never registered again.
- **Late reports.** A device that was unreachable delivers the reports of the
  ticks it missed when it returns (store and forward, see
  :mod:`fedge.contracts.protocol`). They are logged as late reports of their own ticks,
  and a drift among them that no campaign has answered yet counts for the
  device at the tick they arrive.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from fedge.contracts.protocol import DriftReport
from fedge.core.triggers import Decision, TriggerPolicy

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


class StateStore(Protocol):
    """Where the orchestrator keeps its counters between restarts (e.g. a JSON file)."""

    def load(self) -> Mapping[str, Any] | None:
        """The saved state, or None when there is none."""
        ...

    def save(self, state: Mapping[str, Any]) -> None:
        """Replace the saved state at once (a crash leaves the old or the new one)."""
        ...


#: Version tag naming the run (across restarts) a model version was registered by.
RUN_KEY_TAG = "fedge.run_key"
STATE_FORMAT = 1


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
    #: Reports of earlier ticks that arrived with this tick's poll (store and forward).
    late_reports: int = 0


@dataclass(frozen=True)
class LateRecord:
    """Reports of one tick that arrived at a later tick."""

    tick: int
    arrived: int
    devices: tuple[int, ...]
    accuracy: float | None
    drifted: tuple[int, ...]


@dataclass
class RunRecord:
    """Everything a run did, for summaries and tests."""

    ticks: list[TickRecord] = field(default_factory=list)
    campaigns: list[CampaignRecord] = field(default_factory=list)
    champion: int = 0
    resumed_from: int = 0
    refused: list[dict[str, Any]] = field(default_factory=list)
    late: list[LateRecord] = field(default_factory=list)
    #: First tick this process ran when it resumed an interrupted run, else None.
    resumed_at: int | None = None
    #: Campaigns whose version landed before a restart and were adopted, not rerun.
    recovered: list[dict[str, Any]] = field(default_factory=list)

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
            "late": [asdict(r) for r in self.late],
            "resumed_at": self.resumed_at,
            "recovered": list(self.recovered),
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
    state : StateStore, optional
        Saved after every tick; with ``resume``, an unfinished run of the same
        ``run_id`` continues from it.
    run_id : str, default ""
        What identifies this run across restarts (the run folder).
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
        state: StateStore | None = None,
        run_id: str = "",
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
        self.state = state
        self.run_id = run_id
        self.run_key = uuid.uuid4().hex
        self.last_tick: int | None = None
        self.last_registered = 0

    def run(self, ticks: Sequence[int]) -> RunRecord:
        """Run the given monitoring ticks and return the record.

        An interrupted run of the same ``run_id`` (see ``state``) continues after
        the last tick it finished.
        """
        try:
            todo = self._restore(list(ticks))
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("saved orchestrator state is unreadable (%s); starting this run afresh", exc)
            todo = list(ticks)
        # Saved before the first tick: a version registered before the first
        # tick completes is then recognised as this run's after a crash.
        self._save()
        if self.resume and self.champion is None:
            self.champion = self.registry.champion()
            if self.champion is not None:
                self.record.resumed_from = self.champion[0]
                self.record.champion = self.champion[0]
        for tick in todo:
            self.step(tick)
        self._save(finished=True)
        return self.record

    # -- persisted state ---------------------------------------------------------------------
    def snapshot(self, finished: bool = False) -> dict[str, Any]:
        """The counters a restarted orchestrator needs, JSON-ready."""
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "run_id": self.run_id,
            "run_key": self.run_key,
            "tick": self.last_tick,
            "finished": finished,
            "rounds_done": self.rounds_done,
            "last_campaign": self.last_campaign,
            "champion": self.champion[0] if self.champion else 0,
            "last_registered": self.last_registered,
            "policy": repr(self.policy),
        }
        checkpoint = getattr(self.federation, "checkpoint", None)
        if callable(checkpoint):
            state["federation"] = checkpoint()
        return state

    def _save(self, finished: bool = False) -> None:
        if self.state is not None:
            self.state.save(self.snapshot(finished))

    def _restore(self, ticks: list[int]) -> list[int]:
        """Continue an interrupted run from the saved state; returns the ticks left."""
        saved = self.state.load() if self.state is not None and self.resume else None
        if not saved:
            return ticks
        if saved.get("format") != STATE_FORMAT or saved.get("finished", True):
            return ticks
        if saved.get("run_id") != self.run_id:
            log.info(
                "the last run of this model (%s) stopped after tick %s; this is a new run",
                saved.get("run_id"),
                saved.get("tick"),
            )
            return ticks
        self.run_key = str(saved["run_key"])
        self.rounds_done = int(saved.get("rounds_done", 0))
        last = saved.get("last_campaign")
        self.last_campaign = None if last is None else int(last)
        self.last_registered = int(saved.get("last_registered", 0))
        done = saved.get("tick")
        restore = getattr(self.federation, "restore", None)
        if callable(restore) and isinstance(saved.get("federation"), Mapping):
            restore(saved["federation"])
        done = self._adopt_landed(-1 if done is None else int(done))
        self.last_tick = done if done >= 0 else None
        left = [t for t in ticks if t > done]
        self.record.resumed_at = left[0] if left else None
        log.info(
            "resuming the run after tick %d: %d rounds done, last campaign at tick %s, "
            "last registered version %d",
            done,
            self.rounds_done,
            self.last_campaign,
            self.last_registered,
        )
        self.tracker.log_event(
            "resumed",
            done + 1,
            {
                "after_tick": done,
                "rounds_done": self.rounds_done,
                "last_campaign": self.last_campaign,
                "last_registered": self.last_registered,
                "recovered": list(self.record.recovered),
            },
        )
        return left

    def _adopt_landed(self, done: int) -> int:
        """Adopt versions this run registered after its last saved tick (crash before the save).

        Returns the last finished tick: the tick of an adopted campaign is finished.
        """
        listing = getattr(self.registry, "versions", None)
        if not callable(listing):
            return done
        try:
            versions = list(listing())
        except Exception as exc:  # noqa: BLE001 - the registry may be unreachable right now
            log.warning(
                "cannot list the registry to find versions registered after tick %d (%s); "
                "continuing from the saved state",
                done,
                " ".join(str(exc).split())[:200],
            )
            return done
        landed = sorted(
            (int(v["version"]), dict(v.get("tags", {})))
            for v in versions
            if dict(v.get("tags", {})).get(RUN_KEY_TAG) == self.run_key
            and int(v["version"]) > self.last_registered
        )
        for version, tags in landed:
            tick = int(tags.get("fedge.trigger_tick", done))
            self.last_registered = version
            self.rounds_done += int(tags.get("fedge.campaign_rounds", 0))
            self.last_campaign = tick
            if tags.get("fedge.promoted") == "true":
                self.registry.promote(version)  # idempotent: the alias may have moved already
            done = max(done, tick)
            self.record.recovered.append({"tick": tick, "version": version})
            log.warning(
                "tick %d: campaign v%d was registered before the restart; adopted, not rerun",
                tick,
                version,
            )
        return done

    # -- late reports ------------------------------------------------------------------------
    def _late_reports(self) -> list[DriftReport]:
        take = getattr(self.federation, "late_reports", None)
        return list(take()) if callable(take) else []

    def _record_late(self, tick: int, late: Sequence[DriftReport]) -> None:
        """Log reports of earlier ticks as late arrivals of their own ticks."""
        by_tick: dict[int, list[DriftReport]] = {}
        for report in late:
            by_tick.setdefault(report.tick, []).append(report)
        for t, group in sorted(by_tick.items()):
            acc = tick_accuracy(group)
            rec = LateRecord(
                tick=t,
                arrived=tick,
                devices=tuple(sorted(r.device for r in group)),
                accuracy=acc,
                drifted=tuple(sorted(r.device for r in group if r.drift)),
            )
            self.record.late.append(rec)
            metrics = {
                "late/devices": float(len(group)),
                "late/drift_fraction": len(rec.drifted) / len(group),
            }
            if acc is not None:
                metrics["late/prequential_accuracy"] = acc
            self.tracker.log_metrics(metrics, step=t)
        self.tracker.log_event(
            "late_reports",
            tick,
            {"ticks": sorted(by_tick), "reports": [r.to_dict() for r in late]},
        )
        log.info(
            "tick %d: %d late report(s) of tick(s) %s from device(s) %s",
            tick,
            len(late),
            ", ".join(str(t) for t in sorted(by_tick)),
            ", ".join(str(d) for d in sorted({r.device for r in late})),
        )

    def _current_state(
        self, reports: Sequence[DriftReport], late: Sequence[DriftReport]
    ) -> list[DriftReport]:
        """Reports as the trigger sees them: a drift delivered late, not yet answered, counts."""
        since = -1 if self.last_campaign is None else self.last_campaign
        unanswered = {r.device for r in late if r.drift and r.tick > since}
        return [
            replace(r, drift=True) if r.device in unanswered and not r.drift else r for r in reports
        ]

    def step(self, tick: int) -> TickRecord:
        """One tick: poll, decide, maybe run a campaign and the gate."""
        reports = self.federation.poll(tick, self.champion)
        late = self._late_reports()
        if late:
            self._record_late(tick, late)
        decision = self.policy.decide(
            tick,
            self._current_state(reports, late),
            has_model=self.champion is not None,
            last_campaign=self.last_campaign,
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
            late_reports=len(late),
        )
        self.record.ticks.append(rec)
        metrics = {
            "drift_fraction": rec.drift_fraction,
            "rejected_rows": float(rec.rejected),
            "devices_reporting": float(len(reports)),
            "champion_version": float(rec.champion),
            "late_reports": float(len(late)),
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
        self.last_tick = tick
        self._save()
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
            RUN_KEY_TAG: self.run_key,
            **outcome.tags,
        }
        if outcome.metrics:
            self.tracker.log_metrics(dict(outcome.metrics), step=tick)
        version = self.registry.register(outcome.weights, tags)
        self.last_registered = version
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
