"""Several models in service: split on drift, recognise a known concept, merge, retire."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedge.contracts.protocol import DriftReport
from fedge.core.clustering import DriftClustering, cluster_distance, merge_agreeing
from fedge.core.orchestrator import Orchestrator
from fedge.core.pool import ClusterView
from fedge.core.ports import CampaignOutcome, Deployed, RoundMetrics
from fedge.core.triggers import Always


def _report(device: int, drift: bool = False) -> DriftReport:
    return DriftReport(device, 1, 1, 100, 5, drift, int(drift), int(drift), 100)


def _views(members: Mapping[int, Sequence[int]]) -> dict[int, ClusterView]:
    return {k: ClusterView(k, k + 1, tuple(v), 0, 0) for k, v in members.items()}


def test_drifted_device_that_no_model_fits_gets_a_new_model() -> None:
    policy = DriftClustering()
    scores = {0: {0: 0.95}, 1: {0: 0.96}, 2: {0: 0.10}}
    plan = policy.plan(1, [_report(0), _report(1), _report(2, True)], _views({0: [0, 1, 2]}), scores)
    assert plan.assignment == {0: 0, 1: 0, 2: 1}
    assert plan.start_from == {1: None}, "a model that gets 10% right is no starting point"


def test_new_model_starts_from_the_model_that_still_fits_best() -> None:
    policy = DriftClustering()
    scores = {0: {0: 0.95}, 1: {0: 0.96}, 2: {0: 0.70}}
    plan = policy.plan(1, [_report(0), _report(1), _report(2, True)], _views({0: [0, 1, 2]}), scores)
    assert plan.assignment[2] == 1 and plan.start_from == {1: 0}
    assert "new cluster 1" in plan.reasons[2]


def test_false_alarm_keeps_the_device_on_its_model() -> None:
    policy = DriftClustering()
    scores = {0: {0: 0.95}, 1: {0: 0.93}}
    plan = policy.plan(1, [_report(0), _report(1, True)], _views({0: [0, 1]}), scores)
    assert plan.assignment == {0: 0, 1: 0}
    assert not plan.start_from


def test_device_moves_to_the_model_of_a_concept_seen_before() -> None:
    policy = DriftClustering()
    scores = {
        0: {0: 0.95, 1: 0.05},
        1: {0: 0.96, 1: 0.04},
        2: {0: 0.06, 1: 0.97},
        3: {0: 0.08, 1: 0.95},  # was on cluster 0, its data now follows cluster 1's concept
    }
    views = _views({0: [0, 1, 3], 1: [2]})
    plan = policy.plan(4, [_report(d, d == 3) for d in range(4)], views, scores)
    assert plan.assignment == {0: 0, 1: 0, 2: 1, 3: 1}
    assert not plan.start_from, "a known concept needs no new model"


def test_models_that_serve_each_others_devices_equally_are_merged() -> None:
    scores = {0: {0: 0.90, 1: 0.89}, 1: {0: 0.88, 1: 0.90}, 2: {0: 0.2, 1: 0.2, 2: 0.9}}
    assert cluster_distance(scores, [0], [1], 0, 1) <= 0.05
    groups, merged = merge_agreeing(scores, {0: [0], 1: [1], 2: [2]}, 0.05)
    # model 1 fits the union slightly better (0.895 vs 0.89), so it is the one kept
    assert sorted(groups) == [1, 2] and groups[1] == [0, 1]
    assert merged == {1: (0,)}


def test_idle_models_beyond_the_pool_size_are_retired_oldest_first() -> None:
    policy = DriftClustering(max_models=2)
    views = {
        0: ClusterView(0, 1, (0,), 0, 5),
        1: ClusterView(1, 2, (), 0, 1),
        2: ClusterView(2, 3, (), 0, 3),
    }
    scores = {0: {0: 0.9, 1: 0.1, 2: 0.2}}
    plan = policy.plan(5, [_report(0)], views, scores)
    assert plan.retire == (1,)


class _Federation:
    """Two concepts: devices 0-1 always on concept 0; device 2 switches to concept 1 at tick 2."""

    def __init__(self) -> None:
        self.deployed: list[dict[int, int]] = []
        self.trained: list[dict[int, tuple[int, ...]]] = []

    def _concept(self, device: int, tick: int) -> int:
        return 1 if device == 2 and tick >= 2 else 0

    def poll(self, tick: int, deployment: Mapping[int, Deployed], default: Any) -> list[DriftReport]:
        self.deployed.append({d: v.cluster for d, v in deployment.items()})
        self.trained.append({})
        reports = []
        for d in range(3):
            model = deployment.get(d)
            fits = model is not None and float(model.weights["w"][0]) == self._concept(d, tick)
            errors = 5 if fits or model is None else 90
            version = model.version if model else 0
            drift = model is not None and not fits
            reports.append(DriftReport(d, tick, version, 100, errors, drift, int(drift), 0, 100))
        return reports

    def score(self, tick: int, models: Mapping[int, Any]) -> dict[int, dict[int, float]]:
        return {
            d: {k: 0.95 if float(w["w"][0]) == self._concept(d, tick) else 0.1 for k, w in models.items()}
            for d in range(3)
        }

    def campaign(
        self,
        devices: Sequence[int],
        start: Any,
        *,
        tick: int,
        rounds: int,
        first_round: int,
        lineage: str,
    ) -> CampaignOutcome:
        self.trained[-1][int(lineage.split("-")[1])] = tuple(devices)
        concept = self._concept(devices[0], tick)
        rm = tuple(RoundMetrics(first_round + r, 0.1, 0.95, 0.1, 0.5, len(devices)) for r in range(rounds))
        return CampaignOutcome({"w": np.array([float(concept)])}, rm, len(devices))

    def versions(self) -> list[dict[str, Any]]:
        return []


class _Registry:
    def __init__(self) -> None:
        self.tags: list[dict[str, str]] = []
        self.aliases: dict[str, int] = {}

    def register(self, weights: Any, tags: Mapping[str, str]) -> int:
        self.tags.append(dict(tags))
        return len(self.tags)

    def set_alias(self, version: int, alias: str) -> None:
        self.aliases[alias] = version

    def load(self, alias: str) -> Any:
        return None

    def versions(self) -> list[dict[str, Any]]:
        return []


class _Tracker:
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_event(self, kind: str, tick: int, payload: Mapping[str, Any]) -> None:
        pass


def test_orchestrator_splits_the_drifted_device_and_serves_it_its_own_model() -> None:
    fed, reg = _Federation(), _Registry()
    orch = Orchestrator(
        fed,
        reg,
        _Tracker(),
        Always(),
        {"w": np.array([9.0])},
        clusters=DriftClustering(),
        rounds=2,
        initial_rounds=3,
        min_improvement=-1.0,
    )
    record = orch.run(range(5))
    assert fed.trained[0] == {0: (0, 1, 2)}
    assert fed.trained[2] == {0: (0, 1), 1: (2,)}, "the drifted device trains its own model"
    assert fed.deployed[3] == {0: 0, 1: 0, 2: 1}, "and is served it at the next tick"
    assert record.accuracy(4) == 0.95
    last_of_1 = max(i + 1 for i, t in enumerate(reg.tags) if t["fedge.cluster"] == "1")
    assert reg.aliases["cluster-1"] == last_of_1, "each cluster's alias names its newest version"
    new = next(t for t in reg.tags if t["fedge.cluster"] == "1")
    assert new["fedge.trigger_reason"].startswith("new cluster")
    assert new["fedge.split_from"] == "" and new["fedge.parent_version"] == "none", "fresh start"
    later = [t for t in reg.tags if t["fedge.cluster"] == "1"][1:]
    assert later and all(t["fedge.parent_version"] != "none" for t in later), "lineage within a cluster"
    # Campaigns of one tick share round slots; the fresh cluster of tick 2 takes the
    # initial rounds, as any model trained from scratch does.
    assert orch.rounds_done == 3 + 2 + 3 + 2 + 2
    assert orch.model_rounds == 3 + 2 + (2 + 3) + (2 + 2) + (2 + 2)


# -- score-based splits: no detector needed --------------------------------------------------


def test_a_drift_at_the_first_step_is_split_off_without_any_detector_firing() -> None:
    """Step 1: the model trained on step 0 serves 3 devices whose concept changed; nobody fired."""
    policy = DriftClustering()
    scores = {d: {0: 0.93 + 0.01 * (d % 3)} for d in range(7)} | {d: {0: 0.74} for d in (7, 8, 9)}
    plan = policy.plan(1, [_report(d) for d in range(10)], _views({0: list(range(10))}), scores)
    assert all(plan.assignment[d] == 0 for d in range(7))
    new = {plan.assignment[d] for d in (7, 8, 9)}
    assert len(new) == 3 and 0 not in new, "one model's score cannot tell their concepts apart"
    assert plan.start_from == {k: 0 for k in new}, "each starts from the model that still gets 74% right"
    assert plan.reasons[7].startswith("split")
    grouped = DriftClustering(fingerprint=1).plan(
        1, [_report(d) for d in range(10)], _views({0: list(range(10))}), scores
    )
    assert {grouped.assignment[d] for d in (7, 8, 9)} == {1}, "one score is enough when asked"
    secure = DriftClustering(min_size=3).plan(
        1, [_report(d) for d in range(10)], _views({0: list(range(10))}), scores
    )
    assert {secure.assignment[d] for d in (7, 8, 9)} == {1}, "a one-device model could not train"


def test_devices_split_on_one_score_get_their_own_models_and_the_next_tick_merges_those_that_agree() -> (
    None
):
    # Tick 1: devices 4-7 leave model 0; two of them follow concept A, two concept B.
    policy = DriftClustering()
    reports = [_report(d) for d in range(8)]
    first = {d: {0: 0.95} for d in range(4)} | {d: {0: 0.78} for d in range(4, 8)}
    plan = policy.plan(1, reports, _views({0: list(range(8))}), first)
    assert len({plan.assignment[d] for d in range(4, 8)}) == 4
    members: dict[int, list[int]] = {}
    for d, k in plan.assignment.items():
        members.setdefault(k, []).append(d)
    # Tick 2: every device scores every model; the models of 4 and 5 fit each other's
    # devices (concept A), as do those of 6 and 7 (concept B); A's and B's do not.
    keys = {d: plan.assignment[d] for d in range(4, 8)}
    second: dict[int, dict[int, float]] = {}
    for d in range(8):
        row = {0: 0.95 if d < 4 else 0.78}
        for e, k in keys.items():
            same = (d in (4, 5)) == (e in (4, 5)) and d >= 4
            row[k] = 0.93 if same else 0.70
        second[d] = row
    merged = policy.plan(2, reports, _views(members), second)
    a = {merged.assignment[d] for d in (4, 5)}
    b = {merged.assignment[d] for d in (6, 7)}
    assert len(a) == 1 and len(b) == 1 and a != b, merged.assignment
    assert all(merged.assignment[d] == 0 for d in range(4))


def test_one_model_per_newcomer_never_exceeds_max_models() -> None:
    scores = {d: {0: 0.95} for d in range(5)} | {d: {0: 0.75} for d in range(5, 9)}
    views = _views({0: list(range(9))})
    plan = DriftClustering(max_models=3).plan(1, [_report(d) for d in range(9)], views, scores)
    new = [sorted(d for d in range(5, 9) if plan.assignment[d] == k) for k in (1, 2)]
    assert sorted(map(len, new)) == [2, 2], "room for two new models: the four split in halves"
    assert len(set(plan.assignment.values())) == 3
    tight = DriftClustering(max_models=2).plan(1, [_report(d) for d in range(9)], views, scores)
    assert {tight.assignment[d] for d in range(5, 9)} == {1}, "no room: the agreeing newcomers share one"


def test_a_gap_within_sampling_noise_keeps_a_silent_device_but_a_firing_detector_lowers_the_bar() -> None:
    # 100 samples at ~92%: one standard error is about 3 points; a 6-point gap is z ~ 1.9.
    scores = {d: {0: 0.92} for d in range(9)} | {9: {0: 0.86}}
    views = _views({0: list(range(10))})
    silent = DriftClustering().plan(1, [_report(d) for d in range(10)], views, scores)
    assert silent.assignment[9] == 0, "a 2-sigma dip is noise for a device whose detector is quiet"
    fired = DriftClustering().plan(1, [_report(d, d == 9) for d in range(10)], views, scores)
    assert fired.assignment[9] == 1, "the same gap with its detector firing is a drift"
    more = DriftClustering(samples=1000).plan(1, [_report(d) for d in range(10)], views, scores)
    assert more.assignment[9] == 1, "with ten times the samples the same gap is significant"


def test_a_silent_device_moves_to_the_model_that_fits_it_as_well_as_its_own_devices() -> None:
    policy = DriftClustering()
    scores = {d: {0: 0.94, 1: 0.72} for d in (0, 1, 2)} | {d: {0: 0.73, 1: 0.93} for d in (3, 4, 5)}
    scores[6] = {0: 0.75, 1: 0.92}  # on cluster 0 until now, its data now follow cluster 1's concept
    views = _views({0: [0, 1, 2, 6], 1: [3, 4, 5]})
    plan = policy.plan(5, [_report(d) for d in range(7)], views, scores)
    assert plan.assignment[6] == 1 and not plan.start_from
    assert "fits cluster 1 better" in plan.reasons[6]


def test_a_whole_cluster_drifting_silently_is_caught_against_its_models_last_accuracy() -> None:
    policy = DriftClustering()
    views = _views({0: [0, 1]})
    policy.plan(1, [_report(0), _report(1)], views, {0: {0: 0.95}, 1: {0: 0.94}})
    plan = policy.plan(2, [_report(0)], _views({0: [0]}), {0: {0: 0.70}})
    assert plan.assignment == {0: 1}, "a lone device is compared with its model's earlier accuracy"


def test_fit_gap_z_grows_with_the_gap_and_the_samples() -> None:
    from fedge.core.clustering import fit_gap_z

    assert fit_gap_z(0.9, 0.9, 100) == 0.0
    assert fit_gap_z(0.8, 0.9, 100) < fit_gap_z(0.7, 0.9, 100)
    assert fit_gap_z(0.8, 0.9, 100) < fit_gap_z(0.8, 0.9, 400)
    assert fit_gap_z(0.95, 1.0, 100) > 0, "a perfect reference still has a noise floor"


def test_a_firing_detector_lowers_the_bar_for_leaving_a_model_not_for_joining_one() -> None:
    """Cluster 1 is one device at 85 %; a drifted device gets 75 % from it (z ~ 1.6 at m = 1)."""
    scores = {0: {0: 0.10, 1: 0.85}, 1: {0: 0.05, 1: 0.75}, 2: {0: 0.95, 1: 0.08}, 3: {0: 0.94, 1: 0.1}}
    views = _views({0: [1, 2, 3], 1: [0]})
    plan = DriftClustering().plan(3, [_report(d, d == 1) for d in range(4)], views, scores)
    assert plan.assignment[1] == 1, "the known concept's model takes it: no cold start for noise"
    assert not plan.start_from
