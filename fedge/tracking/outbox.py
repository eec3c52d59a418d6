"""A durable, ordered journal of tracking writes that have not reached the store yet.

When the MLflow tracking server is unreachable, :class:`fedge.tracking.Tracker`
appends every write (metrics, events, artifacts, model versions, alias moves, the
run's end) here and replays them in order once the server answers again. Model
registrations are journalled before they are attempted at all, so a registration
interrupted between "created in MLflow" and "marked done here" is recognised on
replay instead of being made twice.

This module is storage only: SQLite in WAL mode with ``synchronous=FULL`` (an
appended entry is on disk when :meth:`Outbox.append` returns) and a ``files``
folder for what an entry carries besides JSON (a saved model, a copied
artifact). It knows nothing about MLflow; :mod:`fedge.tracking` gives entries
their meaning.

One process at a time owns an outbox: opening it takes an exclusive lock on
``lock`` in the folder, released by :meth:`Outbox.close`.

Examples
--------
>>> box = Outbox(tmp / "tracking-outbox")  # doctest: +SKIP
>>> entry = box.append("metrics", {"run_id": "r1", "metrics": [["acc", 0.9, 1700000000000, 3]]})  # doctest: +SKIP
>>> [e.kind for e in box.entries("pending")]  # doctest: +SKIP
['metrics']
>>> box.mark_done(entry.seq)  # doctest: +SKIP
>>> box.close()  # doctest: +SKIP
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["OUTBOX_DIR", "Entry", "Outbox", "OutboxBusy", "OutboxError", "find_outboxes"]

#: Name of the outbox folder inside a run folder.
OUTBOX_DIR = "tracking-outbox"
JOURNAL_FILE = "journal.sqlite"
FILES_DIR = "files"
LOCK_FILE = "lock"

PENDING, DONE, FAILED = "pending", "done", "failed"
_STATES = (PENDING, DONE, FAILED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    uid TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'failed')),
    result TEXT,
    error TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    landed REAL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class OutboxError(RuntimeError):
    """The outbox folder cannot be opened or written; the message is one line."""


class OutboxBusy(OutboxError):
    """Another live process owns the outbox (a run still going, or a sync)."""


@dataclass(frozen=True)
class Entry:
    """One journalled write.

    Attributes
    ----------
    seq : int
        Position in the journal; replay goes in ascending ``seq``.
    uid : str
        Stable identity of the write, used to recognise it in the store.
    kind : str
        What the write is (``"metrics"``, ``"register"``, ...).
    payload : dict
        Everything needed to perform the write, JSON values only.
    state : {"pending", "done", "failed"}
        ``done`` once the store has it; ``failed`` when the store refused it.
    result : dict or None
        What the store answered (e.g. the version number), once done.
    error : str
        Why the store refused it, for ``failed`` entries.
    """

    seq: int
    uid: str
    kind: str
    payload: dict[str, Any]
    state: str
    result: dict[str, Any] | None
    error: str


class Outbox:
    """The journal in ``folder`` (created when missing), owned by this process until closed.

    Parameters
    ----------
    folder : Path
        The outbox folder, usually ``<run folder>/tracking-outbox``.
    create : bool, default=True
        Create the folder and journal when missing; with ``False`` a missing
        journal raises :class:`OutboxError`.

    Raises
    ------
    OutboxBusy
        If another process (or another open :class:`Outbox`) holds the folder.
    OutboxError
        If the folder or journal cannot be created or read.
    """

    def __init__(self, folder: Path, *, create: bool = True) -> None:
        self.folder = Path(folder)
        journal = self.folder / JOURNAL_FILE
        if not create and not journal.is_file():
            raise OutboxError(f"no tracking outbox at {self.folder}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutboxError(f"tracking outbox {self.folder}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._lock_fd)
            raise OutboxBusy(
                f"tracking outbox {self.folder} is in use by another fedge process (pid {holder})"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, str(os.getpid()).encode(), 0)
        self._mutex = threading.Lock()
        self._closed = False
        try:
            self._db = sqlite3.connect(journal, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            if self.meta("created") is None:
                self.set_meta("created", repr(time.time()))
        except sqlite3.Error as exc:
            if getattr(self, "_db", None) is not None:
                self._db.close()
            self._release()
            raise OutboxError(
                f"tracking outbox {journal} is unreadable ({exc}); move it aside to start a new one"
            ) from None

    def __repr__(self) -> str:
        return f"Outbox(folder={str(self.folder)!r})"

    # -- writing -----------------------------------------------------------------------

    def append(self, kind: str, payload: Mapping[str, Any], *, uid: str | None = None) -> Entry:
        """Journal a write; it is on disk when this returns.

        Files the entry refers to must already be in :meth:`files_for` ``(uid)``
        (use :meth:`new_uid` to pick the uid first).

        Returns
        -------
        Entry
            The pending entry.
        """
        uid = uid or self.new_uid()
        text = json.dumps(dict(payload), sort_keys=True, allow_nan=True)
        with self._locked() as db:
            cur = db.execute(
                "INSERT INTO entries (uid, kind, payload, created) VALUES (?, ?, ?, ?)",
                (uid, kind, text, time.time()),
            )
            seq = int(cur.lastrowid or 0)
        return Entry(seq, uid, kind, json.loads(text), PENDING, None, "")

    def mark_done(self, seq: int, result: Mapping[str, Any] | None = None) -> None:
        """Record that the store has entry ``seq``; its staged files are removed."""
        with self._locked() as db:
            row = db.execute("SELECT uid FROM entries WHERE seq = ?", (seq,)).fetchone()
            db.execute(
                "UPDATE entries SET state = 'done', result = ?, error = '', landed = ? WHERE seq = ?",
                (json.dumps(dict(result or {})), time.time(), seq),
            )
        if row is not None:
            shutil.rmtree(self.folder / FILES_DIR / row[0], ignore_errors=True)

    def amend(self, seq: int, changes: Mapping[str, Any]) -> None:
        """Add or replace keys of entry ``seq``'s payload."""
        with self._locked() as db:
            row = db.execute("SELECT payload FROM entries WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                raise OutboxError(f"tracking outbox {self.folder}: no entry {seq}")
            payload = {**json.loads(row[0]), **changes}
            db.execute(
                "UPDATE entries SET payload = ? WHERE seq = ?",
                (json.dumps(payload, sort_keys=True, allow_nan=True), seq),
            )

    def mark_failed(self, seq: int, error: str) -> None:
        """Park entry ``seq``: the store refused it. It stays in the journal for a later sync."""
        with self._locked() as db:
            db.execute("UPDATE entries SET state = 'failed', error = ? WHERE seq = ?", (error, seq))

    def retry_failed(self) -> int:
        """Put every failed entry back in the queue; returns how many."""
        with self._locked() as db:
            cur = db.execute(
                "UPDATE entries SET state = 'pending', error = '' WHERE state = 'failed'"
            )
            return int(cur.rowcount)

    def set_meta(self, key: str, value: str) -> None:
        """Remember a fact about the journal (tracking URI, experiment, ...)."""
        with self._locked() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- reading -----------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A fact stored with :meth:`set_meta`, or ``None``."""
        with self._locked() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def next_pending(self) -> Entry | None:
        """The oldest entry not yet in the store, or ``None`` when all are."""
        with self._locked() as db:
            row = db.execute(
                "SELECT seq, uid, kind, payload, state, result, error FROM entries "
                "WHERE state = 'pending' ORDER BY seq LIMIT 1"
            ).fetchone()
        return None if row is None else _entry(row)

    def entry(self, uid: str) -> Entry | None:
        """The entry with this uid, in any state."""
        with self._locked() as db:
            row = db.execute(
                "SELECT seq, uid, kind, payload, state, result, error FROM entries WHERE uid = ?",
                (uid,),
            ).fetchone()
        return None if row is None else _entry(row)

    def entries(self, state: str | None = None, kind: str | None = None) -> list[Entry]:
        """Entries in journal order, optionally of one state and/or kind."""
        if state is not None and state not in _STATES:
            raise ValueError(f"state {state!r}: must be one of {', '.join(_STATES)}")
        query = "SELECT seq, uid, kind, payload, state, result, error FROM entries"
        clauses, args = [], []
        if state is not None:
            clauses.append("state = ?")
            args.append(state)
        if kind is not None:
            clauses.append("kind = ?")
            args.append(kind)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        with self._locked() as db:
            rows = db.execute(query + " ORDER BY seq", args).fetchall()
        return [_entry(row) for row in rows]

    def counts(self) -> dict[str, int]:
        """Number of entries per state (every state present, zero when none)."""
        with self._locked() as db:
            rows = db.execute("SELECT state, COUNT(*) FROM entries GROUP BY state").fetchall()
        found = {str(state): int(n) for state, n in rows}
        return {state: found.get(state, 0) for state in _STATES}

    # -- files -------------------------------------------------------------------------

    @staticmethod
    def new_uid() -> str:
        """A fresh entry identity."""
        return uuid.uuid4().hex

    def files_for(self, uid: str) -> Path:
        """The (created) folder where entry ``uid`` keeps its files."""
        path = self.folder / FILES_DIR / uid
        path.mkdir(parents=True, exist_ok=True)
        return path

    def sync_files(self, uid: str) -> None:
        """Flush entry ``uid``'s files to disk before the entry that names them is appended."""
        root = self.folder / FILES_DIR / uid
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                fd = os.open(Path(dirpath) / name, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(Path(dirpath))
        _fsync_dir(root.parent)

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Close the journal and release the folder; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        with self._mutex:
            self._db.close()
        self._release()

    def remove(self) -> None:
        """Close and delete the whole outbox folder (call only when nothing is pending)."""
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- internals ---------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            if self._closed:
                raise OutboxError(f"tracking outbox {self.folder} is closed")
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise OutboxError(f"tracking outbox {self.folder}: {exc}") from None

    def _release(self) -> None:
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            os.close(self._lock_fd)


def find_outboxes(root: Path) -> list[Path]:
    """Outbox folders at ``root``: itself, its own, its runs' or its scenarios' runs'.

    ``root`` may be an outbox folder, a run folder, a scenario folder or an output
    folder (``<output>/<scenario>/<run>/tracking-outbox``). The result is ordered
    by when each journal was started, oldest first, so replaying them in this
    order keeps the registry's history in order.
    """
    root = Path(root)
    if (root / JOURNAL_FILE).is_file():
        return [root]
    found = {
        p.parent
        for pattern in (
            f"{OUTBOX_DIR}/{JOURNAL_FILE}",
            f"*/{OUTBOX_DIR}/{JOURNAL_FILE}",
            f"*/*/{OUTBOX_DIR}/{JOURNAL_FILE}",
        )
        for p in root.glob(pattern)
    }
    return sorted(found, key=lambda p: (_started(p), str(p)))


def _started(folder: Path) -> float:
    """When the journal in ``folder`` was started (read without taking its lock)."""
    try:
        db = sqlite3.connect(f"file:{folder / JOURNAL_FILE}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'created'").fetchone()
        finally:
            db.close()
        return float(row[0]) if row else 0.0
    except (sqlite3.Error, ValueError):
        return 0.0


def _entry(row: tuple[Any, ...]) -> Entry:
    seq, uid, kind, payload, state, result, error = row
    return Entry(
        int(seq),
        str(uid),
        str(kind),
        json.loads(payload),
        str(state),
        None if result is None else json.loads(result),
        str(error),
    )


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
