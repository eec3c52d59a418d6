"""The ingest inbox: a device's append-only queue of validated rows, one batch per tick.

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

Sealed at rest
--------------
Every batch is sealed (AES-256-GCM) under the device's key, bound to its row;
a changed batch is skipped and counted when read (:attr:`Batch.unauthenticated`),
an inbox sealed under another key is refused, and a format-1 inbox (written in
the clear) is sealed in place when first opened. See :mod:`clients.inbox_seal`.

Files and memory
----------------
The inbox holds samples, so its file is created ``0600`` (SQLite gives its
``-wal``/``-shm``/``-journal`` sidecars the mode of the database file) and a
folder it creates ``0700``, whatever the process umask. One call stores all its
batches or none; the checked batches of a call wait in memory up to
:data:`CHUNK_ROWS` rows and beyond that in a private temporary SQLite file
(unlinked when opened, mode ``0600``), and the inbox's write lock is held only
while they are copied in, so a reading device is never kept waiting for a long
parse. :func:`ingest` and the command line create a new inbox only once the input has
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
clients.inbox.IngestError: ingest: tick 1, row 0: a feature is NaN, infinite or not a number; nothing from this batch was stored
>>> read_schema(path)
InboxSchema(n_features=2, n_classes=2)

From the shell, a CSV with a ``label`` column (and optionally ``tick``)::

    python -m clients.ingest runs/devices/device-0.inbox.sqlite samples.csv --tick 7
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np

from clients.crypto import RecordAuthenticationError
from clients.inbox_batches import (
    UNLABELLED,
    Batch,
    BatchInput,
    InboxSchema,
    IngestError,
    OnInvalid,
    Receipt,
    Staging,
    _no_rejects,
    _positive,
    stage,
)
from clients.inbox_labels import LABELS_TABLE, LabelQueue, LabelReceipt, LateLabels
from clients.inbox_seal import (
    INBOX_SUFFIX,
    PLAIN_FORMAT,
    READABLE_FORMATS,
    SEALED_FORMAT,
    check_key,
    create_private_file,
    key_check,
    open_batch,
    open_cipher,
    seal_batch,
    seal_in_place,
    upgrade_to_ids,
)
from clients.targets import CLASS, Targets

SIDECAR_SUFFIXES: tuple[str, ...] = ("-wal", "-shm", "-journal")
"""Files SQLite may keep beside an inbox; they hold samples too."""
CHUNK_ROWS = 10_000
"""Rows read from a file, and kept in memory while a call is checked, at a time."""

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
        " received REAL NOT NULL,"
        " first_row INTEGER NOT NULL DEFAULT 0)"
    ),
    LABELS_TABLE,
)
__all__ = ["UNLABELLED", "Batch", "LabelReceipt", "LateLabels", "Receipt", "_positive"]  # re-exported
log = logging.getLogger("fedge.device")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def inbox_path(store_path: Path) -> Path:
    """The inbox beside a device store: ``device-3.sqlite`` -> ``device-3.inbox.sqlite``."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.stem + INBOX_SUFFIX)


# -- checking and staging a call's batches ---------------------------------------------------

