"""Data sources a device application feeds its ingest inbox from: a folder of files, or Python.

A device's data often sits in files already: one folder per device holding CSV, JSON
lines, NumPy ``.npz`` or Parquet files, or one such file. :class:`FolderSource` reads
them in name order as that device's stream; a stream produced by code (a sensor
driver, a message queue) is any object with the :class:`DataSource` interface.
:func:`feed` appends a source's batches to the device's inbox, only the ticks the
inbox does not hold yet, so feeding again after new files arrived stores only them.

Files
-----
``*.csv``, ``*.jsonl``
    As ``fedge-ingest`` reads them (:func:`clients.ingest.iter_batches`): a
    ``label`` column (``"y"`` in JSON), optionally ``tick``, every other column a
    feature. Float targets may sit in a ``label`` or ``target`` column, vector
    targets of ``k`` values in ``label_0 .. label_<k-1>`` (or ``target_<i>``;
    JSON ``"y"``: a list of ``k`` numbers).
``*.npz``
    Arrays ``x`` (``(n, ...)``: rows, images or multichannel windows, flattened to
    ``(n, features)`` in C order), ``y`` (``(n,)`` integer labels, or floats with NaN
    for rows without a label; ``(n, k)`` floats for vector targets) and optionally
    ``tick`` (``(n,)``). Read with ``allow_pickle=False``: an object array is refused.
``*.parquet``
    Columns ``label`` (or ``target``; null: no label), or ``label_0 .. label_<k-1>``
    for vector targets, optionally ``tick``, every other column a numeric feature,
    read a row group at a time (needs ``pyarrow``).

Targets
-------
The kind of target a device's rows hold (class labels, float or vector targets,
:mod:`clients.targets`) is the task's: :class:`FolderSource` reads files as the
``targets`` it is given, and :meth:`FolderSource.scan` reports what the files hold
(vectors, numbers with a fraction, or whole numbers that may be classes), so the
configuration can refuse data that does not fit the task in one line.

Rows without a label are stored like any other (never rejected) and monitored
without labels; a label that comes later names the row by its sample id.

Rows without a tick take the tick after the previous file's last one (0 for the
first file), so a folder of one file per tick needs no tick column.

Examples
--------
>>> import tempfile
>>> folder = Path(tempfile.mkdtemp())
>>> np.savez(folder / "000.npz", x=np.zeros((3, 1, 2, 2)), y=[0, 1, 1])
>>> np.savez(folder / "001.npz", x=np.ones((2, 1, 2, 2)), y=[1, 0])
>>> source = FolderSource(folder)
>>> [(tick, x.shape, y.tolist()) for tick, x, y in source.batches()]
[(0, (3, 4), [0, 1, 1]), (1, (2, 4), [1, 0])]
>>> source.scan()
SourceShape(n_features=4, n_classes=2, n_ticks=2, n_rows=5, targets=Targets(kind='class', size=1))
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from clients.inbox import CHUNK_ROWS, Inbox, IngestError, Receipt, ingest
from clients.targets import CLASS, FLOAT, Targets

SUFFIXES = (".csv", ".jsonl", ".npz", ".parquet")
log = logging.getLogger("fedge.device")

Batch = tuple[int, Any, Any]


@dataclass(frozen=True)
class SourceShape:
    """What a scan of a source found: row width, classes (largest label + 1), ticks, rows, targets.

    ``targets`` is vector targets when the files hold vectors, float targets when a
    value has a fraction, and class labels when every value is a whole number (which
    a regression may still read as numbers); ``n_classes`` is then the largest + 1
    (for float and vector targets: the values per row, 1 or ``k``).
    """

    n_features: int
    n_classes: int
    n_ticks: int
    n_rows: int
    targets: Targets = CLASS


@runtime_checkable
class DataSource(Protocol):
    """One device's stream of ``(tick, x, y)`` batches, ticks never going back.

    ``x`` is ``(n, features)`` (or ``(n, ...)``, flattened), ``y`` one target per
    row of the task's kind: an integer label, a number (float targets), or ``k``
    numbers (vector targets, ``(n, k)``); ``None`` or NaN for no label. A source
    may be endless; :func:`feed` takes what it yields.
    """

    def batches(self) -> Iterable[Batch]:
        """The batches, oldest first."""
        ...


class FolderSource:
    """A device's files (a folder of them, or one file), read in name order.

    Parameters
    ----------
    path : Path
        A folder of ``*.csv``, ``*.jsonl``, ``*.npz`` or ``*.parquet`` files (others
        are ignored; sub-folders are not read), or one such file.
    targets : Targets, default class labels
        The kind of target to read (see the module docstring).

    Raises
    ------
    IngestError
        ``path`` does not exist, or holds no data file.
    """

    def __init__(self, path: Path, targets: Targets = CLASS) -> None:
        self.path = Path(path)
        self.targets = targets
        if self.path.is_dir():
            files = sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
        elif self.path.is_file() and self.path.suffix in SUFFIXES:
            files = [self.path]
        elif self.path.exists():
            raise IngestError(f"ingest: {self.path} is not a data file (known: {', '.join(SUFFIXES)})")
        else:
            raise IngestError(f"ingest: {self.path} does not exist")
        if not files:
            raise IngestError(f"ingest: {self.path} holds no data file ({', '.join(SUFFIXES)})")
        self.files = files

    def batches(self) -> Iterator[Batch]:
        """Every file's batches in name order; tickless rows follow the previous file."""
        return self._batches(self.targets)

    def _batches(self, targets: Targets | None) -> Iterator[Batch]:
        """As :meth:`batches`, reading targets as ``targets`` (None: any numbers, for :meth:`scan`)."""
        last = -1
        for path in self.files:
            for tick, x, y in _read(path, last + 1, targets):
                last = max(last, tick)
                yield tick, x, y

    def scan(self) -> SourceShape:
        """Read everything once: width, classes, ticks, rows and targets (nothing is kept in memory).

        Raises
        ------
        IngestError
            A file cannot be read, holds rows of two widths, or targets of two lengths.
        """
        width: int | None = None
        top, ticks, rows, size, fraction = -1, -1, 0, 0, False
        for tick, x, y in self._batches(None):
            x = _flat(np.asarray(x, dtype=np.float64))
            labels = _as_numbers(y, self.path)
            if not len(labels):
                continue
            if width is None:
                width = x.shape[1]
            elif x.shape[1] != width:
                raise IngestError(f"ingest: {self.path}: rows of {x.shape[1]} features after rows of {width}")
            k = labels.shape[1] if labels.ndim == 2 else 0
            if rows and k != size:
                raise IngestError(f"ingest: {self.path}: rows with {_count(k)} after rows with {_count(size)}")
            size = k
            known = labels[np.isfinite(labels)]
            fraction = fraction or bool((np.floor(known) != known).any())
            # A negative label is a bad row (dropped and counted when fed), not a class.
            if not size and len(known):
                top = max(top, int(known.max()))
            ticks, rows = max(ticks, tick), rows + len(labels)
        if width is None:
            raise IngestError(f"ingest: {self.path} holds no rows")
        targets = Targets("vector", size) if size else FLOAT if fraction else CLASS
        # For float and vector targets, "classes" is the values per row, as an inbox records it.
        return SourceShape(width, targets.size if not targets.is_class else top + 1, ticks + 1, rows, targets)

    def __repr__(self) -> str:
        return f"FolderSource({str(self.path)!r}, files={len(self.files)})"


