"""How a device application hands samples to its SuperNode: the ingest inbox.

The inbox is a small SQLite file beside the device's store
(``device-<id>.inbox.sqlite`` next to ``device-<id>.sqlite``). A device
application appends one *batch* of labelled rows per tick; the ClientApp takes
the batches up to the tick it is polled for, so it reads only data that is
already on the device. Each batch is checked against the device's schema
(row width, finite numbers, known labels) before anything is written:

* ``on_invalid="raise"`` (the default, for real device applications): a batch
  with a malformed row is refused whole with an :class:`IngestError` naming the
  tick, the row and the problem; nothing from it is stored.
* ``on_invalid="drop"``: bad rows are dropped and counted with the batch, so
  the device's drift report still shows them (the simulated scenarios use this
  to play a faulty sensor).

The inbox is append-only: ticks never go backwards, and stored batches are
never changed. The reader keeps its own cursor (the id of the last batch it
took) and may :meth:`Inbox.prune` what it has consumed. The inbox records its
schema when it is created; :meth:`Inbox.open_existing` (or :func:`read_schema`)
gives it back to a reader that does not know it.

Files and memory
----------------
The inbox holds samples, so its file is created ``0600`` (SQLite gives its
``-wal``/``-shm``/``-journal`` sidecars the mode of the database file) and a
folder it creates ``0700``, whatever the process umask. One call stores all its
batches or none; the checked batches of a call wait in memory up to
:data:`CHUNK_ROWS` rows and beyond that in a private temporary SQLite file
(unlinked when opened, mode ``0600``), and the inbox's write lock is held only
while they are copied in, so a reading device is never kept waiting for a long
parse. Files are read as a stream of chunks of :data:`CHUNK_ROWS` rows: storing
a 1,000,000-row CSV (two features) with ``fedge-ingest`` peaked at 386 MB
resident when the whole file was read first and at 46 MB chunk by chunk
(``/usr/bin/time -v``; importing this module alone peaks at 29 MB).
:func:`ingest` and the command line create a new inbox only once the input has
been accepted, so a refused file leaves no inbox behind.

Examples
--------
>>> import tempfile
>>> path = Path(tempfile.mkdtemp()) / "device-0.inbox.sqlite"
>>> with Inbox(path, n_features=2, n_classes=2) as inbox:
...     inbox.append(0, [[0.1, 0.2], [0.3, 0.4]], [0, 1]).accepted
2
>>> with Inbox(path) as inbox:
...     inbox.append(1, [[0.1, float("nan")]], [0])
Traceback (most recent call last):
...
clients.ingest.IngestError: ingest: tick 1, row 0: a feature is NaN, infinite or not a number; nothing from this batch was stored
>>> read_schema(path)
InboxSchema(n_features=2, n_classes=2)

From the shell, a CSV with a ``label`` column (and optionally ``tick``)::

    python -m clients.ingest runs/devices/device-0.inbox.sqlite samples.csv --tick 7
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import json
import math
import os
import re
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self, TextIO

import numpy as np

from clients.validation import REJECT_REASONS, validate_rows

INBOX_SUFFIX = ".inbox.sqlite"
SIDECAR_SUFFIXES: tuple[str, ...] = ("-wal", "-shm", "-journal")
"""Files SQLite may keep beside an inbox; they hold samples too."""
CHUNK_ROWS = 10_000
"""Rows read from a file, and kept in memory while a call is checked, at a time."""
OnInvalid = Literal["raise", "drop"]
BatchInput = tuple[int, "np.ndarray | Sequence[Any]", "np.ndarray | Sequence[Any]"]

_REASON_TEXT = {
    "wrong_width": "wrong number of features",
    "non_finite": "a feature is NaN, infinite or not a number",
    "unknown_label": "the label is not one of the device's classes",
}
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    (
        "CREATE TABLE IF NOT EXISTS batches ("
        " id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " tick INTEGER NOT NULL,"
        " n INTEGER NOT NULL,"
        " x BLOB NOT NULL,"
        " y BLOB NOT NULL,"
        " rejected TEXT NOT NULL,"
        " source TEXT NOT NULL,"
        " received REAL NOT NULL)"
    ),
)
_FORMAT = "fedge-ingest-inbox/1"
_INT64_MAX = 2**63 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_MAX_LINE = 1 << 20  # a JSON line longer than this is refused, so one line cannot fill memory
# ASCII only: Python's int()/float() also take "1_000", Arabic-Indic digits and "infinity".
_TICK_RE = re.compile(r"[0-9]+", re.ASCII)
_LABEL_RE = re.compile(r"(-?[0-9]+)(?:\.0+)?", re.ASCII)
# Unambiguous on purpose: "[0-9]+\.?[0-9]*" backtracks quadratically on a long run of digits.
_FLOAT = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_NON_FINITE = r"[+-]?(?i:nan|inf|infinity)"
_FLOAT_RE = re.compile(_FLOAT, re.ASCII)
_NON_FINITE_RE = re.compile(_NON_FINITE, re.ASCII)


def _column_re(cell: str) -> re.Pattern[str]:
    """A pattern for a whole column joined by newlines, every cell matching ``cell``."""
    padded = rf"[ \t]*(?:{cell})[ \t]*"
    return re.compile(rf"(?:{padded}\n)*{padded}", re.ASCII)


_FEATURE_COLUMN = _column_re(f"{_FLOAT}|{_NON_FINITE}")
_LABEL_COLUMN = _column_re(r"-?[0-9]{1,18}(?:\.0+)?")
# At most 18 digits keeps int() cheap and inside int64; longer cells take the careful path.
_TICK_COLUMN = _column_re(r"[0-9]{1,18}")


class IngestError(ValueError):
    """Device data that cannot be ingested; the message names the tick, row and problem."""


@dataclass(frozen=True)
class InboxSchema:
    """The shape of the rows an inbox holds, fixed when it is created.

    Parameters
    ----------
    n_features : int
        Row width.
    n_classes : int
        Number of classes; labels are ``0 .. n_classes - 1``.
    """

    n_features: int
    n_classes: int


def inbox_path(store_path: Path) -> Path:
    """The inbox beside a device store: ``device-3.sqlite`` -> ``device-3.inbox.sqlite``."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.stem + INBOX_SUFFIX)


