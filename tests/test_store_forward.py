"""Store and forward: a device that cannot reach the server keeps its reports and delivers them."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from inprocess_helpers import fed_device
from mlflow import MlflowClient
from signing_helpers import deploy_signed, trusting

from clients.client_app import app as client_app
from clients.client_app import forget_devices
from clients.device import Device
from clients.store import DeviceStore
from fedge.contracts import model as nets
from fedge.contracts.config_load import load_config
from fedge.core.records import CampaignRecord, TickRecord
from fedge.engines.inprocess import InProcessGrid
from fedge.runner import feed_devices
from fedge.scenarios import build_scenario
from fedge.server.app import run_server

CFG = load_config(
    None,
    ["scenario.clients=2", "scenario.ticks=12", "scenario.schedule.at=4", "scenario.bad_row_fraction=0.0"],
)


def _champion(device: Device) -> dict[str, np.ndarray]:
    xs, ys = zip(*(build_scenario(CFG.scenario).batch(c, t) for c in range(2) for t in range(3)))
    model = nets.build_model(2, 2, CFG.model.hidden, CFG.model.layers)
    nets.initial_weights(model, 0)
    nets.train(model, np.concatenate(xs), np.concatenate(ys), epochs=30, lr=0.02, batch_size=32, seed=0)
    return nets.get_weights(model)


def test_missed_ticks_are_monitored_on_return_and_kept_until_acknowledged(tmp_path: Path) -> None:
    cfg, signer = trusting(CFG, tmp_path)
    twin = fed_device(cfg, 0, tmp_path / "twin.sqlite")
    weights = _champion(twin)
    deploy_signed(twin, signer, 1, weights)
    online = [asdict(twin.report_for(t)) for t in range(8)]

    device = fed_device(cfg, 0, tmp_path / "device.sqlite")
    deploy_signed(device, signer, 1, weights)
    for t in range(3):
        device.report_for(t)
    device.acknowledge([0, 1, 2])
    device.close()  # unreachable for ticks 3-6, and restarted meanwhile

    device = fed_device(cfg, 0, tmp_path / "device.sqlite")
    missed = device.catch_up(7)
    current = device.report_for(7)
    backlog = device.backlog(7)
    assert [r.tick for r in missed] == [3, 4, 5, 6]
    assert [asdict(r) for r in backlog] == online[3:7], "each missed tick as if it had been polled"
    assert asdict(current) == online[7]
    assert any(r.drift for r in backlog), "the drift at tick 4 was seen while unreachable"

    device.close()
    device = fed_device(cfg, 0, tmp_path / "device.sqlite")
    assert [r.tick for r in device.backlog(8)] == [3, 4, 5, 6, 7], "the outbox survives a restart"
    assert device.acknowledge([3, 4, 5, 6, 7]) == 5
    assert device.backlog(8) == [] and device.store.outbox_size() == 0


def test_a_repeated_poll_gets_the_same_report_and_monitors_the_tick_once(tmp_path: Path) -> None:
    cfg, signer = trusting(CFG, tmp_path)
    device = fed_device(cfg, 1, tmp_path / "d.sqlite")
    deploy_signed(device, signer, 1, _champion(device))
    first = device.report_for(0)
    window, seen = len(device.store), device.monitor.samples_seen
    device.close()
    device = fed_device(cfg, 1, tmp_path / "d.sqlite")
    assert device.report_for(0) == first, "a restarted server polls tick 0 again"
    assert len(device.store) == window and device.monitor.samples_seen == seen
    device.acknowledge([0])
    assert device.report_for(0) == first, "the last report is kept after its acknowledgement"


def test_outbox_is_bounded_and_says_what_it_dropped(tmp_path: Path, caplog: Any) -> None:
    with DeviceStore(tmp_path / "s.sqlite", outbox_capacity=3) as store:
        for t in range(5):
            store.put_report(t, {"tick": t, "drift": False})
        assert [r["tick"] for r in store.pending_reports()] == [2, 3, 4]
    assert "dropped the 1 oldest" in caplog.text


def test_offline_device_delivers_its_reports_when_it_returns(tmp_path: Path) -> None:
    overrides = [
        f'run.output_dir="{tmp_path}"',
        "scenario.clients=3",
        "scenario.ticks=9",
        "scenario.schedule.at=4",
        "scenario.bad_row_fraction=0.0",
        "campaign.rounds=2",
        "campaign.initial_rounds=3",
    ]
    cfg = load_config(None, overrides)
    folder = tmp_path / "run"
    feed_devices(cfg, folder)  # device data arrives in each inbox whether or not it is reachable
    run_config: dict[str, bool | float | int | str] = {
        "scenario": "", "overrides": ";".join(overrides), "run-dir": str(folder)
    }
    grid = InProcessGrid(client_app, cfg.scenario.clients, run_config)

    def unplug(rec: TickRecord, campaign: CampaignRecord | None) -> None:
        if rec.tick == 2:
            grid.offline.add(1001)  # device 1 unreachable for ticks 3, 4, 5
        if rec.tick == 5:
            grid.offline.clear()

    try:
        run_server(grid, cfg, folder, on_tick=unplug)
    finally:
        forget_devices()
    summary = json.loads((folder / "summary.json").read_text())

    reporting = [t["n_samples"] // 100 for t in summary["ticks"]]
    assert reporting == [3, 3, 3, 2, 2, 2, 3, 3, 3]
    late = summary["late_reports"]
    assert [(r["tick"], r["arrived"], r["devices"]) for r in late] == [
        (3, 6, [1]), (4, 6, [1]), (5, 6, [1])
    ]
    assert late[1]["drifted"] == [1], "its drift at tick 4 is reported for tick 4"
    assert [t["late_reports"] for t in summary["ticks"]] == [0, 0, 0, 0, 0, 0, 3, 0, 0]

    client = MlflowClient(summary["tracking_uri"])
    history = client.get_metric_history(summary["run_id"], "late/devices")
    assert sorted(m.step for m in history) == [3, 4, 5]
    artifacts = [f.path for f in client.list_artifacts(summary["run_id"], "events")]
    assert any("tick-0006" in a and "late_reports" in a for a in artifacts)

    with DeviceStore(folder / "devices" / "device-1.sqlite") as store:
        assert [r["tick"] for r in store.pending_reports()] == [8], "all but the last acknowledged"
    device = fed_device(cfg, 1, folder / "devices" / "device-1.sqlite")
    try:
        assert device.monitor.samples_seen == 100 * 8, "every tick after the first model was tested"
        assert device.version == summary["champion"]
    finally:
        device.close()
