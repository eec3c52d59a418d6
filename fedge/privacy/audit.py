"""Append-only, hash-chained audit log of everything a device sends, and its anchors.

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
chain head at that moment (:attr:`fedge.contracts.protocol.DriftReport.audit_entries`).
The server keeps them (:class:`AuditAnchors`), and :func:`verify` and
:func:`check_logs` check a log against them: a missing log, a log with fewer
entries than the server saw, or one whose entry at the anchored count does not
hash to the anchored head (rewritten, even with the key) is flagged. Entries
written after the last report the server received are covered by the key only.

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
is true. A line cut short by such a crash is not an entry: :func:`verify` and
:func:`summarise` ignore it, and the log drops it when it is opened again, so
the chain continues from the last whole entry.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "device-1.audit.jsonl"
>>> log = AuditLog(path)
>>> _ = log.append({"message_type": "query", "bytes": 120, "blocked": False})
>>> _ = log.append({"message_type": "train", "bytes": 4096, "blocked": False})
>>> log.close()
>>> verify(path).ok, verify(path).entries, verify(path).keyed
(True, 2, True)
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
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedge.contracts.protocol import DriftReport

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
#: Where a run folder keeps the anchors the server recorded.
ANCHORS_FILE = "audit-anchors.json"

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


class _Chain:
    """How entries are hashed: HMAC-SHA256 under the device's key, else plain SHA-256."""

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
        self._chain = _Chain(key)

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
    if pieces and not chunk.endswith(b"\n") and not _is_entry(pieces[-1]):
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