def _no_rejects() -> dict[str, int]:
    return {**{reason: 0 for reason in REJECT_REASONS}, "total": 0}


@dataclass(frozen=True)
class Receipt:
    """What :meth:`Inbox.append` stored.

    Parameters
    ----------
    batch_id : int
        Id of the stored batch (increasing).
    tick : int
        Tick of the batch.
    accepted : int
        Rows stored.
    rejected : dict of str to int
        Rows dropped per reason (only with ``on_invalid="drop"``) and ``"total"``.
    """

    batch_id: int
    tick: int
    accepted: int
    rejected: dict[str, int] = field(default_factory=_no_rejects)


@dataclass(frozen=True)
class Batch:
    """Rows a device took from its inbox.

    Parameters
    ----------
    last_batch_id : int
        Id of the newest batch included (the reader's next cursor); 0 if none.
    x : numpy.ndarray
        ``float32`` rows, shape ``(n, n_features)``.
    y : numpy.ndarray
        ``int64`` labels, shape ``(n,)``.
    rejected : dict of str to int
        Rows dropped at ingest, per reason, and ``"total"``.
    """

    last_batch_id: int
    x: np.ndarray
    y: np.ndarray
    rejected: dict[str, int]

    @property
    def empty(self) -> bool:
        """Whether no batch was taken."""
        return self.last_batch_id == 0


# -- checking and staging a call's batches ---------------------------------------------------
@dataclass(frozen=True)
class _Checked:
    tick: int
    n: int
    x: bytes
    y: bytes
    rejected: str


def _check_batch(
    tick: object,
    x: np.ndarray | Sequence[Any],
    y: np.ndarray | Sequence[Any],
    schema: InboxSchema,
    on_invalid: OnInvalid,
) -> _Checked:
    """Validate one batch; raise on a malformed batch, or on a bad row with ``"raise"``."""
    if (
        isinstance(tick, bool)
        or not isinstance(tick, int | np.integer)
        or not 0 <= int(tick) <= _INT64_MAX
    ):
        raise IngestError(f"ingest: tick must be a non-negative integer (64-bit), got {_short(tick)}")
    tick = int(tick)
    try:
        rows = validate_rows(x, y, schema.n_features, schema.n_classes)
    except (TypeError, ValueError, OverflowError) as exc:
        message = str(exc).removeprefix("validate_rows: ")
        raise IngestError(
            f"ingest: tick {tick}: {message}; nothing from this batch was stored"
        ) from None
    if rows.rejected["total"] and on_invalid == "raise":
        row, reason = _first_bad_row(x, y, schema)
        raise IngestError(
            f"ingest: tick {tick}, row {row}: {_REASON_TEXT[reason]}; "
            "nothing from this batch was stored"
        )
    xs = np.ascontiguousarray(rows.x, dtype=np.float32).reshape(-1, schema.n_features)
    ys = np.ascontiguousarray(rows.y, dtype=np.int64)
    return _Checked(tick, len(ys), xs.tobytes(), ys.tobytes(), json.dumps(dict(rows.rejected)))


def _first_bad_row(
    x: np.ndarray | Sequence[Any], y: np.ndarray | Sequence[Any], schema: InboxSchema
) -> tuple[int, str]:
    for i, (row, label) in enumerate(zip(x, y, strict=True)):
        single = validate_rows([row], [label], schema.n_features, schema.n_classes)
        for reason in REJECT_REASONS:
            if single.rejected[reason]:
                return i, reason
    return -1, "non_finite"


class _Staging:
    """The checked batches of one call, in order: in memory up to ``spill_rows`` rows, then on disk.

    The disk part is SQLite's private temporary database (``connect("")``): it is
    unlinked as soon as it is opened and gone when closed, so a refused or
    interrupted call leaves nothing behind, and a file of any length costs only
    SQLite's page cache in memory.
    """

    def __init__(self, spill_rows: int = CHUNK_ROWS) -> None:
        self.spill_rows = spill_rows
        self._memory: list[_Checked] = []
        self._rows = 0
        self._disk: sqlite3.Connection | None = None

    def add(self, batch: _Checked) -> None:
        if self._disk is not None:
            self._insert(batch)
            return
        self._memory.append(batch)
        self._rows += batch.n
        if self._rows > self.spill_rows:
            self._disk = sqlite3.connect("")
            # A scratch copy: durability does not matter, the inbox commit does.
            self._disk.execute("PRAGMA journal_mode=OFF")
            self._disk.execute("PRAGMA synchronous=OFF")
            self._disk.execute(
                "CREATE TABLE staged (seq INTEGER PRIMARY KEY, tick INTEGER, n INTEGER,"
                " x BLOB, y BLOB, rejected TEXT)"
            )
            for held in self._memory:
                self._insert(held)
            self._memory.clear()

    def _insert(self, batch: _Checked) -> None:
        assert self._disk is not None
        self._disk.execute(
            "INSERT INTO staged (tick, n, x, y, rejected) VALUES (?, ?, ?, ?, ?)",
            (batch.tick, batch.n, batch.x, batch.y, batch.rejected),
        )

    def __iter__(self) -> Iterator[_Checked]:
        if self._disk is None:
            yield from self._memory
            return
        # The cursor steps one row at a time, so reading back is bounded too.
        for tick, n, x, y, rejected in self._disk.execute(
            "SELECT tick, n, x, y, rejected FROM staged ORDER BY seq"
        ):
            yield _Checked(int(tick), int(n), x, y, rejected)

    def close(self) -> None:
        self._memory.clear()
        if self._disk is not None:
            self._disk.close()
            self._disk = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stage(
    batches: Iterable[BatchInput], schema: InboxSchema, on_invalid: OnInvalid, floor: int
) -> _Staging:
    """Check every batch (ticks not before ``floor`` nor each other) into a staging area."""
    if on_invalid not in ("raise", "drop"):
        raise IngestError(f"ingest: on_invalid={on_invalid!r} is not allowed; allowed: raise, drop")
    staged = _Staging()
    try:
        stored_floor = True
        for item in batches:
            try:
                tick, x, y = item
            except (TypeError, ValueError):
                raise IngestError(
                    f"ingest: a batch is a (tick, x, y) triple, got {_short(item)}"
                ) from None
            checked = _check_batch(tick, x, y, schema, on_invalid)
            if checked.tick < floor:
                before = f"the latest stored tick {floor}" if stored_floor else f"tick {floor}"
                raise IngestError(
                    f"ingest: tick {checked.tick} is before {before} "
                    "(the inbox is append-only); nothing from this call was stored"
                )
            floor, stored_floor = checked.tick, False
            staged.add(checked)
    except BaseException:
        staged.close()
        raise
    return staged


