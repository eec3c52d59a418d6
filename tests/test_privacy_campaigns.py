"""Secure aggregation and DP chosen in a run's ``[privacy]`` section, end to end.

What a compliance owner checks: the updates that crossed were masked or
noised as configured, every model version says how it was trained and what
it cost in epsilon, the budget stops campaigns (and says so) and survives a
restart, and wrong combinations are refused before anything starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from flwr.app import Message
from inprocess_helpers import run_captured

from fedge.contracts.config import ConfigError
from fedge.contracts.config_load import load_config
from fedge.engines.inprocess import InProcessGrid
from fedge.privacy.accounting import PrivacyBudget
from fedge.privacy.anchors import summarise, verify
from fedge.privacy.report import write_report
from fedge.tracking import Tracker

BASE = [
    "scenario.clients=4",
    "scenario.ticks=8",
    "scenario.schedule.at=4",
    "campaign.rounds=2",
    "campaign.initial_rounds=3",
]


def run(
    tmp_path: Path, extra: list[str], name: str = "run"
) -> tuple[dict[str, Any], list[tuple[Message, Message]], Path]:
    overrides = [f'run.output_dir="{tmp_path}"', *BASE, *extra]
    folder = tmp_path / name
    summary, crossed = run_captured(overrides, folder)
    return summary, crossed, folder


def train_exchanges(crossed: list[tuple[Message, Message]]) -> list[tuple[Message, Message]]:
    return [(q, r) for q, r in crossed if q.metadata.message_type == "train" and not r.has_error()]


def test_secure_aggregation_from_config_masks_every_update_and_still_recovers(
    tmp_path: Path,
) -> None:
    summary, crossed, folder = run(tmp_path, ["privacy.secure_aggregation=true"])

    kinds = {q.metadata.message_type for q, _ in crossed}
    assert {"query.secagg_setup", "query.secagg_share_keys", "query.secagg_unmask"} <= kinds
    trains = train_exchanges(crossed)
    assert trains
    for request, reply in trains:
        sent = request.content.array_records["arrays"]
        for key, masked in reply.content.array_records["arrays"].items():
            values = masked.numpy()
            assert values.dtype.kind in "iu", "an update left a device unmasked"
            assert values.shape == sent[key].shape
    # The drift is detected and the secure retraining brings accuracy back.
    (recovery,) = summary["recoveries"]
    assert recovery["right_after"] < 0.5
    assert recovery["after_retraining"] is not None and recovery["after_retraining"] > 0.9
    versions = summary["versions"]
    assert len(versions) == len(summary["campaigns"]) == 2
    for v in versions:
        assert v["tags"]["fedge.aggregation"].startswith("secagg+ (k=4 of 4")
        assert v["tags"]["fedge.dp"] == "none"
    # The key exchange passed the device's egress policy, and the audit shows it.
    for log in sorted((folder / "devices").glob("*.audit.jsonl")):
        assert verify(log).ok
        assert not summarise(log)["blocked"]
    report = write_report(folder).read_text()
    assert "Blocked messages in total: 0." in report
    assert "secagg+ (k=4 of 4" in report


def test_central_dp_budget_charges_each_version_refuses_when_spent_and_survives_restart(
    tmp_path: Path,
) -> None:
    z = 2.0
    ledger = PrivacyBudget(epsilon_limit=1e9, delta=1e-5, noise_multiplier=z)
    initial = ledger.cost(3)
    # Enough for the first campaign, not for the first retraining after it
    # (campaigns compose in RDP: 3 then 2 rounds cost what 5 rounds cost).
    limit = (ledger.spent_after(3) + ledger.spent_after(5)) / 2
    privacy = [
        "privacy.secure_aggregation=true",
        'privacy.dp="central-client"',
        f"privacy.noise_multiplier={z}",
        "privacy.clipping_norm=10.0",
        f"privacy.epsilon_budget={limit}",
        # A campaign is asked for every tick: whether drift is visible through
        # this much noise is not what is tested here.
        'trigger.policy="always"',
    ]
    summary, crossed, _ = run(tmp_path, privacy)

    (version,) = summary["versions"]
    tags = version["tags"]
    assert tags["fedge.dp"] == "central-client (z=2, C=10)"
    assert float(tags["fedge.epsilon"]) == pytest.approx(initial, abs=1e-4)
    assert float(tags["fedge.epsilon_campaign"]) == pytest.approx(initial, abs=1e-4)
    assert tags["fedge.aggregation"].startswith("secagg+")
    # Central DP averages unweighted: every device's masked reply says weight 1.
    assert train_exchanges(crossed)
    refused = summary["refused"]
    assert refused and all("privacy budget" in r["reason"] for r in refused)
    assert "no further campaign will start" in refused[0]["reason"]
    assert [r["tick"] for r in refused] == list(range(1, 8))
    assert summary["privacy_budget"]["epsilon_spent"] == pytest.approx(initial, abs=1e-4)

    report = write_report(tmp_path / "run").read_text()
    assert f"Epsilon spent: {initial:.4f} of {limit:g} at delta 1e-05" in report
    assert "Campaigns not started (ticks 1-7): privacy budget" in report
    assert "Secure aggregation: on (SecAgg+" in report

    client = mlflow.MlflowClient(summary["tracking_uri"])
    spent = client.get_metric_history(summary["run_id"], "privacy/epsilon_spent")
    assert [m.value for m in spent] == pytest.approx([initial], abs=1e-4)

    # A restarted server replays the lineage's account from the registry: the
    # next run finds the budget as spent as it was.
    again, _, _ = run(tmp_path, privacy, name="run-2")
    assert again["resumed_from"] == version["version"]
    assert again["privacy_budget"]["epsilon_spent"] == pytest.approx(initial, abs=1e-4)
    assert again["refused"] and not again["campaigns"]
    tracker = Tracker(summary["tracking_uri"], "fedge", summary["model_name"])
    assert len(tracker.versions()) == 1


def test_local_dp_noises_each_update_as_configured(tmp_path: Path) -> None:
    summary, crossed, _ = run(
        tmp_path,
        ['privacy.dp="local"', "privacy.local_epsilon=50.0", "privacy.epsilon_budget=1e6"],
    )
    cfg = load_config(None, ['privacy.dp="local"', "privacy.local_epsilon=50.0"])
    from fedge.privacy.accounting import local_dp_params

    params = local_dp_params(cfg.privacy)
    assert params is not None
    # Each released update is the clipped update plus Gaussian noise of the
    # accounted std: per coordinate, the update's spread is that std.
    for request, reply in train_exchanges(crossed)[:8]:
        sent = request.content.array_records["arrays"]
        got = reply.content.array_records["arrays"]
        delta = np.concatenate(
            [(got[k].numpy() - sent[k].numpy()).ravel() for k in sent]
        )
        assert np.std(delta) == pytest.approx(params.noise_std, rel=0.15)
    tags = summary["versions"][0]["tags"]
    assert tags["fedge.dp"].startswith("local (LocalDpMod, C=1")
    assert float(tags["fedge.epsilon"]) > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["privacy.secure_aggregation=true", "campaign.strategy=krum"],
            "privacy.secure_aggregation: campaign.strategy 'krum' needs each device's update",
        ),
        (
            ["privacy.secure_aggregation=true", 'campaign.compression="int8"'],
            "cannot compress masked updates",
        ),
        (
            ["privacy.secure_aggregation=true", 'privacy.dp="central-server"'],
            "under secure aggregation use 'central-client'",
        ),
        (
            ["privacy.secure_aggregation=true", "privacy.secagg_shares=2.5"],
            "privacy.secagg_shares: 2.5 is neither a fraction",
        ),
        (
            ["privacy.secure_aggregation=true", "scenario.clients=2"],
            "needs at least 3 devices",
        ),
        (['privacy.dp="sometimes"'], "privacy.dp: 'sometimes' is not allowed"),
        (['privacy.dp="central-client"', "privacy.delta=0.5"], "privacy.delta: 0.5 is out of range"),
    ],
)
def test_privacy_settings_that_cannot_work_are_refused_in_one_line(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_secure_aggregation_runs_on_flowers_simulation_engine_like_in_process(
    tmp_path: Path,
) -> None:
    """The device keeps its protocol state in Flower's context between the four exchanges."""
    from fedge.runner import RunRequest, quiet_tick
    from fedge.runner import run as run_engine

    results = {}
    for engine in ("inprocess", "simulation"):
        overrides = (
            "scenario.clients=3",
            "scenario.ticks=5",
            "scenario.schedule.at=3",
            "campaign.rounds=1",
            "campaign.initial_rounds=2",
            "privacy.secure_aggregation=true",
            f'run.output_dir="{tmp_path / engine}"',
        )
        results[engine] = run_engine(RunRequest(None, overrides, engine), on_tick=quiet_tick)
    ours, flower = results["inprocess"], results["simulation"]
    assert [c["tick"] for c in flower["campaigns"]] == [c["tick"] for c in ours["campaigns"]] == [0, 3]
    # Masks cancel exactly; only the quantiser's rounding may differ between engines.
    assert [t["accuracy"] for t in flower["ticks"]] == pytest.approx(
        [t["accuracy"] for t in ours["ticks"]], abs=0.02
    )
    for v in flower["versions"]:
        assert v["tags"]["fedge.aggregation"] == "secagg+ (k=3 of 3, t=2)"


