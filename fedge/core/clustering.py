"""DriftClustering: split devices whose detector fires onto new models, merge models that agree.

The policy behind fedge's multi-model service (a :class:`fedge.core.pool.ClusterPolicy`).
Each tick it sees the devices' drift reports and a score matrix: the fraction
of each device's latest samples every model in the pool gets right. Then:

* a device is moved to another model when that model fits its data clearly
  better than its own (``switch_margin``) and about as well as it fits its own
  devices (``fit_margin``): a concept seen before is recognised;
* a device whose detector fired and whose model no longer fits its data, with
  no other model that fits, gets a new model; devices drifting at the same tick
  whose scores on every model agree share one new model;
* two models are merged when each fits the other's devices about as well as
  their own (:func:`cluster_distance` at most ``merge_distance``), keeping the
  one that fits the union better;
* idle models (no devices) stay in the pool for concepts that come back, up to
  ``max_models``; the longest unused go first.

The arithmetic is in module-level functions so other policies can reuse it.

Examples
--------
>>> scores = {0: {0: 0.95, 1: 0.90}, 1: {0: 0.92, 1: 0.94}}
>>> cluster_distance(scores, [0], [1], 0, 1)
0.05
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedge.contracts.protocol import DriftReport
from fedge.core.pool import ClusterPlan, ClusterView
from fedge.core.ports import Scores


def mean_score(scores: Scores, devices: Sequence[int], model: int) -> float | None:
    """Mean score of ``model`` over ``devices`` (None when none of them scored it)."""
    vals = [scores[d][model] for d in devices if d in scores and model in scores[d]]
    return float(np.mean(vals)) if vals else None


def cluster_distance(
    scores: Scores, devices_a: Sequence[int], devices_b: Sequence[int], model_a: int, model_b: int
) -> float:
    """How much worse each model serves the other's devices than their own model does.

    The larger of the two accuracy losses (``model_b`` on ``devices_a`` versus
    ``model_a``, and the reverse); infinite when a score is missing.
    """
    own_a = mean_score(scores, devices_a, model_a)
    cross_a = mean_score(scores, devices_a, model_b)
    own_b = mean_score(scores, devices_b, model_b)
    cross_b = mean_score(scores, devices_b, model_a)
    if own_a is None or cross_a is None or own_b is None or cross_b is None:
        return float("inf")
    return round(max(own_a - cross_a, own_b - cross_b), 12)


def merge_agreeing(
    scores: Scores, members: Mapping[int, Sequence[int]], merge_distance: float
) -> tuple[dict[int, list[int]], dict[int, tuple[int, ...]]]:
    """Agglomerate clusters, closest pair first, while their distance is within ``merge_distance``.

    Returns
    -------
    tuple
        The new ``cluster -> devices`` and ``kept cluster -> clusters merged into it``.
    """
    groups = {k: list(v) for k, v in members.items() if v}
    merged: dict[int, tuple[int, ...]] = {}
    while len(groups) > 1:
        keys = sorted(groups)
        best: tuple[float, int, int] | None = None
        for i, a in enumerate(keys):
            for b in keys[i + 1 :]:
                dist = cluster_distance(scores, groups[a], groups[b], a, b)
                if dist <= merge_distance and (best is None or dist < best[0]):
                    best = (dist, a, b)
        if best is None:
            break
        _, a, b = best
        union = groups[a] + groups[b]
        score_a = mean_score(scores, union, a) or 0.0
        score_b = mean_score(scores, union, b) or 0.0
        keep, drop = (a, b) if score_a >= score_b else (b, a)
        groups[keep] = sorted(union)
        del groups[drop]
        merged[keep] = merged.get(keep, ()) + (drop,) + merged.pop(drop, ())
    return groups, merged


@dataclass
class DriftClustering:
    """Drift-triggered splits, score-based recognition and merges of models.

    Parameters
    ----------
    switch_margin : float, default 0.1
        A device moves to another model only if it scores at least this much
        better on the device's latest samples than the device's own model.
    fit_margin : float, default 0.1
        A model "fits" a device when it scores within this of the accuracy it
        has on its own devices.
    merge_distance : float, default 0.05
        Models whose :func:`cluster_distance` is at most this are merged.
    max_models : int, default 6
        Models kept in the pool, idle ones included.
    start_floor : float, default 0.5
        A new model starts from the pool's model that fits its devices' data best
        when that model gets at least this fraction right (fine-tuning keeps what
        the concepts share), else from fresh weights (a concept that contradicts
        every known one, such as a label flip, is learnt faster anew).

    A device whose detector stayed silent is split too when its model scores
    more than ``1.5 * fit_margin`` below that model's accuracy on its own
    devices (a drift the detector missed).
    """

    switch_margin: float = 0.1
    fit_margin: float = 0.1
    merge_distance: float = 0.05
    max_models: int = 6
    start_floor: float = 0.5
    home: dict[int, float] = field(default_factory=dict, repr=False)

    @property
    def needs_scores(self) -> bool:
        """The policy reads the score matrix."""
        return True

    def _start_for(self, devices: Sequence[int], scores: Scores) -> int | None:
        """The model a new cluster of ``devices`` starts from (None: fresh weights)."""
        known = {k for d in devices for k in scores.get(d, {})}
        fitting = {k: mean_score(scores, devices, k) or 0.0 for k in known}
        if not fitting:
            return None
        best = max(fitting, key=lambda k: (fitting[k], -k))
        return best if fitting[best] >= self.start_floor else None

    def _fits(self, key: int, score: float) -> bool:
        reference = self.home.get(key, max(self.home.values(), default=1.0))
        return score >= reference - self.fit_margin

    def plan(
        self,
        tick: int,
        reports: Sequence[DriftReport],
        clusters: Mapping[int, ClusterView],
        scores: Scores | None,
    ) -> ClusterPlan:
        """Next assignment; see the module docstring for the rules."""
        devices = [r.device for r in reports]
        drifted = {r.device for r in reports if r.drift}
        current = {d: k for k, c in clusters.items() for d in c.devices}
        next_key = max(clusters, default=-1) + 1
        scores = scores or {}
        assignment: dict[int, int] = {}
        start_from: dict[int, int | None] = {}
        reasons: dict[int, str] = {}
        for key, cluster in clusters.items():
            own = mean_score(scores, [d for d in cluster.devices if d not in drifted], key)
            if own is not None:
                self.home[key] = own

        newcomers: list[int] = []
        for d in devices:
            s = scores.get(d, {})
            cur = current.get(d)
            if not s:
                if cur is not None:
                    assignment[d] = cur
                else:
                    newcomers.append(d)
                continue
            best = max(s, key=lambda k: (s[k], -k))
            own = s.get(cur, -1.0) if cur is not None else -1.0
            if best != cur and s[best] >= own + self.switch_margin and self._fits(best, s[best]):
                assignment[d] = best
                reasons[d] = f"fits cluster {best} better ({s[best]:.2f} vs {own:.2f})"
            elif cur is not None and (
                (d in drifted and not self._fits(cur, own))
                or (cur in s and own < self.home.get(cur, 1.0) - 1.5 * self.fit_margin)
            ):
                newcomers.append(d)
            else:
                assignment[d] = cur if cur is not None else best

        # Newcomers whose scores agree on every model share one new model.
        groups: list[list[int]] = []
        for d in newcomers:
            for group in groups:
                ref = scores.get(group[0], {})
                mine = scores.get(d, {})
                if set(ref) == set(mine) and all(
                    abs(ref[k] - mine[k]) <= self.switch_margin for k in ref
                ):
                    group.append(d)
                    break
            else:
                groups.append([d])
        if not clusters and groups:
            groups = [sorted(d for g in groups for d in g)]
        for group in groups:
            key, next_key = next_key, next_key + 1
            start_from[key] = self._start_for(group, scores)
            for d in group:
                assignment[d] = key
                if d in current:
                    reasons[d] = f"drift: new cluster {key} (left cluster {current[d]})"

        members: dict[int, list[int]] = {}
        for d, k in assignment.items():
            if k in clusters:
                members.setdefault(k, []).append(d)
        kept, merged = merge_agreeing(scores, members, self.merge_distance)
        for keep in merged:
            for d in kept[keep]:
                if assignment[d] != keep:
                    reasons[d] = f"cluster {assignment[d]} merged into {keep}"
                    assignment[d] = keep

        in_use = set(assignment.values())
        idle = sorted((c.last_used, k) for k, c in clusters.items() if k not in in_use)
        excess = len(set(clusters) | in_use) - self.max_models
        retire = tuple(k for _, k in idle[: max(0, excess)])
        for k in retire:
            self.home.pop(k, None)
        return ClusterPlan(assignment, start_from, merged, retire, reasons)