# -- the inbox ---------------------------------------------------------------------------------
class Inbox:
    """A device's append-only queue of validated rows, one batch per tick.

    Parameters
    ----------
    path : Path
        SQLite file; created (``0600``, in a ``0700`` folder if the folder is new)
        with the schema on first use.
    n_features : int, optional
        Row width. Needed when the file is new; checked against the file otherwise.
    n_classes : int, optional
        Number of classes (labels ``0 .. n_classes - 1``); as ``n_features``.

    Raises
    ------
    IngestError
        The file is not an inbox, or its schema differs from the one given.

    See Also
    --------
    Inbox.open_existing : open an inbox whose schema the caller does not know.
    ingest : append to an inbox that is created only if the input is accepted.
    """

    def __init__(
        self, path: Path, *, n_features: int | None = None, n_classes: int | None = None
    ) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._created = False
        if not self.path.exists():
            if n_features is None or n_classes is None:
                raise IngestError(
                    f"ingest: no inbox at {self.path} (a new inbox needs the row width and classes)"
                )
            # Check the schema before anything exists on disk.
            _positive(n_features, "n_features")
            _positive(n_classes, "n_classes")
            self._created = _create_private_file(self.path)
        try:
            self._conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            with self._write() as conn:
                for statement in _SCHEMA:
                    conn.execute(statement)
                stored = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                if stored and stored.get("format") != _FORMAT:
                    raise IngestError(f"ingest: {self.path} is not a fedge ingest inbox")
                if not stored:
                    if n_features is None or n_classes is None:
                        raise IngestError(f"ingest: {self.path} has no schema yet")
                    stored = {
                        "format": _FORMAT,
                        "n_features": str(_positive(n_features, "n_features")),
                        "n_classes": str(_positive(n_classes, "n_classes")),
                        "last_tick": "-1",
                    }
                    conn.executemany("INSERT INTO meta VALUES (?, ?)", stored.items())
            self._schema = InboxSchema(int(stored["n_features"]), int(stored["n_classes"]))
        except sqlite3.DatabaseError as exc:
            self._discard()
            raise IngestError(f"ingest: {self.path} is not a usable inbox ({exc})") from exc
        except BaseException:
            self._discard()
            raise
        for given, have, what in (
            (n_features, self.n_features, "features"),
            (n_classes, self.n_classes, "classes"),
        ):
            if given is not None and int(given) != have:
                self.close()
                raise IngestError(
                    f"ingest: {self.path} holds rows with {have} {what}, {given} were given"
                )

    @classmethod
    def open_existing(cls, path: Path) -> Self:
        """Open an inbox that exists, taking its schema from the file.

        This is how a device learns its input shape from the data its application
        put there (``inbox.n_features``, ``inbox.n_classes``).

        Raises
        ------
        IngestError
            There is no file at ``path``, or it is not an inbox.
        """
        if not Path(path).exists():
            raise IngestError(f"ingest: no inbox at {path}")
        return cls(path)

    @property
    def schema(self) -> InboxSchema:
        """Row width and number of classes, as recorded when the inbox was created."""
        return self._schema

    @property
    def n_features(self) -> int:
        """Row width recorded in the inbox."""
        return self._schema.n_features

    @property
    def n_classes(self) -> int:
        """Number of classes recorded in the inbox (labels ``0 .. n_classes - 1``)."""
        return self._schema.n_classes

    # -- writing -----------------------------------------------------------------------------
    def append(
        self,
        tick: int,
        x: np.ndarray | Sequence[Any],
        y: np.ndarray | Sequence[Any],
        *,
        on_invalid: OnInvalid = "raise",
        source: str = "",
    ) -> Receipt:
        """Store one tick's rows, checked first; nothing is stored if the batch is refused.

        Parameters
        ----------
        tick : int
            The tick the rows belong to; not before the latest stored tick.
        x : array-like
            Feature rows, ``(n, n_features)``.
        y : array-like
            One integer label per row (booleans are not labels).
        on_invalid : {"raise", "drop"}, default "raise"
            Refuse a batch with a bad row, or drop and count the bad rows.
        source : str, default ""
            Free text kept with the batch (e.g. the file it came from).

        Returns
        -------
        Receipt
            What was stored.

        Raises
        ------
        IngestError
            The batch is malformed, has a bad row (with ``"raise"``), or goes back in time.
        """
        return self.append_many([(tick, x, y)], on_invalid=on_invalid, source=source)[0]

    def append_many(
        self,
        batches: Iterable[BatchInput],
        *,
        on_invalid: OnInvalid = "raise",
        source: str = "",
    ) -> list[Receipt]:
        """Store several ticks' batches in one transaction: all of them or none.

        Parameters are as for :meth:`append`, one ``(tick, x, y)`` per batch.
        ``batches`` may be a generator of any length: beyond :data:`CHUNK_ROWS`
        rows the checked batches wait on disk, not in memory, and the inbox is
        locked only for the final copy.
        """
        with _stage(batches, self.schema, on_invalid, self.last_tick) as staged:
            return self._commit(staged, source)

    def _commit(self, staged: _Staging, source: str) -> list[Receipt]:
        receipts: list[Receipt] = []
        now = time.time()
        try:
            with self._write() as conn:
                row = conn.execute("SELECT value FROM meta WHERE key = 'last_tick'").fetchone()
                last = int(row[0])
                for batch in staged:
                    if batch.tick < last:
                        # Another writer stored a later tick while this call was checked.
                        raise IngestError(
                            f"ingest: tick {batch.tick} is before the latest stored tick {last} "
                            "(the inbox is append-only); nothing from this call was stored"
                        )
                    last = batch.tick
                    cursor = conn.execute(
                        "INSERT INTO batches (tick, n, x, y, rejected, source, received)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (batch.tick, batch.n, batch.x, batch.y, batch.rejected, source, now),
                    )
                    receipts.append(
                        Receipt(int(cursor.lastrowid or 0), batch.tick, batch.n, json.loads(batch.rejected))
                    )
                conn.execute("UPDATE meta SET value = ? WHERE key = 'last_tick'", (str(last),))
        except sqlite3.Error as exc:
            raise IngestError(
                f"ingest: cannot write to {self.path} ({exc}); nothing from this call was stored"
            ) from exc
        return receipts

    # -- reading -----------------------------------------------------------------------------
    def take(self, after: int = 0, through_tick: int | None = None) -> Batch:
        """All rows of batches newer than ``after`` up to ``through_tick``, oldest first.

        Parameters
        ----------
        after : int, default 0
            Id of the last batch already taken (the reader's cursor).
        through_tick : int, optional
            Leave batches of later ticks for later.

        Returns
        -------
        Batch
            The rows, the drop counts and the new cursor (``last_batch_id``; 0 if
            nothing was taken).
        """
        query = "SELECT id, x, y, rejected FROM batches WHERE id > ?"
        params: list[int] = [int(after)]
        if through_tick is not None:
            query += " AND tick <= ?"
            params.append(int(through_tick))
        rows = self._connection().execute(query + " ORDER BY id", params).fetchall()
        rejected = _no_rejects()
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        last = 0
        for batch_id, xb, yb, rej in rows:
            last = int(batch_id)
            xs.append(np.frombuffer(xb, dtype=np.float32).reshape(-1, self.n_features))
            ys.append(np.frombuffer(yb, dtype=np.int64))
            for key, value in json.loads(rej).items():
                rejected[key] = rejected.get(key, 0) + int(value)
        x = np.concatenate(xs) if xs else np.zeros((0, self.n_features), dtype=np.float32)
        y = np.concatenate(ys) if ys else np.zeros(0, dtype=np.int64)
        return Batch(last, x, y, rejected)

    def prune(self, through_batch: int) -> int:
        """Delete batches up to and including ``through_batch`` (already taken); returns how many."""
        with self._write() as conn:
            cursor = conn.execute("DELETE FROM batches WHERE id <= ?", (int(through_batch),))
        return int(cursor.rowcount)

    @property
    def last_tick(self) -> int:
        """The latest tick ever stored (``-1`` for a new inbox); survives pruning."""
        row = self._connection().execute("SELECT value FROM meta WHERE key = 'last_tick'").fetchone()
        return int(row[0])

    def __len__(self) -> int:
        (count,) = self._connection().execute("SELECT COUNT(*) FROM batches").fetchone()
        return int(count)

    # -- plumbing ----------------------------------------------------------------------------
    def close(self) -> None:
        """Close the file; calling it again does nothing."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _discard(self) -> None:
        """Close, and remove the file if this object created it and it holds no batch."""
        empty = True
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                (count,) = self._conn.execute("SELECT COUNT(*) FROM batches").fetchone()
                empty = count == 0
        self.close()
        if self._created and empty:
            for suffix in ("", *SIDECAR_SUFFIXES):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self.path}{suffix}")
            self._created = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Inbox(path={str(self.path)!r}, n_features={self.n_features}, n_classes={self.n_classes})"

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise IngestError(f"ingest: {self.path} is closed")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def read_schema(path: Path) -> InboxSchema:
    """The schema an existing inbox was created with.

    Raises
    ------
    IngestError
        There is no inbox at ``path``.
    """
    with Inbox.open_existing(path) as inbox:
        return inbox.schema


def ingest(
    path: Path,
    batches: Iterable[BatchInput],
    *,
    n_features: int | None = None,
    n_classes: int | None = None,
    on_invalid: OnInvalid = "raise",
    source: str = "",
) -> list[Receipt]:
    """Append ``batches`` to the inbox at ``path`` (all or none), creating it only if they are accepted.

    Parameters
    ----------
    path : Path
        The inbox file.
    batches : iterable of (tick, x, y)
        As for :meth:`Inbox.append_many`; may be a generator of any length.
    n_features, n_classes : int, optional
        The schema; needed when there is no inbox yet, checked against it otherwise.
    on_invalid : {"raise", "drop"}, default "raise"
        As for :meth:`Inbox.append`.
    source : str, default ""
        Kept with each batch.

    Returns
    -------
    list of Receipt
        One per stored batch.

    Raises
    ------
    IngestError
        The input was refused; an inbox that did not exist still does not.
    """
    path = Path(path)
    if path.exists():
        with Inbox(path, n_features=n_features, n_classes=n_classes) as inbox:
            return inbox.append_many(batches, on_invalid=on_invalid, source=source)
    if n_features is None or n_classes is None:
        raise IngestError(f"ingest: no inbox at {path} (a new inbox needs the row width and classes)")
    schema = InboxSchema(_positive(n_features, "n_features"), _positive(n_classes, "n_classes"))
    with _stage(batches, schema, on_invalid, -1) as staged:
        inbox = Inbox(path, n_features=schema.n_features, n_classes=schema.n_classes)
        try:
            receipts = inbox._commit(staged, source)
        except BaseException:
            inbox._discard()
            raise
        inbox.close()
        return receipts


def _create_private_file(path: Path) -> bool:
    """Create an empty owner-only file (and owner-only folders); False if it already existed.

    The mode is given to ``open`` itself, so no row is ever written to a file
    others could read, and SQLite copies it onto the sidecar files it creates.
    """
    missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, 0o600)  # exact, whatever the umask
    finally:
        os.close(fd)
    return True


def _positive(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < 1:
        raise IngestError(f"ingest: {what} must be a positive integer, got {value!r}")
    return int(value)


def _cut(text: str, limit: int) -> str:
    """``text`` on one line and at most ``limit`` characters."""
    text = " ".join(text.splitlines())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: object, limit: int = 40) -> str:
    """``repr`` cut to ``limit`` characters, for messages about hostile input."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001  # any object may come in; the message must still be one line
        text = f"<{type(value).__name__}>"
    return _cut(text, limit)


