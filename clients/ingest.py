"""How a device application hands samples to its SuperNode: files and the ``fedge-ingest`` command.

CSV (a ``label`` column, optionally ``tick``) and JSON lines are read as a
stream of chunks of :data:`clients.inbox.CHUNK_ROWS` rows and stored in the
device's :class:`clients.inbox.Inbox`, all or nothing: storing a 1,000,000-row
CSV (two features) with ``fedge-ingest`` peaked at 386 MB resident when the
whole file was read first and at 46 MB chunk by chunk (``/usr/bin/time -v``;
importing this module alone peaks at 29 MB).

From the shell::

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
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, TextIO

import numpy as np

from clients.inbox import (
    CHUNK_ROWS,
    Inbox,
    InboxSchema,
    IngestError,
    OnInvalid,
    Receipt,
    _positive,
    ingest,
    read_schema,
)
from clients.inbox_batches import _cut, _short
from clients.inbox_labels import read_label_file

_MAX_LINE = 1 << 20  # a JSON line longer than this is refused, so one line cannot fill memory
# ASCII only: Python's int()/float() also take "1_000", Arabic-Indic digits and "infinity".
_INT64_MAX = 2**63 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)
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
_LABEL_COLUMN = _column_re(r"(?:-?[0-9]{1,18}(?:\.0+)?)?")
# At most 18 digits keeps int() cheap and inside int64; longer cells take the careful path.
_TICK_COLUMN = _column_re(r"[0-9]{1,18}")


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
    (``tick`` optional as for CSV). An empty label cell, or a JSON line without
    ``y`` (or with ``"y": null``), is a row without a label: it is stored (label
    ``None`` here) and may get its label later (``--labels``). Consecutive rows of one tick form one batch,
    cut every ``chunk_rows`` rows; ticks must not go back.

    A label is a plain decimal integer: ``3`` or ``-1``, and also ``3.0``
    (``3.00``), because spreadsheet and pandas exports write an integer column
    that ever held a gap as floats. Anything else is refused wherever it
    appears: ``true``, ``[1]``, ``{}``, ``0x1``, ``3e0``,
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
        ys: list[int | None] = []
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
        missing = [not c.strip() for c in cells]
        if any(missing):
            cells = [c if c.strip() else "0" for c in cells]
        labels = [int(c.split(".")[0]) for c in cells] if any("." in c for c in cells) else list(map(int, cells))
        high = self.n_classes - 1 if self.strict and self.n_classes is not None else _INT64_MAX
        low = 0 if self.strict and self.n_classes is not None else -_INT64_MAX
        if min(labels) < low or max(labels) > high:
            return None
        if any(missing):
            # NaN is a row without a label (clients.validation); a class fits a float exactly.
            return ticks, x, np.where(missing, np.nan, np.asarray(labels, dtype=np.float64))  # type: ignore[return-value]
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

    def _label_text(self, value: str, lineno: int, where: str) -> int | None:
        text = value.strip()
        if not text:
            return None  # no label (yet)
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
        ys: list[int | None] = []
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
            if not isinstance(obj, dict) or "x" not in obj:
                raise self._error(lineno, "", "expected an object with 'x' (and 'y', its label, if known)")
            if not isinstance(obj["x"], list):
                raise self._error(lineno, ", field 'x'", "must be a list of numbers")
            tick = self._json_tick(obj.get("tick"), lineno)
            xs = [self._json_feature(v, lineno, f", field 'x[{i}]'") for i, v in enumerate(obj["x"])]
            if self.strict and self.n_features is not None and len(xs) != self.n_features:
                raise self._error(
                    lineno, ", field 'x'", f"{len(xs)} features, the inbox holds rows of {self.n_features}"
                )
            yield lineno, tick, xs, self._json_label(obj.get("y"), lineno)

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

    def _json_label(self, value: object, lineno: int) -> int | None:
        where = ", field 'y'"
        if value is None:
            return None  # no label (yet)
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
        description="Append samples (labelled or not), or late labels, to a device's ingest inbox (all or none).",
    )
    parser.add_argument("inbox", type=Path, help="inbox file, e.g. <run dir>/devices/device-0.inbox.sqlite")
    parser.add_argument("file", nargs="?", default="-", help="CSV or JSON-lines file; '-' for stdin")
    parser.add_argument(
        "--labels",
        action="store_true",
        help="FILE holds late labels (columns id,label; JSON {\"id\": .., \"y\": ..}) for earlier samples",
    )
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
        if args.labels:
            return _late_labels(args, fmt, name, stream)
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
    ids = (
        f"; sample ids {receipts[0].first_row}-{receipts[-1].first_row + receipts[-1].rows - 1} in file order"
        if receipts and receipts[0].first_row
        else ""
    )
    print(f"stored {stored} rows in {len(receipts)} batches ({span}); dropped {dropped}{ids}")
    return 0


def _late_labels(args: argparse.Namespace, fmt: Literal["csv", "jsonl"], name: str, stream: IO[bytes]) -> int:
    """``fedge-ingest INBOX FILE --labels``: store late labels by sample id (all or none)."""
    ids, labels = read_label_file(stream, fmt, name)
    with Inbox.open_existing(args.inbox) as inbox:
        receipt = inbox.append_labels(
            ids, labels, tick=args.tick, on_invalid="drop" if args.drop_invalid else "raise", source=name
        )
    print(f"stored {receipt.accepted} late labels (arriving at tick {receipt.tick}); dropped {receipt.dropped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

