"""The ingest inbox at rest: a stolen file holds no sample, a changed batch is never read."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import numpy as np
import pytest

from clients.inbox import CHUNK_ROWS, SIDECAR_SUFFIXES, Inbox, IngestError, ingest
from clients.inbox_batches import InboxSchema, stage

# Values no SQLite page or header would hold by chance.
MARKERS = np.array([[1234.5678, -98765.4321], [31415.927, 27182.818]], dtype=np.float32)
LABELS = np.array([1, 0], dtype=np.int64)


def _files(path: Path) -> bytes:
    """The inbox with every sidecar SQLite keeps beside it."""
    out = b""
    for suffix in ("", *SIDECAR_SUFFIXES):
        part = Path(f"{path}{suffix}")
        if part.exists():
            out += part.read_bytes()
    return out


def _holds_markers(blob: bytes) -> list[float]:
    return [float(v) for v in MARKERS.ravel() if v.tobytes() in blob]


def test_inbox_file_holds_no_sample_value_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "device-0.inbox.sqlite"
    with Inbox(path, n_features=2, n_classes=2) as inbox:
        inbox.append(0, MARKERS, LABELS)
        assert _holds_markers(_files(path)) == [], "sample values are sealed in the file and its WAL"
        batch = inbox.take()
    np.testing.assert_array_equal(batch.x, MARKERS)
    np.testing.assert_array_equal(batch.y, LABELS)
    key = tmp_path / "device-0.key"  # the store's key: the same one seals the store
    assert key.exists() and stat.S_IMODE(key.stat().st_mode) == 0o600


def _batch_blobs(path: Path) -> list[tuple[int, bytes]]:
    with sqlite3.connect(path) as conn:
        return [(int(i), bytes(x)) for i, x in conn.execute("SELECT id, x FROM batches ORDER BY id")]


def _set_x(path: Path, batch_id: int, x: bytes) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE batches SET x = ? WHERE id = ?", (x, batch_id))
    conn.close()


def test_a_changed_batch_is_skipped_and_counted_the_others_are_read(tmp_path: Path) -> None:
    path = tmp_path / "device-0.inbox.sqlite"
    with Inbox(path, n_features=2, n_classes=2) as inbox:
        for tick in range(3):
            inbox.append(tick, MARKERS + tick, LABELS)
    _, (second, blob), _ = _batch_blobs(path)
    flipped = bytearray(blob)
    flipped[-1] ^= 0x01
    _set_x(path, second, bytes(flipped))
    with Inbox(path) as inbox:
        batch = inbox.take()
    assert batch.unauthenticated == 2, "the changed batch's rows are counted, not read"
    np.testing.assert_array_equal(batch.x, np.concatenate([MARKERS, MARKERS + 2]))
    assert batch.last_batch_id == 3, "the cursor moves past it, so it is not retried forever"


def test_a_batch_moved_to_another_row_does_not_open(tmp_path: Path) -> None:
    path = tmp_path / "device-0.inbox.sqlite"
    with Inbox(path, n_features=2, n_classes=2) as inbox:
        inbox.append(0, MARKERS, LABELS)
        inbox.append(0, MARKERS + 1, LABELS)
    (a, xa), (b, xb) = _batch_blobs(path)
    _set_x(path, a, xb)  # same tick and row count: only the row id tells them apart
    _set_x(path, b, xa)
    with Inbox(path) as inbox:
        batch = inbox.take()
    assert batch.unauthenticated == 4 and len(batch.x) == 0


def test_an_inbox_sealed_under_another_key_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "device-0.inbox.sqlite"
    with Inbox(path, n_features=2, n_classes=2) as inbox:
        inbox.append(0, MARKERS, LABELS)
    with pytest.raises(IngestError, match="sealed under another key") as refused:
        Inbox(path, key_file=tmp_path / "other.key")
    assert "\n" not in str(refused.value)
    with Inbox(path) as inbox:  # the right key still reads it: nothing was lost
        assert len(inbox.take().x) == 2


def _plaintext_inbox(path: Path) -> None:
    """An inbox as format 1 wrote it: features and labels in the clear."""
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute(
            "CREATE TABLE batches (id INTEGER PRIMARY KEY AUTOINCREMENT, tick INTEGER NOT NULL,"
            " n INTEGER NOT NULL, x BLOB NOT NULL, y BLOB NOT NULL, rejected TEXT NOT NULL,"
            " source TEXT NOT NULL, received REAL NOT NULL)"
        )
        conn.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [("format", "fedge-ingest-inbox/1"), ("n_features", "2"), ("n_classes", "2"), ("last_tick", "4")],
        )
        conn.execute(
            "INSERT INTO batches (tick, n, x, y, rejected, source, received) VALUES (4, 2, ?, ?, '{}', '', 0)",
            (MARKERS.tobytes(), LABELS.tobytes()),
        )
    conn.close()
    path.chmod(0o600)


def test_an_inbox_written_in_the_clear_is_sealed_in_place_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "device-0.inbox.sqlite"
    _plaintext_inbox(path)
    assert len(_holds_markers(_files(path))) == MARKERS.size, "format 1 holds the values in the clear"
    with Inbox(path) as inbox:
        batch = inbox.take()
        assert inbox.last_tick == 4
    np.testing.assert_array_equal(batch.x, MARKERS)
    np.testing.assert_array_equal(batch.y, LABELS)
    assert _holds_markers(_files(path)) == [], "after the upgrade no clear value is left in any page"
    with Inbox(path) as inbox:  # and it stays readable as a sealed inbox
        np.testing.assert_array_equal(inbox.take().x, MARKERS)


def test_rows_spilled_while_a_long_call_is_checked_are_sealed_too(tmp_path: Path) -> None:
    schema = InboxSchema(2, 2)
    batches = [(t, MARKERS, LABELS) for t in range(4)]
    with stage(iter(batches), schema, "raise", -1, spill_rows=3) as staged:
        assert staged._disk is not None, "the call spilled to disk"
        blobs = b"".join(bytes(x) + bytes(y) for x, y in staged._disk.execute("SELECT x, y FROM staged"))
        assert _holds_markers(blobs) == []
        back = list(staged)
    assert [c.tick for c in back] == [0, 1, 2, 3]
    assert all(np.frombuffer(c.x, dtype=np.float32).tolist() == MARKERS.ravel().tolist() for c in back)


def test_a_long_ingest_round_trips_through_the_sealed_spill(tmp_path: Path) -> None:
    path = tmp_path / "device-0.inbox.sqlite"
    rng = np.random.default_rng(0)
    n = CHUNK_ROWS + 500
    x = rng.normal(size=(n, 2)).astype(np.float32)
    y = rng.integers(0, 2, size=n)
    ingest(path, [(t, x[t::4], y[t::4]) for t in range(4)], n_features=2, n_classes=2)
    with Inbox(path) as inbox:
        batch = inbox.take()
    assert len(batch.x) == n and batch.unauthenticated == 0
    np.testing.assert_array_equal(np.sort(batch.x[:, 0]), np.sort(x[:, 0]))
