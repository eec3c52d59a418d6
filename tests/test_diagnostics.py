"""Remote diagnostics: ``fedge diagnose`` asks one device, its next poll answers."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from inprocess_helpers import run_captured
from mlflow import MlflowClient
from typer.testing import CliRunner

from clients.detectors import DETECTOR_NAMES
from clients.egress import egress_violations
from clients.store import DeviceStore
from fedge.cli import app as cli
from fedge.contracts import protocol as p
from fedge.contracts.config import FedgeConfig
from fedge.contracts.diagnostics import DeviceDiagnostics, config_digest
from fedge.server.diagnostics import DIAGNOSTICS_DIR, REQUESTS_FILE

ASKED = 2  # the device the operator asks, while the run is at tick ASK_AT
ASK_AT = 1


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def diag_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run in which an operator asks device 2 for diagnostics after tick 1."""
    tmp = tmp_path_factory.mktemp("diag")
    folder = tmp / "run"
    said: list[Any] = []

    def on_tick(rec: Any, *_: Any) -> None:
        if rec.tick == ASK_AT:
            said.append(CliRunner().invoke(cli, ["diagnose", str(folder), str(ASKED)]))

    overrides = [
        f'run.output_dir="{tmp}"',
        "scenario.clients=3",
        "scenario.ticks=4",
        "scenario.schedule.at=2",
        "campaign.rounds=1",
        "campaign.initial_rounds=1",
    ]
    summary, crossed = run_captured(overrides, folder, on_tick=on_tick)
    return {"summary": summary, "crossed": crossed, "folder": folder, "said": said}


def test_a_request_made_during_a_run_is_answered_at_the_next_poll(diag_run: dict[str, Any]) -> None:
    (result,) = diag_run["said"]
    assert result.exit_code == 0, result.output
    assert f"asked device {ASKED}" in result.output
    asked = [
        (req, reply)
        for req, reply in diag_run["crossed"]
        if req.metadata.message_type == "query" and req.content.config_records[p.CONFIG].get(p.DIAGNOSE)
    ]
    # Only the asked device, only once, at the poll after the request.
    assert [(r.metadata.dst_node_id, r.metadata.group_id) for r, _ in asked] == [
        (1000 + ASKED, f"tick-{ASK_AT + 1}")
    ]
    request, reply = asked[0]
    assert p.DIAGNOSTICS in reply.content.config_records
    assert egress_violations(request, reply) == []
    others = [reply for req, reply in diag_run["crossed"] if req is not request and reply.has_content()]
    assert not any(p.DIAGNOSTICS in r.content.config_records for r in others)


def test_the_answer_lands_in_the_run_folder_owner_only_and_in_mlflow(diag_run: dict[str, Any]) -> None:
    folder: Path = diag_run["folder"]
    path = folder / DIAGNOSTICS_DIR / f"device-{ASKED}-tick-{ASK_AT + 1}.json"
    answer = json.loads(path.read_text())
    assert _mode(path) == 0o600
    assert _mode(folder / DIAGNOSTICS_DIR / REQUESTS_FILE) == 0o600
    assert _mode(folder / DIAGNOSTICS_DIR) == 0o700
    assert answer["device"] == ASKED and answer["tick"] == ASK_AT + 1
    assert answer["detector"] == "ADWIN"
    assert answer["store_rows"] > 0 and answer["samples_seen"] > 0
    assert answer["store_bytes"] > 0 and answer["audit_bytes"] > 0
    assert answer["model_version"] >= 1
    assert answer["config_matches_server"] is True
    assert len(answer["config_digest"]) == 64
    run_id = json.loads((folder / "mlflow-run.json").read_text())["run_id"]
    client = MlflowClient(diag_run["summary"]["tracking_uri"])
    names = [a.path for a in client.list_artifacts(run_id, "events")]
    assert f"events/tick-{ASK_AT + 1:04d}-diagnostics.json" in names
    # --show prints the latest answer.
    shown = CliRunner().invoke(cli, ["diagnose", str(folder), str(ASKED), "--show"])
    assert shown.exit_code == 0, shown.output
    assert f"device {ASKED} diagnostics at tick {ASK_AT + 1}" in shown.output
    assert answer["config_digest"] in shown.output


def test_the_answer_is_in_the_devices_audit_log_and_carries_no_sample(diag_run: dict[str, Any]) -> None:
    folder: Path = diag_run["folder"]
    store_path = folder / "devices" / f"device-{ASKED}.sqlite"
    audit = [json.loads(line) for line in store_path.with_suffix(".audit.jsonl").read_text().splitlines()]
    logged = [e for e in audit if "diagnostics" in e.get("records", {})]
    assert len(logged) == 1 and logged[0]["blocked"] is False
    assert set(logged[0]["records"]["diagnostics"]["keys"]) <= set(p.DIAGNOSTICS_FIELDS)
    (reply,) = [
        r for q, r in diag_run["crossed"] if r.has_content() and p.DIAGNOSTICS in r.content.config_records
    ]
    values = list(reply.content.config_records[p.DIAGNOSTICS].values())
    assert all(isinstance(v, int | float) for v in values)
    with DeviceStore(store_path) as store:
        x, _, _ = store.window()
    samples = set(np.round(x.ravel(), 6).tolist())
    floats = [round(float(v), 6) for v in values if isinstance(v, float) and v not in (0.0, -1.0)]
    assert not samples.intersection(floats)


def test_asking_an_unknown_device_or_a_bad_id_is_one_line(diag_run: dict[str, Any]) -> None:
    folder = str(diag_run["folder"])
    for args, says in (
        ([folder, "99"], "device 99: not a device of this run"),
        ([folder, "../2"], "expected a device number"),
        ([folder, "1", "--show"], "device 1: no diagnostics answer yet"),
        ([folder + "-missing", "1"], "no such run folder"),
    ):
        result = CliRunner().invoke(cli, ["diagnose", *args])
        assert result.exit_code == 2, result.output
        assert says in result.output and len(result.output.strip().splitlines()) == 1, result.output
        assert "Traceback" not in result.output


def test_the_record_round_trips_and_the_policy_refuses_a_string_digest() -> None:
    digest = config_digest(FedgeConfig())
    d = DeviceDiagnostics(1, 5, store_rows=3, errors=(("OSError", 2),), config_digest=digest)
    assert DeviceDiagnostics.from_dict(d.to_dict()) == d
    assert set(p.DETECTOR_KINDS[1:]) == set(DETECTOR_NAMES)
    request = Message(RecordDict({p.CONFIG: ConfigRecord({p.TICK: 5})}), 1, "query")
    bad = {**d.to_dict(), "config_digest": digest}  # a string key the contract does not know
    reply = Message(RecordDict({p.DIAGNOSTICS: ConfigRecord(bad)}), reply_to=request)
    assert any("config_digest" in v for v in egress_violations(request, reply))
    with pytest.raises(ValueError, match="device diagnostics"):
        DeviceDiagnostics.from_dict({**d.to_dict(), "store_rows": "3"})
