"""Trigger policies: given one tick of drift reports, should a campaign start?

Each policy is a small class with one method, :meth:`TriggerPolicy.decide`.
``quorum`` is the product's default; ``periodic``, ``always`` and ``never`` are
the baselines benchmarks compare against. Every policy also answers "yes" when
there is no model yet (the initial campaign).

>>> from fedge.contracts.protocol import DriftReport
>>> def report(device, drift):
...     return DriftReport(device, 5, 1, 100, 3, drift, int(drift), int(drift), 100)
>>> policy = DriftQuorum(quorum=0.5, cooldown=2)
>>> policy.decide(5, [report(0, True), report(1, False)], has_model=True, last_campaign=1)
Decision(retrain=True, reason='drift quorum: 1/2 devices (>= 1)', drifted=(0,))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fedge.contracts.protocol import DriftReport


@dataclass(frozen=True)
class Decision:
    """A trigger decision and the reason it gives."""

    retrain: bool
    reason: str
    drifted: tuple[int, ...] = ()


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


def _drifted(reports: Sequence[DriftReport]) -> tuple[int, ...]:
    return tuple(sorted(r.device for r in reports if r.drift))


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
    """

    quorum: float = 0.3
    cooldown: int = 2

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
        drifted = _drifted(reports)
        if not has_model:
            return Decision(True, INITIAL, drifted)
        needed = self.needed(len(reports))
        if len(drifted) < needed:
            return Decision(False, f"{len(drifted)}/{len(reports)} devices in drift (< {needed})", drifted)
        if last_campaign is not None and tick - last_campaign <= self.cooldown:
            return Decision(False, f"cooldown: last campaign at tick {last_campaign}", drifted)
        return Decision(
            True, f"drift quorum: {len(drifted)}/{len(reports)} devices (>= {needed})", drifted
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


def make_policy(name: str, *, quorum: float = 0.3, cooldown: int = 2, period: int = 4) -> TriggerPolicy:
    """Policy by its config name."""
    if name == "quorum":
        return DriftQuorum(quorum=quorum, cooldown=cooldown)
    if name == "periodic":
        return Periodic(period=period)
    if name == "always":
        return Always()
    if name == "never":
        return Never()
    raise ValueError(f"trigger.policy: {name!r} is not allowed; allowed: quorum, periodic, always, never")
