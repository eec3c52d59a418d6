"""Ingest refuses what is not data, streams big files, leaves nothing on refusal, keeps files owner-only."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.inbox import SIDECAR_SUFFIXES, Inbox, InboxSchema, IngestError, ingest, read_schema
from clients.ingest import ingest_file, iter_batches, main, read_rows
from clients.validation import validate_rows

ROOT = Path(__file__).resolve().parents[1]


def _digest(path: Path) -> str:
    """The inbox's bytes with any sidecar, so a change that sits in the WAL counts too."""
    h = hashlib.sha256()
    for suffix in ("", *SIDECAR_SUFFIXES):
        part = Path(f"{path}{suffix}")
        if part.exists():
            h.update(suffix.encode() + part.read_bytes())
    return h.hexdigest()


def _inbox_with_a_batch(folder: Path, n_classes: int = 4, name: str = "device-0.inbox.sqlite") -> Path:
    path = folder / name
    with Inbox(path, n_features=2, n_classes=n_classes) as inbox:
        inbox.append(0, [[0.5, 0.25]], [1])
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- 1. strict labels ---------------------------------------------------------------------------
REFUSED_CSV_LABELS = [
    ("true", "is not an integer"),
    ("True", "is not an integer"),
    ("[1]", "is not an integer"),
    ('"{""a"": 1}"', "is not an integer"),
    ("0x1", "is not an integer"),
    ("nan", "is not an integer"),
    ("inf", "is not an integer"),
    ("1.5", "is not an integer"),
    ("3e0", "is not an integer"),
    ("1_0", "is not an integer"),
    ("\uff11", "is not an integer"),  # a full-width digit, which int() would take
    ("-1", "out of range (labels are 0..3)"),
    ("4", "out of range (labels are 0..3)"),
    ("99999999999999999999999", "out of range"),
]