def feed(
    source: DataSource,
    inbox: Path,
    *,
    n_features: int,
    n_classes: int,
    through_tick: int | None = None,
    source_name: str = "",
    targets: Targets = CLASS,
) -> list[Receipt]:
    """Append what ``source`` yields after the inbox's last tick (all of it or none).

    Bad rows (non-finite, wrong width, unknown label) are dropped and counted, as
    the device's drift report then shows; a malformed file is refused whole.

    Parameters
    ----------
    source : DataSource
        The device's stream.
    inbox : Path
        The device's inbox (created with the schema if missing).
    n_features, n_classes : int
        The schema.
    through_tick : int, optional
        Stop after this tick (a source may be endless).
    source_name : str, default ""
        Kept with each batch (default: the source's ``repr``).
    targets : Targets, default class labels
        The kind of target the rows hold (the inbox's, recorded when it is created).

    Returns
    -------
    list of Receipt
        One per stored batch.
    """
    inbox = Path(inbox)
    last = -1
    if inbox.exists():
        with Inbox(inbox, n_features=n_features, n_classes=n_classes, targets=targets) as box:
            last = box.last_tick
    name = source_name or repr(source)

    def fresh() -> Iterator[Batch]:
        for tick, x, y in source.batches():
            if through_tick is not None and tick > through_tick:
                return
            if tick > last:
                yield tick, _flat(np.asarray(x, dtype=np.float64)), y

    return ingest(
        inbox, fresh(), n_features=n_features, n_classes=n_classes, on_invalid="drop", source=name,
        targets=targets,
    )


