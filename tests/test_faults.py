"""Faults, with nothing lost: devices that stop answering, a server that is stopped and restarted.

The first tests run on the in-process engine; the last two start real
processes (SuperLink with TLS and SuperNode authentication, SuperNodes, an
MLflow server) on 127.0.0.1, kill a SuperNode in the middle of a campaign, and
stop the ServerApp in the middle of a run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message
from mlflow import MlflowClient

from clients.client_app import app as client_app
from clients.client_app import forget_devices
from clients.device import Device
from clients.store import DeviceStore
from fedge.contracts.config import FedgeConfig
from fedge.contracts.config_load import load_config
from fedge.core.records import CampaignRecord, TickRecord
from fedge.core.state import JsonState, state_path
from fedge.deploy.launcher import LocalDeployment, start_deployment
from fedge.deploy.runs import save_run_log, stop_run, submit_run, wait_for_run
from fedge.engines.inprocess import InProcessGrid
from fedge.runner import feed_devices
from fedge.server.app import run_server
from fedge.tracking import list_model_versions

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _inprocess(
    tmp: Path, *extra: str, drop_node: int | None = None
) -> tuple[dict[str, Any], FedgeConfig, Path]:
    """A 3-device run in which one node dies right after its report of tick 0 (before the campaign)."""
    overrides = [
        f'run.output_dir="{tmp}"',
        "scenario.clients=3",
        "scenario.ticks=3",
        "scenario.schedule.at=2",
        "scenario.bad_row_fraction=0.0",
        "campaign.rounds=1",
        "campaign.initial_rounds=2",
        *extra,
    ]
    cfg = load_config(None, overrides)
    folder = tmp / "run"
    feed_devices(cfg, folder)
    grid = InProcessGrid(client_app, 3, {"scenario": "", "overrides": ";".join(overrides), "run-dir": str(folder)})

    def watch(request: Message, reply: Message) -> None:
        md = request.metadata
        if md.message_type == "query" and md.dst_node_id == drop_node and md.group_id == "tick-0":
            grid.offline.add(drop_node)  # it reported; the campaign it is part of starts now

    def back(rec: TickRecord, campaign: CampaignRecord | None) -> None:
        grid.offline.clear()

    grid.on_exchange = watch
    try:
        run_server(grid, cfg, folder, on_tick=back)
    finally:
        forget_devices()
        grid.on_exchange = None
    return json.loads((folder / "summary.json").read_text()), cfg, folder


def test_round_goes_on_without_a_device_that_stops_answering(tmp_path: Path) -> None:
    s, cfg, folder = _inprocess(tmp_path, "campaign.min_devices=2", drop_node=1002)
    first = s["campaigns"][0]
    assert first["tick"] == 0 and first["version"] == 1, "the campaign completed with two devices"
    short = s["short_rounds"]
    assert {(r["round"], r["kind"], r["replied"], r["sent"]) for r in short} == {
        (1, "train", 2, 3), (1, "evaluate", 2, 3), (2, "train", 2, 3), (2, "evaluate", 2, 3)
    }
    assert all(r["missing_nodes"] == [1002] for r in short)
    assert s["versions"][0]["tags"]["fedge.participating_devices"] == "2", "who trained, not who was asked"
    assert [t["n_samples"] // 100 for t in s["ticks"]] == [3, 3, 3], "it is back for the next poll"
    device = Device(cfg, 2, folder / "devices" / "device-2.sqlite")
    try:
        assert device.version == s["champion"], "the returning device got the champion"
    finally:
        device.close()


def test_campaign_is_abandoned_when_fewer_than_min_devices_answer(tmp_path: Path) -> None:
    s, _, _ = _inprocess(tmp_path, "campaign.min_devices=3", drop_node=1002)
    (refusal, *_) = s["refused"]
    assert refusal["tick"] == 0
    assert "campaign abandoned" in refusal["reason"] and "campaign.min_devices is 3" in refusal["reason"]
    assert "2 of 3 devices replied" in refusal["reason"]
    versions = list_model_versions(s["tracking_uri"], s["model_name"])
    assert [v["tags"]["fedge.trigger_tick"] for v in versions] == ["1"], "nothing from tick 0"
    assert [c["tick"] for c in s["campaigns"]] == [1], "retried with all three at the next tick"


def test_in_process_run_resumes_after_the_server_dies(tmp_path: Path) -> None:
    """The same restart on the in-process engine (the deployment test below does it for real)."""
    overrides = [
        f'run.output_dir="{tmp_path}"',
        "scenario.clients=2",
        "scenario.ticks=6",
        "scenario.schedule.at=3",
        "scenario.bad_row_fraction=0.0",
        "campaign.rounds=1",
        "campaign.initial_rounds=2",
        "trigger.policy=\"periodic\"",
        "trigger.period=2",
    ]
    cfg = load_config(None, overrides)
    folder = tmp_path / "run"
    feed_devices(cfg, folder)
    run_config: dict[str, bool | float | int | str] = {
        "scenario": "", "overrides": ";".join(overrides), "run-dir": str(folder)
    }

    class Died(Exception):
        pass

    def die_after_3(rec: TickRecord, campaign: CampaignRecord | None) -> None:
        if rec.tick == 3:
            raise Died

    with pytest.raises(Died):
        try:
            run_server(InProcessGrid(client_app, 2, run_config), cfg, folder, on_tick=die_after_3)
        finally:
            forget_devices()
    saved = JsonState(state_path(cfg.output_dir, cfg.model_name)).load()
    assert saved is not None and saved["tick"] == 3 and saved["rounds_done"] == 3
    try:
        run_server(InProcessGrid(client_app, 2, run_config), cfg, folder, on_tick=lambda *_: None)
    finally:
        forget_devices()
    s = json.loads((folder / "summary.json").read_text())
    assert s["resumed_at"] == 4
    assert [t["tick"] for t in s["ticks"]] == [0, 1, 2, 3, 4, 5], "the summary covers the whole run"
    # Ticks 0 and 2 before the kill; after it, periodic from the saved last campaign (2).
    assert [c["tick"] for c in s["campaigns"]] == [0, 2, 4]
    assert s["rounds_used"] == 4
    versions = list_model_versions(s["tracking_uri"], s["model_name"])
    assert [v["tags"]["fedge.trigger_tick"] for v in versions] == ["0", "2", "4"]
    assert len({v["tags"]["fedge.run_key"] for v in versions}) == 1
    with DeviceStore(folder / "devices" / "device-0.sqlite") as store:
        assert store.get_state("last-tick") == b"5"


# -- real processes ------------------------------------------------------------------------------

DEPLOYED = (
    "scenario.clients=3",
    "scenario.ticks=4",
    "scenario.bad_row_fraction=0.0",
    "scenario.schedule.at=3",
    'scenario.name="faults"',
    'trigger.policy="periodic"',
    "trigger.period=2",
    "campaign.rounds=1",
    "campaign.initial_rounds=1",
    "campaign.local_epochs=1",
    "campaign.min_devices=2",
    # Under load a SuperNode's first message of a run (app install, ClientApp start) takes 15-20 s.
    "run.reply_timeout=25",
)


@dataclass
class FaultyRun:
    """What the deployment went through and what it left behind."""

    dep: LocalDeployment
    cfg: FedgeConfig
    folder: Path
    first_run: int
    killed_after_tick: bytes | None
    stopped: dict[str, Any]
    summary: dict[str, Any]


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultyRun]:
    """Four ticks on SuperLink (TLS, node auth), MLflow server and 3 SuperNodes, with two faults.

    Campaigns run at ticks 0 and 2. SuperNode 2 is killed while it trains in the
    campaign of tick 2, which goes on with the other two; the ServerApp is stopped
    once tick 2 is done; node 2 is started again, and so is the run, which
    resumes at tick 3.
    """
    out = tmp_path_factory.mktemp("faults")
    cfg = load_config(EXPERIMENTS / "sine2_sudden.toml", [*DEPLOYED, f'run.output_dir="{out}"'])
    folder = out / "run"
    feed_devices(cfg, folder)
    dep = start_deployment(out / "deployment", out, n_devices=3)
    try:
        run_config: dict[str, object] = {
            "scenario": str(EXPERIMENTS / "sine2_sudden.toml"),
            "overrides": ";".join([*DEPLOYED, f'tracking.uri="{dep.tracking_uri}"']),
            "output-dir": str(out),
            "run-dir": str(folder),
            "engine": "deployment",
        }
        first = submit_run(dep, run_config)
        log = dep.supernode(2).process.log
        _wait_for(
            lambda: log.read_text(errors="replace").count("Receiving: train message") >= 2,
            300,
            "the campaign of tick 2 reaching node 2",
        )
        dep.kill_supernode(2)
        with DeviceStore(folder / "devices" / "device-2.sqlite") as kept:
            killed_after = kept.get_state("last-tick")
        saved = JsonState(state_path(cfg.output_dir, cfg.model_name))
        _wait_for(lambda: (saved.load() or {}).get("tick") == 2, 300, "the campaign of tick 2")
        stop_run(dep, first)
        stopped = saved.load() or {}
        save_run_log(dep, first)
        dep.restart_supernode(2, 3)
        again = submit_run(dep, run_config)
        status = wait_for_run(dep, again, 400, done_file=folder / "summary.json", poll=5.0)
        assert status == "finished:completed", status
        summary = json.loads((folder / "summary.json").read_text())
        yield FaultyRun(dep, cfg, folder, first, killed_after, stopped, summary)
    finally:
        dep.stop()


def _first_mlflow_run(faulty: FaultyRun) -> str:
    client = MlflowClient(faulty.summary["tracking_uri"])
    experiment = client.get_experiment_by_name(faulty.cfg.tracking.experiment)
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`fedge.run_dir` = '{faulty.folder}'",
    )
    (stopped,) = [r for r in runs if r.info.run_id != faulty.summary["run_id"]]
    return str(stopped.info.run_id)


def test_supernode_killed_mid_campaign_round_goes_on_and_the_node_rejoins(
    faulty_run: FaultyRun,
) -> None:
    s, node2 = faulty_run.summary, faulty_run.dep.node_ids[2]
    client = MlflowClient(s["tracking_uri"])
    first = _first_mlflow_run(faulty_run)
    events = [f.path for f in client.list_artifacts(first, "events")]
    short = [e for e in events if "tick-0002-round_short" in e]
    assert short, f"the tick-2 rounds went on without node 2: {events}"
    payload = json.loads(Path(client.download_artifacts(first, short[0])).read_text())["payload"]
    assert payload["missing_nodes"] == [node2] and payload["replied"] == 2 and payload["sent"] == 3
    versions = list_model_versions(s["tracking_uri"], s["model_name"])
    assert versions[1]["tags"]["fedge.trigger_tick"] == "2", "the campaign completed without it"

    assert faulty_run.killed_after_tick == b"2", "it was killed after its report of tick 2"
    resumed = [t for t in s["ticks"] if t["tick"] >= s["resumed_at"]]
    assert [(t["tick"], t["n_samples"] // 100) for t in resumed] == [(3, 3)], "it rejoined"

    device = Device(faulty_run.cfg, 2, faulty_run.folder / "devices" / "device-2.sqlite")
    try:
        assert device.version == s["ticks"][-1]["champion"], "it got the champion at its next poll"
        assert device.monitor.samples_seen == 100 * 3, "one detector stream, ticks 1-3, none twice"
        _, _, ticks = device.store.window()
        assert max(np.bincount(ticks)) == 100, "no tick's rows were stored twice"
    finally:
        device.close()


def test_serverapp_stopped_mid_run_resumes_with_its_counters(faulty_run: FaultyRun) -> None:
    s, stopped = faulty_run.summary, faulty_run.stopped
    assert stopped["tick"] == 2 and not stopped["finished"] and stopped["rounds_done"] == 2
    assert stopped["last_campaign"] == 2 and stopped["last_registered"] == 2
    assert s["resumed_at"] == 3, "the next tick"
    assert [t["tick"] for t in s["ticks"]] == [0, 1, 2, 3], "the summary covers the whole run"
    versions = list_model_versions(s["tracking_uri"], s["model_name"])
    assert [v["tags"]["fedge.trigger_tick"] for v in versions] == ["0", "2"], "none lost or twice"
    assert len({v["tags"]["fedge.run_key"] for v in versions}) == 1, "one run across the restart"
    assert s["rounds_used"] == 2, "the round counter carried over"
    after = [c for c in s["campaigns"] if c["tick"] >= s["resumed_at"]]
    assert after == [], "tick 3 is within the period of the campaign at tick 2"
    client = MlflowClient(s["tracking_uri"])
    assert [m.step for m in client.get_metric_history(s["run_id"], "devices_reporting")] == [3]
    first = _first_mlflow_run(faulty_run)
    assert sorted(m.step for m in client.get_metric_history(first, "devices_reporting")) == [0, 1, 2]
