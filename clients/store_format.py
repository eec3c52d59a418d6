"""The on-disk format of a device store: schema, sealed sample records, migration.

:class:`clients.store.DeviceStore` decides what the device keeps (the window, its
state, its model, its outbox); this module decides how that looks inside the SQLite
file. It holds the schema and the format marker, opens and checks a file before the
store uses it (read-only first, so a file that is not a store is moved aside
unmodified), checks the device key against the store, seals a format-1 store's
plaintext rows in place, and packs and unpacks sample rows as AES-256-GCM records
bound to their row id and tick. Anything that makes a file unusable is an
:class:`UnusableStoreError`, which the store answers by moving the file aside.
"""

from __future__ import annotations

import io
import logging
import sqlite3
import struct
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clients.crypto import (
    RecordAuthenticationError,
    RecordCipher,
    WrongKeyError,
    private_file,
    tighten,
)
from clients.targets import CLASS, Targets

logger = logging.getLogger("fedge.device")

_FORMAT = "fedge.device_store"
# Version 2 seals every sample row; a version-1 store (plaintext rows) is sealed in
# place when it is opened, then vacuumed so no plaintext page stays in the file.
# Version 3 keeps, per row, its inbox sample id, whether it has a label yet, and the
# prediction the deployed model made when it arrived (sealed), so a late label is
# scored with the model of the sample's arrival; version-2 rows are labelled rows.
# The meta key ``targets`` (clients.targets) says what a record's label part holds:
# absent (every store written before target kinds existed) means an int64 class label.
_FORMAT_VERSION = "3"
_READABLE_VERSIONS = ("1", "2", _FORMAT_VERSION)
SIDECAR_SUFFIXES = ("-wal", "-shm", "-journal")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    (
        # record: AES-GCM of the row's float32 features and its target; id and tick
        # stay in the clear (trimming needs them) and are bound to the record.
        # sample: the inbox's sample id (NULL: none); labelled: 0 until a label is known;
        # prediction: AES-GCM of the arrival model's float64 prediction(s) (version
        # predicted_by, 0: no model then).
        "CREATE TABLE IF NOT EXISTS samples (id INTEGER PRIMARY KEY,"
        " tick INTEGER NOT NULL, record BLOB NOT NULL, sample INTEGER,"
        " labelled INTEGER NOT NULL DEFAULT 1, predicted_by INTEGER NOT NULL DEFAULT 0,"
        " prediction BLOB)"
    ),
    "CREATE INDEX IF NOT EXISTS samples_by_tick ON samples (tick)",
    "CREATE INDEX IF NOT EXISTS samples_by_sample ON samples (sample)",
    "CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
    (
        "CREATE TABLE IF NOT EXISTS model (slot INTEGER PRIMARY KEY CHECK (slot = 0),"
        " version INTEGER NOT NULL, arrays BLOB NOT NULL)"
    ),
    "CREATE TABLE IF NOT EXISTS outbox (tick INTEGER PRIMARY KEY, report TEXT NOT NULL)",
)


# Associated data of a sealed record: what it is and where it belongs.
_SAMPLE_AD = b"fedge.sample\x00"
_PREDICTION_AD = b"fedge.prediction\x00"
#: The label of a row that has none yet (as :data:`clients.validation.UNLABELLED`).
NO_LABEL = -1
_KEY_CHECK_AD = b"fedge.key-check\x00"
_ID_TICK = struct.Struct("<qq")


class UnusableStoreError(Exception):
    """The file at the store's path is not a store this code can use."""


def open_store(
    path: Path, cipher: RecordCipher, key_path: Path, key_created: bool
) -> sqlite3.Connection:
    """Connect to ``path`` and make sure it is a healthy store, creating the schema if new.

    Parameters
    ----------
    path
        The store's SQLite file.
    cipher
        Cipher under the device's key.
    key_path
        Where that key is kept (named in errors).
    key_created
        Whether the key was just made, so a store sealed before holds a lost key.

    Raises
    ------
    UnusableStoreError
        If the file is not a store this code can use (the caller moves it aside).
    clients.crypto.WrongKeyError
        If the store was sealed with another valid key.
    """
    # SQLite creates its -wal and -shm files with the main file's mode, so an
    # owner-only main file (made before SQLite sees it) keeps them owner-only too.
    private_file(path)
    for suffix in SIDECAR_SUFFIXES:
        tighten(Path(f"{path}{suffix}"))
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    try:
        found = _prepare(conn)
        migrated = _unlock(conn, found, cipher, path, key_path, key_created)
    except sqlite3.DatabaseError as exc:
        conn.close()
        if _is_corruption(exc):
            raise UnusableStoreError(f"unreadable database ({exc})") from exc
        raise
    except (UnusableStoreError, WrongKeyError):
        conn.close()
        raise
    if migrated:
        # The plaintext rows are in free pages (and maybe the log) until the file
        # is rebuilt: rebuild it, and empty the log.
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        logger.info("device store %s: sealed its samples (format 1 -> 2)", path)
    return conn


