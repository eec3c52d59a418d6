"""Append-only, hash-chained audit log of everything a device sends.

Each line is one JSON object describing one outgoing message: time, message
type, record names with their kinds, keys, array shapes and byte counts, and
whether the egress policy blocked it. Values never appear. Each entry carries
the SHA-256 of the previous entry and its own hash over its content, so an
edited, inserted, reordered or deleted line breaks the chain.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "device.audit.jsonl"
>>> log = AuditLog(path)
>>> _ = log.append({"message_type": "query", "bytes": 120, "blocked": False})
>>> _ = log.append({"message_type": "train", "bytes": 4096, "blocked": False})
>>> verify(path).ok, verify(path).entries
(True, 2)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


def _digest(prev: str, body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev + canonical).encode()).hexdigest()


class AuditLog:
    """An audit log file; appends only, never rewrites.

    Parameters
    ----------
    path : Path
        The JSON-lines file (created with its folder when missing).
    fsync : bool, default True
        Force each entry to disk before the message leaves.
    """

    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self._prev = 0, GENESIS
        if self.path.exists():
            last = _last_line(self.path)
            if last:
                entry = json.loads(last)
                self._seq, self._prev = int(entry["seq"]) + 1, str(entry["hash"])

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Add one entry (``record`` must hold descriptions, never values)."""
        body = {"seq": self._seq, "time": round(time.time(), 3), **record, "prev": self._prev}
        entry = {**body, "hash": _digest(self._prev, body)}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        self._seq, self._prev = self._seq + 1, entry["hash"]
        return entry

    def __repr__(self) -> str:
        return f"AuditLog(path={str(self.path)!r}, fsync={self.fsync})"


def _last_line(path: Path) -> str:
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        pos = fh.tell()
        chunk = b""
        while pos > 0 and chunk.count(b"\n") < 2:
            step = min(4096, pos)
            pos -= step
            fh.seek(pos)
            chunk = fh.read(step) + chunk
    lines = [line for line in chunk.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


@dataclass(frozen=True)
class Verdict:
    """Result of checking a log's chain."""

    ok: bool
    entries: int
    broken_at: int | None = None
    reason: str = ""


def verify(path: str | Path) -> Verdict:
    """Check every entry's hash and its link to the previous one."""
    prev, n = GENESIS, 0
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return Verdict(False, 0, None, f"{path}: no audit log")
    for n, line in enumerate(lines):
        try:
            entry = json.loads(line)
            body = {k: v for k, v in entry.items() if k != "hash"}
            stored = entry["hash"]
        except (ValueError, KeyError, AttributeError):
            return Verdict(False, n, n, f"line {n + 1}: not an audit entry")
        if entry.get("seq") != n:
            return Verdict(False, n, n, f"line {n + 1}: sequence {entry.get('seq')} where {n} was due")
        if entry.get("prev") != prev:
            return Verdict(False, n, n, f"line {n + 1}: does not follow the previous entry")
        if _digest(prev, body) != stored:
            return Verdict(False, n, n, f"line {n + 1}: content does not match its hash")
        prev = stored
    return Verdict(True, len(lines))


def summarise(path: str | Path) -> dict[str, Any]:
    """Counts per message type, bytes sent, blocked messages and what they tried to send."""
    by_type: Counter[str] = Counter()
    sent_bytes = 0
    blocked: list[dict[str, Any]] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        by_type[str(entry.get("message_type"))] += 1
        if entry.get("blocked"):
            blocked.append({"seq": entry["seq"], "violations": entry.get("violations", [])})
        else:
            sent_bytes += int(entry.get("bytes", 0))
    return {
        "messages": sum(by_type.values()),
        "by_type": dict(by_type),
        "bytes_sent": sent_bytes,
        "blocked": blocked,
    }