def _flat(x: np.ndarray) -> np.ndarray:
    """Rows of any fixed shape as flat rows (C order, as a task's ``INPUT_SHAPE`` undoes)."""
    if x.ndim == 1:
        return x.reshape(len(x), 1) if x.size else x.reshape(0, 0)
    return x.reshape(len(x), -1)


def _as_numbers(y: Any, path: Path) -> np.ndarray:
    """A batch's targets as float64, ``(n,)`` or ``(n, k)``, NaN for none; rows of two lengths refused."""
    if isinstance(y, np.ndarray) and y.dtype.kind in "iuf":
        return y.astype(np.float64)
    items = list(y)
    lengths = {len(v) for v in items if isinstance(v, list | tuple | np.ndarray)}
    if len(lengths) > 1:
        raise IngestError(f"ingest: {path}: targets of different lengths {sorted(lengths)}")
    if lengths:
        (k,) = lengths
        if any(not isinstance(v, list | tuple | np.ndarray) and v is not None for v in items):
            raise IngestError(f"ingest: {path}: numbers and lists of {k} numbers as targets")
        return np.asarray([[np.nan] * k if v is None else v for v in items], dtype=np.float64)
    return np.asarray([np.nan if v is None else v for v in items], dtype=np.float64)


def _count(k: int) -> str:
    return f"{k} target values" if k else "one target value"


def _read(path: Path, next_tick: int, targets: Targets | None) -> Iterator[Batch]:
    if path.suffix in (".csv", ".jsonl"):
        from clients.ingest import iter_batches

        with path.open("rb") as stream:
            yield from iter_batches(
                stream, path.suffix[1:], next_tick, path.name, strict=False, targets=targets  # type: ignore[arg-type]
            )
    elif path.suffix == ".npz":
        yield from _read_npz(path, next_tick, targets)
    else:
        yield from _read_parquet(path, next_tick, targets)


def _read_npz(path: Path, next_tick: int, targets: Targets | None) -> Iterator[Batch]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [k for k in ("x", "y") if k not in arrays.files]
            if missing:
                raise IngestError(f"ingest: {path.name} has no array {missing[0]!r} (needs x and y)")
            x, y = arrays["x"], arrays["y"]
            tick = arrays["tick"] if "tick" in arrays.files else None
    except (OSError, ValueError) as exc:
        if isinstance(exc, IngestError):
            raise
        raise IngestError(f"ingest: {path.name} cannot be read as .npz ({str(exc)[:120]})") from None
    if x.dtype.kind not in "biuf" or y.dtype.kind not in "iuf":
        raise IngestError(
            f"ingest: {path.name}: x must be numeric and y integer labels (NaN: none), got {x.dtype} and {y.dtype}"
        )
    vector = targets is None or targets.kind == "vector"
    if y.ndim == 2 and y.shape[1] == 1 and not (targets is not None and targets.kind == "vector"):
        y = y[:, 0]  # a column: one value per row
    if y.ndim not in (1, 2) or (y.ndim == 2 and not vector):
        what = targets.describe() if targets is not None else "targets"
        raise IngestError(f"ingest: {path.name}: y has shape {y.shape}, the inbox holds {what}")
    if len(x) != len(y) or (tick is not None and len(tick) != len(y)):
        raise IngestError(f"ingest: {path.name}: x, y (and tick) have different lengths")
    x = _flat(x)
    yield from _split_ticks(path.name, x, y, tick, next_tick)


