"""The MLflow server goes away mid-run: the run goes on, nothing is lost, nothing is doubled.

Every test here runs a real ``mlflow server`` (SQLite backend, artifacts in a
temporary folder) and stops it for a while; the federation runs on the
in-process engine.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow_helpers import MlflowServer, free_port

from fedge.core.records import CampaignRecord, TickRecord
from fedge.runner import RunRequest, run
from fedge.tracking import (
    ENTRY_TAG,
    PROVISIONAL_TAG,
    Tracker,
    TrackingError,
    list_model_versions,
    sync_outboxes,
)
from fedge.tracking.outbox import OUTBOX_DIR, Outbox

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TICKS = 10
DRIFT_AT = 5
TICK_METRICS = ("drift_fraction", "rejected_rows", "devices_reporting", "champion_version")
X = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server(shared_server: MlflowServer) -> MlflowServer:
    """The module's server, running; each test registers under its own model name."""
    if not shared_server.healthy():
        shared_server.stop()
        shared_server.start()
    return shared_server


@pytest.fixture
def model(request: pytest.FixtureRequest) -> str:
    return "fedge-" + request.node.name.removeprefix("test_")[:40]


def _run(
    server: MlflowServer,
    model: str,
    out: Path,
    run_dir: Path,
    *,
    stop_after: int,
    restart_after: int | None,
) -> dict[str, Any]:
    """A short drift scenario whose tracking server stops after one tick and maybe restarts."""

    def on_tick(rec: TickRecord, campaign: CampaignRecord | None) -> None:
        if rec.tick == stop_after:
            server.stop()
        if restart_after is not None and rec.tick == restart_after:
            server.start()

    overrides = (
        f'run.output_dir="{out}"',
        f'tracking.uri="{server.url}"',
        f'tracking.model_name="{model}"',
        "scenario.clients=3",
        f"scenario.ticks={TICKS}",
        f"scenario.schedule.at={DRIFT_AT}",
        "scenario.bad_row_fraction=0.0",
        "trigger.cooldown=1",
        "campaign.rounds=2",
        "campaign.initial_rounds=3",
    )
    return run(
        RunRequest(EXPERIMENTS / "sine2_sudden.toml", overrides), on_tick=on_tick, run_dir=run_dir
    )


def _assert_everything_landed_once(
    url: str, model: str, summary: dict[str, Any], run_dir: Path
) -> None:
    """Metrics, events, versions with lineage, the champion alias: all there, once."""
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    run_id = summary["run_id"]
    info = client.get_run(run_id).info
    assert info.status == "FINISHED"
    for key in TICK_METRICS:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert steps == list(range(TICKS)), f"{key}: every tick once, got {steps}"
    rounds = sum(c["rounds"] for c in summary["campaigns"])
    steps = sorted(m.step for m in client.get_metric_history(run_id, "round/eval_acc"))
    assert steps == list(range(1, rounds + 1)), "every round once"

    campaigns = summary["campaigns"]
    assert len(campaigns) >= 2, "the initial campaign and one for the drift"
    events = sorted(a.path for a in client.list_artifacts(run_id, "events"))
    expected = sorted(
        f"events/tick-{c['tick']:04d}-{kind}.json"
        for c in campaigns
        for kind in ("drift_trigger", "campaign")
    )
    assert events == expected
    counts = [m.value for m in client.get_metric_history(run_id, "events/campaign")]
    assert counts == [float(n) for n in range(1, len(campaigns) + 1)]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.json", "accuracy.png"} <= artifacts

    versions = list_model_versions(url, model)
    assert [v["version"] for v in versions] == list(range(1, len(campaigns) + 1))
    assert len({v["tags"][ENTRY_TAG] for v in versions}) == len(versions)
    for c, v in zip(campaigns, versions, strict=True):
        tags = v["tags"]
        assert tags["fedge.trigger_tick"] == str(c["tick"]), "one version per campaign, in order"
        assert tags["fedge.trigger_reason"] == c["reason"]
        assert tags["fedge.promoted"] == str(c["promoted"]).lower()
        assert tags["fedge.parent_version"] == (str(c["parent"]) if c["parent"] else "none")
        assert v["version"] == c["version"], "the number the run used is MLflow's"
        assert PROVISIONAL_TAG not in tags
    holders = [v["version"] for v in versions if "champion" in v["aliases"]]
    promoted = [c["version"] for c in campaigns if c["promoted"]]
    assert holders == [promoted[-1]] == [summary["champion"]]
    assert not (run_dir / OUTBOX_DIR).exists(), "nothing left in the journal"


