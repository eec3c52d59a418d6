"""A few devices send scaled, sign-flipped updates: robust aggregation keeps the champion good."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict

from clients.client_app import app as client_app
from clients.client_app import forget_devices
from fedge.contracts.config_load import load_config
from fedge.contracts.wire import from_arrays, to_arrays
from fedge.engines.inprocess import InProcessGrid
from fedge.runner import feed_devices
from fedge.server.app import run_server

ATTACKERS = {0, 1}


def attacked_app(msg: Message, context: Context) -> Message:
    """The real ClientApp, except that two devices invert and blow up their updates."""
    reply = client_app(msg, context)
    pid = int(context.node_config["partition-id"])
    if msg.metadata.message_type != "train" or pid not in ATTACKERS or reply.has_error():
        return reply
    sent = from_arrays(msg.content.array_records["arrays"])
    local = from_arrays(reply.content.array_records["arrays"])
    poisoned = {k: sent[k] - 10.0 * (local[k] - sent[k]) for k in local}
    metrics = reply.content.metric_records["metrics"]
    content = RecordDict({"arrays": to_arrays(poisoned), "metrics": MetricRecord(dict(metrics))})
    return Message(content, reply_to=msg)


def _run(tmp: Path, *overrides: str) -> dict[str, Any]:
    items = [
        f'run.output_dir="{tmp}"',
        "scenario.clients=7",
        "scenario.ticks=5",
        "scenario.schedule.kind=\"stationary\"",
        "scenario.bad_row_fraction=0.0",
        *overrides,
    ]
    cfg = load_config(None, items)
    folder = tmp / "run"
    run_config = {"scenario": "", "overrides": ";".join(items), "run-dir": str(folder)}
    feed_devices(cfg, folder)
    grid = InProcessGrid(attacked_app, cfg.scenario.clients, run_config)
    try:
        return run_server(grid, cfg, folder, on_tick=lambda *_: None)
    finally:
        forget_devices()


def _late_accuracy(summary: dict[str, Any]) -> float:
    return min(t["accuracy"] for t in summary["ticks"][1:])


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(tmp_path_factory.mktemp("plain"), 'campaign.strategy="fedavg"',
                "campaign.screen_updates=false")


def test_plain_fedavg_falls_to_the_attack(plain: dict[str, Any]) -> None:
    assert _late_accuracy(plain) < 0.8


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_robust_aggregators_hold(tmp_path: Path, plain: dict[str, Any], strategy: str) -> None:
    # 2 attackers of 7: trim 2 per side (beta 0.3), Krum told to expect 2
    robust = _run(tmp_path, f'campaign.strategy="{strategy}"', "campaign.screen_updates=false",
                  "campaign.assumed_malicious=2", "campaign.trim_beta=0.3")
    assert _late_accuracy(robust) > 0.9
    assert _late_accuracy(robust) > _late_accuracy(plain) + 0.1


def test_screening_alone_saves_fedavg(tmp_path: Path) -> None:
    screened = _run(tmp_path, 'campaign.strategy="fedavg"', "campaign.screen_updates=true")
    assert _late_accuracy(screened) > 0.9
