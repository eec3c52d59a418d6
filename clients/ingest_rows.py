"""Reading CSV and JSON-lines samples line by line: ticks, features and targets, or a one-line refusal.

:func:`clients.ingest.iter_batches` cuts a file into blocks of rows and hands each to
:class:`Rows`, which parses it (a column at a time where every cell is plainly good,
row by row where one is not, so a bad cell is named by its line and column).

Targets
-------
Class labels sit in a ``label`` column (JSON ``"y"``): decimal integers. Float targets
sit in a ``label`` or ``target`` column (JSON ``"y"``: a number); vector targets of
``k`` values in columns ``label_0 .. label_<k-1>`` or ``target_0 .. target_<k-1>``
(JSON ``"y"``: a list of ``k`` numbers). An empty cell (every cell of a vector empty;
JSON ``null`` or no ``"y"``) is a row without a label.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from clients.inbox import IngestError
from clients.inbox_batches import _cut, _short
from clients.targets import CLASS, Targets

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
_TARGET_COLUMN = _column_re(f"(?:{_FLOAT}|{_NON_FINITE})?")
# At most 18 digits keeps int() cheap and inside int64; longer cells take the careful path.
_TICK_COLUMN = _column_re(r"[0-9]{1,18}")


class _JsonFloat(float):
    """A JSON number with a fraction or exponent, keeping its text (``3.0`` vs ``3e0``)."""

    text: str


def _json_float(text: str) -> _JsonFloat:
    value = _JsonFloat(text)
    value.text = text
    return value


_Block = tuple[list[int], list[int], Any, list[Any]]
"""Line numbers, ticks, rows (an array for CSV, lists for JSON lines) and labels."""


@dataclass(frozen=True)
class _Layout:
    label: int
    tick: int | None
    features: list[int]
    where: list[str]
    #: Every target column (one, or k for a vector target).
    targets: tuple[int, ...] = ()
    vector: bool = False


def _target_columns(header: list[str], targets: Targets | None, name: str, shown: str) -> tuple[list[int], bool]:
    """Where a float or vector target sits in a header, and whether it is a vector; or a one-line refusal."""
    for stem in ("label", "target"):
        if f"{stem}_0" in header:
            m = 0
            while f"{stem}_{m}" in header:
                m += 1
            if targets is not None and targets.kind != "vector":
                raise IngestError(f"ingest: {name}: the header has vector target columns ({stem}_0 ..), "
                                  f"the inbox holds {targets.describe()}: {shown}")
            if targets is not None and m != targets.size:
                raise IngestError(f"ingest: {name}: the header has {m} target columns ({stem}_0 ..), "
                                  f"the inbox holds {targets.describe()}: {shown}")
            return [header.index(f"{stem}_{i}") for i in range(m)], True
    found = [c for c in ("label", "target") if c in header]
    if not found:
        raise IngestError(f"ingest: {name}: the header has no 'label' or 'target' column: {shown}")
    if len(found) > 1 or header.count(found[0]) > 1:
        raise IngestError(f"ingest: {name}: the header has two target columns: {shown}")
    if targets is not None and targets.kind == "vector":
        raise IngestError(f"ingest: {name}: the header has one target column {found[0]!r}, the inbox holds "
                          f"{targets.describe()} (columns label_0 .. label_{targets.size - 1}): {shown}")
    return [header.index(found[0])], False


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
        targets: Targets | None = CLASS,
    ) -> None:
        self.name = name
        self.default_tick = default_tick
        self.n_features = n_features
        self.n_classes = n_classes
        self.strict = strict
        #: None: any numeric target (a number or a list of numbers), as a folder scan reads them.
        self.targets = targets

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
        if self.targets is CLASS or (self.targets is not None and self.targets.is_class):
            if "label" not in header:
                raise IngestError(f"ingest: {self.name}: the header has no 'label' column: {shown}")
            columns, vector = [header.index("label")], False
        else:
            columns, vector = _target_columns(header, self.targets, self.name, shown)
        for column in ("label", "tick"):
            if header.count(column) > 1:
                raise IngestError(f"ingest: {self.name}: the header has two '{column}' columns: {shown}")
        layout = _Layout(
            label=columns[0],
            tick=header.index("tick") if "tick" in header else None,
            features=[i for i, h in enumerate(header) if h != "tick" and i not in columns],
            where=[f", column {i + 1} ({_cut(h, 30)})" for i, h in enumerate(header)],
            targets=tuple(columns),
            vector=vector,
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
            if self._numeric:
                ys.append(self._target_cells(row, layout, lineno))
            else:
                ys.append(self._label_text(row[layout.label], lineno, where[layout.label]))
        return lines, ticks, np.asarray(xs, dtype=np.float64).reshape(len(rows), -1), ys

    @property
    def _numeric(self) -> bool:
        """Whether targets are read as numbers (float, vector, or a scan's any), not class labels."""
        return self.targets is None or not self.targets.is_class

    def _target_cells(self, row: list[str], layout: _Layout, lineno: int) -> Any:
        """One row's float target (a vector: a list; all cells empty: None)."""
        values = []
        for i in layout.targets:
            text = row[i].strip()
            if not text:
                values.append(math.nan)
            elif _FLOAT_RE.fullmatch(text) or _NON_FINITE_RE.fullmatch(text):
                values.append(self._target_finite(float(text), lineno, layout.where[i], text))
            else:
                raise self._error(lineno, layout.where[i], f"target {_short(row[i])} is not a number")
        if all(math.isnan(v) for v in values):
            return None
        return values if layout.vector else values[0]

    def _target_finite(self, number: float, lineno: int, where: str, text: str) -> float:
        if self.strict and not math.isnan(number) and not (math.isfinite(number) and abs(number) <= _FLOAT32_MAX):
            raise self._error(lineno, where, f"target {_short(text)} is not a finite 32-bit number")
        return number

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
        if self._numeric:
            y = np.empty((n, len(layout.targets)), dtype=np.float64)
            for j, i in enumerate(layout.targets):
                cells = [r[i] for r in rows]
                if not _whole_column(_TARGET_COLUMN, cells):
                    return None
                y[:, j] = [float(c) if c.strip() else math.nan for c in cells]
            with np.errstate(invalid="ignore"):
                if self.strict and not (np.isnan(y) | (np.isfinite(y) & (np.abs(y) <= _FLOAT32_MAX))).all():
                    return None
            return ticks, x, y if layout.vector else y[:, 0]  # type: ignore[return-value]
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

    def _jsonl(self, text: IO[str]) -> Iterator[tuple[int, int, list[float], Any]]:
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
            y = self._json_target(obj.get("y"), lineno) if self._numeric else self._json_label(obj.get("y"), lineno)
            yield lineno, tick, xs, y

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

    def _json_target(self, value: object, lineno: int) -> Any:
        """A float target (a number) or a vector one (a list of numbers); None: no label."""
        where = ", field 'y'"
        if value is None:
            return None
        vector = isinstance(value, list)
        kind = self.targets.kind if self.targets is not None else None
        if vector and kind == "float" or not vector and kind == "vector":
            assert self.targets is not None
            raise self._error(lineno, where, f"{_short(value)} is not one of the inbox's {self.targets.describe()}")
        items = value if isinstance(value, list) else [value]
        if self.strict and kind == "vector" and self.targets is not None and len(items) != self.targets.size:
            raise self._error(lineno, where, f"{len(items)} values, the inbox holds {self.targets.describe()}")
        numbers = []
        for v in items:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise self._error(lineno, where, f"target {_short(value)} is not a number or a list of numbers")
            try:
                number = float(v)
            except OverflowError:
                number = math.inf
            numbers.append(self._target_finite(number, lineno, where, getattr(v, "text", None) or _short(v)))
        return numbers if vector else numbers[0]

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
