"""The pool of models in service: clusters of devices, and the policies that form them.

A single global model is a pool of one cluster (:class:`OneModel`); with
``clustering.enabled`` a :class:`fedge.core.clustering.DriftClustering` splits,
moves and merges clusters as the devices' data drift apart. The orchestrator
runs the same loop over either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fedge.contracts.protocol import DriftReport
from fedge.core.ports import Scores, Weights

#: Registry alias of the model serving the whole fleet when there is one model.
CHAMPION_ALIAS = "champion"


def cluster_alias(key: int) -> str:
    """Registry alias of the model serving cluster ``key`` (several models in service)."""
    return f"cluster-{key}"


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


@dataclass(frozen=True)
class OneModel:
    """One global model for every device: the pool is a single cluster, key 0.

    >>> OneModel().plan(0, [], {}, None).assignment
    {}
    """

    @property
    def needs_scores(self) -> bool:
        """One model needs no scoring of alternatives."""
        return False

    def plan(
        self,
        tick: int,
        reports: Sequence[DriftReport],
        clusters: Mapping[int, ClusterView],
        scores: Scores | None,
    ) -> ClusterPlan:
        """Every reporting device on cluster 0 (created fresh the first time)."""
        start: dict[int, int | None] = {} if 0 in clusters else {0: None}
        return ClusterPlan({r.device: 0 for r in reports}, start_from=start if reports else {})


@dataclass
class Cluster:
    """One model line in the pool (mutable state the orchestrator keeps)."""

    key: int
    weights: Weights
    version: int
    created: int
    last_used: int
    devices: tuple[int, ...] = ()
    split_from: int | None = None
    origin_version: int = 0
    last_campaign: int | None = None

    def view(self) -> ClusterView:
        """The read-only view a policy gets."""
        return ClusterView(self.key, self.version, self.devices, self.created, self.last_used)

    def saved(self) -> dict[str, object]:
        """JSON-ready state without weights (they live in the registry)."""
        return {
            "key": self.key,
            "version": self.version,
            "created": self.created,
            "last_used": self.last_used,
            "devices": list(self.devices),
            "split_from": self.split_from,
            "origin_version": self.origin_version,
            "last_campaign": self.last_campaign,
        }
