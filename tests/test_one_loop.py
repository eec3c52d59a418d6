"""One loop for one model and for one model per cluster: every capability works on both.

Six devices; three of them flip to the other concept at tick 3. With clustering
on, the flipped devices get their own model, and that model's campaigns run
with the same strategy, secure aggregation, DP, quorum and resume rules a single
model gets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message
from inprocess_helpers import run_captured

from fedge.runner import RunRequest, quiet_tick, run
from fedge.tracking import default_tracking_uri, list_model_versions

# 6 devices, ticks 0..7: devices 3-5 move to concept 1 at tick 3 and stay there.
SPLIT = "\n".join(["0 0 0 0 0 0"] * 3 + ["0 0 0 1 1 1"] * 5) + "\n"


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    cp = tmp_path / "split.cp"
    cp.write_text(SPLIT)
    return [
        f'run.output_dir="{tmp_path}"',
        "scenario.clients=6",
        "scenario.ticks=8",
        'scenario.schedule.kind="matrix"',
        f'scenario.schedule.file="{cp}"',
        "scenario.bad_row_fraction=0.0",
        "campaign.rounds=2",
        "campaign.initial_rounds=3",
        "clustering.enabled=true",
        'trigger.policy="always"',
        "campaign.min_improvement=-1.0",
        *extra,
    ]


def _clusters(summary: dict[str, Any]) -> dict[str, set[int]]:
    last = summary["clusters"][-1]["assignment"]
    out: dict[str, set[int]] = {}
    for device, key in last.items():
        out.setdefault(str(key), set()).add(int(device))
    return out


def _trains(crossed: list[tuple[Message, Message]]) -> list[tuple[Message, Message]]:
    return [(q, r) for q, r in crossed if q.metadata.message_type == "train" and not r.has_error()]


def test_clustered_campaigns_run_under_secure_aggregation_with_the_chosen_strategy(
    tmp_path: Path,
) -> None:
    overrides = _overrides(
        tmp_path, "privacy.secure_aggregation=true", 'campaign.strategy="fedprox"'
    )
    summary, crossed = run_captured(overrides, tmp_path / "run")
    clusters = _clusters(summary)
    assert sorted(map(sorted, clusters.values())) == [[0, 1, 2], [3, 4, 5]], clusters
    trains = _trains(crossed)
    assert trains
    for _, reply in trains:
        for masked in reply.content.array_records["arrays"].values():
            assert masked.numpy().dtype.kind in "iu", "an update left a device unmasked"
    versions = summary["versions"]
    assert {v["tags"]["fedge.cluster"] for v in versions} == {"0", "1"}
    for v in versions:
        assert v["tags"]["fedge.strategy"] == "fedprox"
        n = len(v["tags"]["fedge.devices"].split(","))
        assert v["tags"]["fedge.aggregation"].startswith(f"secagg+ (k={n} of {n}"), v["tags"]
    split = [v for v in versions if int(v["tags"]["fedge.trigger_tick"]) > 3]
    assert split and all(len(v["tags"]["fedge.devices"].split(",")) == 3 for v in split), (
        "after the split each cluster's secure rounds run over its own three devices"
    )
    assert summary["ticks"][-1]["accuracy"] > 0.85, "each concept is served its own model"


def test_clustered_dp_keeps_one_privacy_ledger_per_cluster_lineage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The product's DP noise is unseeded (it must not be predictable); here it is drawn
    # from a seeded generator so that whether the noisy model splits is not luck.
    import flwr.supercore.differential_privacy as flower_dp

    monkeypatch.setattr(flower_dp.np.random, "normal", np.random.default_rng(2).normal)
    overrides = _overrides(
        tmp_path,
        'privacy.dp="central-client"',
        "privacy.noise_multiplier=0.3",
        "privacy.clipping_norm=1.0",
        "privacy.epsilon_budget=1000000.0",
    )
    summary, _ = run_captured(overrides, tmp_path / "run")
    before = next(t for t in summary["ticks"] if t["tick"] == 2)
    assert before["accuracy"] > 0.85, "the noised model still learns the first concept"
    budgets = summary["privacy_budget"]
    by_cluster: dict[str, list[float]] = {}
    for v in sorted(summary["versions"], key=lambda v: v["version"]):
        by_cluster.setdefault(v["tags"]["fedge.cluster"], []).append(float(v["tags"]["fedge.epsilon"]))
    # A noised model can split once more; what must hold is one ledger per lineage that trained.
    trained = {f"cluster-{k}" for k in by_cluster}
    assert {"cluster-0", "cluster-1"} <= set(budgets) and set(budgets) == trained, (budgets, trained)
    ledgers = sorted(p.name for p in (tmp_path / "state").glob("*.privacy.json"))
    assert len(ledgers) == len(trained) and all(".cluster-" in name for name in ledgers), ledgers
    for spent in by_cluster.values():
        assert spent == sorted(spent) and spent[0] > 0, "each lineage's epsilon only grows"


def test_a_cluster_smaller_than_min_devices_is_refused_in_one_line_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    summary, _ = run_captured(_overrides(tmp_path, "campaign.min_devices=4"), tmp_path / "run")
    refused = [r["reason"] for r in summary["refused"]]
    assert refused and all("campaign.min_devices is 4" in r for r in refused), refused
    assert all(r.startswith("cluster ") and "\n" not in r for r in refused)
    assert summary["versions"], "the cluster large enough still trained"


def test_a_killed_clustered_run_resumes_and_registers_nothing_twice(tmp_path: Path) -> None:
    overrides = _overrides(tmp_path)
    folder = tmp_path / "run"

    class Died(Exception):
        pass

    def die_after_5(rec: Any, campaign: Any) -> None:
        if rec.tick == 5:
            raise Died

    with pytest.raises(Died):
        run_captured(overrides, folder, on_tick=die_after_5)
    saved = json.loads(next((tmp_path / "state").glob("*.json")).read_text())
    serving = sorted(sorted(m["devices"]) for m in saved["pool"] if m["devices"])
    assert saved["tick"] == 5 and serving == [[0, 1, 2], [3, 4, 5]], "the pool is saved with the run"
    summary, _ = run_captured(overrides, folder)
    assert summary["resumed_at"] == 6, "continues after the kill"
    uri = default_tracking_uri(tmp_path)
    versions = list_model_versions(uri, summary["model_name"])
    keys = [(v["tags"]["fedge.trigger_tick"], v["tags"]["fedge.cluster"]) for v in versions]
    assert len(keys) == len(set(keys)), "no campaign registered twice"
    assert {"6", "7"} <= {tick for tick, _ in keys}


def test_clustered_policy_runs_on_flower_simulation_with_the_in_process_numbers(
    tmp_path: Path,
) -> None:
    results = {}
    for engine in ("inprocess", "simulation"):
        out = tmp_path / engine
        out.mkdir()
        overrides = tuple(_overrides(out))
        results[engine] = run(RunRequest(None, overrides, engine), on_tick=quiet_tick)
    ours, flower = results["inprocess"], results["simulation"]
    assert flower["engine"] == "simulation"
    assert _clusters(flower) == _clusters(ours) and len(_clusters(ours)) == 2
    assert [t["accuracy"] for t in ours["ticks"]] == pytest.approx(
        [t["accuracy"] for t in flower["ticks"]], abs=1e-6
    )
