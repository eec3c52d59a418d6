"""The on-device store keeps the newest samples, state and model across restarts, and a
damaged file never stops the device."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from clients.store import DeviceStore


def batch(n: int, d: int = 4, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose first feature is their running number, so order is visible."""
    x = np.zeros((n, d), dtype=np.float32)
    x[:, 0] = np.arange(start, start + n)
    x[:, 1:] = 0.5
    return x, (np.arange(start, start + n) % 3).astype(np.int64)


def test_window_returns_samples_oldest_first_with_dtypes(tmp_path: Path) -> None:
    with DeviceStore(tmp_path / "node.sqlite", capacity=100) as store:
        store.append(*batch(5), tick=1)
        store.append(*batch(3, start=5), tick=2)
        x, y, ticks = store.window()

    assert x.dtype == np.float32 and x.shape == (8, 4)
    assert y.dtype == np.int64 and ticks.dtype == np.int64
    np.testing.assert_array_equal(x[:, 0], np.arange(8))
    np.testing.assert_array_equal(y, np.arange(8) % 3)
    np.testing.assert_array_equal(ticks, [1] * 5 + [2] * 3)


def test_empty_store_has_an_empty_window(tmp_path: Path) -> None:
    with DeviceStore(tmp_path / "node.sqlite", n_features=3) as store:
        x, y, ticks = store.window()
        assert len(store) == 0
    assert x.shape == (0, 3) and y.shape == (0,) and ticks.shape == (0,)


def test_capacity_keeps_the_newest_samples(tmp_path: Path) -> None:
    with DeviceStore(tmp_path / "node.sqlite", capacity=10) as store:
        for tick in range(4):
            store.append(*batch(4, start=4 * tick), tick=tick)
        x, _, ticks = store.window()
        assert len(store) == 10

    np.testing.assert_array_equal(x[:, 0], np.arange(6, 16))
    np.testing.assert_array_equal(ticks, [1, 1, 2, 2, 2, 2, 3, 3, 3, 3])


def test_a_batch_larger_than_capacity_keeps_its_tail(tmp_path: Path) -> None:
    with DeviceStore(tmp_path / "node.sqlite", capacity=5) as store:
        store.append(*batch(3), tick=0)
        store.append(*batch(12, start=3), tick=1)
        x, _, _ = store.window()

    np.testing.assert_array_equal(x[:, 0], np.arange(10, 15))