# -- checking ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """Result of checking a log's chain (and, where there are any, the server's anchors).

    ``torn_tail`` is True when the file ends in a line cut short by a crash
    (not counted as an entry; the entries before it are what was checked).
    ``kind`` names what is wrong: ``"missing"`` (no log), ``"short"`` (fewer
    entries than the server saw), ``"rewritten"`` (an entry the server saw
    hashes differently now), ``"key"`` (keyed entries, no key to check them
    with), ``"chain"`` (the chain itself is broken), ``"anchors"`` (the
    server's record of the run cannot be read); empty when ``ok``.
    ``keyed`` says whether the entries were checked with the device's key,
    ``anchored`` how many entries the server's anchors vouched for.
    """

    ok: bool
    entries: int
    broken_at: int | None = None
    reason: str = ""
    torn_tail: bool = False
    kind: str = ""
    keyed: bool = False
    anchored: int = 0


def _lines(path: str | Path) -> tuple[list[str], bool]:
    """Whole lines of the log, and whether an unfinished last line was left out."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    if text and not text.endswith("\n") and lines and not _is_entry(lines[-1]):
        return lines[:-1], True
    return lines, False


@dataclass(frozen=True)
class Anchor:
    """What one drift report said about its device's audit log.

    Parameters
    ----------
    tick : int
        The report's tick.
    entries : int
        Entries the log held when the report was made.
    head : str
        Hex prefix (:data:`ANCHOR_HEX` digits) of the hash of the last of them.
    """

    tick: int
    entries: int
    head: str


def verify(
    path: str | Path,
    *,
    key: bytes | None = None,
    anchors: Sequence[Anchor] | None = None,
) -> Verdict:
    """Check every entry's hash and link, and the log against what the server saw.

    Parameters
    ----------
    path : Path
        The audit log.
    key : bytes, optional
        The device's key; by default read from the key file beside the log
        (:func:`key_path`). With a key, every entry must be keyed and its HMAC
        must match; keyed entries without a key fail (``kind="key"``).
    anchors : sequence of Anchor, optional
        What the server saw of this log. By default those recorded for the
        log's device in its run folder (``<run>/devices/<log>`` ->
        ``<run>/audit-anchors.json`` or the anchors in ``<run>/summary.json``);
        pass ``()`` to check the chain alone.
    """
    path = Path(path)
    if anchors is None:
        anchors = ()
        if path.parent.name == "devices":  # a run folder's device log
            try:
                anchors = load_anchors(path.parent.parent).for_device(device_of(path))
            except ValueError as exc:
                return Verdict(
                    False, 0, None, f"the server's audit anchors are unreadable: {exc}", kind="anchors"
                )
    if key is None:
        try:
            key = read_key(key_path(path))
        except ValueError as exc:
            return Verdict(False, 0, None, str(exc), kind="key")
    want = max((a.entries for a in anchors), default=0)
    try:
        lines, torn = _lines(path)
    except FileNotFoundError:
        seen = f"; the server saw {seen_by_server(anchors)}" if want else ""
        return Verdict(False, 0, None, f"no audit log{seen}", kind="missing", anchored=want)
    chain = _Chain(key)
    at: dict[int, list[Anchor]] = {}
    for a in anchors:
        at.setdefault(a.entries, []).append(a)

    def broken(n: int, reason: str, kind: str = "chain") -> Verdict:
        return Verdict(False, n, n, reason, torn, kind, chain.keyed, want)

    prev = GENESIS
    for n, line in enumerate(lines):
        try:
            entry = json.loads(line)
            body = {k: v for k, v in entry.items() if k != "hash"}
            stored = str(entry["hash"])
        except (ValueError, KeyError, AttributeError):
            return broken(n, f"line {n + 1}: not an audit entry")
        if entry.get("seq") != n:
            return broken(n, f"line {n + 1}: sequence {entry.get('seq')} where {n} was due")
        if entry.get("prev") != prev:
            return broken(n, f"line {n + 1}: does not follow the previous entry")
        if (entry.get("mac") == MAC) != chain.keyed:
            if chain.keyed:
                return broken(n, f"line {n + 1}: not keyed, though the log has a key")
            return broken(n, f"line {n + 1}: keyed, but the log's key file is missing", "key")
        if not hmac.compare_digest(chain.digest(prev, body), stored):
            return broken(n, f"line {n + 1}: content does not match its hash")
        for a in at.get(n + 1, ()):
            if stored[: len(a.head)] != a.head:
                return broken(
                    n,
                    f"line {n + 1}: not the entry the server saw there at tick {a.tick} "
                    "(the log was rewritten up to here)",
                    "rewritten",
                )
        prev = stored
    if len(lines) < want:
        what = "is empty" if not lines else f"holds {len(lines)} entries"
        return Verdict(
            False, len(lines), len(lines), f"the log {what}; the server saw {seen_by_server(anchors)}",
            torn, "short", chain.keyed, want,
        )
    return Verdict(True, len(lines), torn_tail=torn, keyed=chain.keyed, anchored=want)


def seen_by_server(anchors: Sequence[Anchor]) -> str:
    """The most the anchors vouch for, for people: ``"40 entries at tick 7"``."""
    best = max(anchors, key=lambda a: (a.entries, a.tick))
    return f"{best.entries} entries at tick {best.tick}"


def device_of(path: str | Path) -> str:
    """The device id in a log's name: ``device-3.audit.jsonl`` -> ``"3"``."""
    return Path(path).name.split(".")[0].removeprefix("device-")


# -- what the server saw ----------------------------------------------------------------------
class AuditAnchors:
    """The audit-log anchors the server received in the devices' drift reports.

    Pure and JSON-ready: the server calls :meth:`record` with every report it
    reads, saves :meth:`to_dict` (or :meth:`save`) beside the run, and
    :func:`check_logs` later holds each device's log against it.

    Per device it keeps two anchors: the one with the most entries (its head
    commits to the whole chain up to there, so it alone catches any deletion,
    truncation or rewrite before it) and the one of the latest tick (which
    catches a log replaced during the run by a shorter one that grew again).

    Examples
    --------
    >>> from fedge.contracts.protocol import DriftReport
    >>> anchors = AuditAnchors()
    >>> hi, lo = anchor_fields("ab" * 32)
    >>> anchors.record(DriftReport(3, 5, 1, 10, 0, False, 0, 0, 10,
    ...                            audit_entries=7, audit_head_hi=hi, audit_head_lo=lo))
    True
    >>> anchors.for_device(3)[0].entries
    7
    """

    def __init__(self) -> None:
        self._strongest: dict[str, Anchor] = {}
        self._latest: dict[str, Anchor] = {}

    def record(self, report: DriftReport) -> bool:
        """Keep what ``report`` says about its device's log; False when it says nothing."""
        if report.audit_entries <= 0:
            return False  # a device of an older version, or nothing logged yet
        try:
            head = anchor_head(report.audit_head_hi, report.audit_head_lo)
        except OverflowError:
            log.warning(
                "device %s tick %d: audit head out of range; not recorded", report.device, report.tick
            )
            return False
        self._keep(str(report.device), Anchor(report.tick, report.audit_entries, head))
        return True

    def record_all(self, reports: Iterable[DriftReport]) -> int:
        """Record several reports (a poll's replies with their late reports); returns how many counted."""
        return sum(self.record(r) for r in reports)

    def _keep(self, device: str, anchor: Anchor) -> None:
        strongest = self._strongest.get(device)
        if strongest is None or anchor.entries > strongest.entries:
            self._strongest[device] = anchor
        latest = self._latest.get(device)
        if latest is None or anchor.tick >= latest.tick:
            self._latest[device] = anchor

    def devices(self) -> list[str]:
        """Devices with at least one anchor, in id order."""
        return sorted(self._strongest, key=_natural)

    def for_device(self, device: int | str) -> tuple[Anchor, ...]:
        """The anchors kept for ``device`` (empty when the server has none)."""
        key = str(device)
        kept = [a for a in (self._strongest.get(key), self._latest.get(key)) if a is not None]
        return tuple(dict.fromkeys(kept))

    def merge(self, other: AuditAnchors) -> AuditAnchors:
        """Add another record's anchors to this one (returns self)."""
        for device in other.devices():
            for anchor in other.for_device(device):
                self._keep(device, anchor)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: ``{"devices": {id: {"strongest": {...}, "latest": {...}}}}``."""
        return {
            "devices": {
                d: {"strongest": asdict(self._strongest[d]), "latest": asdict(self._latest[d])}
                for d in self.devices()
            }
        }

    @classmethod
    def from_dict(cls, data: Any) -> AuditAnchors:
        """Read :meth:`to_dict`'s output, refusing anything else with one line.

        Raises
        ------
        ValueError
            If ``data`` is not an anchors record.
        """
        anchors = cls()
        devices = data.get("devices") if isinstance(data, dict) else None
        if not isinstance(devices, dict):
            raise ValueError("audit anchors: expected an object with 'devices'")  # noqa: TRY004 - a file's content
        for device, kept in devices.items():
            if not isinstance(kept, dict):
                raise ValueError(f"audit anchors: device {device!r}: expected an object")  # noqa: TRY004
            for which in ("strongest", "latest"):
                raw = kept.get(which)
                if raw is None:
                    continue
                try:
                    anchor = Anchor(int(raw["tick"]), int(raw["entries"]), str(raw["head"]))
                    if len(bytes.fromhex(anchor.head)) * 2 != ANCHOR_HEX:
                        raise ValueError("wrong head length")
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(f"audit anchors: device {device!r}: bad {which} anchor") from exc
                anchors._keep(str(device), anchor)
        return anchors

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` to ``path`` atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.to_dict(), fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> AuditAnchors:
        """Read a file :meth:`save` wrote; an absent file is an empty record.

        Raises
        ------
        ValueError
            If the file is not an anchors record.
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        try:
            return cls.from_dict(json.loads(text))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def __len__(self) -> int:
        return len(self._strongest)

    def __repr__(self) -> str:
        return f"AuditAnchors(devices={len(self)})"


def _natural(device: str) -> tuple[int, int | str]:
    return (0, int(device)) if device.isdigit() else (1, device)


def load_anchors(run_dir: str | Path) -> AuditAnchors:
    """The anchors a run's server recorded: ``audit-anchors.json`` and ``summary.json``'s.

    Both are read and merged, so removing one of them does not hide the other.

    Raises
    ------
    ValueError
        If either holds something that is not an anchors record.
    """
    run_dir = Path(run_dir)
    anchors = AuditAnchors.load(run_dir / ANCHORS_FILE)
    summary_path = run_dir / "summary.json"
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return anchors  # no summary yet (a live run), or not one the report would read either
    if isinstance(summary, dict) and summary.get("audit_anchors") is not None:
        try:
            anchors.merge(AuditAnchors.from_dict(summary["audit_anchors"]))
        except ValueError as exc:
            raise ValueError(f"{summary_path}: {exc}") from None
    return anchors


@dataclass(frozen=True)
class Finding:
    """One device whose audit log does not hold up.

    ``kind`` is a :attr:`Verdict.kind`; ``problem`` a one-line explanation.
    """

    device: str
    path: str
    kind: str
    problem: str


def check_logs(
    anchors: AuditAnchors, log_paths: Iterable[str | Path] | Mapping[str, str | Path]
) -> list[Finding]:
    """Every device whose log is missing, short, rewritten or broken, in device order.

    Parameters
    ----------
    anchors : AuditAnchors
        What the server saw.
    log_paths : iterable of Path, or mapping of device id to Path
        The logs found (a list of ``device-<id>.audit.jsonl`` files is mapped
        by name). Each is checked (with its key, if it has one) against its
        device's anchors; a device with anchors but no log here is missing.
    """
    if isinstance(log_paths, Mapping):
        paths = {str(d): Path(p) for d, p in log_paths.items()}
    else:
        paths = {device_of(p): Path(p) for p in log_paths}
    findings = []
    for device in sorted(set(paths) | set(anchors.devices()), key=_natural):
        path = paths.get(device)
        mine = anchors.for_device(device)
        if path is None:
            verdict = Verdict(False, 0, None, f"no audit log; the server saw {seen_by_server(mine)}", kind="missing")
        else:
            verdict = verify(path, anchors=mine)
        if not verdict.ok:
            findings.append(Finding(device, str(path or ""), verdict.kind, verdict.reason))
    return findings


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