# -- files ------------------------------------------------------------------------------------
class _JsonFloat(float):
    """A JSON number with a fraction or exponent, keeping its text (``3.0`` vs ``3e0``)."""

    text: str


def _json_float(text: str) -> _JsonFloat:
    value = _JsonFloat(text)
    value.text = text
    return value


def iter_batches(
    stream: IO[str] | IO[bytes],
    fmt: Literal["csv", "jsonl"],
    default_tick: int | None = None,
    name: str = "<input>",
    *,
    n_features: int | None = None,
    n_classes: int | None = None,
    strict: bool = True,
    chunk_rows: int | None = CHUNK_ROWS,
) -> Iterator[tuple[int, Any, list[int]]]:
    """Parse CSV or JSON lines into ``(tick, rows, labels)`` batches, reading as it goes.

    CSV needs a header with a ``label`` column; a ``tick`` column is optional
    (else ``default_tick``); every other column is a feature, in header order.
    A JSON line is an object ``{"x": [...], "y": <label>, "tick": <tick>}``
    (``tick`` optional as for CSV). Consecutive rows of one tick form one batch,
    cut every ``chunk_rows`` rows; ticks must not go back.

    A label is a plain decimal integer: ``3`` or ``-1``, and also ``3.0``
    (``3.00``), because spreadsheet and pandas exports write an integer column
    that ever held a gap as floats. Anything else is refused wherever it
    appears: ``true``, ``[1]``, ``{}``, an empty cell, ``0x1``, ``3e0``,
    ``3.5``, ``nan``, ``inf``, a JSON string, and integers beyond 64 bits. A
    feature is a decimal number (``nan``/``inf`` are read as such and left to
    the row checks); ticks are non-negative decimal integers.

    Parameters
    ----------
    stream : text or binary file
        Binary input is read as UTF-8 (a leading byte-order mark is skipped).
    fmt : {"csv", "jsonl"}
        The format.
    default_tick : int, optional
        Tick of rows that carry none.
    name : str, default "<input>"
        The file's name for error messages.
    n_features, n_classes : int, optional
        The inbox's schema. With ``n_features`` a CSV header of another width
        is refused. With ``strict`` they also refuse, naming the line and
        column, a non-finite feature, a JSON row of another width and a label
        outside ``0 .. n_classes - 1`` (else those rows are left to the
        inbox's ``on_invalid="drop"`` to count).
    strict : bool, default True
        See ``n_features``.
    chunk_rows : int or None, default CHUNK_ROWS
        Most rows in one yielded batch; None for no limit.

    Yields
    ------
    tuple of (int, rows, list of int)
        A tick, its rows (a ``float64`` array from CSV, lists of numbers from
        JSON lines, whose rows may differ in width) and their labels.

    Raises
    ------
    IngestError
        Input that cannot be read, in one line naming the file, line and column.
    """
    if fmt not in ("csv", "jsonl"):
        raise IngestError(f"ingest: format {fmt!r} is not known; known: csv, jsonl")
    if chunk_rows is not None and chunk_rows < 1:
        raise IngestError(f"ingest: chunk_rows must be positive, got {chunk_rows}")
    name = _cut(str(name), 200)
    text, wrapper = _as_text(stream)
    parser = _Rows(name, default_tick, n_features, n_classes, strict)
    block = CHUNK_ROWS if chunk_rows is None else min(chunk_rows, CHUNK_ROWS)
    blocks = parser.csv(text, block) if fmt == "csv" else parser.jsonl(text, block)
    pending: list[tuple[Any, list[int]]] = []
    pending_tick, pending_rows = -1, 0
    previous: int | None = None
    try:
        for lines, ticks, x, ys in blocks:
            t = np.asarray(ticks, dtype=np.int64)
            steps = np.diff(t, prepend=t[0] if previous is None else previous)
            back = np.flatnonzero(steps < 0)
            if back.size:
                i = int(back[0])
                before = int(t[i - 1]) if i else previous
                raise IngestError(
                    f"ingest: {name} line {lines[i]}: tick {int(t[i])} comes after tick {before} "
                    "(ticks must not go back)"
                )
            previous = int(t[-1])
            edges = [0, *(np.flatnonzero(t[1:] != t[:-1]) + 1).tolist(), len(t)]
            for a, b in itertools.pairwise(edges):
                tick = int(t[a])
                if pending and tick != pending_tick:
                    yield pending_tick, *_joined(pending)
                    pending, pending_rows = [], 0
                while a < b:  # fill each batch of a tick up to chunk_rows
                    take = b - a if chunk_rows is None else min(b - a, chunk_rows - pending_rows)
                    pending.append((x[a : a + take], ys[a : a + take]))
                    pending_tick, pending_rows, a = tick, pending_rows + take, a + take
                    if chunk_rows is not None and pending_rows >= chunk_rows:
                        yield pending_tick, *_joined(pending)
                        pending, pending_rows = [], 0
        if pending:
            yield pending_tick, *_joined(pending)
    finally:
        if wrapper is not None:
            # Leave the caller's binary stream open (a TextIOWrapper closes it when collected).
            with contextlib.suppress(ValueError):
                wrapper.detach()


