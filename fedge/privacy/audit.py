"""Append-only, hash-chained audit log of everything a device sends.

This is the device's side: writing the log, its key, and reading the chain
head a drift report carries. Checking a log (:func:`fedge.privacy.anchors.verify`)
and what the server keeps of it (:class:`fedge.privacy.anchors.AuditAnchors`)
live in :mod:`fedge.privacy.anchors`, which a device never loads.

Each line is one JSON object describing one outgoing message: time, message
type, record names with their kinds, keys, array shapes and byte counts, and
whether the egress policy blocked it. Values never appear. Each entry carries
the hash of the previous entry and its own hash over its content, so an
edited, inserted, reordered or deleted line breaks the chain.

Keyed chain: a new log gets a per-device key (``device-<id>.audit.key``
beside ``device-<id>.audit.jsonl``, 32 random bytes, owner-only), and each
entry's hash is an HMAC-SHA256 under it (the entry says ``"mac":
"hmac-sha256"``). Someone holding a copy of the log but not the key cannot
recompute a chain that verifies after deleting or editing entries. A log
begun before keys existed stays a plain SHA-256 chain.

Anchors: every drift report a device sends carries its log's entry count and
chain head at that moment (:func:`chain_head`, :func:`anchor_fields`;
:attr:`fedge.contracts.protocol.DriftReport.audit_entries`), so the server can
later tell a log cut short or rewritten (see :mod:`fedge.privacy.anchors`).

Durability (group commit): :meth:`AuditLog.append` writes the entry to the
file before it returns, so the entry of every message that left the device
survives a crash of the device's process. Entries reach the disk (``fsync``)
in groups: within ``sync_interval`` seconds of being written (one background
thread per process syncs every log that has new entries), on
:meth:`AuditLog.close` and when the process exits normally. An operating
system crash or a power cut can therefore lose at most the entries of the
last ``sync_interval`` seconds, never an earlier one; what remains is a prefix
of the chain and still verifies; if the server had already been told of
those entries, the log is then flagged as shorter than the server saw, which
is true. A line cut short by such a crash is not an entry: the checks ignore
it, and the log drops it when it is opened again, so the chain continues from
the last whole entry.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "device-1.audit.jsonl"
>>> log = AuditLog(path)
>>> _ = log.append({"message_type": "query", "bytes": 120, "blocked": False})
>>> _ = log.append({"message_type": "train", "bytes": 4096, "blocked": False})
>>> log.close()
>>> log.keyed, chain_head(path)[0]
(True, 2)
>>> key_path(path).name
'device-1.audit.key'
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: one process per device log
    fcntl = None  # type: ignore[assignment]

GENESIS = "0" * 64
#: What a keyed entry says it is hashed with.
MAC = "hmac-sha256"
#: Bytes of a device's audit key (and of the report's pseudonym secret).
KEY_BYTES = 32
#: Hex digits of the chain head a drift report carries: 128 bits, two signed 64-bit ints
#: (a report holds numbers only; 128 bits leave a second preimage out of reach).
ANCHOR_HEX = 32

log = logging.getLogger("fedge.device")


# -- keys -------------------------------------------------------------------------------------
def key_path(log_path: str | Path) -> Path:
    """The key file of an audit log: ``device-3.audit.jsonl`` -> ``device-3.audit.key``."""
    path = Path(log_path)
    stem = path.name.removesuffix(".jsonl")
    return path.with_name(stem + ".key")


def read_key(path: str | Path) -> bytes | None:
    """The key in ``path`` (None when there is no such file).

    Raises
    ------
    ValueError
        If the file does not hold exactly :data:`KEY_BYTES` bytes.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    if len(data) != KEY_BYTES:
        raise ValueError(f"key file {path}: expected {KEY_BYTES} bytes, found {len(data)}")
    return data


def load_or_create_key(path: str | Path) -> bytes:
    """The key in ``path``, created (owner-only, 0600) on first use.

    Several processes may ask at once: the new key is written to a private
    temporary file and published with a hard link, which fails when another
    process published first; then everyone reads the one that won.
    """
    path = Path(path)
    existing = read_key(path)
    if existing is not None:
        return existing
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(KEY_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process was first; its key is the key
    finally:
        os.unlink(tmp)
    key = read_key(path)
    if key is None:  # pragma: no cover - removed between link and read
        raise ValueError(f"key file {path}: vanished while it was being created")
    return key


class Chain:
    """How entries are hashed: HMAC-SHA256 under the device's key, else plain SHA-256.

    The log hashes with it as it writes, :func:`fedge.privacy.anchors.verify`
    as it checks; one definition keeps the two in step.
    """

    def __init__(self, key: bytes | None) -> None:
        self._mac = hmac.new(key, digestmod=hashlib.sha256) if key is not None else None

    @property
    def keyed(self) -> bool:
        return self._mac is not None

    def digest(self, prev: str, body: Mapping[str, Any]) -> str:
        data = (prev + json.dumps(body, sort_keys=True, separators=(",", ":"))).encode()
        if self._mac is None:
            return hashlib.sha256(data).hexdigest()
        mac = self._mac.copy()  # the keyed state is computed once, copied per entry
        mac.update(data)
        return mac.hexdigest()


# -- the log ----------------------------------------------------------------------------------
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
    keyed : bool, default True
        Key a new (missing or empty) log: its key file (:func:`key_path`) is
        created and every entry's hash is an HMAC under it. An existing log
        keeps the kind of chain it has.

    Raises
    ------
    ValueError
        If ``sync_interval`` is negative, the last whole line of an existing
        file is not an audit entry, or the log's key and its entries disagree
        (keyed entries without the key file, or a key file beside unkeyed
        entries): the chain cannot be continued.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        fsync: bool = True,
        sync_interval: float = 1.0,
        keyed: bool = True,
    ) -> None:
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
        key = read_key(key_path(self.path))
        entries_keyed = False
        if self.path.exists():
            with self.path.open("ab") as fh:
                _lock_file(fh)
                self._seq, self._prev, entries_keyed = _chain_end(self.path)
                self._size = os.fstat(fh.fileno()).st_size
                if self._seq == 0 and key is None and keyed:
                    key = load_or_create_key(key_path(self.path))
        elif keyed:
            # The key exists before the first entry: a log with entries and no key is old or tampered.
            key = load_or_create_key(key_path(self.path))
        if self._seq > 0 and entries_keyed != (key is not None):
            raise ValueError(
                f"audit log {self.path}: "
                + (
                    "its entries are keyed but its key file is missing"
                    if entries_keyed
                    else "a key file lies beside entries that are not keyed"
                )
                + "; the chain cannot be continued (check it with `fedge audit`)"
            )
        self._chain = Chain(key)

    @property
    def keyed(self) -> bool:
        """Whether entries are hashed with the device's key."""
        return self._chain.keyed

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
                self._seq, self._prev, _ = _chain_end(self.path) if size else (0, GENESIS, False)
                size = os.fstat(fh.fileno()).st_size
            body = {"seq": self._seq, "time": round(time.time(), 3), **record, "prev": self._prev}
            if self._chain.keyed:
                body["mac"] = MAC
            entry = {**body, "hash": self._chain.digest(self._prev, body)}
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
            f"sync_interval={self.sync_interval}, keyed={self.keyed})"
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


