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
Decision(retrain=True, reason='drift quorum: 1/2 devices (>= 1; label 1)', drifted=(0,), signals={'label': (0,)})
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

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
    """

    retrain: bool
    reason: str
    drifted: tuple[int, ...] = ()
    signals: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


class TriggerPolicy(Protocol):
    """Decides at each monitoring tick whether to start a retraining campaign."""

    def decide(
        self,
        tick: int,
        reports: Sequence[DriftReport],
        *,
        has_model: bool,
        last_campaign: int | None,
    ) -> Decision:
        """Decide for ``tick`` given the devices' ``reports``."""
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
    """

    quorum: float = 0.3
    cooldown: int = 2
    signals: str = "either"
    accuracy_floor: float = 0.0
    accuracy_source: str = "either"

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
    ) -> Decision:
        counted = SIGNAL_SETS[self.signals]
        drifted = _drifted(reports, counted)
        signals = {k: v for k, v in fired_signals(reports).items() if k in counted}
        if not has_model:
            return Decision(True, INITIAL, drifted, signals)
        needed = self.needed(len(reports))
        floor = self._below_floor(reports)
        if floor is not None:
            signals = {**signals, FLOOR: tuple(sorted(r.device for r in reports))}
        if len(drifted) < needed and floor is None:
            return Decision(
                False, f"{len(drifted)}/{len(reports)} devices in drift (< {needed})", drifted, signals
            )
        if last_campaign is not None and tick - last_campaign <= self.cooldown:
            return Decision(False, f"cooldown: last campaign at tick {last_campaign}", drifted, signals)
        if len(drifted) < needed:
            return Decision(True, floor or "", drifted, signals)
        tally = _tally({k: v for k, v in signals.items() if k != FLOOR})
        return Decision(
            True,
            f"drift quorum: {len(drifted)}/{len(reports)} devices (>= {needed}; {tally})",
            drifted,
            signals,
        )

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
    ) -> Decision:
        if not has_model:
            return Decision(True, INITIAL, _drifted(reports))
        return Decision(False, "never retrains", _drifted(reports))


def make_policy(
    name: str,
    *,
    quorum: float = 0.3,
    cooldown: int = 2,
    period: int = 4,
    signals: str = "either",
    accuracy_floor: float = 0.0,
    accuracy_source: str = "either",
) -> TriggerPolicy:
    """Policy by its config name (the evidence keys apply to ``quorum``)."""
    if name == "quorum":
        return DriftQuorum(quorum, cooldown, signals, accuracy_floor, accuracy_source)
    if name == "periodic":
        return Periodic(period=period)
    if name == "always":
        return Always()
    if name == "never":
        return Never()
    raise ValueError(f"trigger.policy: {name!r} is not allowed; allowed: quorum, periodic, always, never")
