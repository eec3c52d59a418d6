"""Only what the wire contract allows leaves a device, and every message is in its audit log."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from clients.egress import EGRESS_BLOCKED, egress_violations, make_egress_mod
from fedge.contracts.wire import to_arrays
from fedge.privacy.anchors import summarise, verify
from fedge.privacy.audit import AuditLog

WEIGHTS = {"0.weight": np.zeros((4, 2), np.float32), "0.bias": np.zeros(4, np.float32)}


@pytest.fixture(autouse=True)
def _identity() -> None:
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = 1


def _request(kind: str) -> Message:
    content = RecordDict({"config": ConfigRecord({"tick": 3})})
    if kind == "train":
        content["arrays"] = to_arrays(WEIGHTS)
    msg = Message(content, 1001, kind, group_id="g")
    msg.metadata.__dict__["_message_id"] = "m1"
    return msg


def _reply(request: Message, **records: object) -> Message:
    return Message(RecordDict(records), reply_to=request)  # type: ignore[arg-type]


def test_a_proper_train_reply_may_leave() -> None:
    req = _request("train")
    reply = _reply(req, arrays=to_arrays(WEIGHTS),
                   metrics=MetricRecord({"num-examples": 80, "train_loss": 0.3}))
    assert egress_violations(req, reply) == []


@pytest.mark.parametrize(
    ("kind", "records", "expected"),
    [
        ("train", {"raw": ConfigRecord({"x": 1.0})}, "record 'raw' is not allowed"),
        ("train", {"metrics": MetricRecord({"num-examples": 1, "labels": [0, 1, 1]})},
         "metrics.labels is not an allowed key"),
        ("train", {"metrics": MetricRecord({"train_loss": [0.1, 0.2]})},
         "metrics.train_loss must be a scalar"),
        ("train", {"arrays": to_arrays({"samples": np.ones((100, 2), np.float32)})},
         "do not mirror the model sent"),
        ("query", {"report": ConfigRecord({"device": 1, "secret": "x"})},
         "report.secret is not an allowed key"),
        ("query", {"arrays": to_arrays(WEIGHTS)}, "record 'arrays' is not allowed"),
        ("evaluate", {"metrics": ConfigRecord({"eval_acc": 0.9})}, "must be metrics"),
    ],
)
def test_replies_outside_the_contract_are_refused(
    kind: str, records: dict[str, object], expected: str
) -> None:
    req = _request(kind)
    problems = egress_violations(req, _reply(req, **records))
    assert any(expected in p for p in problems), problems


def test_the_mod_blocks_a_handler_that_tries_to_send_raw_data(tmp_path: Path) -> None:
    audit = tmp_path / "d.audit.jsonl"
    mod = make_egress_mod(lambda ctx: audit)
    ctx = Context(1, 1001, {}, RecordDict(), {})
    raw = np.random.default_rng(0).random((100, 2)).astype(np.float32)

    def leaky(msg: Message, context: Context) -> Message:
        return _reply(msg, arrays=to_arrays({"x": raw}), metrics=MetricRecord({"num-examples": 1}))

    out = mod(_request("train"), ctx, leaky)
    assert out.has_error() and out.error.code == EGRESS_BLOCKED
    assert "do not mirror the model sent" in out.error.reason
    text = audit.read_text()
    assert '"blocked": true' in text
    assert str(float(raw[0, 0]))[:8] not in text, "the audit log holds no values"
    summary = summarise(audit)
    assert summary["messages"] == 1 and len(summary["blocked"]) == 1
    assert summary["bytes_sent"] == 0


def test_handler_exceptions_leave_only_their_type(tmp_path: Path) -> None:
    mod = make_egress_mod(lambda ctx: tmp_path / "a.jsonl")

    def failing(msg: Message, context: Context) -> Message:
        raise ValueError("row [0.123, 0.456] is odd")

    out = mod(_request("query"), Context(1, 1001, {}, RecordDict(), {}), failing)
    assert out.has_error()
    assert "0.123" not in out.error.reason and "ValueError" in out.error.reason


def test_audit_chain_detects_edits_insertions_and_deletions(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, fsync=False)
    for i in range(5):
        log.append({"message_type": "query", "bytes": 100 + i, "blocked": False})
    assert verify(path).ok and verify(path).entries == 5
    # a restarted device continues the same chain
    AuditLog(path, fsync=False).append({"message_type": "train", "bytes": 7, "blocked": False})
    assert verify(path).ok and verify(path).entries == 6

    lines = path.read_text().splitlines()
    edited = json.loads(lines[2])
    edited["bytes"] = 1
    for tampered, where in [
        (lines[:2] + [json.dumps(edited)] + lines[3:], 2),
        (lines[:3] + lines[4:], 3),
        (lines[:1] + [lines[2], lines[1]] + lines[3:], 1),
        (lines[:2] + ["not json"] + lines[2:], 2),
    ]:
        path.write_text("\n".join(tampered) + "\n")
        verdict = verify(path)
        assert not verdict.ok and verdict.broken_at == where, verdict


def _entries(n: int, kind: str = "query") -> list[dict[str, object]]:
    return [{"message_type": kind, "bytes": 100 + i, "blocked": False} for i in range(n)]


def test_a_crash_mid_write_leaves_a_chain_that_verifies_and_continues(tmp_path: Path) -> None:
    path = tmp_path / "d.audit.jsonl"
    log = AuditLog(path)
    for record in _entries(4):
        log.append(record)
    log.close()
    whole = path.read_bytes()
    path.write_bytes(whole[: whole.rindex(b"\n", 0, len(whole) - 1) + 40])  # the 4th line cut short

    verdict = verify(path)
    assert verdict.ok and verdict.entries == 3 and verdict.torn_tail
    assert summarise(path)["messages"] == 3

    # the restarted device drops the unfinished line and continues the chain
    AuditLog(path).append({"message_type": "train", "bytes": 7, "blocked": False})
    verdict = verify(path)
    assert verdict.ok and verdict.entries == 4 and not verdict.torn_tail
    assert json.loads(path.read_text().splitlines()[-1])["seq"] == 3


def _append_then_die(path: Path, kind: str, n: int) -> None:
    log = AuditLog(path, sync_interval=60.0)  # nothing reaches fsync before the crash
    for record in _entries(n, kind):
        log.append(record)
    os._exit(0)  # a crash: no close, no exit handlers


def test_entries_of_sent_messages_survive_a_crash_of_the_device_process(tmp_path: Path) -> None:
    path = tmp_path / "d.audit.jsonl"
    child = multiprocessing.get_context("fork").Process(target=_append_then_die, args=(path, "train", 5))
    child.start()
    child.join()
    verdict = verify(path)
    assert verdict.ok and verdict.entries == 5


def test_processes_serving_one_device_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "d.audit.jsonl"
    AuditLog(path).append({"message_type": "query", "bytes": 1, "blocked": False})
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_append_then_die, args=(path, kind, 30)) for kind in ("train", "evaluate")]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    verdict = verify(path)
    assert verdict.ok and verdict.entries == 61, verdict
    assert summarise(path)["by_type"] == {"query": 1, "train": 30, "evaluate": 30}


def test_audit_log_refuses_what_it_cannot_continue(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sync_interval must be >= 0"):
        AuditLog(tmp_path / "a.jsonl", sync_interval=-1)
    path = tmp_path / "b.jsonl"
    path.write_text("not an entry\n")
    with pytest.raises(ValueError, match="last line is not an audit entry"):
        AuditLog(path)


def test_group_commit_syncs_many_entries_at_once_and_soon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    log = AuditLog(tmp_path / "d.audit.jsonl", sync_interval=0.05)
    for record in _entries(200):
        log.append(record)
    waited = 0.0
    while not synced and waited < 5.0:  # the promise is 0.05 s; allow a very busy machine
        time.sleep(0.05)
        waited += 0.05
    assert 1 <= len(synced) < 20, "entries reach the disk in groups, without the caller waiting"
    time.sleep(0.1)
    before = len(synced)
    log.append({"message_type": "query", "bytes": 1, "blocked": False})
    log.close()  # close syncs what is pending right away
    assert len(synced) == before + 1