# -- the inbox ---------------------------------------------------------------------------------
class Inbox(LabelQueue):
    """A device's append-only queue of validated rows, one batch per tick.

    Parameters
    ----------
    path : Path
        SQLite file; created (``0600``, in a ``0700`` folder if the folder is new)
        with the schema on first use.
    n_features : int, optional
        Row width. Needed when the file is new; checked against the file otherwise.
    n_classes : int, optional
        Number of classes (labels ``0 .. n_classes - 1``); as ``n_features``. For
        float or vector targets it is the values per row and may be left out.
    targets : Targets or str, optional
        The kind of target the rows hold (:mod:`clients.targets`): class labels
        (the default for a new inbox, and what an inbox written before target
        kinds existed holds), ``"float"`` or ``"vector:<k>"``. Recorded when the
        inbox is created; checked against the file otherwise.
    key_file : Path, optional
        The device key that seals the batches; by default the key file of the
        store beside the inbox (created ``0600`` if there is none yet).

    Raises
    ------
    IngestError
        The file is not an inbox, its schema (width, classes, target kind) differs
        from the one given, the key file cannot be used, or the inbox was sealed
        under another key.

    See Also
    --------
    Inbox.open_existing : open an inbox whose schema the caller does not know.
    ingest : append to an inbox that is created only if the input is accepted.
    """

    def __init__(
        self,
        path: Path,
        *,
        n_features: int | None = None,
        n_classes: int | None = None,
        targets: Targets | str | None = None,
        key_file: Path | None = None,
    ) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._created = False
        wanted = _targets(targets)
        if wanted is not None and not wanted.is_class:
            if n_classes is not None and n_classes != wanted.size:
                raise IngestError(f"ingest: {wanted.describe()} hold {wanted.size} value(s) per row, "
                                  f"n_classes={n_classes} was given")
            n_classes = wanted.size
        self.key_path, self._cipher = open_cipher(self.path, key_file)
        if not self.path.exists():
            if n_features is None or n_classes is None:
                raise IngestError(
                    f"ingest: no inbox at {self.path} (a new inbox needs the row width and classes)"
                )
            # Check the schema before anything exists on disk.
            _positive(n_features, "n_features")
            _positive(n_classes, "n_classes")
            self._created = create_private_file(self.path)
        try:
            self._conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # Pruned batches (and the clear rows of a format-1 inbox) are zeroed, not left in free pages.
            self._conn.execute("PRAGMA secure_delete=ON")
            with self._write() as conn:
                for statement in _SCHEMA:
                    conn.execute(statement)
                stored = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                if stored and stored.get("format") not in READABLE_FORMATS:
                    raise IngestError(f"ingest: {self.path} is not a fedge ingest inbox")
                if not stored:
                    if n_features is None or n_classes is None:
                        raise IngestError(f"ingest: {self.path} has no schema yet")
                    stored = {
                        "format": SEALED_FORMAT,
                        "n_features": str(_positive(n_features, "n_features")),
                        "n_classes": str(_positive(n_classes, "n_classes")),
                        "last_tick": "-1",
                        "last_row": "0",
                        "key_check": key_check(self._cipher),
                        "targets": (wanted or CLASS).meta,
                    }
                    conn.executemany("INSERT INTO meta VALUES (?, ?)", stored.items())
                elif stored["format"] == PLAIN_FORMAT:
                    seal_in_place(conn, self._cipher, self.path)
                else:
                    check_key(self._cipher, stored.get("key_check", ""), self.path, self.key_path)
                if stored["format"] != SEALED_FORMAT:
                    upgrade_to_ids(conn, self.path)
            if stored["format"] == PLAIN_FORMAT:
                # The clear pages were rewritten in the WAL; fold them into the file now.
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            try:
                held = Targets.parse(stored.get("targets"))
            except ValueError:
                raise IngestError(f"ingest: {self.path} is not a fedge ingest inbox (targets)") from None
            self._schema = InboxSchema(int(stored["n_features"]), int(stored["n_classes"]), held)
        except sqlite3.DatabaseError as exc:
            self._discard()
            raise IngestError(f"ingest: {self.path} is not a usable inbox ({exc})") from exc
        except BaseException:
            self._discard()
            raise
        if wanted is not None and wanted != self.targets:
            self.close()
            raise IngestError(f"ingest: {self.path} holds {self.targets.describe()}, "
                              f"{wanted.describe()} were given; nothing was stored")
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

    @property
    def targets(self) -> Targets:
        """The kind of target the rows hold (class labels for an inbox written before kinds existed)."""
        return self._schema.targets

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
            One target per row, of the inbox's kind: an integer class label
            (booleans are not labels), a number, or a list of ``k`` numbers;
            ``None`` or NaN for a row whose label is not known (yet): it is
            stored, never rejected.
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
        with stage(batches, self.schema, on_invalid, self.last_tick, CHUNK_ROWS) as staged:
            return self._commit(staged, source)

    def _commit(self, staged: Staging, source: str) -> list[Receipt]:
        receipts: list[Receipt] = []
        now = time.time()
        try:
            with self._write() as conn:
                row = conn.execute("SELECT value FROM meta WHERE key = 'last_tick'").fetchone()
                last = int(row[0])
                # Ids are chosen here, inside the write lock, so each seal can name its row.
                (top,) = conn.execute(
                    "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'batches'), 0),"
                    " COALESCE((SELECT MAX(id) FROM batches), 0))"
                ).fetchone()
                batch_id = int(top)
                next_row = int(conn.execute("SELECT value FROM meta WHERE key = 'last_row'").fetchone()[0]) + 1
                for batch in staged:
                    if batch_id == top:  # only a call that stores something marks the origin
                        _check_origin(conn, self.path, source)
                    if batch.tick < last:
                        # Another writer stored a later tick while this call was checked.
                        raise IngestError(
                            f"ingest: tick {batch.tick} is before the latest stored tick {last} "
                            "(the inbox is append-only); nothing from this call was stored"
                        )
                    last = batch.tick
                    batch_id += 1
                    x, y = seal_batch(self._cipher, batch_id, batch.tick, batch.n, batch.x, batch.y)
                    conn.execute(
                        "INSERT INTO batches (id, tick, n, x, y, rejected, source, received, first_row)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (batch_id, batch.tick, batch.n, x, y, batch.rejected, source, now, next_row),
                    )
                    rejected = json.loads(batch.rejected)
                    receipts.append(
                        Receipt(batch_id, batch.tick, batch.n, rejected, next_row, batch.n_in)
                    )
                    next_row += batch.n_in
                conn.execute("UPDATE meta SET value = ? WHERE key = 'last_tick'", (str(last),))
                conn.execute("UPDATE meta SET value = ? WHERE key = 'last_row'", (str(next_row - 1),))
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
        query = "SELECT id, tick, n, x, y, rejected, first_row FROM batches WHERE id > ?"
        params: list[int] = [int(after)]
        if through_tick is not None:
            query += " AND tick <= ?"
            params.append(int(through_tick))
        rows = self._connection().execute(query + " ORDER BY id", params).fetchall()
        rejected = _no_rejects()
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        ids: list[np.ndarray] = []
        last = 0
        unauthenticated = 0
        for batch_id, tick, n, xb, yb, rej, first in rows:
            last = int(batch_id)
            try:
                x, y, at = open_batch(self._cipher, batch_id, tick, n, xb, yb, self.n_features, self.targets)
            except RecordAuthenticationError as exc:
                unauthenticated += int(n)
                log.warning(
                    "inbox %s: batch %d (tick %d, %d rows) failed authentication (%s); skipped",
                    self.path, batch_id, tick, n, exc,
                )
                continue
            xs.append(x)
            ys.append(y)
            ids.append(first + at if first else np.zeros(len(y), dtype=np.int64))
            for key, value in json.loads(rej).items():
                rejected[key] = rejected.get(key, 0) + int(value)
        x = np.concatenate(xs) if xs else np.zeros((0, self.n_features), dtype=np.float32)
        y = np.concatenate(ys) if ys else self.targets.empty()
        sample_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        return Batch(last, x, y, rejected, unauthenticated, sample_ids)

    def prune(self, through_batch: int) -> int:
        """Delete batches up to and including ``through_batch`` (already taken); returns how many."""
        with self._write() as conn:
            cursor = conn.execute("DELETE FROM batches WHERE id <= ?", (int(through_batch),))
        return int(cursor.rowcount)

    @property
    def origin(self) -> str | None:
        """``"scenario"`` or ``"device"``: whose rows the inbox holds (None before the first write)."""
        row = self._connection().execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()
        return None if row is None else str(row[0])

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
        kind = "" if self.targets.is_class else f", targets={self.targets.meta!r}"
        return f"Inbox(path={str(self.path)!r}, n_features={self.n_features}, n_classes={self.n_classes}{kind})"

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


