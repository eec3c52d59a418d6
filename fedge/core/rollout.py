"""Staged rollout of a promoted model: a canary cohort, widening waves, automatic rollback.

With ``[rollout] mode = "staged"`` a model that passes the gate does not reach
every device at once. It goes, in order, to

1. the **canary** cohort: ``canary`` devices (a fraction below 1 of the devices
   known when the rollout starts, rounded up, or a whole count), then
2. ``waves`` widening waves, each adding an equal share of the rest; the last
   reaches every device, and the rollout **completes**: the ``champion`` alias
   moves to the new version.

Who comes first is a stated, deterministic rule: devices are ordered by
SHA-256 of ``"<version>:<device>"`` (:func:`cohort_order`), so canary duty
moves around the fleet from one version to the next, and a restarted server
picks the same devices.

A wave widens only on evidence from a live A/B: at every tick where both
sides report, the cohort's accuracy on its new data (devices running the
candidate) is set against that of the devices still on the champion (same
ticks, same stream). After ``hold_ticks`` such ticks the wave widens when the
cohort's mean is no more than ``max_drop`` below the control's, and the
rollout **rolls back** (the cohort gets the champion back at its next poll;
the champion never moved) when it is. It also rolls back when more than
``failure_share`` of the cohort, and at least ``min_failures`` devices, failed
to install the candidate or answered with errors (Greengrass's abort
criteria), and when ``4 * hold_ticks`` ticks bring no evidence at all.

Pure Python: the orchestrator applies the steps (aliases, events, deployment).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from fedge.contracts.protocol import DriftReport
from fedge.core.ports import Deployed, Weights

if TYPE_CHECKING:
    from fedge.core.orchestrator import Orchestrator

log = logging.getLogger("fedge.server")

#: Registry alias of the version in trial.
CANARY_ALIAS = "canary"
#: Ticks without any A/B evidence, in units of ``hold_ticks``, before a rollout gives up.
NO_EVIDENCE_HOLDS = 4


@dataclass(frozen=True)
class RolloutPolicy:
    """The ``[rollout]`` settings of a staged rollout (see the module docstring).

    Parameters
    ----------
    canary : float, default 0.2
        Canary cohort: a fraction below 1 of the devices (rounded up), or a count.
    waves : int, default 1
        Widening waves after the canary; the last reaches every device.
    hold_ticks : int, default 2
        A/B ticks each wave is judged on.
    max_drop : float, default 0.05
        Largest shortfall of the cohort's accuracy against the control's that still holds.
    failure_share : float, default 0.3
        Share of the cohort that may fail (install refused, error reply) before it aborts.
    min_failures : int, default 1
        Failed devices needed before the share counts (a cohort of one is not judged on one).
    """

    canary: float = 0.2
    waves: int = 1
    hold_ticks: int = 2
    max_drop: float = 0.05
    failure_share: float = 0.3
    min_failures: int = 1

    @classmethod
    def from_config(cls, section: Any) -> RolloutPolicy | None:
        """The policy of a ``[rollout]`` section, None for ``mode = "immediate"``."""
        if getattr(section, "mode", "immediate") != "staged":
            return None
        return cls(**{k: getattr(section, k) for k in asdict(cls()) if hasattr(section, k)})


def cohort_order(version: int, devices: Iterable[int]) -> list[int]:
    """Devices in rollout order for ``version``: by SHA-256 of ``"<version>:<device>"``."""
    def rank(device: int) -> bytes:
        return hashlib.sha256(f"{version}:{device}".encode()).digest()

    return sorted(set(devices), key=rank)


def wave_sizes(n: int, canary: float, waves: int) -> list[int]:
    """Cumulative cohort sizes: the canary, then ``waves`` widenings ending at ``n``.

    >>> wave_sizes(10, 0.2, 2)
    [2, 6, 10]
    >>> wave_sizes(3, 5, 1)
    [2, 3]
    """
    if n <= 1:
        return [n]
    first = math.ceil(canary * n) if canary < 1 else int(canary)
    first = min(max(first, 1), n - 1)  # a canary of everyone would be no trial at all
    rest = n - first
    return [first, *(first + math.ceil(rest * i / waves) for i in range(1, waves + 1))]


def _live_accuracy(reports: Sequence[DriftReport]) -> float | None:
    """Sample-weighted prequential accuracy of ``reports``; the mean estimate where no labels."""
    measured = [(r.accuracy, r.n_samples) for r in reports if r.accuracy is not None]
    n = sum(k for _, k in measured)
    if n:
        return sum(a * k for a, k in measured) / n
    estimates = [r.estimate for r in reports if r.estimate is not None]
    return sum(estimates) / len(estimates) if estimates else None


@dataclass(frozen=True)
class RolloutStep:
    """What a tick of the rollout decided: ``hold``, ``widen``, ``complete`` or ``rollback``."""

    kind: str
    payload: dict[str, Any]


@dataclass
class Rollout:
    """One version in trial.

    Parameters
    ----------
    version, previous : int
        The candidate and the champion it would replace.
    weights : dict of ndarray
        The candidate's weights.
    order : list of int
        Devices in rollout order (:func:`cohort_order`).
    sizes : list of int
        Cumulative cohort size per wave (:func:`wave_sizes`).
    started : int
        Tick the rollout started (and its current wave's start, ``wave_started``).
    """

    version: int
    previous: int
    weights: Weights
    order: list[int]
    sizes: list[int]
    started: int
    cluster: int = 0
    wave: int = 0
    wave_started: int = 0
    #: Per A/B tick of the current wave: (tick, cohort accuracy, control accuracy).
    samples: list[tuple[int, float, float]] = field(default_factory=list)
    failed: set[int] = field(default_factory=set)

    @property
    def cohort(self) -> set[int]:
        """Devices meant to run the candidate now."""
        return set(self.order[: self.sizes[self.wave]])

    def deployment(self) -> dict[int, Deployed]:
        """The candidate for every device of the cohort."""
        target = Deployed(self.cluster, self.version, self.weights)
        return dict.fromkeys(self.cohort, target)

    def _payload(self, tick: int, **extra: Any) -> dict[str, Any]:
        return {
            "version": self.version,
            "previous": self.previous,
            "wave": self.wave,
            "waves": len(self.sizes) - 1,
            "cohort": sorted(self.cohort),
            "devices": len(self.order),
            "ab": [list(s) for s in self.samples],
            **extra,
        }

    def observe(
        self, tick: int, reports: Sequence[DriftReport], failed: Iterable[int], policy: RolloutPolicy
    ) -> RolloutStep:
        """Judge this tick's reports; the step the rollout takes."""
        cohort = self.cohort
        self.failed |= set(failed) & cohort
        n_failed = len(self.failed)
        if n_failed >= policy.min_failures and n_failed / len(cohort) > policy.failure_share:
            return RolloutStep("rollback", self._payload(
                tick, reason=f"{n_failed} of {len(cohort)} cohort devices failed "
                f"(install refused or error); rollout.failure_share is {policy.failure_share}",
                failed=sorted(self.failed)))
        on_candidate = [r for r in reports if r.device in cohort and r.model_version == self.version]
        on_champion = [
            r for r in reports if r.device not in cohort and r.model_version == self.previous
        ]
        a, b = _live_accuracy(on_candidate), _live_accuracy(on_champion)
        if a is not None and b is not None:
            self.samples.append((tick, round(a, 6), round(b, 6)))
        if len(self.samples) < policy.hold_ticks:
            if tick - self.wave_started >= NO_EVIDENCE_HOLDS * policy.hold_ticks:
                return RolloutStep("rollback", self._payload(
                    tick, reason=f"no live A/B evidence in {tick - self.wave_started} ticks"))
            return RolloutStep("hold", self._payload(tick))
        cand = sum(s[1] for s in self.samples) / len(self.samples)
        champ = sum(s[2] for s in self.samples) / len(self.samples)
        judged = {"cohort_accuracy": round(cand, 6), "control_accuracy": round(champ, 6)}
        if champ - cand > policy.max_drop:
            return RolloutStep("rollback", self._payload(
                tick, reason=f"cohort accuracy {cand:.3f} is {champ - cand:.3f} below the "
                f"champion's {champ:.3f} (rollout.max_drop {policy.max_drop})", **judged))
        self.wave += 1
        self.wave_started, self.samples = tick, []
        kind = "complete" if self.wave == len(self.sizes) - 1 else "widen"
        return RolloutStep(kind, self._payload(tick, **judged))

    def saved(self) -> dict[str, Any]:
        """JSON-ready state without weights (the registry holds them under ``canary``)."""
        return {
            "version": self.version, "previous": self.previous, "order": self.order,
            "sizes": self.sizes, "started": self.started, "cluster": self.cluster,
            "wave": self.wave, "wave_started": self.wave_started,
            "samples": [list(s) for s in self.samples], "failed": sorted(self.failed),
        }

    @classmethod
    def restored(cls, saved: Mapping[str, Any], weights: Weights) -> Rollout:
        """A rollout from :meth:`saved` and the candidate's weights."""
        return cls(
            int(saved["version"]), int(saved["previous"]), weights,
            [int(d) for d in saved["order"]], [int(s) for s in saved["sizes"]],
            int(saved["started"]), int(saved.get("cluster", 0)), int(saved["wave"]),
            int(saved["wave_started"]),
            [(int(t), float(a), float(b)) for t, a, b in saved.get("samples", [])],
            {int(d) for d in saved.get("failed", [])},
        )


def start_rollout(
    policy: RolloutPolicy, tick: int, version: int, weights: Weights, previous: int,
    devices: Iterable[int], cluster: int = 0,
) -> Rollout:
    """A rollout of ``version`` over ``devices`` (those known now), starting with the canary."""
    order = cohort_order(version, devices)
    sizes = wave_sizes(len(order), policy.canary, policy.waves)
    return Rollout(version, previous, dict(weights), order, sizes, tick, cluster, 0, tick)


# -- applied to the orchestrator (its registry, tracker and pool) ------------------------------
def begin_rollout(orch: Orchestrator, tick: int, key: int, version: int, weights: Weights) -> None:
    """The gate let ``version`` through: the canary cohort gets it first, the champion stays.

    With fewer than two devices there is no one to compare with: it is promoted at once.
    """
    assert orch.rollout_policy is not None
    cluster = orch.pool[key]
    rollout = start_rollout(
        orch.rollout_policy, tick, version, weights, cluster.version, sorted(orch.assignment), key
    )
    if len(rollout.sizes) < 2:
        orch.registry.set_alias(version, orch.alias(key))
        cluster.weights, cluster.version = dict(weights), version
        orch.record.champion = version
        return
    orch.rollout = rollout
    orch.registry.set_alias(version, CANARY_ALIAS)
    orch.tracker.log_event("rollout", tick, {"step": "canary", **rollout._payload(tick)})
    log.info("tick %d: v%d in trial on canary device(s) %s", tick, version, sorted(rollout.cohort))


def advance_rollout(orch: Orchestrator, tick: int, reports: Sequence[DriftReport]) -> RolloutStep:
    """Judge the version in trial on this tick's reports; widen, complete or roll back.

    Every step but ``hold`` is an MLflow event (``rollout``); ``complete`` moves the
    champion alias, ``rollback`` leaves it where it was (the cohort gets the
    champion again at its next poll).
    """
    rollout, policy = orch.rollout, orch.rollout_policy
    assert rollout is not None and policy is not None
    failed = getattr(orch.federation, "failed_devices", None)
    step = rollout.observe(tick, reports, failed(tick) if callable(failed) else (), policy)
    if step.kind == "hold":
        return step
    orch.tracker.log_event("rollout", tick, {"step": step.kind, **step.payload})
    said = step.payload.get("reason", f"wave {step.payload['wave']}, {len(rollout.cohort)} devices")
    log.info("tick %d: rollout of v%d: %s (%s)", tick, rollout.version, step.kind, said)
    if step.kind in ("complete", "rollback"):
        orch.rollout = None
    if step.kind == "complete":
        cluster = orch.pool[rollout.cluster]
        orch.registry.set_alias(rollout.version, orch.alias(rollout.cluster))
        cluster.weights, cluster.version = rollout.weights, rollout.version
        orch.record.champion = rollout.version
    return step


def restore_rollout(orch: Orchestrator, state: Mapping[str, Any]) -> None:
    """Take up the rollout a stopped server had in trial (its weights: the ``canary`` alias)."""
    saved = state.get("rollout")
    if not saved or orch.rollout_policy is None:
        return
    found = orch.registry.load(CANARY_ALIAS)
    if found is None or found[0] != int(saved["version"]):
        log.warning("the rollout in trial (v%s) has no canary model; dropped", saved.get("version"))
        return
    orch.rollout = Rollout.restored(saved, found[1])
