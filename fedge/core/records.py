"""What a run did, tick by tick: the records summaries, plots and tests read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fedge.contracts.protocol import DRIFT_SIGNALS, DriftReport


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
    #: The cluster (model lineage) the campaign trained; 0 for a single model.
    cluster: int = 0
    #: The evidence the trigger rested on: drift signals (``label``, ``input``,
    #: ``prediction``) and ``accuracy-floor``; empty for the initial or a periodic one.
    signals: tuple[str, ...] = ()
    #: Devices left out because they held fewer than ``campaign.min_labels`` labelled samples.
    too_few_labels: tuple[int, ...] = ()
    #: Labelled holdout samples the gate's last evaluation rested on (-1: not known).
    gate_labels: int = -1


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
    #: Each drift signal that fired this tick and the devices it fired on.
    signals: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: Sample-weighted confidence-based accuracy estimate of the devices that made one.
    estimated_accuracy: float | None = None
    #: Labels ``accuracy`` rests on, those that came late for this tick's samples included.
    n_scored: int = 0
    #: Of those, the labels that came at a later tick (see :func:`with_late_labels`).
    late_labels: int = 0


def with_late_labels(rec: TickRecord, labels: int, errors: int) -> TickRecord:
    """``rec`` with late labels of its own samples folded into its prequential accuracy.

    Each late label was scored on the device against the prediction the model deployed
    when its sample arrived made, so the tick's accuracy becomes what it would have been
    had the label come with its sample.
    """
    scored = rec.n_scored + labels
    if labels <= 0 or scored <= 0:
        return rec
    right = (rec.accuracy or 0.0) * rec.n_scored + (labels - errors)
    return replace(rec, accuracy=right / scored, n_scored=scored, late_labels=rec.late_labels + labels)


@dataclass(frozen=True)
class LateRecord:
    """Reports of one tick that arrived at a later tick."""

    tick: int
    arrived: int
    devices: tuple[int, ...]
    accuracy: float | None
    drifted: tuple[int, ...]


@dataclass(frozen=True)
class ClusterTick:
    """The pool after one tick: who is served by which cluster."""

    tick: int
    assignment: dict[int, int]
    versions: dict[int, int]
    created: tuple[int, ...]
    merged: dict[int, tuple[int, ...]]
    retired: tuple[int, ...]


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
    #: The pool after every tick this process ran.
    history: list[ClusterTick] = field(default_factory=list)
    #: Ticks where the champion on standby led and served again (:mod:`fedge.core.standby`).
    rollbacks: list[dict[str, Any]] = field(default_factory=list)

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
            "rollbacks": list(self.rollbacks),
        }


def tick_accuracy(reports: Sequence[DriftReport]) -> float | None:
    """Prequential accuracy over the scored labels of the devices that had a model."""
    scored = [r for r in reports if r.accuracy is not None]
    n = sum(r.scored for r in scored)
    if n == 0:
        return None
    return 1.0 - sum(r.n_errors for r in scored) / n


def tick_estimated_accuracy(reports: Sequence[DriftReport]) -> float | None:
    """Sample-weighted confidence-based accuracy estimate over the devices that made one."""
    scored = [r for r in reports if r.estimate is not None and r.n_samples]
    n = sum(r.n_samples for r in scored)
    if n == 0:
        return None
    return sum(r.estimated_accuracy * r.n_samples for r in scored) / n


def fired_signals(reports: Sequence[DriftReport]) -> dict[str, tuple[int, ...]]:
    """Each drift signal that fired in ``reports`` and the devices it fired on."""
    out: dict[str, tuple[int, ...]] = {}
    for name in DRIFT_SIGNALS:
        devices = tuple(sorted(r.device for r in reports if name in r.signals))
        if devices:
            out[name] = devices
    return out


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
