"""monitor -> trigger -> campaign -> gate -> promote, in plain Python.

The :class:`Orchestrator` drives one run tick by tick over a pool of models:
one cluster when a single global model serves every device
(:class:`fedge.core.pool.OneModel`), several when a clustering policy splits
the devices. Each tick it

1. polls every device with its cluster's model (the device tests its new
   samples with it and reports drift),
2. asks the cluster policy for the next assignment (with, when the policy
   wants them, the scores of every model on every device's latest samples),
3. asks the trigger policy, per cluster, whether that cluster retrains, and
   runs a campaign for each that does, over the cluster's devices, through the
   same :class:`fedge.core.ports.Federation` call (so every strategy, privacy
   setting and quorum rule applies to one cluster as to many),
4. gates every candidate against the model its devices run and moves the
   cluster's alias when it wins.

Faults it survives:

- **A restart.** With a :class:`StateStore` the orchestrator saves its counters
  and the pool (without weights: those are in the registry under each
  cluster's alias) after every tick. Restarted on the same run with
  ``resume``, it continues at the next tick; a campaign whose model version
  landed in the registry before the crash (found by the run's
  ``fedge.run_key`` tag) is adopted, never registered again.
- **Late reports.** A device that was unreachable delivers the reports of the
  ticks it missed when it returns (store and forward). They are logged as late
  reports of their own ticks, and a drift among them that no campaign has
  answered yet counts for the device at the tick they arrive.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

from fedge.contracts.protocol import MAX_SCORED_MODELS, DriftReport
from fedge.core.gate import gate_margin, promotes
from fedge.core.pool import (
    CHAMPION_ALIAS,
    Cluster,
    ClusterPlan,
    ClusterPolicy,
    OneModel,
    cluster_alias,
)
from fedge.core.ports import (
    CampaignOutcome,
    CampaignRefused,
    Deployed,
    Federation,
    Registry,
    StateStore,
    Tracker,
    Weights,
)
from fedge.core.records import (
    CampaignRecord,
    ClusterTick,
    LateRecord,
    RunRecord,
    TickRecord,
    fired_signals,
    tick_accuracy,
    tick_estimated_accuracy,
    with_late_labels,
)
from fedge.core.resume import RUN_KEY_TAG, restore, snapshot
from fedge.core.rollout import Rollout, RolloutPolicy, advance_rollout, begin_rollout
from fedge.core.standby import Standby, keep_standby, watch_standby
from fedge.core.triggers import INITIAL, Decision, DriftMemory, TriggerPolicy, decide_clusters

log = logging.getLogger("fedge.server")


TickCallback = Callable[[TickRecord, CampaignRecord | None], None]


class Orchestrator:
    """Runs the loop for ``ticks`` monitoring ticks.

    Parameters
    ----------
    federation, registry, tracker
        The ports of :mod:`fedge.core.ports`.
    policy : TriggerPolicy
        Decides, per cluster, when a campaign starts.
    initial_weights : dict of ndarray
        Starting point of a cluster that starts fresh.
    clusters : ClusterPolicy, optional
        Which cluster serves each device; default :class:`OneModel` (one
        global model under the ``champion`` alias). Any other policy keeps one
        alias per cluster (``cluster-<key>``).
    rounds : int, default 4
        Strategy rounds per retraining campaign.
    initial_rounds : int, default 8
        Strategy rounds of a campaign from fresh weights.
    participants : {"all", "drifted"}, default "all"
        Which of a cluster's devices train; "drifted" falls back to all of them
        when none reported drift (initial and periodic campaigns).
    min_improvement : float, default 0.0
        A candidate is promoted only if its federated accuracy exceeds that of
        the model its devices run by more than this.
    gate_z : float, default 0.0
        ... and by more than this many standard errors of the paired accuracy
        difference on the holdout (:mod:`fedge.core.gate`).
    strategy : str, default "fedavg"
        Name recorded in the lineage tags.
    resume : bool, default True
        Start from the registry's champion when there is one (one model), and
        continue an interrupted run of the same ``run_id`` from ``state``.
    warm_start : bool, default True
        Retraining campaigns start from the cluster's weights (True) or from
        the seeded initial weights (False: the old concept is forgotten at once).
    on_tick : callable, optional
        Called with each :class:`TickRecord` and the tick's first campaign.
    state : StateStore, optional
        Saved after every tick.
    run_id : str, default ""
        What identifies this run across restarts (the run folder).
    rollout : RolloutPolicy, optional
        Roll a promoted model out in stages (:mod:`fedge.core.rollout`; one model
        only); None gives it to every device at the next poll.
    standby_z : float, default 0.0
        Above 0 (one model, no staged rollout): the champion a promotion replaces
        stays on standby and serves again when it leads by this many standard
        errors on the devices' newest samples (:mod:`fedge.core.standby`).
    """

    def __init__(
        self,
        federation: Federation,
        registry: Registry,
        tracker: Tracker,
        policy: TriggerPolicy,
        initial_weights: Weights,
        *,
        clusters: ClusterPolicy | None = None,
        rounds: int = 4,
        initial_rounds: int = 8,
        participants: str = "all",
        min_improvement: float = 0.0,
        gate_z: float = 0.0,
        strategy: str = "fedavg",
        resume: bool = True,
        warm_start: bool = True,
        on_tick: TickCallback | None = None,
        state: StateStore | None = None,
        run_id: str = "",
        rollout: RolloutPolicy | None = None,
        standby_z: float = 0.0,
    ) -> None:
        if participants not in ("all", "drifted"):
            raise ValueError(f"campaign.participants: {participants!r}; allowed: all, drifted")
        self.federation = federation
        self.registry = registry
        self.tracker = tracker
        self.policy = policy
        self.initial_weights = initial_weights
        self.cluster_policy: ClusterPolicy = clusters if clusters is not None else OneModel()
        self.single = isinstance(self.cluster_policy, OneModel)
        self.rounds = rounds
        self.initial_rounds = initial_rounds
        self.participants = participants
        self.min_improvement = min_improvement
        self.gate_z = gate_z
        self.strategy = strategy
        self.resume = resume
        self.warm_start = warm_start
        self.on_tick = on_tick
        self.state = state
        self.run_id = run_id
        self.record = RunRecord()
        self.pool: dict[int, Cluster] = {}
        self.assignment: dict[int, int] = {}
        #: Round slots used: campaigns of one tick run on disjoint devices, so they share them.
        self.rounds_done = 0
        #: Rounds summed over every model trained.
        self.model_rounds = 0
        self.last_refusal = ""
        self.run_key = uuid.uuid4().hex
        self.last_tick: int | None = None
        self.last_registered = 0
        self.drift_memory = DriftMemory()
        if rollout is not None and not self.single:
            raise ValueError("rollout: a staged rollout serves one model, not clusters")
        self.rollout_policy = rollout
        self.rollout: Rollout | None = None
        self.standby_z = standby_z
        self.standby: Standby | None = None

    # -- the pool ------------------------------------------------------------------------------
    def alias(self, key: int) -> str:
        """Registry alias of cluster ``key``'s model."""
        return CHAMPION_ALIAS if self.single else cluster_alias(key)

    @property
    def champion(self) -> tuple[int, Weights] | None:
        """The single model in service (version, weights), if there is exactly one."""
        trained = [c for c in self.pool.values() if c.version > 0]
        if len(self.pool) == 1 and trained:
            return trained[0].version, trained[0].weights
        return None

    @property
    def last_campaign(self) -> int | None:
        """Tick of the latest campaign of any cluster (None before the first)."""
        ticks = [c.last_campaign for c in self.pool.values() if c.last_campaign is not None]
        return max(ticks) if ticks else None

    def _champion_version(self) -> int:
        champ = self.champion
        return champ[0] if champ is not None and self.single else 0

    # -- running -------------------------------------------------------------------------------
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
        if self.resume and self.single and not self.pool:
            found = self.registry.load(CHAMPION_ALIAS)
            if found is not None:  # a champion of an earlier run serves from the start
                version, weights = found
                self.pool[0] = Cluster(0, weights, version, -1, -1)
                self.record.resumed_from = version
                self.record.champion = version
        for tick in todo:
            self.step(tick)
        self._save(finished=True)
        table, log_dict = getattr(self.federation, "fleet_table", None), getattr(self.tracker, "log_dict", None)
        if callable(table) and callable(log_dict):
            log_dict(table(), "fleet.json")  # the fleet table as the run ends
        return self.record

    def step(self, tick: int) -> TickRecord:
        """One tick: poll, re-plan the pool, decide per cluster, run campaigns and the gate."""
        deployment = {
            d: Deployed(k, self.pool[k].version, self.pool[k].weights)
            for d, k in self.assignment.items()
            if k in self.pool and self.pool[k].version > 0
        }
        champ = self.champion
        default = Deployed(next(iter(self.pool)), champ[0], champ[1]) if champ else None
        if self.rollout is not None:
            deployment.update(self.rollout.deployment())  # the cohort runs the version in trial
        reports = self.federation.poll(tick, deployment, default)
        late = self._late_reports()
        if late:
            self._record_late(tick, late)
        current = self._current_state(reports, late)
        plan = self._plan(tick, current)
        created = self._apply(tick, plan)
        self.drift_memory.update(tick, current)
        decisions = decide_clusters(
            self.policy, tick, current, self.pool, self.assignment, self.drift_memory.last
        )
        drifted = tuple(sorted({d for dec in decisions.values() for d in dec.drifted}))
        acc = tick_accuracy(reports)
        rec = TickRecord(
            tick=tick,
            accuracy=acc,
            drift_fraction=len(drifted) / len(reports) if reports else 0.0,
            drifted=drifted,
            rejected=sum(r.rejected for r in reports),
            n_samples=sum(r.n_samples for r in reports),
            champion=self._champion_version(),
            late_reports=len(late),
            signals=fired_signals(reports),
            estimated_accuracy=tick_estimated_accuracy(reports),
            n_scored=sum(r.scored for r in reports if r.accuracy is not None),
        )
        self.record.ticks.append(rec)
        self._fold_late_labels()
        metrics = {
            "drift_fraction": rec.drift_fraction,
            "rejected_rows": float(rec.rejected),
            "devices_reporting": float(len(reports)),
            "champion_version": float(rec.champion),
            "late_reports": float(len(late)),
        }
        if not self.single:
            metrics["models_in_service"] = float(len(set(self.assignment.values())))
            metrics["models_in_pool"] = float(len(self.pool))
        if acc is not None:
            metrics["prequential_accuracy"] = acc
        counts = getattr(self.federation, "fleet_counts", None)
        if callable(counts):
            metrics.update({f"fleet/{status}": float(n) for status, n in counts().items()})
        if self.rollout is not None:
            advance_rollout(self, tick, reports)
        if rec.estimated_accuracy is not None:
            metrics["estimated_accuracy"] = rec.estimated_accuracy
        self.tracker.log_metrics(metrics, step=tick)
        if plan.reasons:
            self.tracker.log_event(
                "cluster_change",
                tick,
                {
                    "moves": {str(d): r for d, r in plan.reasons.items()},
                    "created": list(created),
                    "merged": {str(k): list(v) for k, v in plan.merged.items()},
                    "retired": list(plan.retire),
                },
            )
        if self.standby is not None:
            watch_standby(self, tick)
        campaigns, refusals = self._campaigns(tick, decisions, current, plan, created)
        if refusals:
            rec = replace(rec, refused="; ".join(refusals))
            self.record.ticks[-1] = rec
        self.record.history.append(
            ClusterTick(
                tick=tick,
                assignment=dict(self.assignment),
                versions={k: c.version for k, c in self.pool.items()},
                created=created,
                merged=dict(plan.merged),
                retired=plan.retire,
            )
        )
        self.last_tick = tick
        self._save()
        if self.on_tick is not None:
            self.on_tick(rec, campaigns[0] if campaigns else None)
        return rec

    def _plan(self, tick: int, reports: Sequence[DriftReport]) -> ClusterPlan:
        scores = None
        trained = [k for k, c in self.pool.items() if c.version > 0]
        if self.cluster_policy.needs_scores and trained:
            # The most recently used models fit in one scoring message.
            recent = sorted(trained, key=lambda k: -self.pool[k].last_used)[:MAX_SCORED_MODELS]
            scores = self.federation.score(tick, {k: self.pool[k].weights for k in recent})
        views = {k: c.view() for k, c in self.pool.items()}
        return self.cluster_policy.plan(tick, reports, views, scores)

    def _apply(self, tick: int, plan: ClusterPlan) -> tuple[int, ...]:
        created = []
        for key in sorted(set(plan.assignment.values()) - set(self.pool)):
            source = plan.start_from.get(key)
            parent = self.pool.get(source) if source is not None else None
            start = parent.weights if parent is not None else self.initial_weights
            self.pool[key] = Cluster(
                key,
                dict(start),
                0,
                tick,
                tick,
                split_from=source if parent is not None else None,
                origin_version=parent.version if parent is not None else 0,
            )
            created.append(key)
        if self.single:
            # One model: a device that did not report this tick stays on it.
            self.assignment.update(plan.assignment)
        else:
            self.assignment = dict(plan.assignment)
        members: dict[int, list[int]] = {}
        for device, key in sorted(self.assignment.items()):
            members.setdefault(key, []).append(device)
        for key, cluster in self.pool.items():
            cluster.devices = tuple(members.get(key, ()))
            if cluster.devices:
                cluster.last_used = tick
        for key in plan.retire:
            if key in self.pool and not self.pool[key].devices:
                del self.pool[key]
        return tuple(created)

    # -- campaigns -----------------------------------------------------------------------------
    def _campaigns(
        self,
        tick: int,
        decisions: Mapping[int, Decision],
        reports: Sequence[DriftReport],
        plan: ClusterPlan,
        created: tuple[int, ...],
    ) -> tuple[list[CampaignRecord], list[str]]:
        records: list[CampaignRecord] = []
        refusals: list[str] = []
        first_round = self.rounds_done + 1
        used = 0
        for key, decision in decisions.items():
            if not decision.retrain or self.rollout is not None:
                continue  # one version in trial at a time
            try:
                record = self._campaign(tick, key, decision, reports, plan, created, first_round)
            except CampaignRefused as exc:
                reason = str(exc) if self.single else f"cluster {key}: {exc}"
                self._refused(tick, decision, reason)
                refusals.append(reason)
                continue
            records.append(record)
            used = max(used, record.rounds)
        self.rounds_done += used
        return records, refusals

    def _campaign(
        self,
        tick: int,
        key: int,
        decision: Decision,
        reports: Sequence[DriftReport],
        plan: ClusterPlan,
        created: tuple[int, ...],
        first_round: int,
    ) -> CampaignRecord:
        cluster = self.pool[key]
        members = cluster.devices
        reporting = {r.device for r in reports}
        everyone = tuple(d for d in members if d in reporting)
        devices = decision.counted if self.participants == "drifted" and decision.counted else everyone
        reason = self._reason(tick, key, decision, plan, created)
        self.tracker.log_event(
            "drift_trigger",
            tick,
            {
                "reason": reason,
                "cluster": key,
                "devices": list(devices),
                "signals": {k: list(v) for k, v in decision.signals.items()},
                "reports": [r.to_dict() for r in reports if r.device in members],
            },
        )
        parent = cluster.version or cluster.origin_version
        trained_before = cluster.version > 0 or cluster.origin_version > 0
        if cluster.version > 0 and not self.warm_start:
            start = self.initial_weights
        else:
            start = cluster.weights
        rounds = self.rounds if trained_before else self.initial_rounds
        outcome = self.federation.campaign(
            devices,
            start,
            tick=tick,
            rounds=rounds,
            first_round=first_round,
            lineage=self.alias(key),
        )
        self._log_rounds(key, outcome)
        self.model_rounds += len(outcome.rounds)
        promoted = self._gate(cluster, outcome)
        tags = {
            "fedge.parent_version": str(parent) if parent else "none",
            "fedge.trigger_reason": reason,
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
        if not self.single:
            tags.update(
                {
                    "fedge.cluster": str(key),
                    "fedge.merged_clusters": ",".join(str(m) for m in plan.merged.get(key, ())),
                    "fedge.split_from": "" if cluster.split_from is None else str(cluster.split_from),
                    "fedge.drifted_devices": ",".join(str(d) for d in decision.drifted),
                }
            )
        if outcome.metrics:
            self.tracker.log_metrics(dict(outcome.metrics), step=tick)
        version = self.registry.register(outcome.weights, tags)
        self.last_registered = version
        if promoted and self.rollout_policy is not None and cluster.version > 0:
            begin_rollout(self, tick, key, version, outcome.weights)
        elif promoted:
            keep_standby(self, cluster.version, cluster.weights)
            self.registry.set_alias(version, self.alias(key))
            cluster.weights = outcome.weights
            cluster.version = version
            if self.single:
                self.record.champion = version
        cluster.last_campaign = tick
        record = CampaignRecord(
            tick=tick,
            reason=reason if self.single else f"{reason} (cluster {key})",
            devices=tuple(devices),
            version=version,
            parent=parent,
            promoted=promoted,
            candidate_acc=outcome.candidate_acc,
            champion_acc=outcome.champion_acc,
            rounds=len(outcome.rounds),
            cluster=key,
            signals=tuple(decision.signals),
            too_few_labels=tuple(outcome.too_few_labels),
            gate_labels=outcome.gate_labels,
        )
        self.record.campaigns.append(record)
        self.tracker.log_event("campaign", tick, asdict(record))
        return record

    def _reason(
        self, tick: int, key: int, decision: Decision, plan: ClusterPlan, created: tuple[int, ...]
    ) -> str:
        if key in created and not self.single:
            source = plan.start_from.get(key)
            if source is None and not self.record.campaigns:
                return INITIAL
            return "new cluster" + (f" from cluster {source}" if source is not None else "")
        return decision.reason

    def _log_rounds(self, key: int, outcome: CampaignOutcome) -> None:
        for rm in outcome.rounds:
            if self.single:
                metrics = {
                    "round/train_loss": rm.train_loss,
                    "round/eval_acc": rm.eval_acc,
                    "round/eval_loss": rm.eval_loss,
                    "round/champion_acc": rm.champion_acc,
                    "round/devices": float(rm.n_devices),
                }
            else:
                metrics = {
                    f"cluster-{key}/eval_acc": rm.eval_acc,
                    f"cluster-{key}/train_loss": rm.train_loss,
                    f"cluster-{key}/devices": float(rm.n_devices),
                }
            self.tracker.log_metrics(metrics, step=rm.round)

    def _gate(self, cluster: Cluster, outcome: CampaignOutcome) -> bool:
        """Promote a cluster's first model; later ones only when they beat the current one."""
        if cluster.version == 0:
            return True
        cand, champ = outcome.candidate_acc, outcome.champion_acc
        if math.isnan(cand):
            return False
        if math.isnan(champ):
            return True
        margin = gate_margin(cand, champ, outcome.discordant, outcome.gate_labels, self.gate_z)
        return promotes(cand, champ, self.min_improvement, margin)

    def _refused(self, tick: int, decision: Decision, reason: str) -> None:
        """Record a campaign the federation declined; said once per distinct reason."""
        self.record.refused.append({"tick": tick, "reason": reason})
        self.tracker.log_event("campaign_refused", tick, {"reason": reason, "trigger": decision.reason})
        if reason != self.last_refusal:
            log.warning("tick %d: no campaign: %s", tick, reason)
            self.last_refusal = reason

    def _fold_late_labels(self) -> None:
        """Late labels raise or lower the accuracy of the tick their samples arrived at."""
        take = getattr(self.federation, "late_labels", None)
        amended = take() if callable(take) else {}
        if not amended:
            return  # most ticks: nothing to look up
        at = {rec.tick: i for i, rec in enumerate(self.record.ticks) if rec.tick in amended}
        for t, (labels, errors) in amended.items():
            if t in at:
                rec = self.record.ticks[at[t]] = with_late_labels(self.record.ticks[at[t]], labels, errors)
                if rec.accuracy is not None:
                    self.tracker.log_metrics({"prequential_accuracy_with_late_labels": rec.accuracy}, step=t)

    # -- late reports --------------------------------------------------------------------------
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
        """Reports as the policies see them: a drift delivered late, not yet answered, counts."""
        unanswered = set()
        for r in late:
            key = self.assignment.get(r.device)
            cluster = self.pool.get(key) if key is not None else None
            since = -1 if cluster is None or cluster.last_campaign is None else cluster.last_campaign
            if r.drift and r.tick > since:
                unanswered.add(r.device)
        return [
            replace(r, drift=True) if r.device in unanswered and not r.drift else r for r in reports
        ]

    # -- persisted state -----------------------------------------------------------------------
    def snapshot(self, finished: bool = False) -> dict[str, Any]:
        """The counters and the pool a restarted orchestrator needs, JSON-ready."""
        return snapshot(self, finished)

    def _save(self, finished: bool = False) -> None:
        if self.state is not None:
            self.state.save(snapshot(self, finished))

    def _restore(self, ticks: list[int]) -> list[int]:
        """Continue an interrupted run from the saved state; returns the ticks left."""
        return restore(self, ticks)
