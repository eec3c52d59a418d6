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
took) and may :meth:`Inbox.prune` what it has consumed.

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

From the shell, a CSV with a ``label`` column (and optionally ``tick``)::

    python -m clients.ingest runs/devices/device-0.inbox.sqlite samples.csv --tick 7
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TextIO

import numpy as np

from clients.validation import REJECT_REASONS, validate_rows

if TYPE_CHECKING:
    from fedge.contracts.config import FedgeConfig

INBOX_SUFFIX = ".inbox.sqlite"
OnInvalid = Literal["raise", "drop"]

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


class IngestError(ValueError):
    """Device data that cannot be ingested; the message names the tick, row and problem."""


def inbox_path(store_path: Path) -> Path:
    """The inbox beside a device store: ``device-3.sqlite`` -> ``device-3.inbox.sqlite``."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.stem + INBOX_SUFFIX)


@dataclass(frozen=True)
class DataSchema:
    """What one row of a device's data is: its width and how many classes a label may name."""

    n_features: int
    n_classes: int


def inbox_schema(path: Path) -> DataSchema:
    """The schema an existing inbox was created with.

    Raises
    ------
    IngestError
        There is no inbox at ``path`` (the device has no data source), or it is not one.
    """
    path = Path(path)
    if not path.exists():
        raise IngestError(f"ingest: no inbox at {path}: this device has no data source")
    with Inbox(path) as inbox:
        return DataSchema(inbox.n_features, inbox.n_classes)


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


class Inbox:
    """A device's append-only queue of validated rows, one batch per tick.

    Parameters
    ----------
    path : Path
        SQLite file; created with the schema on first use.
    n_features : int, optional
        Row width. Needed when the file is new; checked against the file otherwise.
    n_classes : int, optional
        Number of classes (labels ``0 .. n_classes - 1``); as ``n_features``.

    Raises
    ------
    IngestError
        The file is not an inbox, or its schema differs from the one given.
    """

    def __init__(
        self, path: Path, *, n_features: int | None = None, n_classes: int | None = None
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            if n_features is None or n_classes is None:
                raise IngestError(
                    f"ingest: no inbox at {self.path} (a new inbox needs the row width and classes)"
                )
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                self.path, timeout=10.0, isolation_level=None
            )
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
        except sqlite3.DatabaseError as exc:
            self.close()
            raise IngestError(f"ingest: {self.path} is not a usable inbox ({exc})") from exc
        except IngestError:
            self.close()
            raise
        self.n_features = int(stored["n_features"])
        self.n_classes = int(stored["n_classes"])
        for given, have, what in (
            (n_features, self.n_features, "features"),
            (n_classes, self.n_classes, "classes"),
        ):
            if given is not None and int(given) != have:
                self.close()
                raise IngestError(
                    f"ingest: {self.path} holds rows with {have} {what}, {given} were given"
                )

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
            One integer label per row.
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
        batches: Iterable[tuple[int, np.ndarray | Sequence[Any], np.ndarray | Sequence[Any]]],
        *,
        on_invalid: OnInvalid = "raise",
        source: str = "",
    ) -> list[Receipt]:
        """Store several ticks' batches in one transaction: all of them or none.

        Parameters are as for :meth:`append`, one ``(tick, x, y)`` per batch.
        """
        if on_invalid not in ("raise", "drop"):
            raise IngestError(f"ingest: on_invalid={on_invalid!r} is not allowed; allowed: raise, drop")
        checked = [self._check(tick, x, y, on_invalid) for tick, x, y in batches]
        receipts: list[Receipt] = []
        now = time.time()
        with self._write() as conn:
            last = int(conn.execute("SELECT value FROM meta WHERE key = 'last_tick'").fetchone()[0])
            for tick, xs, ys, rejected in checked:
                if tick < last:
                    raise IngestError(
                        f"ingest: tick {tick} is before the latest stored tick {last} "
                        "(the inbox is append-only); nothing from this call was stored"
                    )
                last = tick
                cursor = conn.execute(
                    "INSERT INTO batches (tick, n, x, y, rejected, source, received)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (tick, len(ys), xs.tobytes(), ys.tobytes(), json.dumps(rejected), source, now),
                )
                receipts.append(Receipt(int(cursor.lastrowid or 0), tick, len(ys), rejected))
            conn.execute("UPDATE meta SET value = ? WHERE key = 'last_tick'", (str(last),))
        return receipts

    def _check(
        self,
        tick: object,
        x: np.ndarray | Sequence[Any],
        y: np.ndarray | Sequence[Any],
        on_invalid: OnInvalid,
    ) -> tuple[int, np.ndarray, np.ndarray, dict[str, int]]:
        if isinstance(tick, bool) or not isinstance(tick, int | np.integer) or int(tick) < 0:
            raise IngestError(f"ingest: tick must be a non-negative integer, got {tick!r}")
        tick = int(tick)
        try:
            rows = validate_rows(x, y, self.n_features, self.n_classes)
        except (TypeError, ValueError) as exc:
            message = str(exc).removeprefix("validate_rows: ")
            raise IngestError(f"ingest: tick {tick}: {message}; nothing from this batch was stored") from None
        if rows.rejected["total"] and on_invalid == "raise":
            row, reason = self._first_bad_row(x, y)
            raise IngestError(
                f"ingest: tick {tick}, row {row}: {_REASON_TEXT[reason]}; "
                "nothing from this batch was stored"
            )
        xs = np.ascontiguousarray(rows.x, dtype=np.float32).reshape(-1, self.n_features)
        ys = np.ascontiguousarray(rows.y, dtype=np.int64)
        return tick, xs, ys, dict(rows.rejected)

    def _first_bad_row(
        self, x: np.ndarray | Sequence[Any], y: np.ndarray | Sequence[Any]
    ) -> tuple[int, str]:
        for i, (row, label) in enumerate(zip(x, y, strict=True)):
            single = validate_rows([row], [label], self.n_features, self.n_classes)
            for reason in REJECT_REASONS:
                if single.rejected[reason]:
                    return i, reason
        return -1, "non_finite"

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
        if getattr(self, "_conn", None) is not None:
            assert self._conn is not None
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


