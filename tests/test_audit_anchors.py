"""A device's audit log cannot be cut, emptied, deleted or rewritten unnoticed.

Each drift report carries the log's entry count and chain head; the server
keeps them (``AuditAnchors``) and ``fedge audit`` / ``fedge report`` hold every
log against them. The chain itself is keyed, so a copy of the log alone does
not let anyone recompute a chain that verifies.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import stat
from pathlib import Path

import pytest
from inprocess_helpers import fed_device, run_captured
from typer.testing import CliRunner

from fedge.cli import app as cli
from fedge.contracts.config_load import load_config
from fedge.contracts.protocol import LATE_REPORTS, REPORT, DriftReport
from fedge.privacy.anchors import ANCHORS_FILE, AuditAnchors, check_logs, load_anchors, verify
from fedge.privacy.audit import GENESIS, MAC, AuditLog, anchor_fields, chain_head, key_path
from fedge.privacy.report import write_report


def _report(device: int, tick: int, log: Path) -> DriftReport:
    """The drift report a device with this log would send at ``tick``."""
    entries, head = chain_head(log)
    hi, lo = anchor_fields(head)
    return DriftReport(
        device, tick, 1, 10, 0, False, 0, 0, 10,
        audit_entries=entries, audit_head_hi=hi, audit_head_lo=lo,
    )


def _device_run(tmp_path: Path, devices: int = 2, ticks: int = 4) -> tuple[Path, AuditAnchors]:
    """A run folder whose devices sent query/train/evaluate replies; the server kept anchors."""
    run = tmp_path / "run"
    anchors = AuditAnchors()
    logs = {d: AuditLog(run / "devices" / f"device-{d}.audit.jsonl", fsync=False) for d in range(devices)}
    for tick in range(ticks):
        for d, log in logs.items():
            # As on a device: the report is made, then its reply is logged as it leaves.
            anchors.record(_report(d, tick, log.path))
            log.append({"message_type": "query", "bytes": 300, "blocked": False})
            log.append({"message_type": "train", "bytes": 4096, "blocked": False})
            log.append({"message_type": "evaluate", "bytes": 90, "blocked": False})
    for d, log in logs.items():  # the last poll: its report is anchored, its reply logged
        anchors.record(_report(d, ticks, log.path))
        log.append({"message_type": "query", "bytes": 300, "blocked": False})
    anchors.save(run / ANCHORS_FILE)
    return run, anchors


def _entries(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _write_plain_chain(log: Path, entries: list[dict[str, object]]) -> None:
    """What someone with the log but not the key can do: renumber and re-hash with SHA-256."""
    prev, lines = GENESIS, []
    for seq, entry in enumerate(entries):
        body = {k: v for k, v in entry.items() if k not in ("hash", "mac")}
        body.update(seq=seq, prev=prev)
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        prev = hashlib.sha256((prev + canonical).encode()).hexdigest()
        lines.append(json.dumps({**body, "hash": prev}, sort_keys=True))
    log.write_text("".join(line + "\n" for line in lines))


def _write_keyed_chain(log: Path, entries: list[dict[str, object]], key: bytes) -> None:
    """What someone holding the device's key too can do: a keyed chain that verifies on its own."""
    import hmac

    prev, lines = GENESIS, []
    for seq, entry in enumerate(entries):
        body = {k: v for k, v in entry.items() if k != "hash"}
        body.update(seq=seq, prev=prev, mac=MAC)
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        prev = hmac.new(key, (prev + canonical).encode(), hashlib.sha256).hexdigest()
        lines.append(json.dumps({**body, "hash": prev}, sort_keys=True))
    log.write_text("".join(line + "\n" for line in lines))


def test_an_untouched_run_passes_and_its_logs_are_keyed(tmp_path: Path) -> None:
    run, anchors = _device_run(tmp_path)
    logs = sorted((run / "devices").glob("*.audit.jsonl"))
    assert check_logs(anchors, logs) == []
    for log in logs:
        verdict = verify(log)
        assert verdict.ok and verdict.keyed and verdict.anchored == 12 and verdict.entries == 13
        key = key_path(log)
        assert key.name == log.name.replace(".jsonl", ".key")
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert all(e["mac"] == MAC for e in _entries(log))
    assert load_anchors(run).to_dict() == anchors.to_dict()


