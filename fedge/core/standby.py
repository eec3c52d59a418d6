"""The replaced champion on standby: a promoted model that turns out worse is rolled back.

The gate judges a candidate on the devices' held-out samples of the tick its
campaign ran. One model serving devices that hold different concepts can lead
on that tick and lose on every later one: the mix of concepts moves, the new
model (trained on the mix) errs at a steady rate no detector calls a drift, and
no campaign follows to repair it.

With ``campaign.standby_z = z`` above 0 (one model, no staged rollout; the
configuration's default is 1.645, one-sided 5 %), the
champion a promotion replaces stays on **standby** (registry alias
``standby``) until the next promotion. At every tick the devices score both
models on their newest labelled samples (the scoring message clusters use).
When the standby leads the champion by ``z`` standard errors of the accuracy
difference over all samples scored, the two change places: the ``champion``
alias moves back, the demoted version becomes the standby (it returns the same
way if the mix moves back), and a ``standby`` event records both scores.

>>> swaps(0.60, 0.51, 1000, 1.645)
True
>>> swaps(0.52, 0.50, 1000, 1.645)
False
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedge.core.gate import gate_margin, promotes
from fedge.core.ports import Weights

if TYPE_CHECKING:
    from fedge.core.orchestrator import Orchestrator

log = logging.getLogger("fedge.server")

#: Registry alias of the version on standby.
STANDBY_ALIAS = "standby"
#: Scoring keys of the two models (any two distinct ints).
CHAMPION_KEY, STANDBY_KEY = 0, 1


@dataclass
class Standby:
    """The version on standby and its weights."""

    version: int
    weights: Weights

    def saved(self) -> dict[str, int]:
        """JSON-ready, without the weights (they are under the ``standby`` alias)."""
        return {"version": self.version}


def swaps(standby_acc: float, champion_acc: float, n: int, z: float) -> bool:
    """Whether the standby's lead over the champion on ``n`` samples exceeds ``z`` standard errors.

    The gate's own rule (:func:`fedge.core.gate.promotes`, no minimum lead).
    Both scored the same samples but the devices report counts only, so the
    unpaired variance is used (larger than the paired one: fewer swaps).
    """
    return n > 0 and promotes(standby_acc, champion_acc, 0.0, gate_margin(standby_acc, champion_acc, float("nan"), n, z))


def keep_standby(orch: Orchestrator, version: int, weights: Weights) -> None:
    """Put the champion a promotion replaces on standby (with ``standby_z`` above 0)."""
    if orch.standby_z <= 0 or version <= 0 or not orch.single or orch.rollout_policy is not None:
        return
    orch.standby = Standby(version, weights)
    orch.registry.set_alias(version, STANDBY_ALIAS)


def watch_standby(orch: Orchestrator, tick: int) -> None:
    """Score champion and standby on the devices' newest samples; swap them when the standby leads."""
    standby, champ = orch.standby, orch.champion
    count = getattr(orch.federation, "score_counts", None)
    if standby is None or champ is None or not callable(count):
        return
    if orch.record.ticks and orch.record.ticks[-1].n_scored == 0:
        return  # no device holds a label for this tick's samples (yet): nothing to score on
    key = next(iter(orch.pool))
    counts = count(tick, {CHAMPION_KEY: champ[1], STANDBY_KEY: standby.weights})
    n = sum(total for total, _ in counts.values())
    if n <= 0:
        return  # no labelled sample this tick: no evidence either way
    right = {k: sum(c.get(k, 0) for _, c in counts.values()) for k in (CHAMPION_KEY, STANDBY_KEY)}
    champ_acc, standby_acc = right[CHAMPION_KEY] / n, right[STANDBY_KEY] / n
    if not swaps(standby_acc, champ_acc, n, orch.standby_z):
        return
    payload = {
        "restored": standby.version,
        "demoted": champ[0],
        "standby_acc": round(standby_acc, 4),
        "champion_acc": round(champ_acc, 4),
        "samples": n,
        "devices": len(counts),
    }
    cluster = orch.pool[key]
    orch.registry.set_alias(standby.version, orch.alias(key))
    orch.registry.set_alias(champ[0], STANDBY_ALIAS)
    cluster.version, cluster.weights = standby.version, standby.weights
    orch.record.champion = standby.version
    orch.standby = Standby(champ[0], champ[1])
    orch.record.rollbacks.append({"tick": tick, **payload})
    orch.tracker.log_event("standby", tick, payload)
    log.warning(
        "tick %d: v%d scored %.1f%% against v%d's %.1f%% on %d samples; v%d serves again",
        tick,
        champ[0],
        100 * champ_acc,
        standby.version,
        100 * standby_acc,
        n,
        standby.version,
    )


def restore_standby(orch: Orchestrator, state: Mapping[str, Any]) -> None:
    """Take up the standby a stopped server kept (its weights: the ``standby`` alias)."""
    saved = state.get("standby")
    if not saved or orch.standby_z <= 0:
        return
    found = orch.registry.load(STANDBY_ALIAS)
    if found is None or found[0] != int(saved["version"]):
        log.warning("the version on standby (v%s) is not in the registry; none kept", saved.get("version"))
        return
    orch.standby = Standby(found[0], found[1])
