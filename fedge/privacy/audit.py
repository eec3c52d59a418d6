"""Append-only, hash-chained audit log of everything a device sends.

Each line is one JSON object describing one outgoing message: time, message
type, record names with their kinds, keys, array shapes and byte counts, and
whether the egress policy blocked it. Values never appear. Each entry carries
the SHA-256 of the previous entry and its own hash over its content, so an
edited, inserted, reordered or deleted line breaks the chain.

Durability (group commit): :meth:`AuditLog.append` writes the entry to the
file before it returns, so the entry of every message that left the device
survives a crash of the device's process. Entries reach the disk (``fsync``)
in groups: within ``sync_interval`` seconds of being written (one background
thread per process syncs every log that has new entries), on
:meth:`AuditLog.close` and when the process exits normally. An operating
system crash or a power cut can therefore lose at most the entries of the
last ``sync_interval`` seconds, never an earlier one; what remains is a prefix
of the chain and still verifies. A line cut short by such a crash is not an
entry: :func:`verify` and :func:`summarise` ignore it, and the log drops it
when it is opened again, so the chain continues from the last whole entry.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "device.audit.jsonl"
>>> log = AuditLog(path)
>>> _ = log.append({"message_type": "query", "bytes": 120, "blocked": False})
>>> _ = log.append({"message_type": "train", "bytes": 4096, "blocked": False})
>>> log.close()
>>> verify(path).ok, verify(path).entries
(True, 2)
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: one process per device log
    fcntl = None  # type: ignore[assignment]

GENESIS = "0" * 64

log = logging.getLogger("fedge.device")


def _digest(prev: str, body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev + canonical).encode()).hexdigest()


class AuditLog:
    """An audit log file; appends only, never rewrites an entry.

    Parameters
    ----------
    path : Path
        The JSON-lines file (created with its folder when missing).
    fsync : bool, default True
        Force entries to disk (see ``sync_interval``); ``False`` leaves it to
        the operating system's write-back.
    sync_interval : float, default 1.0
        Longest time, in seconds, an entry may stay written but not yet on
        disk. ``0`` syncs each entry before :meth:`append` returns (one
        ``fsync`` per message); a positive interval syncs many entries with
        one ``fsync``, off the caller's path.

    Raises
    ------
    ValueError
        If ``sync_interval`` is negative, or the last whole line of an
        existing file is not an audit entry (the chain cannot be continued).
    """

    def __init__(self, path: str | Path, *, fsync: bool = True, sync_interval: float = 1.0) -> None:
        if not sync_interval >= 0:
            raise ValueError(f"AuditLog: sync_interval must be >= 0 seconds, got {sync_interval!r}")
        self.path = Path(path)
        self.fsync = fsync
        self.sync_interval = float(sync_interval)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._seq, self._prev = 0, GENESIS
        self._deadline: float | None = None  # when the oldest unsynced entry must be on disk
        self._written = self._synced = 0  # entries written by this object / known to be on disk
        self._size = -1  # file size after our last write; another size means another writer
        if self.path.exists():
            with self.path.open("ab") as fh:
                _lock_file(fh)
                self._seq, self._prev = _chain_end(self.path)
                self._size = os.fstat(fh.fileno()).st_size

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Add one entry (``record`` must hold descriptions, never values).

        The entry is in the file when this returns; it is on disk then too
        when ``sync_interval`` is 0, else within ``sync_interval`` seconds.
        """
        with self._lock, self.path.open("ab") as fh:
            # Several processes may serve one device (Flower's simulation): one writer at
            # a time, and each continues the chain from the file, not from its memory.
            _lock_file(fh)
            size = os.fstat(fh.fileno()).st_size
            if size != self._size:
                self._seq, self._prev = _chain_end(self.path) if size else (0, GENESIS)
                size = os.fstat(fh.fileno()).st_size
            body = {"seq": self._seq, "time": round(time.time(), 3), **record, "prev": self._prev}
            entry = {**body, "hash": _digest(self._prev, body)}
            line = (json.dumps(entry, sort_keys=True) + "\n").encode()
            fh.write(line)
            fh.flush()
            if self.fsync and self.sync_interval == 0:
                os.fsync(fh.fileno())
            self._size = size + len(line)
            self._seq, self._prev = self._seq + 1, entry["hash"]
            self._written += 1
            if self.fsync and self.sync_interval == 0:
                self._synced = self._written
        if self.fsync and self.sync_interval > 0:
            _SYNCER.due(self)
        return entry

    def sync(self) -> None:
        """Force every entry written so far to disk now."""
        _SYNCER.forget(self)
        self._fsync_file()

    def close(self) -> None:
        """Sync what is pending; the log may still be appended to afterwards."""
        self.sync()

    def _fsync_file(self) -> None:
        """Sync the file if an entry written by this object may not be on disk yet."""
        target = self._written
        if not self.fsync or self._synced >= target:
            return
        # fsync through any descriptor of the file flushes the file's data (Linux, macOS).
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with self._lock:
            self._synced = max(self._synced, target)

    def __repr__(self) -> str:
        return (
            f"AuditLog(path={str(self.path)!r}, fsync={self.fsync}, "
            f"sync_interval={self.sync_interval})"
        )