def _unlock(
    conn: sqlite3.Connection,
    found: str | None,
    cipher: RecordCipher,
    path: Path,
    key_path: Path,
    key_created: bool,
) -> bool:
    """Create or upgrade the schema, check the key, and open every sealed record.

    Returns whether a format-1 store was sealed (it then wants a VACUUM).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        if found == "1":
            _seal_plaintext_rows(conn, cipher)
        elif found == "2":
            for column in ("sample INTEGER", "labelled INTEGER NOT NULL DEFAULT 1",
                           "predicted_by INTEGER NOT NULL DEFAULT 0", "prediction BLOB"):
                conn.execute(f"ALTER TABLE samples ADD COLUMN {column}")
        for statement in _SCHEMA:
            conn.execute(statement)
        set_meta(conn, "format", _FORMAT)
        set_meta(conn, "format_version", _FORMAT_VERSION)
        _check_key(conn, cipher, path, key_path, key_created)
        width = read_meta(conn, "n_features")
        rows = conn.execute("SELECT id, tick, record FROM samples ORDER BY id").fetchall()
        if rows and width is None:
            raise UnusableStoreError("sample records but no row width")
        if rows:
            open_records(cipher, rows, int(width or 0), stored_targets(conn))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return found == "1"


def _check_key(
    conn: sqlite3.Connection,
    cipher: RecordCipher,
    path: Path,
    key_path: Path,
    key_created: bool,
) -> None:
    """Tell a wrong key (refused) from a lost one (store moved aside) before any record."""
    check = read_meta(conn, "key_check")
    if check is None:
        sealed = cipher.seal(b"", _KEY_CHECK_AD)
        set_meta(conn, "key_check", sealed.hex())
        return
    try:
        cipher.open(bytes.fromhex(check), _KEY_CHECK_AD)
    except (RecordAuthenticationError, ValueError):
        if key_created:
            raise UnusableStoreError(
                f"sealed with a key that is gone: {key_path} was missing, a new key was made"
            ) from None
        raise WrongKeyError(
            f"store {path} was sealed with another key than the one in "
            f"{key_path}; give the store's own key file (key_file or "
            f"$FEDGE_DEVICE_KEY_FILE) or move the store away"
        ) from None


def _seal_plaintext_rows(conn: sqlite3.Connection, cipher: RecordCipher) -> None:
    """Format 1 kept features and label in the clear: seal every row in place."""
    conn.execute("ALTER TABLE samples RENAME TO samples_plaintext")
    conn.execute("DROP INDEX IF EXISTS samples_by_tick")
    for statement in _SCHEMA:
        conn.execute(statement)
    rows = conn.execute("SELECT id, tick, label, x FROM samples_plaintext ORDER BY id").fetchall()
    if rows:
        width = len(rows[0][3]) // 4
        if any(len(row[3]) != 4 * width for row in rows):
            raise UnusableStoreError("format-1 sample rows of different widths")
        x = np.frombuffer(b"".join(row[3] for row in rows), dtype=np.float32)
        plaintexts = pack_rows(
            x.reshape(len(rows), width), np.array([row[2] for row in rows], dtype=np.int64)
        )
        sealed = cipher.seal_many(plaintexts, [sample_ad(row[0], row[1]) for row in rows])
        conn.executemany(
            "INSERT INTO samples (id, tick, record) VALUES (?, ?, ?)",
            ((row[0], row[1], blob) for row, blob in zip(rows, sealed, strict=True)),
        )
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('n_features', ?)", (str(width),)
        )
        set_meta(conn, "last_sample_id", str(rows[-1][0]))
    conn.execute("DROP TABLE samples_plaintext")


def stored_targets(conn: sqlite3.Connection) -> Targets:
    """The kind of target the store's records hold (class labels when it says none)."""
    try:
        return Targets.parse(read_meta(conn, "targets"))
    except ValueError as exc:
        raise UnusableStoreError(f"unknown targets ({exc})") from None


