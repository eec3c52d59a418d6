"""Sealing the ingest inbox at rest: which key, what each batch is bound to, the upgrade.

Every batch's features and labels are sealed with AES-256-GCM under the device's key
(the key file of the store beside the inbox, :func:`clients.crypto.default_key_path`
of :func:`store_of`, or the ``key_file`` given), bound to the batch's id, tick and row
count: a stolen inbox file holds no sample in the clear, and a batch whose bytes were
changed, or that was moved to another row, does not open. The inbox records a sealed
check value, so an inbox sealed under another key is refused whole when it is opened,
before any batch is read.

An inbox written before sealing existed (format 1) is sealed in place the first time
it is opened; SQLite's ``secure_delete`` (set by the inbox) zeroes the clear pages the
upgrade and pruning leave, and the write-ahead log is checkpointed and truncated.

Format 3 gives every ingested row a sample id (a batch's ``first_row`` plus the row's
position in the input) and keeps late labels; a format-2 inbox is upgraded in place when
opened (its batches keep no ids: a late label cannot name their rows).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from pathlib import Path

import numpy as np

from clients.crypto import (
    KeyFileError,
    RecordAuthenticationError,
    RecordCipher,
    default_key_path,
    load_or_create_key,
)
from clients.inbox_batches import IngestError
from clients.targets import CLASS, Targets

SEALED_FORMAT = "fedge-ingest-inbox/3"
V2_FORMAT = "fedge-ingest-inbox/2"
"""Sealed batches without sample ids; upgraded in place when opened."""
PLAIN_FORMAT = "fedge-ingest-inbox/1"
"""Inboxes written before batches were sealed; sealed in place when opened."""
READABLE_FORMATS = (SEALED_FORMAT, V2_FORMAT, PLAIN_FORMAT)
INBOX_SUFFIX = ".inbox.sqlite"

_KEY_CHECK = b"fedge-ingest-inbox key check"
_KEY_CHECK_AAD = b"key-check"
log = logging.getLogger("fedge.device")


def store_of(inbox: Path) -> Path:
    """The store an inbox sits beside (whose key seals it): ``device-3.inbox.sqlite`` -> ``device-3.sqlite``.

    An inbox file not named ``*.inbox.sqlite`` is its own "store" for that purpose,
    so its key file is found the same way (``box.sqlite`` -> ``box.key``).
    """
    inbox = Path(inbox)
    if inbox.name.endswith(INBOX_SUFFIX) and len(inbox.name) > len(INBOX_SUFFIX):
        return inbox.with_name(inbox.name[: -len(INBOX_SUFFIX)] + ".sqlite")
    return inbox


def open_cipher(inbox: Path, key_file: Path | None) -> tuple[Path, RecordCipher]:
    """The key file and cipher of an inbox; the key is created (``0600``) if there is none.

    Raises
    ------
    IngestError
        The key file cannot be used (loose permissions, malformed, unreadable).
    """
    key_path = Path(key_file) if key_file is not None else default_key_path(store_of(inbox))
    try:
        key, _ = load_or_create_key(key_path)
    except KeyFileError as exc:
        raise IngestError(f"ingest: {exc}") from None
    return key_path, RecordCipher(key)


def key_check(cipher: RecordCipher) -> str:
    """The check value a new inbox records: a known text sealed under its key."""
    return cipher.seal(_KEY_CHECK, _KEY_CHECK_AAD).hex()


def check_key(cipher: RecordCipher, check: str, inbox: Path, key_path: Path) -> None:
    """Refuse an inbox whose check value does not open under ``cipher``."""
    try:
        cipher.open(bytes.fromhex(check), _KEY_CHECK_AAD)
    except (ValueError, RecordAuthenticationError):
        raise IngestError(
            f"ingest: {inbox} was sealed under another key than {key_path}; "
            "nothing in it can be read with this key"
        ) from None


def _aad(batch_id: int, tick: int, n: int, part: bytes) -> bytes:
    return b"fedge-inbox|%d|%d|%d|%s" % (batch_id, tick, n, part)


def seal_batch(
    cipher: RecordCipher, batch_id: int, tick: int, n: int, x: bytes, y: bytes
) -> tuple[bytes, bytes]:
    """The sealed features and labels of batch ``batch_id``."""
    sx, sy = cipher.seal_many([x, y], [_aad(batch_id, tick, n, b"x"), _aad(batch_id, tick, n, b"y")])
    return sx, sy


def open_batch(
    cipher: RecordCipher,
    batch_id: int,
    tick: int,
    n: int,
    x: bytes,
    y: bytes,
    width: int,
    targets: Targets = CLASS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features ``(n, width)``, targets and input positions ``(n,)`` of a sealed batch.

    The label part holds the targets (int64 class labels, or float32 values: see
    :class:`clients.targets.Targets`), then (format 3) the int64 position of each
    row in the input it came with; a format-2 batch (class labels only) gives
    positions ``0 .. n - 1``.

    Raises
    ------
    RecordAuthenticationError
        The batch does not open as the batch of this row, or its contents do not
        have the row count it is stored with.
    """
    xb, yb = cipher.open_many([x, y], [_aad(batch_id, tick, n, b"x"), _aad(batch_id, tick, n, b"y")])
    size = targets.itemsize * n
    with_positions = len(yb) == size + 8 * n
    if len(xb) != 4 * width * n or not (with_positions or (targets.is_class and len(yb) == size)):
        raise RecordAuthenticationError("the batch's contents do not have its row count")
    labels = targets.decode(yb[:size], n)
    positions = np.frombuffer(yb, dtype="<i8", offset=size).astype(np.int64) if with_positions else np.arange(n, dtype=np.int64)
    return np.frombuffer(xb, dtype=np.float32).reshape(n, width), labels, positions


def upgrade_to_ids(conn: sqlite3.Connection, inbox: Path) -> None:
    """Give a format-2 inbox the sample-id column and counter (inside the caller's transaction)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(batches)")}
    if "first_row" not in columns:
        conn.execute("ALTER TABLE batches ADD COLUMN first_row INTEGER NOT NULL DEFAULT 0")
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('last_row', '0')")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'format'", (SEALED_FORMAT,))
    log.info("inbox %s: upgraded to sample ids and late labels (%s)", inbox, SEALED_FORMAT)


def create_private_file(path: Path) -> bool:
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


def seal_in_place(conn: sqlite3.Connection, cipher: RecordCipher, inbox: Path) -> None:
    """Seal every batch of a format-1 inbox and mark it sealed (inside the caller's transaction)."""
    rows = conn.execute("SELECT id, tick, n, x, y FROM batches ORDER BY id").fetchall()
    for batch_id, tick, n, x, y in rows:
        sx, sy = seal_batch(cipher, batch_id, tick, n, bytes(x), bytes(y))
        conn.execute("UPDATE batches SET x = ?, y = ? WHERE id = ?", (sx, sy, batch_id))
    conn.execute("UPDATE meta SET value = ? WHERE key = 'format'", (V2_FORMAT,))
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('key_check', ?)", (key_check(cipher),))
    log.info("inbox %s: sealed %d batches written before sealing existed", inbox, len(rows))