def test_deleting_train_entries_and_recomputing_the_plain_chain_is_flagged(tmp_path: Path) -> None:
    run, anchors = _device_run(tmp_path)
    log = run / "devices" / "device-1.audit.jsonl"
    _write_plain_chain(log, [e for e in _entries(log) if e["message_type"] != "train"])

    # The key beside the log refuses the unkeyed chain even without the server's record...
    alone = verify(log, anchors=())
    assert not alone.ok and alone.broken_at == 0 and "not keyed" in alone.reason
    # ...and without the key the server's record still does.
    key_path(log).unlink()
    assert verify(log, anchors=()).ok, "a plain chain without a key holds up on its own"
    verdict = verify(log)
    assert not verdict.ok and verdict.kind == "short", verdict
    (finding,) = check_logs(anchors, sorted((run / "devices").glob("*.audit.jsonl")))
    assert finding.device == "1" and finding.kind == "short"
    assert "the server saw 12 entries at tick 4" in finding.problem

    # Padding the log back to the count the server saw does not help: the head differs.
    kept = _entries(log)
    _write_plain_chain(log, kept + kept[-3:])
    verdict = verify(log)
    assert not verdict.ok and verdict.kind == "rewritten" and "tick 4" in verdict.reason


def test_a_rewrite_with_the_key_is_caught_by_the_anchors(tmp_path: Path) -> None:
    run, _ = _device_run(tmp_path)
    log = run / "devices" / "device-0.audit.jsonl"
    key = key_path(log).read_bytes()
    entries = _entries(log)
    entries[4]["bytes"] = 0  # understate what a train reply sent
    _write_keyed_chain(log, entries, key)
    assert verify(log, anchors=()).ok, "the forged chain holds up on its own"
    verdict = verify(log)
    assert not verdict.ok and verdict.kind == "rewritten" and verdict.broken_at == 11
    assert "not the entry the server saw there at tick 4" in verdict.reason


def test_a_rewrite_without_the_key_fails_even_with_no_anchors(tmp_path: Path) -> None:
    log = tmp_path / "device-5.audit.jsonl"
    audit = AuditLog(log, fsync=False)
    for i in range(6):
        audit.append({"message_type": "train", "bytes": 100 + i, "blocked": False})
    entries = _entries(log)
    entries[2]["bytes"] = 1
    # The attacker keeps the keyed marker and guesses at a key.
    _write_keyed_chain(log, entries, b"\0" * 32)
    verdict = verify(log)
    assert not verdict.ok and verdict.broken_at == 0 and "does not match its hash" in verdict.reason
    # Deleting the key does not make a keyed log pass either.
    key_path(log).unlink()
    verdict = verify(log)
    assert not verdict.ok and verdict.kind == "key"
    with pytest.raises(ValueError, match="keyed but its key file is missing"):
        AuditLog(log)


@pytest.mark.parametrize(
    ("cut", "kind", "words"),
    [
        (lambda lines: lines[:5], "short", "holds 5 entries; the server saw 12 entries at tick 4"),
        (lambda lines: [], "short", "is empty; the server saw 12 entries"),
    ],
    ids=["truncated", "emptied"],
)
def test_a_truncated_or_emptied_log_is_flagged(
    tmp_path: Path, cut: object, kind: str, words: str
) -> None:
    run, anchors = _device_run(tmp_path)
    log = run / "devices" / "device-0.audit.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(cut(lines)))  # type: ignore[operator]
    assert verify(log, anchors=()).ok, "what is left is a valid prefix: only the anchors tell"
    verdict = verify(log)
    assert not verdict.ok and verdict.kind == kind and words in verdict.reason, verdict
    (finding,) = check_logs(anchors, sorted((run / "devices").glob("*.audit.jsonl")))
    assert finding.device == "0" and finding.kind == kind


def test_cutting_only_what_came_after_the_last_report_still_passes(tmp_path: Path) -> None:
    """The limit of anchors, pinned: entries after the last report are the key's to protect."""
    run, _ = _device_run(tmp_path)
    log = run / "devices" / "device-0.audit.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:12]))  # the last poll's reply, logged after its report
    assert verify(log).ok
    log.write_text("".join(lines[:11]))
    assert not verify(log).ok


def test_a_deleted_log_is_flagged_by_device(tmp_path: Path) -> None:
    run, anchors = _device_run(tmp_path, devices=3)
    (run / "devices" / "device-2.audit.jsonl").unlink()
    findings = check_logs(anchors, sorted((run / "devices").glob("*.audit.jsonl")))
    assert [(f.device, f.kind) for f in findings] == [("2", "missing")]
    assert "no audit log" in findings[0].problem and "12 entries at tick 4" in findings[0].problem


def test_the_anchors_survive_the_loss_of_one_copy(tmp_path: Path) -> None:
    run, anchors = _device_run(tmp_path)
    (run / "summary.json").write_text(json.dumps({"run_id": "r", "audit_anchors": anchors.to_dict()}))
    (run / ANCHORS_FILE).unlink()
    (run / "devices" / "device-1.audit.jsonl").write_text("")
    assert verify(run / "devices" / "device-1.audit.jsonl").kind == "short"
    (run / ANCHORS_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="audit-anchors.json"):
        load_anchors(run)