def open_records(
    cipher: RecordCipher, rows: list[tuple[int, int, bytes]], width: int, targets: Targets = CLASS
) -> bytes:
    """The plaintexts of sealed sample ``rows`` (id, tick, record), joined."""
    size = 4 * width + targets.itemsize
    try:
        opened = cipher.open_many(
            [row[2] for row in rows], [sample_ad(row[0], row[1]) for row in rows]
        )
    except RecordAuthenticationError as exc:
        raise UnusableStoreError(
            f"sample record {rows[exc.index][0]} failed authentication (changed, moved "
            "or sealed under another key)"
        ) from None
    for (record_id, _, _), plain in zip(rows, opened, strict=True):
        if len(plain) != size:
            raise UnusableStoreError(
                f"sample record {record_id} holds {len(plain)} bytes, expected {size}"
            )
    return b"".join(opened)


def _prepare(conn: sqlite3.Connection) -> str | None:
    """Check the file read-only first, so a file that is not ours is moved aside unmodified.

    Returns the format version found (``None`` for a new, empty file).
    """
    check = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
    if check != ["ok"]:
        raise UnusableStoreError(f"integrity check failed: {'; '.join(map(str, check[:3]))}")
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if tables:
        marker = None
        if "meta" in tables:
            row = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            marker = None if row is None else row[0]
        if marker != _FORMAT:
            raise UnusableStoreError("not a fedge device store")
        row = conn.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()
        found = None if row is None else str(row[0])
        if found not in _READABLE_VERSIONS:
            raise UnusableStoreError(f"store format version {found}, expected {_FORMAT_VERSION}")
    else:
        found = None
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    # A device writes a few pages per tick for ever: checkpoint often and keep the
    # write-ahead log small on disk (SQLite's defaults let it sit at 4 MiB).
    conn.execute("PRAGMA wal_autocheckpoint=256")
    conn.execute("PRAGMA journal_size_limit=1048576")
    return found


def sample_ad(record_id: int, tick: int) -> bytes:
    """Associated data of a sample record: its kind, row id and tick."""
    return _SAMPLE_AD + _ID_TICK.pack(record_id, tick)


def seal_samples(
    conn: sqlite3.Connection,
    cipher: RecordCipher,
    plaintexts: list[bytes],
    tick: int,
    extra: tuple[list[int | None], list[int], np.ndarray | None, int] | None = None,
) -> tuple[int, int]:
    """Seal and insert packed sample rows of ``tick``; returns the ids before and at the end.

    ``extra`` is, per row, the inbox sample id and whether it is labelled, the
    arrival model's predictions (or None) and that model's version. The caller holds
    the write transaction.
    """
    # Ids are given here, not by SQLite, because each record is sealed to its id;
    # they only grow, so a deleted record put back later does not fit any row.
    (top,) = conn.execute("SELECT MAX(id) FROM samples").fetchone()
    last = max(int(read_meta(conn, "last_sample_id") or 0), int(top or 0))
    ids = range(last + 1, last + 1 + len(plaintexts))
    sealed = cipher.seal_many(plaintexts, [sample_ad(i, tick) for i in ids])
    n = len(sealed)
    samples, labelled, predictions, version = extra or ([None] * n, [1] * n, None, 0)
    predicted: list[bytes | None] = [None] * n
    if predictions is not None and version > 0:
        values = np.asarray(predictions, dtype="<f8").reshape(n, -1)
        predicted = list(cipher.seal_many(
            [row.tobytes() for row in values],
            [_PREDICTION_AD + _ID_TICK.pack(i, tick) for i in ids],
        ))
    else:
        version = 0
    conn.executemany(
        "INSERT INTO samples (id, tick, record, sample, labelled, predicted_by, prediction)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        zip(ids, [tick] * n, sealed, samples, labelled, [version] * n, predicted, strict=True),
    )
    set_meta(conn, "last_sample_id", str(ids[-1]))
    return last, ids[-1]