def _joined(pieces: list[tuple[Any, list[int]]]) -> tuple[Any, list[int]]:
    xs = [x for x, _ in pieces]
    joined_x = np.concatenate(xs) if isinstance(xs[0], np.ndarray) else [r for x in xs for r in x]
    return joined_x, [label for _, ys in pieces for label in ys]


def read_rows(
    stream: TextIO, fmt: Literal["csv", "jsonl"], default_tick: int | None, name: str = "<input>"
) -> list[tuple[int, list[list[float]], list[Any]]]:
    """Parse a whole file into ``(tick, rows, labels)`` batches, one per run of a tick.

    Kept for small inputs; it holds the file in memory. Use :func:`iter_batches`
    (or :func:`ingest_file`) for files of any size. The rules are those of
    :func:`iter_batches`.
    """
    return [
        (tick, x.tolist() if isinstance(x, np.ndarray) else x, y)
        for tick, x, y in iter_batches(stream, fmt, default_tick, name, chunk_rows=None)
    ]


def _as_text(stream: IO[str] | IO[bytes]) -> tuple[IO[str], io.TextIOWrapper | None]:
    probe = stream.read(0)
    if isinstance(probe, bytes):
        wrapper = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")  # type: ignore[type-var]
        return wrapper, wrapper
    return stream, None  # type: ignore[return-value]