def test_central_dp_abandons_a_short_round_and_the_spend_survives_a_restart(
    tmp_path: Path,
) -> None:
    """Noise calibrated for four devices must not go on an average of three."""
    overrides = [
        f'run.output_dir="{tmp_path}"',
        *BASE,
        'privacy.dp="central-client"',
        "privacy.noise_multiplier=2.0",
        "privacy.epsilon_budget=1000",
        "run.reply_timeout=2",
    ]
    nodes: list[int] = []

    def drop_after_first_poll(grid: InProcessGrid, request: Message, reply: Message) -> None:
        # The last device answers tick 0's poll, then is gone before training.
        nodes[:] = nodes or sorted(grid.get_node_ids())
        if request.metadata.message_type == "query" and request.metadata.dst_node_id == nodes[-1]:
            grid.offline.add(nodes[-1])

    summary, _ = run_captured(overrides, tmp_path / "run", drop_after_first_poll)
    # Tick 0's campaign lost a device mid-round: abandoned, nothing registered.
    # Tick 1 polls the three that are left and trains them, noise calibrated for three.
    assert summary["refused"] == [
        {"tick": 0, "reason": summary["refused"][0]["reason"]}
    ] and "campaign abandoned" in summary["refused"][0]["reason"]
    version = summary["versions"][0]
    assert version["tags"]["fedge.trigger_tick"] == "1"
    assert version["tags"]["fedge.participating_devices"] == "3"
    # The abandoned campaign's noised rounds went out: they stay charged.
    ledger = PrivacyBudget(1000, 1e-5, noise_multiplier=2.0)
    both = ledger.spent_after(6)
    assert float(version["tags"]["fedge.epsilon"]) == pytest.approx(both, abs=1e-4)
    rounds = 3 + sum(c["rounds"] for c in summary["campaigns"])
    assert summary["privacy_budget"]["epsilon_spent"] == pytest.approx(
        ledger.spent_after(rounds), abs=1e-4
    )

    # A restarted server (a new run of the lineage) replays both from the ledger,
    # the abandoned one included, though only one version carries DP tags.
    again, _, _ = run(
        tmp_path,
        ['privacy.dp="central-client"', "privacy.noise_multiplier=2.0", "privacy.epsilon_budget=1000"],
        name="run-2",
    )
    labels = [c["label"] for c in again["privacy_budget"]["campaigns"]]
    assert labels[:2] == ["tick 0", "tick 1"]
    assert again["privacy_budget"]["epsilon_spent"] > ledger.spent_after(rounds)