def _split_ticks(name: str, x: Any, y: Any, tick: Any, next_tick: int) -> Iterator[Batch]:
    if tick is None:
        for a in range(0, len(y), CHUNK_ROWS):
            yield next_tick, x[a : a + CHUNK_ROWS], y[a : a + CHUNK_ROWS]
        return
    tick = np.asarray(tick)
    if tick.dtype.kind not in "iu" or (len(tick) and (np.diff(tick) < 0).any()) or (len(tick) and tick.min() < 0):
        raise IngestError(f"ingest: {name}: tick must be non-negative integers that never go back")
    edges = [0, *(np.flatnonzero(tick[1:] != tick[:-1]) + 1).tolist(), len(tick)]
    for a, b in itertools.pairwise(edges):
        for c in range(a, b, CHUNK_ROWS):
            d = min(b, c + CHUNK_ROWS)
            yield int(tick[a]), x[c:d], y[c:d]


def _read_parquet(path: Path, next_tick: int, targets: Targets | None) -> Iterator[Batch]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow ships with the tracking extra
        raise IngestError(f"ingest: {path.name}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        handle = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001  # pyarrow raises its own types for a bad file
        raise IngestError(f"ingest: {path.name} cannot be read as Parquet ({str(exc)[:120]})") from None
    names = handle.schema_arrow.names
    label = _parquet_targets(names, targets, path.name)
    features = [n for n in names if n not in (*label, "tick")]
    for group in handle.iter_batches(batch_size=CHUNK_ROWS):
        columns = {n: group.column(n).to_numpy(zero_copy_only=False) for n in group.schema.names}
        try:
            x = np.column_stack([np.asarray(columns[n], dtype=np.float64) for n in features])
        except (TypeError, ValueError):
            raise IngestError(f"ingest: {path.name}: every column but label and tick must be numeric") from None
        ys = []
        for name in label:
            y = columns[name]
            if y.dtype.kind == "O" and all(v is None or isinstance(v, int | float) for v in y):
                y = np.asarray([np.nan if v is None else v for v in y], dtype=np.float64)
            if y.dtype.kind not in "iuf":
                raise IngestError(f"ingest: {path.name}: {name} must be numbers (null: none), got {y.dtype}")
            ys.append(y)
        y = ys[0] if len(label) == 1 and not label[0].endswith("_0") else np.column_stack(ys).astype(np.float64)
        yield from _split_ticks(path.name, x, y, columns.get("tick"), next_tick)


def _parquet_targets(names: list[str], targets: Targets | None, file: str) -> list[str]:
    """The target columns of a Parquet file: ``label`` (or ``target``), or ``label_0 ..`` for a vector."""
    for stem in ("label", "target"):
        k = 0
        while f"{stem}_{k}" in names:
            k += 1
        if k and (targets is None or targets.kind == "vector"):
            if targets is not None and k != targets.size:
                raise IngestError(f"ingest: {file} has {k} target columns, the inbox holds {targets.describe()}")
            return [f"{stem}_{i}" for i in range(k)]
    if targets is not None and targets.kind == "vector":
        raise IngestError(f"ingest: {file} has no columns label_0 .. label_{targets.size - 1}")
    found: list[str] = [
        n for n in ("label", "target") if n in names and (n == "label" or targets is None or not targets.is_class)
    ]
    if not found:
        raise IngestError(f"ingest: {file} has no 'label' column")
    return found[:1]