_Block = tuple[list[int], list[int], Any, list[int]]
"""Line numbers, ticks, rows (an array for CSV, lists for JSON lines) and labels."""


@dataclass(frozen=True)
class _Layout:
    label: int
    tick: int | None
    features: list[int]
    where: list[str]


def _fits_int64(digits: str) -> bool:
    """Whether a decimal integer's text is within int64, without int() on a huge string."""
    magnitude = digits.lstrip("-").lstrip("0")
    return len(magnitude) <= 19 and abs(int(digits)) <= _INT64_MAX


def _whole_column(pattern: re.Pattern[str], cells: list[str]) -> bool:
    joined = "\n".join(cells)
    # A cell holding a newline would pass as two cells; the count rules that out.
    return joined.count("\n") == len(cells) - 1 and pattern.fullmatch(joined) is not None


class _Rows:
    """Line-by-line readers that name the file, line and column of what they refuse."""

    def __init__(
        self,
        name: str,
        default_tick: int | None,
        n_features: int | None,
        n_classes: int | None,
        strict: bool,
    ) -> None:
        self.name = name
        self.default_tick = default_tick
        self.n_features = n_features
        self.n_classes = n_classes
        self.strict = strict

    def _error(self, lineno: int, where: str, message: str) -> IngestError:
        return IngestError(f"ingest: {self.name} line {lineno}{where}: {message}")

    # CSV -----------------------------------------------------------------------------------
    def csv(self, text: IO[str], block: int) -> Iterator[_Block]:
        reader = csv.reader(text)
        try:
            yield from self._csv(reader, block)
        except csv.Error as exc:
            raise self._error(reader.line_num, "", f"not readable as CSV ({exc})") from None
        except UnicodeDecodeError as exc:
            raise self._error(reader.line_num + 1, "", f"not UTF-8 text ({exc.reason})") from None

    def _csv(self, reader: Any, block: int) -> Iterator[_Block]:
        header = next(reader, None)
        if header is None:
            raise IngestError(f"ingest: {self.name} is empty (a header with a 'label' column is needed)")
        header = [h.strip() for h in header]
        shown = _cut(",".join(header), 80)
        if "label" not in header:
            raise IngestError(f"ingest: {self.name}: the header has no 'label' column: {shown}")
        for column in ("label", "tick"):
            if header.count(column) > 1:
                raise IngestError(f"ingest: {self.name}: the header has two '{column}' columns: {shown}")
        layout = _Layout(
            label=header.index("label"),
            tick=header.index("tick") if "tick" in header else None,
            features=[i for i, h in enumerate(header) if h not in ("label", "tick")],
            where=[f", column {i + 1} ({_cut(h, 30)})" for i, h in enumerate(header)],
        )
        if self.n_features is not None and len(layout.features) != self.n_features:
            raise IngestError(
                f"ingest: {self.name}: the header has {len(layout.features)} feature columns, "
                f"the inbox holds rows of {self.n_features} features: {shown}"
            )
        rows: list[list[str]] = []
        lines: list[int] = []
        for row in reader:
            if not "".join(row).strip():
                continue
            if len(row) != len(header):
                raise self._error(reader.line_num, "", f"{len(row)} fields, the header has {len(header)}")
            rows.append(row)
            lines.append(reader.line_num)
            if len(rows) >= block:
                yield self._csv_block(rows, lines, layout)
                rows, lines = [], []
        if rows:
            yield self._csv_block(rows, lines, layout)

    def _csv_block(self, rows: list[list[str]], lines: list[int], layout: _Layout) -> _Block:
        """Parse a block of CSV rows a column at a time; row by row where that finds a problem."""
        fast = self._csv_columns(rows, layout)
        if fast is not None:
            return (lines, *fast)
        # Row by row, the first bad cell raises with its line and column.
        ticks: list[int] = []
        xs: list[list[float]] = []
        ys: list[int] = []
        where = layout.where
        for lineno, row in zip(lines, rows, strict=True):
            ti = layout.tick
            ticks.append(self._tick(row[ti], lineno, where[ti]) if ti is not None else self._tick(None, lineno, ""))
            xs.append([self._feature_text(row[i], lineno, where[i]) for i in layout.features])
            ys.append(self._label_text(row[layout.label], lineno, where[layout.label]))
        return lines, ticks, np.asarray(xs, dtype=np.float64).reshape(len(rows), -1), ys

    def _csv_columns(
        self, rows: list[list[str]], layout: _Layout
    ) -> tuple[list[int], np.ndarray, list[int]] | None:
        """The block's ticks, features and labels if every cell is plainly good, else None."""
        n = len(rows)
        if layout.tick is None:
            if self.default_tick is None:
                return None
            ticks = [self.default_tick] * n
        else:
            cells = [r[layout.tick] for r in rows]
            if not _whole_column(_TICK_COLUMN, cells):
                return None
            ticks = list(map(int, cells))
            if max(ticks) > _INT64_MAX:
                return None
        x = np.empty((n, len(layout.features)), dtype=np.float64)
        for j, i in enumerate(layout.features):
            cells = [r[i] for r in rows]
            if not _whole_column(_FEATURE_COLUMN, cells):
                return None
            x[:, j] = list(map(float, cells))
        if self.strict and not (np.isfinite(x) & (np.abs(x) <= _FLOAT32_MAX)).all():
            return None
        cells = [r[layout.label] for r in rows]
        if not _whole_column(_LABEL_COLUMN, cells):
            return None
        labels = [int(c.split(".")[0]) for c in cells] if any("." in c for c in cells) else list(map(int, cells))
        high = self.n_classes - 1 if self.strict and self.n_classes is not None else _INT64_MAX
        low = 0 if self.strict and self.n_classes is not None else -_INT64_MAX
        if min(labels) < low or max(labels) > high:
            return None
        return ticks, x, labels

    def _tick(self, value: str | None, lineno: int, where: str) -> int:
        if value is None or not value.strip():
            if self.default_tick is None:
                raise self._error(lineno, where, "no tick (add a 'tick' column or --tick)")
            return self.default_tick
        text = value.strip()
        if not _TICK_RE.fullmatch(text) or not _fits_int64(text):
            raise self._error(lineno, where, f"tick {_short(value)} is not a non-negative integer")
        return int(text)

    def _feature_text(self, value: str, lineno: int, where: str) -> float:
        text = value.strip()
        if _FLOAT_RE.fullmatch(text) or _NON_FINITE_RE.fullmatch(text):
            return self._finite(float(text), lineno, where, text)
        raise self._error(lineno, where, f"not a number: {_short(value)}")

    def _finite(self, number: float, lineno: int, where: str, text: str) -> float:
        if self.strict and not (math.isfinite(number) and abs(number) <= _FLOAT32_MAX):
            raise self._error(lineno, where, f"{_short(text)} is not a finite 32-bit number")
        return number

    def _label_text(self, value: str, lineno: int, where: str) -> int:
        text = value.strip()
        if not text:
            raise self._error(lineno, where, "the label is empty")
        match = _LABEL_RE.fullmatch(text)
        if match is None:
            raise self._error(
                lineno, where, f"label {_short(value)} is not an integer (a class label is written like 3)"
            )
        digits = match.group(1)
        if not _fits_int64(digits):
            raise self._error(lineno, where, f"label {_short(value)} is out of range")
        return self._label_range(int(digits), lineno, where, text)

    def _label_range(self, label: int, lineno: int, where: str, text: str) -> int:
        # Beyond 64 bits a label cannot be stored at all, so it is refused even when dropping.
        high = self.n_classes - 1 if self.strict and self.n_classes is not None else None
        if abs(label) > _INT64_MAX or (high is not None and not 0 <= label <= high):
            known = f" (labels are 0..{high})" if high is not None else ""
            raise self._error(lineno, where, f"label {_short(text)} is out of range{known}")
        return label

    # JSON lines ----------------------------------------------------------------------------
    def jsonl(self, text: IO[str], block: int) -> Iterator[_Block]:
        lines: list[int] = []
        ticks: list[int] = []
        xs: list[list[float]] = []
        ys: list[int] = []
        for lineno, tick, x, y in self._jsonl(text):
            lines.append(lineno)
            ticks.append(tick)
            xs.append(x)
            ys.append(y)
            if len(lines) >= block:
                yield lines, ticks, xs, ys
                lines, ticks, xs, ys = [], [], [], []
        if lines:
            yield lines, ticks, xs, ys

    def _jsonl(self, text: IO[str]) -> Iterator[tuple[int, int, list[float], int]]:
        lineno = 0
        while True:
            lineno += 1
            try:
                line = text.readline(_MAX_LINE + 1)
            except UnicodeDecodeError as exc:
                raise self._error(lineno, "", f"not UTF-8 text ({exc.reason})") from None
            if not line:
                return
            if len(line) > _MAX_LINE:
                raise self._error(lineno, "", f"longer than {_MAX_LINE} characters")
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_float=_json_float)
            except RecursionError:
                raise self._error(lineno, "", "not JSON (nested too deeply)") from None
            except ValueError as exc:
                raise self._error(lineno, "", f"not JSON ({_short(exc.args[0], 80)})") from None
            if not isinstance(obj, dict) or "x" not in obj or "y" not in obj:
                raise self._error(lineno, "", "expected an object with 'x' and 'y'")
            if not isinstance(obj["x"], list):
                raise self._error(lineno, ", field 'x'", "must be a list of numbers")
            tick = self._json_tick(obj.get("tick"), lineno)
            xs = [self._json_feature(v, lineno, f", field 'x[{i}]'") for i, v in enumerate(obj["x"])]
            if self.strict and self.n_features is not None and len(xs) != self.n_features:
                raise self._error(
                    lineno, ", field 'x'", f"{len(xs)} features, the inbox holds rows of {self.n_features}"
                )
            yield lineno, tick, xs, self._json_label(obj["y"], lineno)

    def _json_tick(self, value: object, lineno: int) -> int:
        where = ", field 'tick'"
        if value is None:
            if self.default_tick is None:
                raise self._error(lineno, "", "no tick (add a 'tick' field or --tick)")
            return self.default_tick
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT64_MAX:
            raise self._error(lineno, where, f"tick {_short(value)} is not a non-negative integer")
        return value

    def _json_feature(self, value: object, lineno: int, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._error(lineno, where, f"not a number: {_short(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer too long for a float
            number = math.inf
        return self._finite(number, lineno, where, getattr(value, "text", None) or _short(value))

    def _json_label(self, value: object, lineno: int) -> int:
        where = ", field 'y'"
        if isinstance(value, _JsonFloat):
            return self._label_text(value.text, lineno, where)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._error(
                lineno, where, f"label {_short(value)} is not an integer (a class label is written like 3)"
            )
        return self._label_range(value, lineno, where, str(value) if abs(value) < 10**30 else "a huge integer")


def ingest_file(
    path: Path,
    stream: IO[str] | IO[bytes],
    fmt: Literal["csv", "jsonl"],
    *,
    default_tick: int | None = None,
    name: str = "<input>",
    n_features: int | None = None,
    n_classes: int | None = None,
    on_invalid: OnInvalid = "raise",
    chunk_rows: int = CHUNK_ROWS,
) -> list[Receipt]:
    """Append a CSV or JSON-lines file to the inbox at ``path``, all or nothing, reading it in chunks.

    Parameters are those of :func:`iter_batches` and :func:`ingest`. A new inbox
    (``n_features`` and ``n_classes`` given, no file yet) is created only if the
    whole input is accepted.

    Raises
    ------
    IngestError
        The input or the inbox was refused; the inbox is as it was.
    """
    path = Path(path)
    if path.exists():
        schema = read_schema(path)
        for given, have, what in ((n_features, schema.n_features, "features"), (n_classes, schema.n_classes, "classes")):
            if given is not None and int(given) != have:
                raise IngestError(f"ingest: {path} holds rows with {have} {what}, {given} were given")
    elif n_features is None or n_classes is None:
        raise IngestError(f"ingest: no inbox at {path} (a new inbox needs the row width and classes)")
    else:
        schema = InboxSchema(_positive(n_features, "n_features"), _positive(n_classes, "n_classes"))
    batches = iter_batches(
        stream,
        fmt,
        default_tick,
        name,
        n_features=schema.n_features,
        n_classes=schema.n_classes,
        strict=on_invalid == "raise",
        chunk_rows=chunk_rows,
    )
    return ingest(
        path,
        batches,
        n_features=schema.n_features,
        n_classes=schema.n_classes,
        on_invalid=on_invalid,
        source=name,
    )


# -- the command line -------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, no usage dump
        sys.stderr.write(f"fedge-ingest: error: {message}\n")
        raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    """``fedge-ingest INBOX [FILE]``: append CSV or JSON-lines samples to a device's inbox.

    Returns the exit code: 0 when every batch was stored, 2 when the input was
    refused (nothing stored, and no new inbox left behind) or the arguments are
    wrong; the error is one line.
    """
    parser = _Parser(
        prog="fedge-ingest",
        description="Append labelled samples to a device's ingest inbox (all batches or none).",
    )
    parser.add_argument("inbox", type=Path, help="inbox file, e.g. <run dir>/devices/device-0.inbox.sqlite")
    parser.add_argument("file", nargs="?", default="-", help="CSV or JSON-lines file; '-' for stdin")
    parser.add_argument("--format", choices=("csv", "jsonl"), help="default: from the file name, else csv")
    parser.add_argument("--tick", type=int, help="tick of rows that carry none")
    parser.add_argument("--features", type=int, help="row width (only to create a new inbox)")
    parser.add_argument("--classes", type=int, help="number of classes (only to create a new inbox)")
    parser.add_argument(
        "--drop-invalid",
        action="store_true",
        help="drop and count bad rows instead of refusing the whole input",
    )
    args = parser.parse_args(argv)
    fmt: Literal["csv", "jsonl"] = (
        "jsonl"
        if args.format == "jsonl"
        or (args.format is None and str(args.file).endswith((".jsonl", ".json", ".ndjson")))
        else "csv"
    )
    if args.tick is not None and not 0 <= args.tick <= _INT64_MAX:
        parser.error(f"--tick must be a non-negative integer (64-bit), got {args.tick}")
    try:
        if args.file == "-":
            name, stream = "<stdin>", sys.stdin.buffer
        else:
            name, stream = str(args.file), open(args.file, "rb")  # noqa: SIM115  # closed below
    except OSError as exc:
        parser.error(f"cannot read {args.file}: {exc.strerror or exc}")
    try:
        receipts = ingest_file(
            args.inbox,
            stream,
            fmt,
            default_tick=args.tick,
            name=name,
            n_features=args.features,
            n_classes=args.classes,
            on_invalid="drop" if args.drop_invalid else "raise",
        )
    except IngestError as exc:
        sys.stderr.write(f"fedge-ingest: error: {str(exc).removeprefix('ingest: ')}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"fedge-ingest: error: cannot read {name}: {exc.strerror or exc}\n")
        return 2
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    stored = sum(r.accepted for r in receipts)
    dropped = sum(r.rejected["total"] for r in receipts)
    ticks = sorted({r.tick for r in receipts})
    span = f"ticks {ticks[0]}-{ticks[-1]}" if len(ticks) > 1 else f"tick {ticks[0]}" if ticks else "no tick"
    print(f"stored {stored} rows in {len(receipts)} batches ({span}); dropped {dropped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