def test_run_goes_on_through_an_outage_spanning_a_campaign_and_loses_nothing(
    server: MlflowServer, model: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "runs" / "outage"
    caplog.set_level(logging.WARNING, logger="fedge.tracking")
    summary = _run(server, model, tmp_path / "runs", run_dir, stop_after=2, restart_after=8)

    assert [t["tick"] for t in summary["ticks"]] == list(range(TICKS))
    during = [c for c in summary["campaigns"] if 2 < c["tick"] <= 8]
    assert during, "a campaign ran while the server was down"
    assert summary["tracking"]["pending"] == 0
    assert {v["state"] for v in summary["tracking"]["versions"]} == {"landed"}
    said = [r.getMessage() for r in caplog.records if r.name == "fedge.tracking"]
    assert any("unreachable" in m and "buffers" in m for m in said), said
    assert any("answers again" in m for m in said), said
    _assert_everything_landed_once(server.url, model, summary, run_dir)


def test_outage_through_the_end_keeps_the_journal_and_fedge_sync_sends_it_once(
    server: MlflowServer, model: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "runs" / "down-at-the-end"
    caplog.set_level(logging.WARNING, logger="fedge.tracking")
    summary = _run(server, model, tmp_path / "runs", run_dir, stop_after=2, restart_after=None)

    assert len(summary["ticks"]) == TICKS
    tracking = summary["tracking"]
    assert tracking["pending"] > 0 and not tracking["server_reachable"]
    states = [v["state"] for v in tracking["versions"]]
    assert states[0] == "landed" and "pending" in states[1:]
    assert [v["version"] for v in summary["versions"]] == [
        c["version"] for c in summary["campaigns"]
    ]
    assert (run_dir / OUTBOX_DIR / "journal.sqlite").is_file()
    kept = [r.getMessage() for r in caplog.records if "kept in" in r.getMessage()]
    assert len(kept) == 1 and f"fedge sync {run_dir}" in kept[0], kept

    server.start()
    fedge = Path(sys.executable).with_name("fedge")
    done = subprocess.run(
        [str(fedge), "sync", str(run_dir)], check=False, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "outbox emptied" in done.stdout and "Traceback" not in done.stderr
    _assert_everything_landed_once(server.url, model, summary, run_dir)

    again = subprocess.run(
        [str(fedge), "sync", str(run_dir)], check=False, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and "Nothing to send" in again.stdout
    assert len(list_model_versions(server.url, model)) == len(summary["campaigns"])


def test_next_run_sends_what_the_last_one_buffered_before_it_reads_the_champion(
    server: MlflowServer, model: str, tmp_path: Path
) -> None:
    out = tmp_path / "runs"
    first = _run(
        server, model, out, out / "sine2-sudden" / "first", stop_after=2, restart_after=None
    )
    assert first["tracking"]["pending"] > 0
    server.start()

    second = _run(
        server, model, out, out / "sine2-sudden" / "second", stop_after=TICKS, restart_after=None
    )
    assert second["resumed_from"] == first["champion"]
    assert all(not c["reason"].startswith("initial") for c in second["campaigns"])
    assert not (out / "sine2-sudden" / "first" / OUTBOX_DIR).exists()
    versions = list_model_versions(server.url, model)
    made = first["campaigns"] + second["campaigns"]
    assert [v["version"] for v in versions] == list(range(1, len(made) + 1))
    assert [v["tags"]["fedge.trigger_tick"] for v in versions] == [str(c["tick"]) for c in made]


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_background_thread_sends_the_journal_when_the_server_is_back(
    server: MlflowServer, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    tracker = Tracker(server.url, "outage", "model-bg", outbox=run_dir / OUTBOX_DIR)
    run_id = tracker.start({"rounds": 2})
    v1 = tracker.register_model(_net(0), X, {"fedge.parent_version": "none"})
    tracker.set_champion(v1)
    tracker.log_metrics({"acc": 0.0}, step=0)
    tracker.flush()

    server.stop()
    started = time.perf_counter()
    for step in range(1, 6):
        tracker.log_metrics({"acc": float(step)}, step=step)
    tracker.log_event("drift_trigger", 3, {"devices": [0, 1]})
    v2 = tracker.register_model(_net(1), X, {"fedge.parent_version": str(v1)})
    tracker.set_champion(v2)
    assert v2 == 2, "the number MLflow will give it"
    assert time.perf_counter() - started < 15, "the outage costs seconds, not MLflow's retries"

    server.start()
    client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # nothing calls the tracker: its thread must send
        if client.get_registered_model("model-bg").aliases.get("champion") == "2":
            break
        time.sleep(0.5)
    else:
        pytest.fail("the journal was not sent within 30 s of the server's return")
    tracker.end()

    history = client.get_metric_history(run_id, "acc")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(6)]
    assert client.get_run(run_id).data.metrics["events/drift_trigger"] == 1.0
    assert client.get_model_version("model-bg", "2").tags["fedge.parent_version"] == "1"
    assert not (run_dir / OUTBOX_DIR).exists()


def test_versions_registered_offline_keep_their_lineage_when_mlflow_numbers_them_differently(
    server: MlflowServer, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    tracker = Tracker(server.url, "outage", "model-shared", outbox=run_dir / OUTBOX_DIR)
    tracker.start({})
    v1 = tracker.register_model(_net(0), X, {"fedge.parent_version": "none"})
    tracker.set_champion(v1)
    server.stop()
    v2 = tracker.register_model(_net(1), X, {"fedge.parent_version": str(v1)})
    tracker.set_champion(v2)
    v3 = tracker.register_model(_net(2), X, {"fedge.parent_version": str(v2)})
    tracker.end()
    assert (v1, v2, v3) == (1, 2, 3)

    server.start()
    other = Tracker(server.url, "outage", "model-shared")  # another writer gets there first
    other.start({})
    assert other.register_model(_net(9), X, {"fedge.parent_version": "none"}) == 2
    other.end()

    (result,) = sync_outboxes(run_dir)
    assert result.versions == [(2, 3), (3, 4)] and not result.reason
    assert "2 (now 3)" in result.line()
    versions = {v["version"]: v for v in list_model_versions(server.url, "model-shared")}
    assert sorted(versions) == [1, 2, 3, 4]
    assert versions[3]["tags"][PROVISIONAL_TAG] == "2"
    assert versions[3]["tags"]["fedge.parent_version"] == "1"
    assert versions[4]["tags"]["fedge.parent_version"] == "3", "the parent's real number"
    assert versions[3]["aliases"] == ["champion"]


def test_a_crash_between_creating_a_version_and_marking_it_done_does_not_double_it(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    child = f"""
import os, sys
import numpy as np, torch
from fedge.tracking.outbox import Outbox
from fedge.tracking import Tracker

done = Outbox.mark_done
def crash_after_the_store_has_it(self, seq, result=None):
    if result and "version" in result:
        os._exit(17)  # the process dies: nothing marks the entry done
    done(self, seq, result)
Outbox.mark_done = crash_after_the_store_has_it

tracker = Tracker({uri!r}, "crash", "model-crash", outbox=__import__("pathlib").Path({str(run_dir / OUTBOX_DIR)!r}))
tracker.start({{}})
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(2, 2))
tracker.register_model(net, np.zeros((4, 2), np.float32), {{"fedge.trigger_tick": "0"}})
sys.exit(0)
"""
    crashed = subprocess.run(
        [sys.executable, "-c", child], check=False, capture_output=True, text=True, timeout=300
    )
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    assert [v["version"] for v in list_model_versions(uri, "model-crash")] == [1]
    box = Outbox(run_dir / OUTBOX_DIR, create=False)
    assert [e.kind for e in box.entries("pending")] == ["register"], "the crash left it pending"
    box.close()

    (result,) = sync_outboxes(run_dir)
    assert result.landed == 1 and result.versions == [(1, 1)]
    versions = list_model_versions(uri, "model-crash")
    assert [v["version"] for v in versions] == [1], "found, not made again"
    assert not (run_dir / OUTBOX_DIR).exists()


def test_server_down_at_start_is_one_clear_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError) as caught:
        Tracker(url, "outage", "model-x", outbox=tmp_path / OUTBOX_DIR)
    message = str(caught.value)
    assert "\n" not in message and url in message and "unreachable" in message