def _lock_file(fh: Any, shared: bool = False) -> None:
    """Lock an open log until it is closed (no-op without ``fcntl``); writers lock exclusively."""
    if fcntl is not None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)


def _chain_end(path: Path) -> tuple[int, str, bool]:
    """Sequence number due next, hash of the last entry and whether it is keyed."""
    last = _repair_and_read_last_line(path)
    if not last:
        return 0, GENESIS, False
    try:
        entry = json.loads(last)
        return int(entry["seq"]) + 1, str(entry["hash"]), entry.get("mac") == MAC
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"audit log {path}: the last line is not an audit entry; "
            "the chain cannot be continued (check it with `fedge audit`)"
        ) from exc


def _tail(fh: Any) -> tuple[bytes, int]:
    """The end of an open file holding at least its last two lines, and where it starts."""
    fh.seek(0, os.SEEK_END)
    pos = fh.tell()
    chunk = b""
    while pos > 0 and chunk.count(b"\n") < 2:
        step = min(4096, pos)
        pos -= step
        fh.seek(pos)
        chunk = fh.read(step) + chunk
    return chunk, pos


def _repair_and_read_last_line(path: Path) -> str:
    """The last whole line; a last line cut short by a crash is removed first."""
    with path.open("rb+") as fh:
        chunk, pos = _tail(fh)
        size = fh.seek(0, os.SEEK_END)
        if chunk and not chunk.endswith(b"\n"):
            cut = chunk.rfind(b"\n") + 1  # 0 when the only line is the torn one
            if is_entry(chunk[cut:]):
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


def is_entry(raw: bytes | str) -> bool:
    """Whether ``raw`` is a whole audit entry (a JSON object with a hash), not a torn line."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return False
    return isinstance(entry, dict) and "hash" in entry


def chain_head(path: str | Path, *, sync: bool = False) -> tuple[int, str]:
    """Entries in the log and the hash of its last one: what a drift report carries.

    Reads only the end of the file and changes nothing (a line cut short by a
    crash is not counted, as the log itself would drop it). ``sync`` forces the
    file to disk first, so the entries the server is told about survive a power
    cut; it costs an ``fsync`` (milliseconds) per call, which is why it is off
    by default: the group commit puts them on disk within a second anyway.

    Returns
    -------
    tuple
        ``(0, GENESIS)`` while there is no log or it is empty.

    Raises
    ------
    ValueError
        If the last whole line is not an audit entry.
    """
    try:
        with Path(path).open("rb") as fh:
            _lock_file(fh, shared=True)  # no writer is half-way through a line
            if sync:
                os.fsync(fh.fileno())
            chunk, _ = _tail(fh)
    except FileNotFoundError:
        return 0, GENESIS
    pieces = [p for p in chunk.split(b"\n") if p.strip()]
    if pieces and not chunk.endswith(b"\n") and not is_entry(pieces[-1]):
        pieces.pop()
    if not pieces:
        return 0, GENESIS
    try:
        entry = json.loads(pieces[-1])
        return int(entry["seq"]) + 1, str(entry["hash"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"audit log {path}: the last line is not an audit entry") from exc


def anchor_fields(head: str) -> tuple[int, int]:
    """The first 128 bits of a chain head as two signed 64-bit ints (a report's fields)."""
    raw = bytes.fromhex(head[:ANCHOR_HEX])
    return int.from_bytes(raw[:8], "big", signed=True), int.from_bytes(raw[8:], "big", signed=True)


def anchor_head(hi: int, lo: int) -> str:
    """The hex prefix of a chain head from a report's two fields (inverse of :func:`anchor_fields`).

    Raises
    ------
    OverflowError
        If either value does not fit in a signed 64-bit int.
    """
    return (hi.to_bytes(8, "big", signed=True) + lo.to_bytes(8, "big", signed=True)).hex()