class _GroupSync:
    """One background thread per process: syncs every log whose entries have waited long enough."""

    def __init__(self) -> None:
        self._reset()
        atexit.register(self.sync_all)
        if hasattr(os, "register_at_fork"):
            # A forked child must not wait on the parent's lock or its (absent) thread.
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._pending: dict[int, AuditLog] = {}
        self._thread: threading.Thread | None = None
        self._wake_at = float("inf")  # when the thread wakes up next on its own

    def due(self, audit: AuditLog) -> None:
        """``audit`` has a new entry: sync it within its interval."""
        with self._cond:
            if id(audit) in self._pending:
                return
            deadline = time.monotonic() + audit.sync_interval
            audit._deadline = deadline
            self._pending[id(audit)] = audit
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fedge-audit-sync", daemon=True)
                self._thread.start()
            if deadline < self._wake_at:
                # Waking the thread costs the caller a GIL hand-over: only when it
                # would otherwise sleep past this deadline.
                self._wake_at = deadline
                self._cond.notify()

    def forget(self, audit: AuditLog) -> None:
        """``audit`` is being synced by its owner: no need to wait for it."""
        with self._cond:
            audit._deadline = None
            self._pending.pop(id(audit), None)

    def sync_all(self) -> None:
        """Sync every waiting log now (at exit, or before a worker process ends)."""
        with self._cond:
            waiting = list(self._pending.values())
            self._pending.clear()
        for audit in waiting:
            audit._deadline = None
            audit._fsync_file()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._wake_at = float("inf")
                    self._cond.wait()
                now = time.monotonic()
                due = [a for a in self._pending.values() if (a._deadline or 0.0) <= now]
                if not due:
                    self._wake_at = min(a._deadline or now for a in self._pending.values())
                    self._cond.wait(timeout=max(0.0, self._wake_at - now))
                    continue
                for audit in due:
                    # Entries written from here on schedule a new sync; this one covers
                    # everything written before it.
                    del self._pending[id(audit)]
                    audit._deadline = None
            for audit in due:
                try:
                    audit._fsync_file()
                except OSError as exc:  # a full or vanished disk must not kill the thread
                    log.warning("audit log %s: fsync failed: %s", audit.path, exc)


_SYNCER = _GroupSync()


def sync_all() -> None:
    """Force every audit log of this process to disk now."""
    _SYNCER.sync_all()


def _lock_file(fh: Any) -> None:
    """Exclusive lock on an open log until it is closed (no-op without ``fcntl``)."""
    if fcntl is not None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)


def _chain_end(path: Path) -> tuple[int, str]:
    """Sequence number due next and hash of the last entry of an existing log."""
    last = _repair_and_read_last_line(path)
    if not last:
        return 0, GENESIS
    try:
        entry = json.loads(last)
        return int(entry["seq"]) + 1, str(entry["hash"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"audit log {path}: the last line is not an audit entry; "
            "the chain cannot be continued (check it with `fedge audit`)"
        ) from exc


def _repair_and_read_last_line(path: Path) -> str:
    """The last whole line; a last line cut short by a crash is removed first."""
    with path.open("rb+") as fh:
        fh.seek(0, os.SEEK_END)
        size = pos = fh.tell()
        chunk = b""
        while pos > 0 and chunk.count(b"\n") < 2:
            step = min(4096, pos)
            pos -= step
            fh.seek(pos)
            chunk = fh.read(step) + chunk
        if chunk and not chunk.endswith(b"\n"):
            cut = chunk.rfind(b"\n") + 1  # 0 when the only line is the torn one
            if _is_entry(chunk[cut:]):
                # A whole entry whose newline was lost: complete the line.
                fh.seek(0, os.SEEK_END)
                fh.write(b"\n")
                fh.flush()
                os.fsync(fh.fileno())
                return chunk[cut:].decode("utf-8")
            keep = pos + cut
            log.warning(
                "audit log %s: dropped an unfinished last line (%d bytes) left by a crash",
                path, size - keep,
            )
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
            chunk = chunk[:cut]
    lines = [line for line in chunk.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _is_entry(raw: bytes | str) -> bool:
    try:
        entry = json.loads(raw)
    except ValueError:
        return False
    return isinstance(entry, dict) and "hash" in entry


@dataclass(frozen=True)
class Verdict:
    """Result of checking a log's chain.

    ``torn_tail`` is True when the file ends in a line cut short by a crash
    (not counted as an entry; the entries before it are what was checked).
    """

    ok: bool
    entries: int
    broken_at: int | None = None
    reason: str = ""
    torn_tail: bool = False


def _lines(path: str | Path) -> tuple[list[str], bool]:
    """Whole lines of the log, and whether an unfinished last line was left out."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    if text and not text.endswith("\n") and lines and not _is_entry(lines[-1]):
        return lines[:-1], True
    return lines, False


def verify(path: str | Path) -> Verdict:
    """Check every entry's hash and its link to the previous one."""
    prev, n = GENESIS, 0
    try:
        lines, torn = _lines(path)
    except FileNotFoundError:
        return Verdict(False, 0, None, f"{path}: no audit log")
    for n, line in enumerate(lines):
        try:
            entry = json.loads(line)
            body = {k: v for k, v in entry.items() if k != "hash"}
            stored = entry["hash"]
        except (ValueError, KeyError, AttributeError):
            return Verdict(False, n, n, f"line {n + 1}: not an audit entry", torn)
        if entry.get("seq") != n:
            return Verdict(False, n, n, f"line {n + 1}: sequence {entry.get('seq')} where {n} was due", torn)
        if entry.get("prev") != prev:
            return Verdict(False, n, n, f"line {n + 1}: does not follow the previous entry", torn)
        if _digest(prev, body) != stored:
            return Verdict(False, n, n, f"line {n + 1}: content does not match its hash", torn)
        prev = stored
    return Verdict(True, len(lines), torn_tail=torn)


def summarise(path: str | Path) -> dict[str, Any]:
    """Counts per message type, bytes sent, blocked messages and what they tried to send."""
    by_type: Counter[str] = Counter()
    sent_bytes = 0
    blocked: list[dict[str, Any]] = []
    lines, _ = _lines(path)
    for line in lines:
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
