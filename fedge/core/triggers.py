"""Trigger policies: given one tick of drift reports, should a campaign start?

Each policy is a small class with one method, :meth:`TriggerPolicy.decide`.
``quorum`` is the product's default; ``periodic``, ``always`` and ``never`` are
the baselines benchmarks compare against. Every policy also answers "yes" when
there is no model yet (the initial campaign).

The quorum counts the drift signals ``signals`` names (``label``, ``label-free``
or ``either``, see :data:`fedge.contracts.protocol.DRIFT_SIGNALS`), and its
accuracy floor starts a campaign for a model that is poor without drifting;
every decision says which signals fired on which devices.

>>> from fedge.contracts.protocol import DriftReport
>>> def report(device, drift):
...     return DriftReport(device, 5, 1, 100, 3, drift, int(drift), int(drift), 100)
>>> policy = DriftQuorum(quorum=0.5, cooldown=2)
>>> policy.decide(5, [report(0, True), report(1, False)], has_model=True, last_campaign=1)
Decision(retrain=True, reason='drift quorum: 1/2 devices (>= 1; label 1)', drifted=(0,), signals={'label': (0,)}, counted=(0,))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedge.contracts.protocol import DRIFT_SIGNALS, LABEL_FREE_SIGNALS, DriftReport
from fedge.core.records import fired_signals

#: ``trigger.signals`` -> the report signals that count toward the quorum.
SIGNAL_SETS: dict[str, tuple[str, ...]] = {
    "label": ("label",),
    "label-free": LABEL_FREE_SIGNALS,
    "either": DRIFT_SIGNALS,
}
ACCURACY_SOURCES = ("measured", "estimated", "either")
#: The pseudo-signal of a campaign the accuracy floor started.
FLOOR = "accuracy-floor"


@dataclass(frozen=True)
class Decision:
    """A trigger decision, the reason it gives and the evidence it rests on.

    ``signals`` maps each drift signal that fired (``label``, ``input``,
    ``prediction``, or ``accuracy-floor``) to the devices it fired on.
    ``drifted`` are the devices whose detectors fired at this tick; ``counted``
    the devices the quorum counted (with ``trigger.memory`` above 1 also those
    that fired in the ticks before, after the last campaign).
    """

    retrain: bool
    reason: str
    drifted: tuple[int, ...] = ()
    signals: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    counted: tuple[int, ...] = ()


#: Device -> drift signal -> the last tick it fired on (see :class:`DriftMemory`).
Recent = Mapping[int, Mapping[str, int]]


class DriftMemory:
    """The last tick each device's drift signals fired: what a quorum with memory counts.

    Detectors of devices that drift at different ticks fire at different
    ticks; a quorum over one tick's firings then never forms although most
    devices are in drift. With ``trigger.memory = m`` the quorum counts every
    device whose detector fired within the last ``m`` ticks and after the
    cluster's last campaign.

    >>> from fedge.contracts.protocol import DriftReport
    >>> memory = DriftMemory()
    >>> memory.update(3, [DriftReport(1, 3, 1, 100, 40, True, 1, 1, 100)])
    >>> memory.saved()
    {'1': {'label': 3}}
    """

    def __init__(self, saved: Mapping[str, Mapping[str, int]] | None = None) -> None:
        self.last: dict[int, dict[str, int]] = {
            int(d): {str(k): int(t) for k, t in per.items()} for d, per in (saved or {}).items()
        }

    def update(self, tick: int, reports: Sequence[DriftReport]) -> None:
        """Remember the signals that fired at ``tick``."""
        for name, devices in fired_signals(reports).items():
            for device in devices:
                self.last.setdefault(device, {})[name] = tick

    def saved(self) -> dict[str, dict[str, int]]:
        """JSON-ready (kept in the run's state, so a restart remembers)."""
        return {str(d): dict(per) for d, per in sorted(self.last.items())}


class TriggerPolicy(Protocol):
    """Decides at each monitoring tick whether to start a retraining campaign."""

    def decide(
        self,
        tick: int,
        reports: Sequence[DriftReport],
        *,
        has_model: bool,
        last_campaign: int | None,
        recent: Recent | None = None,
    ) -> Decision:
        """Decide for ``tick`` given the devices' ``reports`` (and the signals of earlier ticks)."""
        ...


def _drifted(reports: Sequence[DriftReport], counted: Sequence[str] = DRIFT_SIGNALS) -> tuple[int, ...]:
    return tuple(sorted(r.device for r in reports if set(r.signals) & set(counted)))


def group_accuracy(reports: Sequence[DriftReport], source: str = "either") -> float | None:
    """A model's accuracy over its reporting devices, sample-weighted.

    ``measured`` is the prequential accuracy of labelled rows; ``estimated`` the
    devices' confidence-based estimates; ``either`` takes each device's measured
    accuracy where it has labelled rows and its estimate where it has none.
    """
    total = weight = 0.0
    for r in reports:
        # A measured accuracy weighs by the labels it rests on, an estimate by the rows.
        value, n = None, r.scored
        if source in ("measured", "either"):
            value = r.accuracy
        if value is None and source in ("estimated", "either"):
            value, n = r.estimate, r.n_samples
        if value is not None and n:
            total += value * n
            weight += n
    return total / weight if weight else None


def _tally(signals: Mapping[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k} {len(v)}" for k, v in signals.items())


INITIAL = "initial: no model deployed yet"


@dataclass(frozen=True)
class DriftQuorum:
    """Retrain when enough devices report drift, then wait ``cooldown`` ticks.

    Parameters
    ----------
    quorum : float, default 0.3
        Below 1: the fraction of reporting devices that must report drift.
        From 1 up: the number of devices.
    cooldown : int, default 2
        Ticks after a campaign during which drift reports start no new one
        (the new model needs a few ticks of errors before its detector means anything).
    signals : {"either", "label", "label-free"}, default "either"
        Which drift flags count toward the quorum (see :data:`SIGNAL_SETS`).
    accuracy_floor : float, default 0.0
        Above 0: retrain (after the cooldown) when the model's accuracy over its
        reporting devices is below it, whatever the detectors say.
    accuracy_source : {"either", "measured", "estimated"}, default "either"
        The accuracy the floor reads (see :func:`group_accuracy`).
    memory : int, default 1
        Ticks a device's firing counts toward the quorum: 1, this tick only;
        ``m``, any of the last ``m`` ticks after the cluster's last campaign
        (see :class:`DriftMemory`).
    """

    quorum: float = 0.3
    cooldown: int = 2
    signals: str = "either"
    accuracy_floor: float = 0.0
    accuracy_source: str = "either"
    memory: int = 1

    def __post_init__(self) -> None:
        if self.signals not in SIGNAL_SETS:
            raise ValueError(
                f"trigger.signals: {self.signals!r} is not allowed; allowed: {', '.join(SIGNAL_SETS)}"
            )
        if self.accuracy_source not in ACCURACY_SOURCES:
            raise ValueError(
                f"trigger.accuracy_source: {self.accuracy_source!r} is not allowed; "
                f"allowed: {', '.join(ACCURACY_SOURCES)}"
            )

    def needed(self, n_reports: int) -> int:
        """Devices that must report drift out of ``n_reports``."""
        if self.quorum >= 1:
            return int(self.quorum)
        return max(1, math.ceil(self.quorum * n_reports - 1e-9))

    def decide(
        self,
        tick: int,
        reports: Sequence[DriftReport],
        *,
        has_model: bool,
        last_campaign: int | None,
        recent: Recent | None = None,
    ) -> Decision:
        counted = SIGNAL_SETS[self.signals]
        drifted = _drifted(reports, counted)
        signals = {k: v for k, v in fired_signals(reports).items() if k in counted}
        if not has_model:
            return Decision(True, INITIAL, drifted, signals, drifted)
        members = self._remembered(tick, reports, counted, last_campaign, recent) | set(drifted)
        inside = tuple(sorted(members))
        needed = self.needed(len(reports))
        floor = self._below_floor(reports)
        if floor is not None:
            signals = {**signals, FLOOR: tuple(sorted(r.device for r in reports))}
        span = f" within {self.memory} ticks" if self.memory > 1 else ""
        if len(inside) < needed and floor is None:
            return Decision(
                False,
                f"{len(inside)}/{len(reports)} devices in drift{span} (< {needed})",
                drifted,
                signals,
                inside,
            )
        if last_campaign is not None and tick - last_campaign <= self.cooldown:
            return Decision(
                False, f"cooldown: last campaign at tick {last_campaign}", drifted, signals, inside
            )
        if len(inside) < needed:
            return Decision(True, floor or "", drifted, signals, inside)
        tally = _tally({k: v for k, v in signals.items() if k != FLOOR})
        return Decision(
            True,
            f"drift quorum: {len(inside)}/{len(reports)} devices{span} (>= {needed}; {tally or 'earlier ticks'})",
            drifted,
            signals,
            inside,
        )

    def _remembered(
        self,
        tick: int,
        reports: Sequence[DriftReport],
        counted: Sequence[str],
        last_campaign: int | None,
        recent: Recent | None,
    ) -> set[int]:
        """Reporting devices whose counted signals fired in the memory span, after the last campaign."""
        if self.memory <= 1 or not recent:
            return set()
        after = last_campaign if last_campaign is not None else -1
        return {
            r.device
            for r in reports
            if any(
                name in counted and after < at and tick - at < self.memory
                for name, at in recent.get(r.device, {}).items()
            )
        }

    def _below_floor(self, reports: Sequence[DriftReport]) -> str | None:
        """The floor's reason when the model's accuracy is below it, else None."""
        if self.accuracy_floor <= 0:
            return None
        accuracy = group_accuracy(reports, self.accuracy_source)
        if accuracy is None or accuracy >= self.accuracy_floor:
            return None
        return (
            f"accuracy floor: {self.accuracy_source} accuracy {accuracy:.3f} "
            f"< {self.accuracy_floor:g} over {len(reports)} devices"
        )


@dataclass(frozen=True)
class Periodic:
    """Retrain every ``period`` ticks whatever the devices report."""

    period: int = 4

    def decide(
        self,
        tick: int,
        reports: Sequence[DriftReport],
        *,
        has_model: bool,
        last_campaign: int | None,
        recent: Recent | None = None,
    ) -> Decision:
        drifted = _drifted(reports)
        if not has_model:
            return Decision(True, INITIAL, drifted)
        since = tick - (last_campaign if last_campaign is not None else 0)
        if since >= self.period:
            return Decision(True, f"periodic: every {self.period} ticks", drifted)
        return Decision(False, f"periodic: {since}/{self.period} ticks", drifted)


@dataclass(frozen=True)
class Always:
    """Retrain at every tick."""

    def decide(
        self,
        tick: int,
        reports: Sequence[DriftReport],
        *,
        has_model: bool,
        last_campaign: int | None,
        recent: Recent | None = None,
    ) -> Decision:
        return Decision(True, INITIAL if not has_model else "always", _drifted(reports))


@dataclass(frozen=True)
class Never:
    """Train once when there is no model, never again."""

    def decide(
        self,
        tick: int,
        reports: Sequence[DriftReport],
        *,
        has_model: bool,
        last_campaign: int | None,
        recent: Recent | None = None,
    ) -> Decision:
        if not has_model:
            return Decision(True, INITIAL, _drifted(reports))
        return Decision(False, "never retrains", _drifted(reports))


def decide_clusters(
    policy: TriggerPolicy,
    tick: int,
    reports: Sequence[DriftReport],
    clusters: Mapping[int, Any],
    assignment: Mapping[int, int],
    recent: Recent | None = None,
) -> dict[int, Decision]:
    """The policy's verdict for every cluster with reporting members.

    ``clusters`` maps a key to the pool's cluster (its ``version`` and
    ``last_campaign``); ``assignment`` maps a device to its cluster's key.
    """
    by_cluster: dict[int, list[DriftReport]] = {}
    for r in reports:
        key = assignment.get(r.device)
        if key is not None and key in clusters:
            by_cluster.setdefault(key, []).append(r)
    return {
        key: policy.decide(
            tick,
            group,
            has_model=clusters[key].version > 0,
            last_campaign=clusters[key].last_campaign,
            recent=recent,
        )
        for key, group in sorted(by_cluster.items())
    }


def make_policy(
    name: str,
    *,
    quorum: float = 0.3,
    cooldown: int = 2,
    period: int = 4,
    signals: str = "either",
    accuracy_floor: float = 0.0,
    accuracy_source: str = "either",
    memory: int = 1,
) -> TriggerPolicy:
    """Policy by its config name (the evidence keys apply to ``quorum``)."""
    if name == "quorum":
        return DriftQuorum(quorum, cooldown, signals, accuracy_floor, accuracy_source, memory)
    if name == "periodic":
        return Periodic(period=period)
    if name == "always":
        return Always()
    if name == "never":
        return Never()
    raise ValueError(f"trigger.policy: {name!r} is not allowed; allowed: quorum, periodic, always, never")