def _positive(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < 1:
        raise IngestError(f"ingest: {what} must be a positive integer, got {value!r}")
    return int(value)


# -- the simulated device application -------------------------------------------------------
def feed_scenario(
    cfg: FedgeConfig, device_id: int, path: Path, ticks: Iterable[int] | None = None
) -> list[Receipt]:
    """Write a scenario device's rows for ``ticks`` (default: all) into its inbox.

    This is the simulated sensor of a scenario going through the same API a real
    device application uses. The scenario's bad rows (``bad_row_fraction``) are
    dropped and counted, as a device would count a faulty sensor's rows. Ticks
    already in the inbox are skipped, so feeding twice stores nothing twice.
    """
    from fedge.scenarios import build_scenario

    scenario = build_scenario(cfg.scenario)
    with Inbox(path, n_features=scenario.n_features, n_classes=scenario.n_classes) as inbox:
        last = inbox.last_tick
        wanted = range(scenario.n_steps) if ticks is None else ticks
        batches = [(t, *scenario.batch(device_id, t)) for t in wanted if t > last]
        return inbox.append_many(batches, on_invalid="drop", source="scenario")


# -- files and the command line -------------------------------------------------------------
def read_rows(
    stream: TextIO, fmt: Literal["csv", "jsonl"], default_tick: int | None, name: str = "<input>"
) -> list[tuple[int, list[list[float]], list[Any]]]:
    """Parse CSV or JSON lines into ``(tick, rows, labels)`` batches, in file order.

    CSV needs a header with a ``label`` column; a ``tick`` column is optional
    (else ``default_tick``); every other column is a feature, in header order.
    A JSON line is an object ``{"x": [...], "y": <label>, "tick": <tick>}``
    (``tick`` optional as for CSV). Consecutive rows of one tick form one batch.

    Raises
    ------
    IngestError
        A line that cannot be read, naming the file and line.
    """
    records: list[tuple[int, list[float], Any]] = []
    if fmt == "csv":
        reader = csv.reader(stream)
        header = next(reader, None)
        if header is None:
            raise IngestError(f"ingest: {name} is empty (a header with a 'label' column is needed)")
        header = [h.strip() for h in header]
        if "label" not in header:
            raise IngestError(f"ingest: {name}: the header has no 'label' column: {','.join(header)}")
        li = header.index("label")
        ti = header.index("tick") if "tick" in header else None
        features = [i for i in range(len(header)) if i not in (li, ti)]
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise IngestError(
                    f"ingest: {name} line {lineno}: {len(row)} fields, the header has {len(header)}"
                )
            tick = _tick(row[ti] if ti is not None else None, default_tick, name, lineno)
            xs = [_number(row[i], header[i], name, lineno) for i in features]
            records.append((tick, xs, _label(row[li], name, lineno)))
    else:
        for lineno, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise IngestError(f"ingest: {name} line {lineno}: not JSON ({exc.args[0]})") from None
            if not isinstance(obj, dict) or "x" not in obj or "y" not in obj:
                raise IngestError(f"ingest: {name} line {lineno}: expected an object with 'x' and 'y'")
            if not isinstance(obj["x"], list):
                raise IngestError(f"ingest: {name} line {lineno}: 'x' must be a list of numbers")
            tick = _tick(obj.get("tick"), default_tick, name, lineno)
            xs = [_number(v, f"x[{i}]", name, lineno) for i, v in enumerate(obj["x"])]
            records.append((tick, xs, obj["y"]))
    batches: list[tuple[int, list[list[float]], list[Any]]] = []
    for tick, xs, label in records:
        if not batches or batches[-1][0] != tick:
            batches.append((tick, [], []))
        batches[-1][1].append(xs)
        batches[-1][2].append(label)
    return batches


def _tick(value: object, default: int | None, name: str, lineno: int) -> int:
    if value is None or value == "":
        if default is None:
            raise IngestError(f"ingest: {name} line {lineno}: no tick (add a 'tick' column or --tick)")
        return default
    try:
        tick = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise IngestError(f"ingest: {name} line {lineno}: tick {value!r} is not an integer") from None
    if isinstance(tick, bool) or tick < 0:
        raise IngestError(f"ingest: {name} line {lineno}: tick {value!r} is not a non-negative integer")
    return int(tick)


def _number(value: object, column: str, name: str, lineno: int) -> float:
    if isinstance(value, bool) or value is None:
        raise IngestError(f"ingest: {name} line {lineno}: {column} is not a number: {value!r}")
    try:
        return float(value) if isinstance(value, int | float) else float(str(value).strip())
    except ValueError:
        raise IngestError(f"ingest: {name} line {lineno}: {column} is not a number: {value!r}") from None


def _label(value: str, name: str, lineno: int) -> int | str:
    text = value.strip()
    try:
        return int(text)
    except ValueError:
        try:
            as_float = float(text)
        except ValueError:
            raise IngestError(f"ingest: {name} line {lineno}: label {value!r} is not an integer") from None
        return int(as_float) if as_float.is_integer() else text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, no usage dump
        sys.stderr.write(f"fedge-ingest: error: {message}\n")
        raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    """``fedge-ingest INBOX [FILE]``: append CSV or JSON-lines samples to a device's inbox.

    Returns the exit code: 0 when every batch was stored, 2 when the input was
    refused (nothing stored) or the arguments are wrong; the error is one line.
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
    if args.tick is not None and args.tick < 0:
        parser.error(f"--tick must be a non-negative integer, got {args.tick}")
    try:
        if args.file == "-":
            text = sys.stdin.read()
            name = "<stdin>"
        else:
            name = str(args.file)
            text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"cannot read {args.file}: {getattr(exc, 'strerror', None) or exc}")
    try:
        batches = read_rows(io.StringIO(text), fmt, args.tick, name)
        with Inbox(args.inbox, n_features=args.features, n_classes=args.classes) as inbox:
            receipts = inbox.append_many(
                batches, on_invalid="drop" if args.drop_invalid else "raise", source=name
            )
    except IngestError as exc:
        sys.stderr.write(f"fedge-ingest: error: {str(exc).removeprefix('ingest: ')}\n")
        return 2
    stored = sum(r.accepted for r in receipts)
    dropped = sum(r.rejected["total"] for r in receipts)
    ticks = sorted({r.tick for r in receipts})
    span = f"ticks {ticks[0]}-{ticks[-1]}" if len(ticks) > 1 else f"tick {ticks[0]}" if ticks else "no tick"
    print(f"stored {stored} rows in {len(receipts)} batches ({span}); dropped {dropped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