def label_samples(
    conn: sqlite3.Connection,
    cipher: RecordCipher,
    width: int,
    sample_ids: list[int],
    labels: Sequence[Any],
    targets: Targets = CLASS,
) -> list[tuple[str, int, Any, int]]:
    """Give stored rows their late labels (the caller holds the write transaction).

    Returns, per label in order, ``(status, tick, prediction, predicted_by)``: status
    ``"ok"``, ``"unknown"`` (no such row in the window: never stored, or pruned) or
    ``"labelled"`` (the row has a label already); the arrival model's prediction
    (a float, or an array for a vector target; NaN without one) and its version (0: none).
    """
    out: list[tuple[str, int, Any, int]] = []
    for sample, label in zip(sample_ids, labels, strict=True):
        row = conn.execute(
            "SELECT id, tick, record, labelled, predicted_by, prediction FROM samples"
            " WHERE sample = ? ORDER BY id DESC LIMIT 1",
            (int(sample),),
        ).fetchone()
        if row is None:
            out.append(("unknown", -1, float("nan"), 0))
            continue
        record_id, tick, record, labelled, version, sealed_prediction = row
        if labelled:
            out.append(("labelled", int(tick), float("nan"), 0))
            continue
        plain = bytearray(open_records(cipher, [(record_id, tick, record)], width))
        plain[4 * width :] = targets.encode(np.asarray(label).reshape(targets.shape(1)))
        resealed = cipher.seal(bytes(plain), sample_ad(record_id, tick))
        conn.execute("UPDATE samples SET record = ?, labelled = 1 WHERE id = ?", (resealed, record_id))
        prediction: Any = float("nan")
        if version and sealed_prediction is not None:
            try:
                opened = cipher.open(bytes(sealed_prediction), _PREDICTION_AD + _ID_TICK.pack(record_id, tick))
                if not opened or len(opened) % 8:
                    raise struct.error("not float64 values")
                got = np.frombuffer(opened, dtype="<f8").astype(np.float64)
                prediction = float(got[0]) if len(got) == 1 else got
            except (RecordAuthenticationError, struct.error):
                logger.warning("device store: the arrival prediction of row %d failed authentication", record_id)
                version = 0
        out.append(("ok", int(tick), prediction, int(version)))
    return out


def pack_rows(rows: np.ndarray, labels: np.ndarray, targets: Targets = CLASS) -> list[bytes]:
    """One plaintext per row: little-endian float32 features, then its target.

    The target is the int64 class label, or the row's float32 value(s)
    (:meth:`clients.targets.Targets.encode`).
    """
    n, width = rows.shape
    packed = np.empty((n, 4 * width + targets.itemsize), dtype=np.uint8)
    packed[:, : 4 * width] = np.ascontiguousarray(rows, dtype="<f4").view(np.uint8).reshape(n, -1)
    packed[:, 4 * width :] = np.frombuffer(targets.encode(labels), dtype=np.uint8).reshape(n, -1)
    raw = packed.tobytes()
    size = packed.shape[1]
    return [raw[i * size : (i + 1) * size] for i in range(n)]


def unpack_rows(plain: bytes, width: int, n: int, targets: Targets = CLASS) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_rows` over the joined plaintexts."""
    packed = np.frombuffer(plain, dtype=np.uint8).reshape(n, 4 * width + targets.itemsize)
    x = np.ascontiguousarray(packed[:, : 4 * width]).view("<f4").astype(np.float32)
    y = targets.decode(np.ascontiguousarray(packed[:, 4 * width :]).tobytes(), n)
    return x, y


def read_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", 0) or 0
    return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Write named arrays as an uncompressed ``.npz`` archive (readable by ``numpy.load``)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, mode="w", compression=zipfile.ZIP_STORED) as archive:
        for name, value in arrays.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"store.put_model: array names must be non-empty str, got {name!r}")
            array = np.asanyarray(value)
            if array.dtype.hasobject:
                raise ValueError(
                    f"store.put_model: array {name!r} has dtype {array.dtype}, "
                    "which cannot be stored without pickling"
                )
            with archive.open(f"{name}.npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return buffer.getvalue()


def unpack_arrays(blob: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_arrays`; never unpickles."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}