def test_fedge_audit_flags_a_truncated_log_and_passes_an_intact_one(tmp_path: Path) -> None:
    run, _ = _device_run(tmp_path)
    intact = CliRunner().invoke(cli, ["audit", str(run / "devices" / "device-0.audit.jsonl")])
    assert intact.exit_code == 0, intact.output
    assert "chain intact" in intact.output
    log = run / "devices" / "device-1.audit.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:3]))
    cut = CliRunner().invoke(cli, ["audit", str(log)])
    assert cut.exit_code == 1
    assert "the server saw 12 entries at tick 4" in " ".join(cut.output.split())


def test_fedge_report_names_every_device_whose_log_does_not_hold_up(tmp_path: Path) -> None:
    run, anchors = _device_run(tmp_path, devices=4)
    (run / "summary.json").write_text(
        json.dumps(
            {
                "run_id": "0123abcd",
                "scenario": "demo",
                "versions": [{"version": 1, "aliases": [], "tags": {"fedge.devices": "0,1,2,3,4"}}],
                "config": {"run.output_dir": str(tmp_path)},
                "audit_anchors": anchors.to_dict(),
            }
        )
    )
    devices = run / "devices"
    (devices / "device-1.audit.jsonl").unlink()
    (devices / "device-2.audit.jsonl").write_text("")
    log3 = devices / "device-3.audit.jsonl"
    _write_plain_chain(log3, [e for e in _entries(log3) if e["message_type"] != "train"])
    report = write_report(run).read_text()
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| dev-")]
    chain = sorted(row[1].split(":")[0] for row in rows)
    assert chain == ["BROKEN", "MISSING", "MISSING", "SHORT", "intact"], rows
    # device 4 trained (its id is in the version's tags) and left no log at all
    assert "no audit log, though it trained a model of this run" in report
    assert "Devices whose audit log does not hold up: 4 (" in report


def test_a_device_report_carries_its_log_head_and_a_full_run_holds_up(tmp_path: Path) -> None:
    overrides = [
        f'run.output_dir="{tmp_path}"',
        "scenario.clients=2",
        "scenario.ticks=4",
        "scenario.schedule.at=2",
        "campaign.rounds=1",
        "campaign.initial_rounds=1",
    ]
    folder = tmp_path / "run"
    _, crossed = run_captured(overrides, folder)
    # What the server will do: record every report a poll brings back.
    anchors = AuditAnchors()
    for request, reply in crossed:
        if request.metadata.message_type == "query" and not reply.has_error():
            for name in (REPORT, *LATE_REPORTS):
                if name in reply.content:
                    anchors.record(DriftReport.from_dict(reply.content[name]))
    devices = folder / "devices"
    logs = sorted(devices.glob("*.audit.jsonl"))
    assert len(logs) == 2 and anchors.devices() == ["0", "1"]
    assert check_logs(anchors, logs) == []
    for device, log in enumerate(logs):
        # The last poll's report said how many entries came before its own reply.
        (last,) = [a for a in anchors.for_device(device) if a.tick == 3]
        kinds = [e["message_type"] for e in _entries(log)]
        assert last.entries == len(kinds) - 1 - kinds[::-1].index("query")
    logs[0].write_text("".join(logs[0].read_text().splitlines(keepends=True)[:2]))
    (finding,) = check_logs(anchors, logs)
    assert finding.device == "0" and finding.kind == "short"


def test_a_device_anchors_its_report_to_its_own_log(tmp_path: Path) -> None:
    cfg = load_config(None, ["scenario.clients=1", "scenario.ticks=3", "scenario.schedule.at=2"])
    device = fed_device(cfg, 0, tmp_path / "device-0.sqlite")
    log = AuditLog(tmp_path / "device-0.audit.jsonl", fsync=False)
    assert device.monitor_tick(0).audit_entries == 0, "nothing logged yet: nothing to anchor"
    for i in range(3):
        log.append({"message_type": "query", "bytes": i, "blocked": False})
    report = device.monitor_tick(1)
    entries, head = chain_head(log.path)
    assert report.audit_entries == entries == 3
    assert (report.audit_head_hi, report.audit_head_lo) == anchor_fields(head)
    assert head == _entries(log.path)[-1]["hash"]
    # Older reports without the fields still parse (and anchor nothing).
    old = {k: v for k, v in report.to_dict().items() if not k.startswith("audit_")}
    assert not AuditAnchors().record(DriftReport.from_dict(old))
    device.close()


def _open_and_append(path: Path, kind: str) -> None:
    log = AuditLog(path, sync_interval=0)
    for i in range(20):
        log.append({"message_type": kind, "bytes": i, "blocked": False})
    os._exit(0)


def test_processes_that_start_a_log_together_share_one_key(tmp_path: Path) -> None:
    path = tmp_path / "device-0.audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_open_and_append, args=(path, k)) for k in ("train", "evaluate", "query")]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    verdict = verify(path)
    assert verdict.ok and verdict.keyed and verdict.entries == 60, verdict
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".key")] == ["device-0.audit.key"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
