"""Samples in the on-device store are encrypted at rest, owner-only, and tamper-evident;
the key file is owner-only and a wrong one is refused."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clients.crypto import (
    KEY_FILE_ENV,
    KeyFileError,
    RecordAuthenticationError,
    WrongKeyError,
    new_key,
    write_key_file,
)
from clients.store import DeviceStore

# Values no store page would hold by chance, in float32 (as stored) and as text.
PATTERN = np.array([31415.926, -2718.2818, 16180.339, 14142.135], dtype=np.float32)


@pytest.fixture(autouse=True)
def _no_key_file_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, under which files are created world-readable unless we say so."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def pattern_rows(n: int = 50) -> tuple[np.ndarray, np.ndarray]:
    return np.tile(PATTERN, (n, 1)), np.arange(n, dtype=np.int64) % 2


def needles() -> list[bytes]:
    """Every way a sample value could show in the file: float32 and float64
    little-endian, one value or the whole row, and decimal text."""
    found = [PATTERN.astype("<f4").tobytes(), PATTERN.astype("<f8").tobytes()]
    for value in PATTERN:
        found.append(struct.pack("<f", value))
        found.append(struct.pack("<d", value))
        found.append(f"{float(value):.2f}".encode())
        found.append(str(float(value)).encode())
    return found


def found_in(blob: bytes) -> list[bytes]:
    return [needle for needle in needles() if needle in blob]


def leaked(path: Path) -> list[bytes]:
    """Needles found in the store file and its SQLite sidecars."""
    return found_in(
        b"".join(
            p.read_bytes() for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()
        )
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_format1_store(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """A store as the previous format wrote it: features and labels in the clear."""
    with sqlite3.connect(path) as conn:
        conn.executescript(
            """
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE samples (id INTEGER PRIMARY KEY, tick INTEGER NOT NULL,
                                  label INTEGER NOT NULL, x BLOB NOT NULL);
            CREATE INDEX samples_by_tick ON samples (tick);
            CREATE TABLE state (key TEXT PRIMARY KEY, value BLOB NOT NULL);
            CREATE TABLE model (slot INTEGER PRIMARY KEY CHECK (slot = 0),
                                version INTEGER NOT NULL, arrays BLOB NOT NULL);
            CREATE TABLE outbox (tick INTEGER PRIMARY KEY, report TEXT NOT NULL);
            """
        )
        conn.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [
                ("format", "fedge.device_store"),
                ("format_version", "1"),
                ("n_features", str(x.shape[1])),
            ],
        )
        conn.executemany(
            "INSERT INTO samples (tick, label, x) VALUES (?, ?, ?)",
            [(7, int(label), row.astype(np.float32).tobytes()) for row, label in zip(x, y)],
        )
        conn.execute("INSERT INTO state VALUES ('monitor', x'0102')")
    conn.close()
    os.chmod(path, 0o644)


def moved_aside(folder: Path, name: str = "node.sqlite") -> list[Path]:
    return [
        p for p in folder.glob(f"{name}.corrupt-*") if not p.name.endswith(("-wal", "-shm"))
    ]


# -- nothing in the clear --------------------------------------------------------------------


def test_store_file_holds_no_sample_value_while_open_and_after_close(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite"
    x, y = pattern_rows()
    with DeviceStore(path, capacity=100) as store:
        store.append(x, y, tick=1)
        store.append(x[:10], y[:10], tick=2)
        assert leaked(path) == [], "sample values readable in the file or its write-ahead log"
        back, labels, _ = store.window()
    np.testing.assert_array_equal(back, np.vstack([x, x[:10]]))
    np.testing.assert_array_equal(labels, np.r_[y, y[:10]])
    assert leaked(path) == []


def test_the_leak_check_finds_the_values_where_they_are_in_the_clear(tmp_path: Path) -> None:
    """The check above can fail: the previous, plaintext format shows the float32
    needles, and the same rows as float64 or as text show the others."""
    path = tmp_path / "node.sqlite"
    x, y = pattern_rows()
    write_format1_store(path, x, y)
    as_float32 = leaked(path)
    as_float64 = found_in(x.astype("<f8").tobytes())
    as_text = found_in("\n".join(",".join(map(str, map(float, row))) for row in x).encode())
    as_text += found_in(np.array2string(x, precision=2).encode())

    assert len(as_float32) == 1 + len(PATTERN)
    assert set(as_float32 + as_float64 + as_text) == set(needles())


def test_a_plaintext_store_is_sealed_in_place_and_keeps_its_samples(
    tmp_path: Path, umask_022: None
) -> None:
    path = tmp_path / "node.sqlite"
    x, y = pattern_rows(30)
    write_format1_store(path, x, y)

    with DeviceStore(path, capacity=100) as store:
        back, labels, ticks = store.window()
        assert leaked(path) == [], "plaintext left in free pages or the log"
        store.append(x[:1], y[:1], tick=8)
        assert store.get_state("monitor") == b"\x01\x02"
        assert len(store) == 31
    np.testing.assert_array_equal(back, x)
    np.testing.assert_array_equal(labels, y)
    assert ticks.tolist() == [7] * 30
    assert mode(path) == 0o600
    assert leaked(path) == []
    assert moved_aside(tmp_path) == []


# -- owner-only files and folders ------------------------------------------------------------


def test_store_sidecars_key_and_new_folders_are_owner_only(
    tmp_path: Path, umask_022: None
) -> None:
    path = tmp_path / "run" / "devices" / "device-3.sqlite"
    with DeviceStore(path) as store:
        store.append(*pattern_rows(5), tick=1)
        sidecars = [Path(f"{path}{suffix}") for suffix in ("-wal", "-shm")]
        assert all(p.exists() for p in sidecars), "expected SQLite's WAL files while open"
        assert {p.name: mode(p) for p in [path, *sidecars]} == {
            "device-3.sqlite": 0o600,
            "device-3.sqlite-wal": 0o600,
            "device-3.sqlite-shm": 0o600,
        }
        assert store.key_path == tmp_path / "run" / "devices" / "device-3.key"
    assert mode(tmp_path / "run" / "devices" / "device-3.key") == 0o600
    assert mode(tmp_path / "run") == 0o700
    assert mode(tmp_path / "run" / "devices") == 0o700


def test_a_loose_store_file_is_tightened_and_a_moved_aside_one_too(
    tmp_path: Path, umask_022: None
) -> None:
    path = tmp_path / "node.sqlite"
    path.write_bytes(b"not a database" * 100)
    os.chmod(path, 0o644)

    DeviceStore(path).close()

    (aside,) = moved_aside(tmp_path)
    assert mode(aside) == 0o600
    assert mode(path) == 0o600


# -- tampering is detected, the store moved aside, nothing lost ------------------------------


def _flip_a_byte_on_disk(path: Path, record_id: int) -> None:
    """Flip one byte in the middle of a record's bytes in the file itself."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        (record,) = conn.execute("SELECT record FROM samples WHERE id = ?", (record_id,)).fetchone()
    conn.close()
    data = bytearray(path.read_bytes())
    at = data.find(record)
    assert at >= 0 and data.count(record) == 1
    data[at + len(record) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _swap_two_records(path: Path, record_id: int) -> None:
    with sqlite3.connect(path) as conn:
        a, b = (
            conn.execute("SELECT record FROM samples WHERE id = ?", (i,)).fetchone()[0]
            for i in (record_id, record_id + 1)
        )
        conn.execute("UPDATE samples SET record = ? WHERE id = ?", (b, record_id))
        conn.execute("UPDATE samples SET record = ? WHERE id = ?", (a, record_id + 1))
    conn.close()


def _move_a_record_to_another_tick(path: Path, record_id: int) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE samples SET tick = tick + 1 WHERE id = ?", (record_id,))
    conn.close()


@pytest.mark.parametrize(
    "tamper", [_flip_a_byte_on_disk, _swap_two_records, _move_a_record_to_another_tick]
)
def test_a_tampered_record_moves_the_store_aside_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tamper: object
) -> None:
    path = tmp_path / "node.sqlite"
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    with DeviceStore(path) as store:
        store.append(x, np.zeros(10, dtype=np.int64), tick=1)
        store.put_state("monitor", b"m")
    tamper(path, 4)  # type: ignore[operator]
    original = path.read_bytes()

    with caplog.at_level(logging.WARNING, logger="fedge.device"):
        store = DeviceStore(path)
    with store:
        assert len(store) == 0 and store.get_state("monitor") is None
        store.append(x[:2], np.zeros(2, dtype=np.int64), tick=2)

    (aside,) = moved_aside(tmp_path)
    assert aside.read_bytes() == original, "the moved-aside store is kept as it was"
    with sqlite3.connect(aside) as conn:  # nothing silently lost: every record is still there
        assert conn.execute("SELECT COUNT(*) FROM samples").fetchone() == (10,)
    conn.close()
    warning = next(r.getMessage() for r in caplog.records if r.name == "fedge.device")
    assert "failed authentication" in warning and str(aside) in warning