def test_reopening_with_a_smaller_capacity_trims_the_oldest(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite"
    with DeviceStore(path, capacity=20) as store:
        store.append(*batch(20), tick=0)
    with DeviceStore(path, capacity=8) as store:
        x, _, _ = store.window()

    np.testing.assert_array_equal(x[:, 0], np.arange(12, 20))


def test_drop_before_removes_older_ticks_and_counts_them(tmp_path: Path) -> None:
    with DeviceStore(tmp_path / "node.sqlite") as store:
        for tick in range(5):
            store.append(*batch(3, start=3 * tick), tick=tick)

        removed = store.drop_before(3)
        _, _, ticks = store.window()

        assert removed == 9
        np.testing.assert_array_equal(ticks, [3, 3, 3, 4, 4, 4])
        assert store.drop_before(3) == 0


def test_restart_keeps_window_state_and_model(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "folder" / "node.sqlite"
    weights: dict[str, np.ndarray] = {
        "layer.0.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "layer.0.bias": np.array([1, -2, 3], dtype=np.float64),
        "steps": np.array(7, dtype=np.int16),
        "file": np.array([True, False]),
    }
    with DeviceStore(path, capacity=50) as store:
        store.append(*batch(30), tick=9)
        store.put_state("monitor", b"\x00\x01binary\xff")
        store.put_model(4, weights)
        before = store.window()

    with DeviceStore(path, capacity=50) as store:
        after = store.window()
        state = store.get_state("monitor")
        model = store.get_model()
        assert store.n_features == 4

    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old, new)
    assert state == b"\x00\x01binary\xff"
    assert model is not None
    version, arrays = model
    assert version == 4
    assert list(arrays) == list(weights)
    for name, array in weights.items():
        assert arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(arrays[name], array)


def test_samples_committed_before_a_hard_exit_survive(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite"
    script = textwrap.dedent(
        f"""
        import os
        import numpy as np
        from clients.store import DeviceStore
        store = DeviceStore({str(path)!r}, capacity=100)
        store.append(np.full((7, 2), 1.5), np.arange(7), tick=3)
        store.put_state("k", b"v")
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)

    with DeviceStore(path) as store:
        x, y, _ = store.window()
        assert store.get_state("k") == b"v"
    assert x.shape == (7, 2)
    np.testing.assert_array_equal(y, np.arange(7))


def test_put_replaces_previous_state_and_model(tmp_path: Path) -> None:
    with DeviceStore(tmp_path / "node.sqlite") as store:
        assert store.get_state("monitor") is None
        assert store.get_model() is None

        store.put_state("monitor", b"old")
        store.put_state("monitor", b"new")
        store.put_model(1, {"w": np.zeros(2)})
        store.put_model(2, {"v": np.ones(3, dtype=np.int32)})

        assert store.get_state("monitor") == b"new"
        model = store.get_model()
    assert model is not None
    assert model[0] == 2 and list(model[1]) == ["v"]


def test_a_rejected_append_leaves_the_window_untouched(tmp_path: Path) -> None:
    with DeviceStore(tmp_path / "node.sqlite", n_features=4) as store:
        store.append(*batch(3), tick=0)
        with pytest.raises(ValueError, match="features"):
            store.append(np.zeros((2, 5)), np.zeros(2, dtype=np.int64), tick=1)
        with pytest.raises(ValueError, match="rows but y has"):
            store.append(np.zeros((2, 4)), np.zeros(3, dtype=np.int64), tick=1)
        assert len(store) == 3


def test_transaction_keeps_all_of_its_writes_or_none(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite"
    with DeviceStore(path) as store:
        with store.transaction():
            store.append(*batch(3), tick=0)
            store.put_state("monitor", b"after tick 0")

        with pytest.raises(RuntimeError), store.transaction():
            store.drop_before(1)
            store.append(*batch(3, start=3), tick=1)
            store.put_state("monitor", b"after tick 1")
            raise RuntimeError("power cut")

    with DeviceStore(path) as store:
        _, _, ticks = store.window()
        state = store.get_state("monitor")
    np.testing.assert_array_equal(ticks, [0, 0, 0])
    assert state == b"after tick 0"


def test_a_refused_write_inside_a_transaction_does_not_undo_the_others(tmp_path: Path) -> None:
    with DeviceStore(tmp_path / "node.sqlite") as store:
        with store.transaction():
            store.put_state("a", b"1")
            with pytest.raises(ValueError):
                store.put_model(1, {"w": np.array([None], dtype=object)})
            store.put_state("b", b"2")

        assert store.get_state("a") == b"1" and store.get_state("b") == b"2"
        assert store.get_model() is None


def test_object_arrays_are_refused_and_the_old_model_kept(tmp_path: Path) -> None:
    with DeviceStore(tmp_path / "node.sqlite") as store:
        store.put_model(1, {"w": np.ones(2)})
        with pytest.raises(ValueError, match="pickling"):
            store.put_model(2, {"w": np.array([{"a": 1}], dtype=object)})
        model = store.get_model()
    assert model is not None and model[0] == 1


def test_reopening_with_a_different_width_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite"
    with DeviceStore(path) as store:
        store.append(*batch(2, d=4), tick=0)

    with pytest.raises(ValueError, match="4 features"):
        DeviceStore(path, n_features=6)


def _corrupt_pages(path: Path) -> None:
    data = bytearray(path.read_bytes())
    page = 4096
    data[page : len(data)] = b"\xa5" * (len(data) - page)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    ["not_sqlite", "garbage_pages", "truncated", "foreign_database"],
)
def test_damaged_file_is_moved_aside_and_a_fresh_store_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    path = tmp_path / "node.sqlite"
    if damage == "not_sqlite":
        path.write_bytes(b"this is a text file, not a database\n" * 200)
    elif damage == "foreign_database":
        with sqlite3.connect(path) as other:
            other.execute("CREATE TABLE recipes (name TEXT)")
        other.close()
    else:
        with DeviceStore(path, capacity=500) as store:
            for tick in range(10):
                store.append(*batch(50, d=16, start=50 * tick), tick=tick)
            store.put_state("k", b"v")
        if damage == "garbage_pages":
            _corrupt_pages(path)
        else:
            path.write_bytes(path.read_bytes()[:5000])
    original = path.read_bytes()

    with caplog.at_level(logging.WARNING, logger="fedge.device"):
        store = DeviceStore(path, capacity=10)
    with store:
        assert len(store) == 0
        assert store.get_state("k") is None
        store.append(*batch(2), tick=0)
        assert len(store) == 2

    moved = list(tmp_path.glob("node.sqlite.corrupt-*"))
    moved_main = [p for p in moved if not p.name.endswith(("-wal", "-shm"))]
    assert len(moved_main) == 1
    assert moved_main[0].read_bytes() == original
    records = [r for r in caplog.records if r.name == "fedge.device"]
    assert records and records[0].levelno == logging.WARNING
    assert str(moved_main[0]) in records[0].getMessage()


def test_a_second_damaged_file_does_not_overwrite_the_first_one_moved_aside(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node.sqlite"
    for content in (b"first" * 100, b"second" * 100):
        path.write_bytes(content)
        DeviceStore(path).close()
        path.unlink()

    moved = sorted(p.read_bytes() for p in tmp_path.glob("node.sqlite.corrupt-*"))
    assert moved == sorted([b"first" * 100, b"second" * 100])


def test_closed_store_refuses_use(tmp_path: Path) -> None:
    store = DeviceStore(tmp_path / "node.sqlite")
    store.close()
    store.close()

    with pytest.raises(ValueError, match="closed"):
        store.window()


def test_repr_shows_path_and_sizes(tmp_path: Path) -> None:
    with DeviceStore(tmp_path / "node.sqlite", capacity=7, n_features=3) as store:
        assert repr(store) == (
            f"DeviceStore(path={str(tmp_path / 'node.sqlite')!r}, capacity=7, n_features=3)"
        )


def test_quarantined_state_moves_to_an_owner_only_file_and_the_rest_stays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "node.sqlite"
    with DeviceStore(path) as store:
        store.append(*batch(3), tick=1)
        store.put_state("monitor", b"\x80unreadable")
        store.put_state("counters", b"{}")

        with caplog.at_level(logging.WARNING, logger="fedge.device"):
            moved = store.quarantine_state("monitor", "not a saved drift monitor")

        assert moved is not None and moved.name.startswith("node.sqlite.monitor.corrupt-")
        assert moved.read_bytes() == b"\x80unreadable"
        assert moved.stat().st_mode & 0o777 == 0o600
        assert store.get_state("monitor") is None
        assert store.get_state("counters") == b"{}" and len(store) == 3
        messages = [r.getMessage() for r in caplog.records if r.name == "fedge.device"]
        assert any(str(moved) in m and "not a saved drift monitor" in m for m in messages)
        assert store.quarantine_state("monitor", "again") is None, "nothing left to move"

    with DeviceStore(path) as store:  # the move is durable
        assert store.get_state("monitor") is None and len(store) == 3


def test_quarantine_keeps_a_state_rewritten_since_it_was_read(tmp_path: Path) -> None:
    with DeviceStore(tmp_path / "node.sqlite") as store:
        store.put_state("monitor", b"bad")
        store.put_state("monitor", b"good, written by another process meanwhile")

        assert store.quarantine_state("monitor", "unreadable", expected=b"bad") is None
        assert store.get_state("monitor") == b"good, written by another process meanwhile"
    assert not list(tmp_path.glob("*.corrupt-*"))


def test_two_quarantines_in_one_second_keep_both_blobs(tmp_path: Path) -> None:
    with DeviceStore(tmp_path / "node.sqlite") as store:
        for blob in (b"first", b"second"):
            store.put_state("monitor", blob)
            store.quarantine_state("monitor", "unreadable")

    moved = sorted(p.read_bytes() for p in tmp_path.glob("node.sqlite.monitor.corrupt-*"))
    assert moved == [b"first", b"second"]