SCENARIO_SOURCE = "scenario"
"""The ``source`` of batches a simulated scenario writes; no other source may join them."""


def _check_origin(conn: sqlite3.Connection, path: Path, source: str) -> None:
    """Refuse to mix a scenario's generated rows with a device application's own rows.

    The first write records which of the two the inbox holds (meta ``origin``);
    a later write of the other kind is refused, so generated rows never reach
    a user's data and user rows never hide among a scenario's.
    """
    kind = "scenario" if source == SCENARIO_SOURCE else "device"
    row = conn.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()
    if row is None:
        conn.execute("INSERT INTO meta VALUES ('origin', ?)", (kind,))
    elif row[0] != kind:
        held = "a scenario's generated rows" if row[0] == "scenario" else "the device application's own rows"
        raise IngestError(f"ingest: {path} holds {held}; {'generated' if kind == 'scenario' else 'own'} rows would "
                          "be mixed into them (use a fresh run folder, or data.source for own data); nothing "
                          "from this call was stored")


def _targets(given: Targets | str | None) -> Targets | None:
    """``given`` as :class:`Targets` (None: not given); a name that is no kind is one line."""
    if given is None or isinstance(given, Targets):
        return given
    try:
        return Targets.parse(given)
    except ValueError as exc:
        raise IngestError(f"ingest: {exc}") from None


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
    key_file: Path | None = None,
    targets: Targets | str | None = None,
) -> list[Receipt]:
    """Append ``batches`` to the inbox at ``path`` (all or none), creating it only if they are accepted.

    Parameters
    ----------
    path : Path
        The inbox file.
    batches : iterable of (tick, x, y)
        As for :meth:`Inbox.append_many`; may be a generator of any length.
    n_features, n_classes : int, optional
        The schema; needed when there is no inbox yet, checked against it otherwise
        (``n_classes`` may be left out for float or vector targets).
    on_invalid : {"raise", "drop"}, default "raise"
        As for :meth:`Inbox.append`.
    source : str, default ""
        Kept with each batch.
    key_file : Path, optional
        The device key that seals the batches (see :class:`Inbox`).
    targets : Targets or str, optional
        The kind of target (see :class:`Inbox`); recorded by the write that
        creates the inbox, checked against it otherwise.

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
    kind = _targets(targets)
    if path.exists():
        with Inbox(path, n_features=n_features, n_classes=n_classes, targets=kind, key_file=key_file) as inbox:
            return inbox.append_many(batches, on_invalid=on_invalid, source=source)
    if kind is not None and not kind.is_class:
        n_classes = kind.size if n_classes is None else n_classes
    if n_features is None or n_classes is None:
        raise IngestError(f"ingest: no inbox at {path} (a new inbox needs the row width and classes)")
    schema = InboxSchema(_positive(n_features, "n_features"), _positive(n_classes, "n_classes"), kind or CLASS)
    with stage(batches, schema, on_invalid, -1, CHUNK_ROWS) as staged:
        inbox = Inbox(
            path, n_features=schema.n_features, n_classes=schema.n_classes, targets=kind, key_file=key_file
        )
        try:
            receipts = inbox._commit(staged, source)
        except BaseException:
            inbox._discard()
            raise
        inbox.close()
        return receipts
