"""The whole loop on the in-process engine: detect drift, retrain, register, promote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedge.runner import RunRequest, quiet_tick, run
from fedge.tracking import list_model_versions

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
DRIFT_AT = 7

SMALL = ("scenario.clients=5", "scenario.ticks=13", "scenario.bad_row_fraction=0.0")


def _run(tmp: Path, scenario: str, *extra: str) -> dict[str, Any]:
    drift = (f"scenario.schedule.at={DRIFT_AT}",) if "sudden" in scenario else ()
    overrides = SMALL + drift + (f'run.output_dir="{tmp}"',) + extra
    return run(RunRequest(EXPERIMENTS / scenario, overrides), on_tick=quiet_tick)


@pytest.fixture(scope="module")
def sudden(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("sudden")
    return tmp, _run(tmp, "sine2_sudden.toml")


def test_quorum_retrains_only_after_the_drift_and_accuracy_recovers(
    sudden: tuple[Path, dict[str, Any]],
) -> None:
    _, s = sudden
    ticks = {t["tick"]: t["accuracy"] for t in s["ticks"]}
    campaigns = s["campaigns"]
    assert campaigns[0]["tick"] == 0 and campaigns[0]["reason"].startswith("initial")
    retrain = [c for c in campaigns[1:]]
    assert retrain, "the drift must start a campaign"
    assert all(c["tick"] >= DRIFT_AT for c in retrain), "no campaign before the drift"
    assert retrain[0]["tick"] <= DRIFT_AT + 1, "detection within a tick of the drift"
    assert retrain[0]["reason"].startswith("drift quorum")
    before = ticks[DRIFT_AT - 1]
    assert before > 0.85
    assert ticks[DRIFT_AT] < before - 0.3, "the flip must hurt the deployed model"
    (rec,) = s["recoveries"]
    assert rec["step"] == DRIFT_AT
    assert rec["after_retraining"] is not None
    assert rec["after_retraining"] >= before - 0.05, rec
    assert ticks[max(ticks)] >= before - 0.05


def test_promoted_version_has_lineage_and_champion_alias(sudden: tuple[Path, dict[str, Any]]) -> None:
    _, s = sudden
    versions = list_model_versions(s["tracking_uri"], "fedge-sine2-sudden")
    assert len(versions) == len(s["campaigns"]), "every campaign's model is a version"
    champions = [v for v in versions if "champion" in v["aliases"]]
    assert len(champions) == 1
    champ = champions[0]
    assert champ["version"] == s["champion"]
    tags = champ["tags"]
    assert tags["fedge.promoted"] == "true"
    assert tags["fedge.parent_version"] == "1"
    assert tags["fedge.trigger_reason"].startswith("drift quorum")
    assert int(tags["fedge.campaign_rounds"]) == 4
    assert int(tags["fedge.participating_devices"]) == 5
    first = versions[0]["tags"]
    assert first["fedge.parent_version"] == "none"


def test_restarted_server_starts_from_the_registry_champion(
    sudden: tuple[Path, dict[str, Any]],
) -> None:
    tmp, first = sudden
    again = _run(tmp, "sine2_sudden.toml")
    assert again["resumed_from"] == first["champion"]
    assert all(c["reason"] != "initial: no model deployed yet" for c in again["campaigns"])
    versions = list_model_versions(again["tracking_uri"], "fedge-sine2-sudden")
    numbers = [v["version"] for v in versions]
    assert numbers == list(range(1, len(numbers) + 1)), "no version lost or duplicated"
    for c in again["campaigns"]:
        assert c["parent"] >= first["champion"]


def test_stationary_stream_starts_no_campaign(tmp_path: Path) -> None:
    s = _run(tmp_path, "sine2_stationary.toml")
    assert [c["reason"] for c in s["campaigns"]] == ["initial: no model deployed yet"]
    accs = [t["accuracy"] for t in s["ticks"][1:]]
    assert min(accs) > 0.85


def test_bad_rows_are_counted_not_fatal(tmp_path: Path) -> None:
    s = _run(tmp_path, "sine2_sudden.toml", "scenario.bad_row_fraction=0.05", "scenario.ticks=4",
             "scenario.schedule.at=2")
    # 5% of 100 rows, 5 devices, 4 ticks
    assert s["rejected_rows"] == 5 * 5 * 4
    assert all(t["n_samples"] == 5 * 95 for t in s["ticks"])


@pytest.mark.parametrize("policy", ["periodic", "always", "never"])
def test_baseline_policies_run_end_to_end(tmp_path: Path, policy: str) -> None:
    s = _run(tmp_path, "sine2_sudden.toml", f'trigger.policy="{policy}"', "trigger.period=3",
             "scenario.ticks=7", "scenario.schedule.at=5", "campaign.rounds=1")
    ticks = [c["tick"] for c in s["campaigns"]]
    assert ticks == {"periodic": [0, 3, 6], "always": list(range(7)), "never": [0]}[policy]
