"""Several models in service at once: one per cluster of devices, in plain Python.

When devices drift at different times to different concepts, one global model
cannot serve them all. The :class:`MultiModelOrchestrator` keeps a pool of
models (clusters), an assignment ``device -> cluster`` and, each tick:

1. polls every device with the model of its cluster (the device tests its new
   samples with it and reports drift),
2. asks a :class:`ClusterPolicy` for the next assignment, given the drift
   reports and, when the policy wants them, how well every model in the pool
   fits every device's latest samples,
3. trains every cluster with members on its own devices, all clusters in the
   same strategy rounds, and registers each cluster's new model as a version
   with its lineage (cluster, parent version, clusters merged into it).

Like :mod:`fedge.core.orchestrator` it knows Flower and MLflow only through ports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from fedge.core.orchestrator import (
    CampaignOutcome,
    CampaignRecord,
    RunRecord,
    TickRecord,
    Tracker,
    Weights,
    tick_accuracy,
)
from fedge.contracts.protocol import MAX_SCORED_MODELS, DriftReport

#: Device -> cluster -> fraction of the device's latest samples the cluster's model gets right.
Scores = dict[int, dict[int, float]]


@dataclass(frozen=True)
class ClusterView:
    """What a policy may know about one cluster of the pool.

    Parameters
    ----------
    key : int
        The cluster's id (stable for its lifetime).
    version : int
        Registry version of its current model (0 before the first campaign).
    devices : tuple of int
        Devices assigned to it now.
    created : int
        Tick the cluster was created.
    last_used : int
        Last tick it had members.
    """

    key: int
    version: int
    devices: tuple[int, ...]
    created: int
    last_used: int


@dataclass(frozen=True)
class ClusterPlan:
    """A policy's answer for one tick.

    Parameters
    ----------
    assignment : dict
        Device -> cluster key for every device that reported. Keys not in the
        pool are new clusters.
    start_from : dict
        New cluster key -> the existing cluster whose model it starts from, or
        None for fresh weights. Every new key in ``assignment`` needs an entry.
    merged : dict
        Cluster key -> clusters merged into it this tick (lineage only).
    retire : tuple of int
        Clusters dropped from the pool (they must have no devices).
    reasons : dict
        Device -> why it moved (for the event log).
    """

    assignment: dict[int, int]
    start_from: dict[int, int | None] = field(default_factory=dict)
    merged: dict[int, tuple[int, ...]] = field(default_factory=dict)
    retire: tuple[int, ...] = ()
    reasons: dict[int, str] = field(default_factory=dict)


class ClusterPolicy(Protocol):
    """Decides which cluster serves each device."""

    @property
    def needs_scores(self) -> bool:
        """Whether :meth:`plan` wants every model scored on every device's latest samples."""
        ...

    def plan(
        self,
        tick: int,
        reports: Sequence[DriftReport],
        clusters: Mapping[int, ClusterView],
        scores: Scores | None,
    ) -> ClusterPlan:
        """The assignment for ``tick`` (after its drift reports came in)."""
        ...


class MultiModelFederation(Protocol):
    """The devices, when several models are in service."""

    def poll_models(
        self, tick: int, deployment: Mapping[int, tuple[int, int, Weights]]
    ) -> list[DriftReport]:
        """Monitoring tick: deploy ``device -> (cluster, version, weights)`` where stale."""
        ...

    def score(self, tick: int, models: Mapping[int, Weights]) -> Scores:
        """Fraction of each device's latest samples each model gets right."""
        ...

    def campaign_clusters(
        self,
        groups: Mapping[int, tuple[Sequence[int], Weights]],
        *,
        tick: int,
        rounds: int,
        first_round: int,
    ) -> dict[int, CampaignOutcome]:
        """Train every ``cluster -> (devices, start weights)`` in the same rounds."""
        ...


class ClusterRegistry(Protocol):
    """Model versions and one alias per cluster."""

    def register(self, weights: Weights, tags: Mapping[str, str]) -> int:
        """Register a model version, return its number."""
        ...

    def set_alias(self, version: int, alias: str) -> None:
        """Point ``alias`` at ``version``."""
        ...


def cluster_alias(key: int) -> str:
    """Registry alias of the model serving cluster ``key``."""
    return f"cluster-{key}"


@dataclass
class _Cluster:
    key: int
    weights: Weights
    version: int
    created: int
    last_used: int
    devices: tuple[int, ...] = ()
    split_from: int | None = None
    origin_version: int = 0


