"""The compliance report's device pseudonyms cannot be undone from what the report prints."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import stat
from pathlib import Path

from fedge.privacy.audit import AuditLog
from fedge.privacy.report import PSEUDONYM_KEY, write_report

DEVICES = range(6)


def _run(output: Path, run_id: str = "4f1c9e0d2b7a4e55") -> Path:
    """A finished run folder under ``output``: a summary and every device's audit log."""
    run = output / "demo" / "run-1"
    for d in DEVICES:
        log = AuditLog(run / "devices" / f"device-{d}.audit.jsonl", fsync=False)
        log.append({"message_type": "query", "bytes": 200, "blocked": False})
    summary = {
        "run_id": run_id,
        "scenario": "demo",
        "run_dir": str(run),
        "model_name": "fedge-demo",
        "champion": 1,
        "versions": [
            {"version": 1, "aliases": ["champion"], "tags": {"fedge.devices": "0,1,2,3,4,5"}}
        ],
        "config": {"run.output_dir": str(output)},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def _pseudonyms(report: str) -> list[str]:
    return re.findall(r"\bdev-[0-9a-f]+\b", report)


def test_pseudonyms_cannot_be_reproduced_from_anything_the_report_prints(tmp_path: Path) -> None:
    run = _run(tmp_path)
    report = write_report(run).read_text()
    names = _pseudonyms(report)
    assert len(set(names)) == len(DEVICES)

    # Every string the report prints, tried as the salt or the key of the obvious hashes.
    printed = set(re.findall(r"[^\s|`()]+", report)) | {"4f1c9e0d2b7a4e55", ""}
    guesses = set()
    for word in printed:
        for d in DEVICES:
            for text in (f"{word}:{d}", f"{d}:{word}", f"{word}{d}", str(d)):
                guesses.add(hashlib.sha256(text.encode()).hexdigest())
                guesses.add(hmac.new(word.encode(), text.encode(), hashlib.sha256).hexdigest())
    found = {name.removeprefix("dev-") for name in names}
    assert not any(g.startswith(f) for g in guesses for f in found), "a pseudonym was reproduced"

    secret = tmp_path / "state" / PSEUDONYM_KEY
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    key = secret.read_bytes()
    assert key.hex() not in report and str(secret) not in report
    # With the operator's secret, and only with it, they are reproduced.
    assert {
        "dev-" + hmac.new(key, f"4f1c9e0d2b7a4e55:{d}".encode(), hashlib.sha256).hexdigest()[:12]
        for d in DEVICES
    } == set(names)


def test_pseudonyms_are_stable_for_one_secret_and_change_with_another(tmp_path: Path) -> None:
    run = _run(tmp_path)
    first = _pseudonyms(write_report(run).read_text())
    second = _pseudonyms(write_report(run, tmp_path / "again.md").read_text())
    assert first == second, "the same secret gives the same pseudonyms"

    # A copy of the run folder elsewhere (an auditor's) does not have the operator's secret.
    elsewhere = _run(tmp_path / "copy")
    summary = json.loads((elsewhere / "summary.json").read_text())
    summary["config"]["run.output_dir"] = str(tmp_path / "operator-only")
    (elsewhere / "summary.json").write_text(json.dumps(summary))
    theirs = _pseudonyms(write_report(elsewhere).read_text())
    assert (elsewhere / "state" / PSEUDONYM_KEY).exists()
    assert set(theirs).isdisjoint(first)

    # An explicit secret is used as given.
    given = tmp_path / "given.key"
    one = _pseudonyms(write_report(run, tmp_path / "a.md", secret=given).read_text())
    two = _pseudonyms(write_report(run, tmp_path / "b.md", secret=given).read_text())
    assert one == two and set(one).isdisjoint(first)