def test_a_record_changed_while_open_is_refused_by_window(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite"
    with DeviceStore(path) as store:
        store.append(*pattern_rows(5), tick=1)
        _swap_two_records(path, 2)
        with pytest.raises(RecordAuthenticationError, match="record 2 failed authentication") as err:
            store.window()
    assert "\n" not in str(err.value)
    DeviceStore(path).close()
    assert len(moved_aside(tmp_path)) == 1


# -- the key file ----------------------------------------------------------------------------


def test_a_wrong_key_is_refused_and_the_store_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite"
    x, y = pattern_rows(5)
    with DeviceStore(path) as store:
        store.append(x, y, tick=1)
    before = path.read_bytes()
    other = tmp_path / "other-device.key"
    write_key_file(other, new_key())

    with pytest.raises(WrongKeyError, match="sealed with another key") as err:
        DeviceStore(path, key_file=other)

    assert "\n" not in str(err.value) and str(other) in str(err.value)
    assert path.read_bytes() == before
    assert moved_aside(tmp_path) == []
    with DeviceStore(path) as store:  # its own key still opens it
        np.testing.assert_array_equal(store.window()[0], x)


@pytest.mark.parametrize("loose", [0o640, 0o604, 0o620, 0o666])
def test_a_key_file_others_can_access_is_refused(tmp_path: Path, loose: int) -> None:
    path = tmp_path / "node.sqlite"
    with DeviceStore(path) as store:
        store.append(*pattern_rows(3), tick=1)
    key = tmp_path / "node.key"
    os.chmod(key, loose)

    with pytest.raises(KeyFileError, match="chmod 600") as err:
        DeviceStore(path)

    assert "\n" not in str(err.value) and f"{loose:04o}" in str(err.value)
    os.chmod(key, 0o600)
    with DeviceStore(path) as store:
        assert len(store) == 3


@pytest.mark.parametrize("content", [b"", b"not hex at all\n", b"ab" * 16 + b"\n", b"\xff" * 32])
def test_a_malformed_key_file_is_refused_in_one_line(tmp_path: Path, content: bytes) -> None:
    key = tmp_path / "node.key"
    key.write_bytes(content)
    os.chmod(key, 0o600)

    with pytest.raises(KeyFileError, match="key") as err:
        DeviceStore(tmp_path / "node.sqlite")

    assert "\n" not in str(err.value) and str(key) in str(err.value)
    assert key.read_bytes() == content, "a key file is never overwritten"


def test_a_lost_key_moves_the_store_aside_and_starts_under_a_new_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "node.sqlite"
    with DeviceStore(path) as store:
        store.append(*pattern_rows(3), tick=1)
    key = tmp_path / "node.key"
    old_key = key.read_bytes()
    key.unlink()

    with caplog.at_level(logging.WARNING, logger="fedge.device"):
        store = DeviceStore(path)
    with store:
        assert len(store) == 0
    assert key.read_bytes() != old_key and mode(key) == 0o600
    assert len(moved_aside(tmp_path)) == 1
    assert any("was missing" in r.getMessage() for r in caplog.records)


def test_the_key_file_can_live_elsewhere_named_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask_022: None
) -> None:
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "secrets" / "{store}.key"))
    path = tmp_path / "devices" / "device-4.sqlite"
    with DeviceStore(path) as store:
        store.append(*pattern_rows(3), tick=1)
        assert store.key_path == tmp_path / "secrets" / "device-4.key"

    assert mode(tmp_path / "secrets" / "device-4.key") == 0o600
    assert mode(tmp_path / "secrets") == 0o700
    assert not (tmp_path / "devices" / "device-4.key").exists()
    monkeypatch.delenv(KEY_FILE_ENV)
    with pytest.raises(WrongKeyError):  # a new key next to the store does not open it
        write_key_file(tmp_path / "devices" / "device-4.key", new_key())
        DeviceStore(path)
