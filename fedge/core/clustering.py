"""DriftClustering: split devices that no model fits onto new models, merge models that agree.

The policy behind fedge's multi-model service (a :class:`fedge.core.pool.ClusterPolicy`).
Each tick it sees the devices' drift reports and a score matrix: the fraction
of each device's latest samples every model in the pool gets right. Then:

* a model "fits" a device unless it scores significantly worse on the
  device's latest samples than on its own cluster's other devices: a one-sided
  z-test on the accuracy gap, with the binomial standard error of scores on
  ``samples`` samples (:func:`fit_gap_z`). A device whose detector fired is
  tested against its own model at the smaller ``drift_z``, any other device,
  and any other model, at ``split_z``; no detector has to fire, so a drift
  at the very first step is caught too;
* a device is moved to another model when its own no longer fits and the other
  does, or when the other fits it significantly and clearly
  (``switch_margin``) better: a concept seen before is recognised;
* a device that no model fits gets a new model; devices split at the same tick
  whose scores agree on every model (at least ``fingerprint`` of them) share
  one new model;
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


def fit_gap_z(device_acc: float, reference_acc: float, samples: int, references: int = 1) -> float:
    """How many standard errors ``device_acc`` lies below ``reference_acc``.

    Both are fractions right of ``samples`` samples per device, the reference
    the median over ``references`` devices (the median of ``m`` binomial
    scores has about ``pi / 2`` times the variance of their mean, so the
    reference adds ``1.57 / m`` of one score's variance). The variance uses the
    pooled accuracy, kept at least half a sample away from 0 and 1 so that a
    perfect score still has a noise floor.

    Parameters
    ----------
    device_acc : float
        The model's accuracy on the device's latest samples.
    reference_acc : float
        The model's accuracy on the devices it serves.
    samples : int
        Samples behind each accuracy.
    references : int, default 1
        Devices behind ``reference_acc``.

    Returns
    -------
    float
        The z statistic; positive when the device is served worse.

    Examples
    --------
    >>> round(fit_gap_z(0.80, 0.90, 100, 9), 2)
    2.58
    """
    n = max(1, int(samples))
    m = max(1, int(references))
    floor = 0.5 / n
    pooled = min(max((device_acc + reference_acc) / 2.0, floor), 1.0 - floor)
    se = float(np.sqrt(pooled * (1.0 - pooled) / n * (1.0 + np.pi / 2.0 / m)))
    return (reference_acc - device_acc) / se


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
    """Score-based splits, recognition and merges of models; a detector lowers the bar.

    Parameters
    ----------
    switch_margin : float, default 0.1
        A device whose own model still fits moves to another only if that one
        scores at least this much better (and significantly so) on the
        device's latest samples.
    fit_margin : float, default 0.02
        The smallest accuracy gap that counts as "not fitting", however many
        samples the scores rest on (an effect-size floor under the z-test).
    merge_distance : float, default 0.05
        Models whose :func:`cluster_distance` is at most this are merged.
    max_models : int, default 6
        Models kept in the pool, idle ones included.
    start_floor : float, default 0.5
        A new model starts from the pool's model that fits its devices' data best
        when that model gets at least this fraction right (fine-tuning keeps what
        the concepts share), else from fresh weights (a concept that contradicts
        every known one, such as a label flip, is learnt faster anew).
    samples : int, default 100
        Samples behind each score (a device's latest tick).
    split_z : float, default 3.0
        z a device's accuracy gap must exceed to leave its model when its
        detector stayed silent (a false split per 740 device-ticks).
    drift_z : float, default 1.5
        The same once the device's detector fired (the detector is evidence
        against its own model; joining another model is always tested at
        ``split_z``).
    fingerprint : int, default 2
        Devices split at the same tick share one new model only when they were
        scored on at least this many models and agree on all of them; below
        that each starts its own model, to be merged once the models agree.
    min_size : int, default 1
        The fewest devices a campaign can train (``campaign.min_devices``, 3
        under secure aggregation): new models of fewer devices are not made one
        per device.

    Examples
    --------
    >>> policy = DriftClustering()
    >>> views = {0: ClusterView(0, 1, (0, 1, 2, 3), 0, 0)}
    >>> scores = {0: {0: 0.93}, 1: {0: 0.91}, 2: {0: 0.92}, 3: {0: 0.72}}
    >>> reports = [DriftReport(d, 1, 1, 100, 8, False, 0, 0, 100) for d in range(4)]
    >>> policy.plan(1, reports, views, scores).assignment
    {0: 0, 1: 0, 2: 0, 3: 1}
    """

    switch_margin: float = 0.1
    fit_margin: float = 0.02
    merge_distance: float = 0.05
    max_models: int = 6
    start_floor: float = 0.5
    samples: int = 100
    split_z: float = 3.0
    drift_z: float = 1.5
    fingerprint: int = 2
    min_size: int = 1
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

    def _reference(
        self, key: int, device: int, scores: Scores, members: Mapping[int, Sequence[int]], drifted: set[int]
    ) -> tuple[float, int] | None:
        """Model ``key``'s accuracy on its other (silent) devices now, else its last home.

        Leaving the device out keeps a drifted device from pulling its own
        reference down; the median keeps a drifted minority from pulling down
        everyone's.
        """
        others = [
            scores[o][key]
            for o in members.get(key, ())
            if o != device and o not in drifted and key in scores.get(o, {})
        ]
        if others:
            return float(np.median(others)), len(others)
        if key in self.home:
            return self.home[key], 1
        return None

    def _fits(self, key: int, device: int, scores: Scores, members: Mapping[int, Sequence[int]], drifted: set[int], z: float) -> bool:
        """Whether model ``key`` serves ``device`` about as well as its own devices."""
        score = scores[device][key]
        ref = self._reference(key, device, scores, members, drifted)
        if ref is None:
            return True  # nothing to compare with: no evidence against it
        reference, m = ref
        if reference - score < self.fit_margin:
            return True
        return fit_gap_z(score, reference, self.samples, m) <= z

    def _better(self, new: float, old: float, z: float) -> bool:
        """Whether a score of ``new`` is clearly and significantly above ``old``."""
        return new >= old + self.switch_margin and fit_gap_z(old, new, self.samples) > z

    def _group(self, newcomers: Sequence[int], scores: Scores, fingerprint: int) -> list[list[int]]:
        """Newcomers whose scores agree (within ``switch_margin``) on the same models, at least ``fingerprint``."""
        groups: list[list[int]] = []
        for d in newcomers:
            mine = scores.get(d, {})
            for group in groups:
                ref = scores.get(group[0], {})
                if len(ref) >= fingerprint and set(ref) == set(mine) and all(
                    abs(ref[k] - mine[k]) <= self.switch_margin for k in ref
                ):
                    group.append(d)
                    break
            else:
                groups.append([d])
        return groups

    def _spread(self, groups: list[list[int]], scores: Scores, room: int) -> list[list[int]]:
        """Halve the largest group (in score order) while there is room for another model.

        Agreeing on one score is weak evidence of one concept: devices kept
        apart train separate models that the merge rule can join again, while
        one model trained on several concepts serves none of them.
        """
        groups = [list(g) for g in groups]
        while len(groups) < room:
            largest = max(groups, key=len)
            if len(largest) < 2 * self.min_size:
                break
            ordered = sorted(largest, key=lambda d: (sorted(scores.get(d, {}).items()), d))
            half = len(ordered) // 2
            groups.remove(largest)
            groups += [sorted(ordered[:half]), sorted(ordered[half:])]
        return groups

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
        members = {k: tuple(c.devices) for k, c in clusters.items()}
        next_key = max(clusters, default=-1) + 1
        scores = scores or {}
        assignment: dict[int, int] = {}
        start_from: dict[int, int | None] = {}
        reasons: dict[int, str] = {}

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
            # A firing detector is evidence against the device's own model only: it
            # lowers the bar for leaving it, not for joining another model.
            z = self.drift_z if d in drifted else self.split_z
            fitting = [
                k for k in s if self._fits(k, d, scores, members, drifted, z if k == cur else self.split_z)
            ]
            own_fits = cur in fitting
            best = max(fitting, key=lambda k: (s[k], -k)) if fitting else None
            own = s.get(cur, -1.0) if cur is not None else -1.0
            if cur is None:
                if best is None:
                    newcomers.append(d)
                else:
                    assignment[d] = best
            elif cur not in s:
                assignment[d] = cur  # its model was not scored: no evidence either way
            elif best is not None and best != cur and (not own_fits or self._better(s[best], own, z)):
                assignment[d] = best
                reasons[d] = f"fits cluster {best} better ({s[best]:.2f} vs {own:.2f})"
            elif not own_fits:
                newcomers.append(d)
            else:
                assignment[d] = cur

        # Newcomers whose scores agree on every model share one new model. One
        # model's score cannot tell new concepts apart (three label swaps all
        # score 0.8 on the old model), so against fewer than ``fingerprint``
        # models each newcomer starts its own and the merge rule joins those that
        # agree at the next tick, within the room ``max_models`` leaves and never
        # below the devices a campaign needs (``min_size``).
        groups = self._group(newcomers, scores, self.fingerprint)
        room = max(1, self.max_models - len(set(assignment.values())))
        if len(groups) > room or any(len(g) < self.min_size for g in groups):
            groups = self._spread(self._group(newcomers, scores, 1), scores, room)
        if not clusters and groups:
            groups = [sorted(d for g in groups for d in g)]
        for group in groups:
            key, next_key = next_key, next_key + 1
            start_from[key] = self._start_for(group, scores)
            for d in group:
                assignment[d] = key
                if d in current:
                    reasons[d] = f"split: new cluster {key} (left cluster {current[d]})"

        kept_members: dict[int, list[int]] = {}
        for d, k in assignment.items():
            if k in clusters:
                kept_members.setdefault(k, []).append(d)
        kept, merged = merge_agreeing(scores, kept_members, self.merge_distance)
        for keep in merged:
            for d in kept[keep]:
                if assignment[d] != keep:
                    reasons[d] = f"cluster {assignment[d]} merged into {keep}"
                    assignment[d] = keep

        # A model's home accuracy: the median over the silent devices it keeps
        # (devices that left it say nothing about how it fits its own concept).
        for k in clusters:
            own = [
                scores[d][k]
                for d, a in assignment.items()
                if a == k and d not in drifted and k in scores.get(d, {})
            ]
            if own:
                self.home[k] = float(np.median(own))

        in_use = set(assignment.values())
        idle = sorted((c.last_used, k) for k, c in clusters.items() if k not in in_use)
        excess = len(set(clusters) | in_use) - self.max_models
        retire = tuple(k for _, k in idle[: max(0, excess)])
        for k in retire:
            self.home.pop(k, None)
        return ClusterPlan(assignment, start_from, merged, retire, reasons)
