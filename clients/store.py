"""On-device store: one SQLite file per node holding what the device must remember.

It keeps the most recent samples (the window the device trains and checks on), small
state blobs (e.g. the drift monitor), the deployed model and the outbox of drift
reports the server has not acknowledged yet (store and forward). Samples never leave;
the file lives next to the data.

Samples are encrypted at rest: every row (features and label) is its own AES-256-GCM
record under the device's key (:mod:`clients.crypto`), bound to its row id and tick,
so the file holds no sample value in the clear and a changed, swapped or moved record
is detected. The store, its SQLite sidecars, the key file and the folders created for
them are readable by their owner only (``0600`` files, ``0700`` folders).

Every write is one SQLite transaction in WAL mode, so a crash or power cut leaves
either the old or the new state, never a mix. A file that is not a readable store is
moved aside and replaced by a fresh one rather than stopping the device; so is a store
whose sample records fail authentication (the file moved aside stays, readable with the
same key). A key file that holds another valid key is refused instead: the store is
left untouched until the right key is given.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np

from clients.crypto import (
    RECORDS_PER_KEY,
    RecordAuthenticationError,
    RecordCipher,
    default_key_path,
    load_or_create_key,
    private_dirs,
    tighten,
)
from clients.store_format import (
    SIDECAR_SUFFIXES,
    UnusableStoreError,
    label_samples,
    open_records,
    open_store,
    pack_arrays,
    pack_rows,
    seal_samples,
    set_meta,
    stored_targets,
    unpack_arrays,
    unpack_rows,
)
from clients.store_outbox import ReportOutbox
from clients.targets import Targets

logger = logging.getLogger("fedge.device")

#: Reports kept in the outbox at most; beyond it the oldest are dropped (and counted).
OUTBOX_CAPACITY = 10_000


class DeviceStore(ReportOutbox):
    """Bounded sample window, key/value state and deployed model in one SQLite file.

    Parameters
    ----------
    path
        SQLite file of this node (mode ``0600``). Missing parent folders are created
        with mode ``0700``. If the file exists but is corrupt, not SQLite, another
        application's database, or holds a sample record that fails authentication, it
        is moved to ``<path>.corrupt-<timestamp>`` (with a warning on the
        ``fedge.device`` logger) and a fresh store is started.
    capacity, default=1000
        Number of most recent samples kept; older ones are dropped on :meth:`append`.
    n_features, default=None
        Width of a sample row. ``None`` takes it from the existing store, or from the
        first :meth:`append`.
    outbox_capacity, default=10000
        Unacknowledged reports kept; the oldest beyond it are dropped with a warning.
    key_file, default=None
        File holding the device's 256-bit key (64 hexadecimal digits, mode ``0600``),
        created on first use. ``None`` takes ``$FEDGE_DEVICE_KEY_FILE`` if set, else
        the store's path with the suffix ``.key`` (``device-3.key``). If the key file
        was missing although the store holds sealed records, the key is lost: the store
        is moved aside and a fresh one is started under a new key.

    Raises
    ------
    ValueError
        If ``capacity`` or ``n_features`` is not positive, or ``n_features`` differs from
        the width the existing store holds.
    clients.crypto.KeyFileError
        If the key file is readable or writable by group or others, or malformed.
    clients.crypto.WrongKeyError
        If the key file holds a valid key other than the one the store was sealed with
        (the store is left as it is).

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> folder = tempfile.mkdtemp()
    >>> with DeviceStore(f"{folder}/node.sqlite", capacity=3) as store:
    ...     store.append(np.zeros((2, 4)), np.array([0, 1]), tick=1)
    ...     store.append(np.ones((2, 4)), np.array([1, 1]), tick=2)
    ...     x, y, ticks = store.window()
    >>> x.shape, y.tolist(), ticks.tolist()
    ((3, 4), [1, 1, 1], [1, 2, 2])
    """

    def __init__(
        self,
        path: str | Path,
        capacity: int = 1000,
        n_features: int | None = None,
        outbox_capacity: int = OUTBOX_CAPACITY,
        key_file: str | Path | None = None,
        targets: Targets | None = None,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int | np.integer):
            raise TypeError(f"store.capacity must be an int, got {capacity!r}")
        if capacity < 1:
            raise ValueError(f"store.capacity must be >= 1, got {capacity}")
        if n_features is not None and (
            isinstance(n_features, bool) or not isinstance(n_features, int | np.integer)
        ):
            raise TypeError(f"store.n_features must be an int or None, got {n_features!r}")
        if n_features is not None and n_features < 1:
            raise ValueError(f"store.n_features must be >= 1, got {n_features}")
        outbox_capacity = _as_int(outbox_capacity, "store.outbox_capacity")
        if outbox_capacity < 1:
            raise ValueError(f"store.outbox_capacity must be >= 1, got {outbox_capacity}")
        self._outbox_capacity = outbox_capacity

        self._path = Path(path)
        self._capacity = int(capacity)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        private_dirs(self._path.parent)
        if self._path.is_dir():
            raise IsADirectoryError(f"store: {self._path} is a folder, expected a SQLite file")
        self._key_path = Path(key_file) if key_file is not None else default_key_path(self._path)
        key, self._key_created = load_or_create_key(self._key_path)
        self._cipher = RecordCipher(key)

        try:
            self._conn = open_store(self._path, self._cipher, self._key_path, self._key_created)
        except UnusableStoreError as exc:
            self._move_aside(str(exc))
            self._conn = open_store(self._path, self._cipher, self._key_path, self._key_created)

        stored = self._get_meta("n_features")
        if stored is not None and n_features is not None and int(stored) != n_features:
            self.close()
            raise ValueError(
                f"store: {self._path} holds samples with {stored} features, "
                f"n_features={n_features} was requested"
            )
        self._n_features: int | None = int(stored) if stored is not None else n_features
        held = self._get_meta("targets")
        self._targets = stored_targets(self._connection()) if held is not None or targets is None else targets
        if targets is not None and targets != self._targets:
            self.close()
            raise ValueError(
                f"store: {self._path} holds samples with {self._targets.describe()}, "
                f"{targets.describe()} were requested"
            )
        with self._transaction() as conn:
            if stored is None and n_features is not None:
                set_meta(conn, "n_features", str(n_features))
            if held is None:
                set_meta(conn, "targets", self._targets.meta)
            self._trim(conn)

    @property
    def path(self) -> Path:
        """Location of the SQLite file."""
        return self._path

    @property
    def key_path(self) -> Path:
        """Location of the key file the samples are sealed with."""
        return self._key_path

    @property
    def capacity(self) -> int:
        """Number of most recent samples kept."""
        return self._capacity

    @property
    def n_features(self) -> int | None:
        """Width of a sample row, or ``None`` until the first append."""
        return self._n_features

    @property
    def targets(self) -> Targets:
        """The kind of target the samples carry."""
        return self._targets

    def append(
        self,
        x: np.ndarray,
        y: np.ndarray,
        tick: int,
        *,
        samples: np.ndarray | None = None,
        predictions: np.ndarray | None = None,
        predicted_by: int = 0,
    ) -> None:
        """Add samples to the window in one transaction, dropping the oldest beyond capacity.

        Parameters
        ----------
        x
            Feature rows, shape ``(n, n_features)`` (a 1-D array is one row); stored as
            ``float32``.
        y
            Targets of the store's kind: integer labels, shape ``(n,)``, ``-1`` for a row
            without a label (yet); or float values ``(n,)`` / ``(n, k)``, NaN for none.
        tick
            Time step the samples arrived at, recorded for every row.
        samples, default=None
            The rows' inbox sample ids (0: none), the ids a late label names
            (:meth:`label`).
        predictions, default=None
            What the deployed model predicted for each row on arrival (sealed), so a
            late label is scored with the model of the row's arrival.
        predicted_by, default=0
            That model's version (0: no model, no predictions kept).

        Raises
        ------
        ValueError
            If the shapes disagree with each other or with ``n_features``, or the labels
            are not of the store's kind (integers for class labels).
        """
        rows = np.asarray(x, dtype=np.float32)
        if rows.ndim == 1:
            rows = rows.reshape(1, -1)
        labels = np.asarray(y).reshape(self._targets.shape(-1))
        if rows.ndim != 2 or rows.shape[1] == 0:
            raise ValueError(f"store.append: x must have shape (n, n_features), got {rows.shape}")
        if labels.shape[0] != rows.shape[0]:
            raise ValueError(
                f"store.append: x has {rows.shape[0]} rows but y has {labels.shape[0]} labels"
            )
        if labels.dtype.kind not in ("biu" if self._targets.is_class else "biuf"):
            raise ValueError(f"store.append: y must hold integer labels, got dtype {labels.dtype}")
        width = int(rows.shape[1])
        if self._n_features is not None and width != self._n_features:
            raise ValueError(
                f"store.append: rows have {width} features, the store holds {self._n_features}"
            )
        tick = _as_int(tick, "store.append: tick")
        if rows.shape[0] == 0:
            return

        keep = slice(-self._capacity, None)
        plaintexts = pack_rows(rows[keep], labels[keep], self._targets)
        n = len(plaintexts)
        ids: list[int | None] = [None] * n if samples is None else [int(i) or None for i in np.asarray(samples)[keep]]
        kept_predictions = None if predictions is None else np.asarray(predictions, np.float64)[keep]
        labelled = self._targets.labelled(labels[keep]).astype(int).tolist()
        extra = (ids, labelled, kept_predictions, int(predicted_by))
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('n_features', ?)", (str(width),)
            )
            last, newest = seal_samples(conn, self._cipher, plaintexts, tick, extra)
            self._trim(conn)
        self._n_features = width
        if last < RECORDS_PER_KEY <= newest:
            logger.warning(
                "device store %s: %d records sealed under key %s; past this many random "
                "nonces may repeat: move the store aside and give the device a new key",
                self._path,
                newest,
                self._key_path,
            )

    def window(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return the stored samples, oldest first.

        Returns
        -------
        x : numpy.ndarray
            ``float32`` of shape ``(n, n_features)``.
        y : numpy.ndarray
            ``int64`` labels of shape ``(n,)`` (``float32`` ``(n,)`` or ``(n, k)`` for
            float or vector targets).
        ticks : numpy.ndarray
            ``int64`` arrival ticks of shape ``(n,)``.

        Raises
        ------
        clients.crypto.RecordAuthenticationError
            If a record was changed on disk since the store was opened (the next open
            moves the store aside).
        """
        with self._lock:
            rows = (
                self._connection()
                .execute("SELECT id, tick, record FROM samples ORDER BY id")
                .fetchall()
            )
        width = self._n_features or 0
        if not rows:
            empty = np.zeros(0, dtype=np.int64)
            return np.zeros((0, width), dtype=np.float32), self._targets.empty(), empty
        try:
            plain = open_records(self._cipher, rows, width, self._targets)
        except UnusableStoreError as exc:
            raise RecordAuthenticationError(
                f"store {self._path}: {exc}; it is moved aside when next opened"
            ) from None
        x, y = unpack_rows(plain, width, len(rows), self._targets)
        return x, y, np.fromiter((row[1] for row in rows), dtype=np.int64, count=len(rows))

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._connection().execute("SELECT COUNT(*) FROM samples").fetchone()
        return int(count)

    def labelled_count(self) -> int:
        """Samples in the window that have a label."""
        with self._lock:
            (count,) = self._connection().execute("SELECT COUNT(*) FROM samples WHERE labelled").fetchone()
        return int(count)

    def label(self, samples: Iterable[int], labels: Iterable[Any]) -> list[tuple[str, int, Any, int]]:
        """Give stored samples their late labels, by inbox sample id, in one transaction.

        Returns, per label, ``(status, tick, prediction, predicted_by)``: ``"ok"``,
        ``"unknown"`` (not in the window: never stored, or dropped since) or
        ``"labelled"`` (it has one); the sample's arrival tick, and the prediction the
        model of version ``predicted_by`` made when it arrived (NaN, 0: none).
        """
        with self._transaction() as conn:
            return label_samples(
                conn, self._cipher, self._n_features or 0, [int(s) for s in samples],
                [int(v) for v in labels] if self._targets.is_class else list(labels), self._targets,
            )

    def drop_before(self, tick: int) -> int:
        """Delete the samples that arrived before ``tick``.

        Parameters
        ----------
        tick
            Samples with a smaller tick are removed.

        Returns
        -------
        int
            Number of samples removed.
        """
        tick = _as_int(tick, "store.drop_before: tick")
        with self._transaction() as conn:
            cursor = conn.execute("DELETE FROM samples WHERE tick < ?", (tick,))
        return int(cursor.rowcount)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group several writes into one atomic step.

        Either all writes made inside the ``with`` block are kept, or, if the block raises
        or the process dies before it ends, none of them. Other threads using the store
        wait until the block ends.

        Examples
        --------
        >>> import tempfile
        >>> import numpy as np
        >>> with DeviceStore(f"{tempfile.mkdtemp()}/node.sqlite") as store:
        ...     with store.transaction():
        ...         store.append(np.ones((2, 3)), np.array([0, 1]), tick=5)
        ...         store.put_state("monitor", b"...")
        ...     len(store), store.get_state("monitor")
        (2, b'...')
        """
        with self._transaction():
            yield

    def put_state(self, key: str, value: bytes) -> None:
        """Store a state blob under ``key``, replacing any previous value.

        Parameters
        ----------
        key
            State name, e.g. ``"monitor"``.
        value
            Bytes to keep (``bytes``, ``bytearray`` or ``memoryview``).
        """
        if not isinstance(key, str):
            raise TypeError(f"store.put_state: key must be a str, got {type(key).__name__}")
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"store.put_state: value must be bytes, got {type(value).__name__}")
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, bytes(value))
            )

    def get_state(self, key: str) -> bytes | None:
        """Return the state blob stored under ``key``, or ``None``.

        Parameters
        ----------
        key
            State name.
        """
        with self._lock:
            row = (
                self._connection()
                .execute("SELECT value FROM state WHERE key = ?", (key,))
                .fetchone()
            )
        return None if row is None else bytes(row[0])

    def quarantine_state(self, key: str, reason: str, expected: bytes | None = None) -> Path | None:
        """Move an unreadable state blob out of the store into a file of its own.

        The blob is written, owner-only, next to the store as
        ``<path>.<key>.corrupt-<timestamp>`` and removed from the store, with a warning on
        the ``fedge.device`` logger naming that file, just as an unreadable store file is
        moved aside. The window, the model and the outbox stay where they are, so a bad
        detector state costs the detector and nothing else. The file is kept for
        inspection and never read by the store again.

        Parameters
        ----------
        key
            State name, e.g. ``"monitor"``.
        reason
            Why the blob was refused, for the warning.
        expected, default=None
            The blob the caller failed to read. Given, the blob is only moved if it is
            still the stored one, so a state another process wrote meanwhile is kept.

        Returns
        -------
        pathlib.Path or None
            The file the blob was moved to, or ``None`` if there was nothing to move.
        """
        with self._transaction() as conn:
            row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
            if row is None or (expected is not None and bytes(row[0]) != bytes(expected)):
                return None
            blob = bytes(row[0])
            # Written and synced before the row goes, so a crash in between leaves the
            # blob in both places rather than in neither.
            while True:
                target = self._aside_path(f"{self._path.name}.{_file_safe(key)[:64]}")
                try:
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    break
                except FileExistsError:  # another process took that name a moment ago
                    continue
            with os.fdopen(fd, "wb") as out:
                out.write(blob)
                out.flush()
                os.fsync(out.fileno())
            conn.execute("DELETE FROM state WHERE key = ?", (key,))
        logger.warning(
            "device store %s: state %r is not usable (%s); moved it to %s and started afresh",
            self._path,
            key,
            reason,
            target,
        )
        return target

    def put_model(self, version: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Record the deployed model, replacing the previous one.

        Parameters
        ----------
        version
            Model version.
        arrays
            Named arrays (weights); names, order, dtypes and shapes are kept. Object
            arrays are refused.

        Raises
        ------
        ValueError
            If an array cannot be stored without pickling.
        """
        version = _as_int(version, "store.put_model: version")
        blob = pack_arrays(arrays)
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO model (slot, version, arrays) VALUES (0, ?, ?)",
                (version, blob),
            )

    def get_model(self) -> tuple[int, dict[str, np.ndarray]] | None:
        """Return the deployed model as ``(version, arrays)``, or ``None`` if none was stored."""
        with self._lock:
            row = (
                self._connection()
                .execute("SELECT version, arrays FROM model WHERE slot = 0")
                .fetchone()
            )
        if row is None:
            return None
        return int(row[0]), unpack_arrays(row[1])

    def close(self) -> None:
        """Close the file; calling it again does nothing."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

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
        return (
            f"DeviceStore(path={str(self._path)!r}, capacity={self._capacity}, "
            f"n_features={self._n_features})"
        )

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError(f"store: {self._path} is closed")
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            if conn.in_transaction:
                # Inside transaction(): a savepoint lets this write fail alone.
                conn.execute("SAVEPOINT write")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK TO write")
                    conn.execute("RELEASE write")
                    raise
                conn.execute("RELEASE write")
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _trim(self, conn: sqlite3.Connection) -> None:
        row = conn.execute(
            "SELECT id FROM samples ORDER BY id DESC LIMIT 1 OFFSET ?", (self._capacity,)
        ).fetchone()
        if row is not None:
            conn.execute("DELETE FROM samples WHERE id <= ?", (row[0],))

    def _get_meta(self, key: str) -> str | None:
        row = self._connection().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _aside_path(self, stem: str) -> Path:
        """A free ``<stem>.corrupt-<timestamp>[-n]`` path next to the store."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self._path.with_name(f"{stem}.corrupt-{stamp}")
        n = 1
        while target.exists():
            target = self._path.with_name(f"{stem}.corrupt-{stamp}-{n}")
            n += 1
        return target

    def _move_aside(self, reason: str) -> None:
        target = self._aside_path(self._path.name)
        tighten(self._path)
        os.replace(self._path, target)
        for suffix in SIDECAR_SUFFIXES:
            sidecar = Path(f"{self._path}{suffix}")
            if sidecar.exists():
                tighten(sidecar)
                os.replace(sidecar, Path(f"{target}{suffix}"))
        logger.warning(
            "device store %s is not usable (%s); moved it to %s and started a fresh store",
            self._path,
            reason,
            target,
        )


def _as_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{what} must be an int, got {value!r}")
    return int(value)


def _file_safe(key: str) -> str:
    """A state name as a file-name part: letters, digits, ``-`` and ``_`` kept, others hex."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_") else f"%{ord(c):02x}" for c in key)