@dataclass(frozen=True)
class ClusterTick:
    """The pool after one tick: who is served by which cluster."""

    tick: int
    assignment: dict[int, int]
    versions: dict[int, int]
    created: tuple[int, ...]
    merged: dict[int, tuple[int, ...]]
    retired: tuple[int, ...]


class MultiModelOrchestrator:
    """Runs the multi-model loop for ``ticks`` monitoring ticks.

    Parameters
    ----------
    federation : MultiModelFederation
        The devices.
    registry : ClusterRegistry
        Where every cluster model version is registered.
    tracker : Tracker
        Metrics and events.
    policy : ClusterPolicy
        Assigns devices to clusters.
    initial_weights : dict of ndarray
        Weights of a cluster started fresh.
    rounds : int, default 4
        Strategy rounds per tick in which clusters train.
    initial_rounds : int, default 8
        Strategy rounds of the first tick.
    strategy : str, default "fedavg"
        Name recorded in the lineage tags.
    on_tick : callable, optional
        Called with each :class:`TickRecord` and the tick's first campaign record.
    """

    def __init__(
        self,
        federation: MultiModelFederation,
        registry: ClusterRegistry,
        tracker: Tracker,
        policy: ClusterPolicy,
        initial_weights: Weights,
        *,
        rounds: int = 4,
        initial_rounds: int = 8,
        strategy: str = "fedavg",
        on_tick: Callable[[TickRecord, CampaignRecord | None], None] | None = None,
    ) -> None:
        self.federation = federation
        self.registry = registry
        self.tracker = tracker
        self.policy = policy
        self.initial_weights = initial_weights
        self.rounds = rounds
        self.initial_rounds = initial_rounds
        self.strategy = strategy
        self.on_tick = on_tick
        self.record = RunRecord()
        self.clusters: dict[int, _Cluster] = {}
        self.assignment: dict[int, int] = {}
        self.history: list[ClusterTick] = []
        self.rounds_done = 0
        self.model_rounds = 0

    def run(self, ticks: Sequence[int]) -> RunRecord:
        """Run the given monitoring ticks and return the record."""
        for tick in ticks:
            self.step(tick)
        return self.record

    def _views(self) -> dict[int, ClusterView]:
        return {
            k: ClusterView(k, c.version, c.devices, c.created, c.last_used)
            for k, c in self.clusters.items()
        }

    def step(self, tick: int) -> TickRecord:
        """One tick: poll with each device's model, re-plan the clusters, train them."""
        deployment = {
            d: (k, self.clusters[k].version, self.clusters[k].weights)
            for d, k in self.assignment.items()
            if k in self.clusters and self.clusters[k].version > 0
        }
        reports = self.federation.poll_models(tick, deployment)
        drifted = tuple(sorted(r.device for r in reports if r.drift))
        scores = None
        trained = [k for k, c in self.clusters.items() if c.version > 0]
        if self.policy.needs_scores and trained:
            # The most recently used models fit in one scoring message.
            recent = sorted(trained, key=lambda k: -self.clusters[k].last_used)[:MAX_SCORED_MODELS]
            scores = self.federation.score(tick, {k: self.clusters[k].weights for k in recent})
        plan = self.policy.plan(tick, reports, self._views(), scores)
        created = self._apply(tick, plan)
        acc = tick_accuracy(reports)
        rec = TickRecord(
            tick=tick,
            accuracy=acc,
            drift_fraction=len(drifted) / len(reports) if reports else 0.0,
            drifted=drifted,
            rejected=sum(r.rejected for r in reports),
            n_samples=sum(r.n_samples for r in reports),
            champion=0,
        )
        self.record.ticks.append(rec)
        metrics = {
            "drift_fraction": rec.drift_fraction,
            "rejected_rows": float(rec.rejected),
            "devices_reporting": float(len(reports)),
            "models_in_service": float(len({k for k in self.assignment.values()})),
            "models_in_pool": float(len(self.clusters)),
        }
        if acc is not None:
            metrics["prequential_accuracy"] = acc
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
        campaigns = self._train(tick, reports, plan, created) if reports else []
        self.history.append(
            ClusterTick(
                tick=tick,
                assignment=dict(self.assignment),
                versions={k: c.version for k, c in self.clusters.items()},
                created=created,
                merged=dict(plan.merged),
                retired=plan.retire,
            )
        )
        if self.on_tick is not None:
            self.on_tick(rec, campaigns[0] if campaigns else None)
        return rec

    def _apply(self, tick: int, plan: ClusterPlan) -> tuple[int, ...]:
        created = []
        for key in sorted(set(plan.assignment.values()) - set(self.clusters)):
            source = plan.start_from.get(key)
            parent = self.clusters.get(source) if source is not None else None
            start = parent.weights if parent is not None else self.initial_weights
            self.clusters[key] = _Cluster(
                key,
                dict(start),
                0,
                tick,
                tick,
                split_from=source if parent is not None else None,
                origin_version=parent.version if parent is not None else 0,
            )
            created.append(key)
        self.assignment = dict(plan.assignment)
        members: dict[int, list[int]] = {}
        for device, key in sorted(self.assignment.items()):
            members.setdefault(key, []).append(device)
        for key, cluster in self.clusters.items():
            cluster.devices = tuple(members.get(key, ()))
            if cluster.devices:
                cluster.last_used = tick
        for key in plan.retire:
            if key in self.clusters and not self.clusters[key].devices:
                del self.clusters[key]
        return tuple(created)

    def _train(
        self, tick: int, reports: Sequence[DriftReport], plan: ClusterPlan, created: tuple[int, ...]
    ) -> list[CampaignRecord]:
        groups = {
            k: (c.devices, c.weights) for k, c in sorted(self.clusters.items()) if c.devices
        }
        if not groups:
            return []
        rounds = self.initial_rounds if tick == 0 or not self.record.campaigns else self.rounds
        outcomes = self.federation.campaign_clusters(
            groups, tick=tick, rounds=rounds, first_round=self.rounds_done + 1
        )
        self.rounds_done += rounds
        records = []
        drifted = {r.device for r in reports if r.drift}
        for key, outcome in sorted(outcomes.items()):
            cluster = self.clusters[key]
            self.model_rounds += len(outcome.rounds)
            for rm in outcome.rounds:
                self.tracker.log_metrics(
                    {f"cluster-{key}/eval_acc": rm.eval_acc, f"cluster-{key}/train_loss": rm.train_loss},
                    step=rm.round,
                )
            parent = cluster.version or cluster.origin_version
            if key in created:
                source = plan.start_from.get(key)
                reason = "new cluster" + (f" from cluster {source}" if source is not None else "")
                if tick == 0 or not self.record.campaigns:
                    reason = "initial: no model deployed yet"
            else:
                reason = "cluster retraining"
            tags = {
                "fedge.cluster": str(key),
                "fedge.parent_version": str(parent) if parent else "none",
                "fedge.merged_clusters": ",".join(str(m) for m in plan.merged.get(key, ())),
                "fedge.split_from": "" if cluster.split_from is None else str(cluster.split_from),
                "fedge.trigger_reason": reason,
                "fedge.trigger_tick": str(tick),
                "fedge.campaign_rounds": str(len(outcome.rounds)),
                "fedge.participating_devices": str(outcome.n_devices),
                "fedge.devices": ",".join(str(d) for d in cluster.devices),
                "fedge.drifted_devices": ",".join(str(d) for d in cluster.devices if d in drifted),
                "fedge.strategy": self.strategy,
                "fedge.candidate_acc": f"{outcome.candidate_acc:.4f}",
                "fedge.champion_acc": f"{outcome.champion_acc:.4f}",
                "fedge.promoted": "true",
            }
            version = self.registry.register(outcome.weights, tags)
            self.registry.set_alias(version, cluster_alias(key))
            cluster.weights = outcome.weights
            cluster.version = version
            record = CampaignRecord(
                tick=tick,
                reason=f"{reason} (cluster {key})",
                devices=cluster.devices,
                version=version,
                parent=parent,
                promoted=True,
                candidate_acc=outcome.candidate_acc,
                champion_acc=outcome.champion_acc,
                rounds=len(outcome.rounds),
            )
            self.record.campaigns.append(record)
            self.tracker.log_event("campaign", tick, {**asdict(record), "cluster": key})
            records.append(record)
        return records


def summarize_history(history: Sequence[ClusterTick]) -> list[dict[str, Any]]:
    """JSON-ready view of the pool over time."""
    return [
        {
            "tick": h.tick,
            "assignment": {str(d): k for d, k in sorted(h.assignment.items())},
            "versions": {str(k): v for k, v in sorted(h.versions.items())},
            "created": list(h.created),
            "merged": {str(k): list(v) for k, v in h.merged.items()},
            "retired": list(h.retired),
        }
        for h in history
    ]