@pytest.mark.parametrize(("cell", "problem"), REFUSED_CSV_LABELS)
def test_a_csv_label_that_is_not_a_plain_class_number_is_refused_naming_file_line_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cell: str, problem: str
) -> None:
    box = _inbox_with_a_batch(tmp_path)
    before = _digest(box)
    data = tmp_path / "samples.csv"
    data.write_text(f"tick,a,b,label\n1,0.1,0.2,1\n1,0.3,0.4,{cell}\n")
    assert main([str(box), str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "samples.csv line 3, column 4 (label): " in err and problem in err
    assert _digest(box) == before


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("true", "is not an integer"),
        ("[1]", "is not an integer"),
        ('{"a": 1}', "is not an integer"),
        ('""', "is not an integer"),
        ('"1"', "is not an integer"),
        ("NaN", "is not an integer"),
        ("Infinity", "is not an integer"),
        ("1.5", "is not an integer"),
        ("1e0", "is not an integer"),
        ("-1", "out of range"),
        ("9", "out of range"),
        ("99999999999999999999999", "out of range"),
    ],
)
def test_a_json_label_that_is_not_a_plain_class_number_is_refused_naming_file_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, problem: str
) -> None:
    box = _inbox_with_a_batch(tmp_path)
    before = _digest(box)
    data = tmp_path / "samples.jsonl"
    data.write_text(f'{{"x": [0.1, 0.2], "y": 1, "tick": 1}}\n{{"x": [0.1, 0.2], "y": {value}, "tick": 1}}\n')
    assert main([str(box), str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "samples.jsonl line 2, field 'y': " in err and problem in err
    assert _digest(box) == before


def test_integral_labels_written_as_floats_are_read_as_integers(tmp_path: Path) -> None:
    box = _inbox_with_a_batch(tmp_path)
    (tmp_path / "a.csv").write_text("tick,a,b,label\n1,0.1,0.2,3.0\n1,0.1,0.2, 2 \n1,0.1,0.2,0.00\n")
    (tmp_path / "b.jsonl").write_text('{"x": [0.1, 0.2], "y": 3.0, "tick": 2}\n')
    assert main([str(box), str(tmp_path / "a.csv")]) == 0
    assert main([str(box), str(tmp_path / "b.jsonl")]) == 0
    with Inbox(box) as inbox:
        assert inbox.take(after=1).y.tolist() == [3, 2, 0, 3]


def test_with_drop_invalid_an_unknown_class_is_counted_but_a_non_number_is_still_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    box = _inbox_with_a_batch(tmp_path)
    (tmp_path / "a.csv").write_text("tick,a,b,label\n1,0.1,0.2,7\n1,nan,0.2,1\n1,0.1,0.2,1\n")
    assert main([str(box), str(tmp_path / "a.csv"), "--drop-invalid"]) == 0
    assert "stored 1 rows in 1 batches (tick 1); dropped 2" in capsys.readouterr().out
    (tmp_path / "b.csv").write_text("tick,a,b,label\n2,0.1,0.2,true\n")
    assert main([str(box), str(tmp_path / "b.csv"), "--drop-invalid"]) == 2
    assert "line 2, column 4 (label): label 'true' is not an integer" in capsys.readouterr().err


@pytest.mark.parametrize("labels", [[True], [np.True_], [[1]], np.array([True])])
def test_the_api_refuses_booleans_and_lists_as_labels(tmp_path: Path, labels: object) -> None:
    box = _inbox_with_a_batch(tmp_path)
    with Inbox(box) as inbox, pytest.raises(IngestError, match="row 0: the label is not one of"):
        inbox.append(1, [[0.1, 0.2]], labels)  # type: ignore[arg-type]
    assert validate_rows([[0.1, 0.2]], labels, 2, 4).rejected["unknown_label"] == 1  # type: ignore[arg-type]


def test_a_numpy_column_of_labels_is_still_read() -> None:
    rows = validate_rows(np.zeros((2, 2)), np.array([[1], [0]]), 2, 2)
    assert rows.y.tolist() == [1, 0]


def test_ticks_and_features_take_plain_decimal_text_only(tmp_path: Path) -> None:
    for content, message in [
        ("tick,a,label\n1_0,0.1,0\n", "column 1 (tick): tick '1_0' is not a non-negative integer"),
        ("tick,a,label\n99999999999999999999,0.1,0\n", "is not a non-negative integer"),
        ("tick,a,label\n1,0x10,0\n", "column 2 (a): not a number: '0x10'"),
        ("tick,a,label\n1,1_0.5,0\n", "column 2 (a): not a number"),
        ("tick,a,label\n1,1e39,0\n", "column 2 (a): '1e39' is not a finite 32-bit number"),
    ]:
        with pytest.raises(IngestError, match=message.replace("(", r"\(").replace(")", r"\)")):
            list(iter_batches(io.StringIO(content), "csv", n_features=1, n_classes=2))


# -- 2. streaming -------------------------------------------------------------------------------
class _CountingStream(io.RawIOBase):
    """A file that says how much of it has been read."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        n = self._data.readinto(buffer)
        self.read_bytes += n
        return n


def _csv_bytes(n: int, ticks: int = 1) -> bytes:
    lines = ["tick,a,b,label"]
    lines += [f"{i * ticks // n},{i / n:.6f},{1 - i / n:.6f},{i % 2}" for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


def test_a_file_is_read_in_chunks_not_all_at_once() -> None:
    data = _csv_bytes(50_000)
    stream = _CountingStream(data)
    batches = iter_batches(io.BufferedReader(stream, 8192), "csv", chunk_rows=1_000)
    tick, _, y = next(batches)
    assert (tick, len(y)) == (0, 1_000)
    assert stream.read_bytes < len(data) // 5, "the first chunk came before the file was read"
    assert sum(len(b[2]) for b in batches) == 49_000


def test_chunks_of_a_file_are_stored_in_order_and_keep_their_ticks(tmp_path: Path) -> None:
    box = tmp_path / "box.sqlite"
    receipts = ingest_file(box, io.BytesIO(_csv_bytes(2_500, ticks=2)), "csv", n_features=2, n_classes=2, chunk_rows=1_000)
    assert [(r.tick, r.accepted) for r in receipts] == [(0, 1_000), (0, 250), (1, 1_000), (1, 250)]
    with Inbox(box) as inbox:
        first = inbox.take(through_tick=0)
        assert len(first.y) == 1_250
        np.testing.assert_allclose(first.x[:3, 0], [0.0, 0.0004, 0.0008], atol=1e-6)
        assert len(inbox.take(after=first.last_batch_id).y) == 1_250
    assert read_rows(io.StringIO("tick,a,label\n0,1,0\n0,2,1\n3,3,0\n"), "csv", None) == [
        (0, [[1.0], [2.0]], [0, 1]),
        (3, [[3.0]], [0]),
    ]


def test_a_bad_row_after_many_chunks_stores_nothing_and_creates_no_inbox(tmp_path: Path) -> None:
    data = _csv_bytes(25_000) + b"0,0.5,0.5,true\n"
    box = tmp_path / "new" / "device-0.inbox.sqlite"
    with pytest.raises(IngestError, match="line 25002, column 4"):
        ingest_file(box, io.BytesIO(data), "csv", n_features=2, n_classes=2)
    assert not (tmp_path / "new").exists(), "no inbox, sidecar or folder is left behind"
    existing = _inbox_with_a_batch(tmp_path, n_classes=2)
    before = _digest(existing)
    with pytest.raises(IngestError, match="line 25002"):
        ingest_file(existing, io.BytesIO(data), "csv")
    assert _digest(existing) == before


def test_a_reading_device_can_write_while_a_long_file_is_parsed(tmp_path: Path) -> None:
    box = _inbox_with_a_batch(tmp_path, n_classes=2)

    def rows() -> Iterator[tuple[int, list[list[float]], list[int]]]:
        yield 1, [[0.1, 0.2]], [1]
        # The device prunes (a write) mid-parse; were the inbox locked, this would wait 10 s and fail.
        with Inbox(box) as device:
            assert device.prune(device.take().last_batch_id) == 1
        yield 2, [[0.3, 0.4]], [0]

    assert [r.tick for r in ingest(box, rows())] == [1, 2]
    with Inbox(box) as inbox:
        assert inbox.take().y.tolist() == [1, 0]


def test_peak_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    """Storing 200,000 rows costs about what 20,000 do (whole-file reading grew ~75 MB here)."""
    script = (
        "import resource, sys\n"
        "from clients.ingest import main\n"
        "main([sys.argv[1], sys.argv[2], '--features', '2', '--classes', '2'])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    peaks = []
    for n in (20_000, 200_000):
        data = tmp_path / f"rows-{n}.csv"
        data.write_bytes(_csv_bytes(n, ticks=4))
        done = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / f"box-{n}.sqlite"), str(data)],
            capture_output=True, text=True, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert f"stored {n} rows" in done.stdout
        peaks.append(int(done.stdout.split()[-1]))
    assert peaks[1] - peaks[0] < 15_000, f"peak RSS grew by {(peaks[1] - peaks[0]) // 1024} MB"


# -- 3 and 4. nothing left on refusal; owner-only files ------------------------------------------
def test_a_refused_first_batch_leaves_no_inbox_behind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.csv").write_text("tick,a,b,label\n0,0.1,0.2,1\n0,0.1,0.2,[1]\n")
    box = tmp_path / "devices" / "device-0.inbox.sqlite"
    assert main([str(box), str(tmp_path / "bad.csv"), "--features", "2", "--classes", "2"]) == 2
    assert "line 3, column 4 (label)" in capsys.readouterr().err
    assert not (tmp_path / "devices").exists()
    with pytest.raises(IngestError, match="tick 0, row 0: the label"):
        ingest(box, [(0, [[0.1, 0.2]], [5])], n_features=2, n_classes=2)
    assert not (tmp_path / "devices").exists()
    assert not list(tmp_path.glob("**/*.inbox.sqlite*"))


def test_a_refused_later_batch_leaves_the_inbox_exactly_as_it_was(tmp_path: Path) -> None:
    box = _inbox_with_a_batch(tmp_path)
    before = _digest(box)
    with Inbox(box) as inbox:
        for bad in ([(1, [[0.1, 0.2]], [9])], [(1, [[0.1, 0.2]], [1]), (0, [[0.1, 0.2]], [1])]):
            with pytest.raises(IngestError):
                inbox.append_many(bad)
        assert len(inbox) == 1
    assert _digest(box) == before


def test_inbox_files_and_new_folders_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        box = tmp_path / "run" / "devices" / "device-0.inbox.sqlite"
        with Inbox(box, n_features=2, n_classes=2) as inbox:
            inbox.append(0, [[0.1, 0.2]], [1])
            files = sorted(p.name for p in box.parent.iterdir())
            assert {"device-0.inbox.sqlite-wal", "device-0.inbox.sqlite-shm"} <= set(files)
            assert {p.name: _mode(p) for p in box.parent.iterdir()} == dict.fromkeys(files, 0o600)
        assert _mode(tmp_path / "run") == 0o700 and _mode(box.parent) == 0o700
        via_cli = tmp_path / "cli" / "box.sqlite"
        (tmp_path / "a.csv").write_text("tick,a,label\n0,0.1,0\n")
        assert main([str(via_cli), str(tmp_path / "a.csv"), "--features", "1", "--classes", "2"]) == 0
        assert (_mode(via_cli.parent), _mode(via_cli)) == (0o700, 0o600)
    finally:
        os.umask(old)


# -- 5. the device does not import the simulation ---------------------------------------------------
def test_importing_the_ingest_module_pulls_in_no_simulation_or_science_stack() -> None:
    code = (
        "import clients.ingest, sys\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('fedge.scenarios', 'sklearn', 'scipy', 'pandas')))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    import clients.ingest

    assert not hasattr(clients.ingest, "feed_scenario")


# -- 6. the schema comes back from the file -----------------------------------------------------------
def test_a_reader_learns_the_schema_from_an_existing_inbox(tmp_path: Path) -> None:
    box = tmp_path / "device-0.inbox.sqlite"
    Inbox(box, n_features=3, n_classes=5).close()
    with Inbox.open_existing(box) as inbox:
        assert (inbox.n_features, inbox.n_classes) == (3, 5)
        assert inbox.schema == InboxSchema(n_features=3, n_classes=5)
    assert read_schema(box) == InboxSchema(3, 5)
    with pytest.raises(IngestError, match="no inbox at"):
        Inbox.open_existing(tmp_path / "missing.inbox.sqlite")
    assert not (tmp_path / "missing.inbox.sqlite").exists()


# -- 7. random input ------------------------------------------------------------------------------------
def _check_refused_or_stored(box: Path, run: object) -> None:
    before = _digest(box)
    with Inbox(box) as inbox:
        rows_before = len(inbox.take().y)
    try:
        receipts = run()  # type: ignore[operator]
    except IngestError as exc:
        assert "\n" not in str(exc)
        assert _digest(box) == before, "nothing from a refused batch is stored"
    else:
        with Inbox(box) as inbox:
            assert len(inbox.take().y) == rows_before + sum(r.accepted for r in receipts)


_CELLS = st.one_of(
    st.sampled_from(["0", "1", "2", "-1", "3.0", "0.5", "nan", "inf", "1e40", "", " ", "true", "[1]", "0x1", '"', "1,2"]),
    st.text(max_size=6),
)
_FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_FUZZ
@given(data=st.binary(max_size=400), fmt=st.sampled_from(["csv", "jsonl"]), drop=st.booleans())
def test_random_bytes_are_refused_with_an_ingest_error_or_stored(tmp_path: Path, data: bytes, fmt: str, drop: bool) -> None:
    box = tmp_path / "box.sqlite"
    if not box.exists():
        _inbox_with_a_batch(tmp_path, n_classes=3, name=box.name)
    on_invalid = "drop" if drop else "raise"
    _check_refused_or_stored(box, lambda: ingest_file(box, io.BytesIO(data), fmt, default_tick=5, on_invalid=on_invalid))  # type: ignore[arg-type]


@_FUZZ
@given(
    text=st.one_of(
        st.text(max_size=300),
        st.lists(st.lists(_CELLS, min_size=3, max_size=5).map(",".join), max_size=8).map(
            lambda lines: "\n".join(["tick,a,b,label", *lines])
        ),
        st.lists(
            st.fixed_dictionaries(
                {"x": st.lists(st.one_of(st.floats(), st.integers(), st.booleans(), st.text(max_size=2)), max_size=3)},
                optional={"y": st.one_of(st.integers(-2, 5), st.floats(), st.booleans(), st.lists(st.integers(0, 2), max_size=1)),
                          "tick": st.one_of(st.integers(-1, 9), st.floats(), st.none())},
            ).map(json.dumps),
            max_size=6,
        ).map("\n".join),
    ),
    drop=st.booleans(),
)
def test_random_text_is_refused_with_an_ingest_error_or_stored(tmp_path: Path, text: str, drop: bool) -> None:
    box = tmp_path / "box.sqlite"
    if not box.exists():
        _inbox_with_a_batch(tmp_path, n_classes=3, name=box.name)
    fmt = "jsonl" if text.startswith("{") else "csv"
    on_invalid = "drop" if drop else "raise"
    _check_refused_or_stored(box, lambda: ingest_file(box, io.StringIO(text), fmt, default_tick=5, on_invalid=on_invalid))  # type: ignore[arg-type]


_VALUES = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=3), st.binary(max_size=3),
        st.just(np.float32(1.5)), st.just(np.int64(1)), st.just(2**64),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner) | st.dictionaries(st.text(max_size=2), inner, max_size=2),
    max_leaves=8,
)


@_FUZZ
@given(
    tick=st.one_of(st.integers(-5, 2**70), st.booleans(), st.floats(), st.none(), st.text(max_size=2)),
    x=st.one_of(_VALUES, st.lists(st.lists(st.floats(width=32), min_size=2, max_size=2), max_size=4)),
    y=st.one_of(_VALUES, st.lists(st.integers(-1, 4), max_size=4)),
    drop=st.booleans(),
)
def test_random_values_given_to_append_are_refused_with_an_ingest_error_or_stored(
    tmp_path: Path, tick: object, x: object, y: object, drop: bool
) -> None:
    box = tmp_path / "box.sqlite"
    if not box.exists():
        _inbox_with_a_batch(tmp_path, n_classes=3, name=box.name)

    def run() -> list[object]:
        with Inbox(box) as inbox:
            return [inbox.append(tick, x, y, on_invalid="drop" if drop else "raise")]  # type: ignore[arg-type]

    _check_refused_or_stored(box, run)
