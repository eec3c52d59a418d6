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
    feature.
``*.npz``
    Arrays ``x`` (``(n, ...)``: rows, images or multichannel windows, flattened to
    ``(n, features)`` in C order), ``y`` (``(n,)`` integer labels, or floats with NaN
    for rows without a label) and optionally
    ``tick`` (``(n,)``). Read with ``allow_pickle=False``: an object array is refused.
``*.parquet``
    Columns ``label`` (null: no label), optionally ``tick``, every other column a
    numeric feature, read a row group at a time (needs ``pyarrow``).

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
SourceShape(n_features=4, n_classes=2, n_ticks=2, n_rows=5)
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

SUFFIXES = (".csv", ".jsonl", ".npz", ".parquet")
log = logging.getLogger("fedge.device")

Batch = tuple[int, Any, Any]


@dataclass(frozen=True)
class SourceShape:
    """What a scan of a source found: row width, classes (largest label + 1), ticks, rows."""

    n_features: int
    n_classes: int
    n_ticks: int
    n_rows: int


@runtime_checkable
class DataSource(Protocol):
    """One device's stream of ``(tick, x, y)`` batches, ticks never going back.

    ``x`` is ``(n, features)`` (or ``(n, ...)``, flattened), ``y`` one integer label
    per row. A source may be endless; :func:`feed` takes what it yields.
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

    Raises
    ------
    IngestError
        ``path`` does not exist, or holds no data file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
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
        last = -1
        for path in self.files:
            for tick, x, y in _read(path, last + 1):
                last = max(last, tick)
                yield tick, x, y

    def scan(self) -> SourceShape:
        """Read everything once: width, classes, ticks and rows (nothing is kept in memory).

        Raises
        ------
        IngestError
            A file cannot be read, or holds rows of two widths.
        """
        width: int | None = None
        top, ticks, rows = -1, -1, 0
        for tick, x, y in self.batches():
            x = _flat(np.asarray(x, dtype=np.float64))
            labels = (
                np.asarray(y, dtype=np.float64)
                if isinstance(y, np.ndarray)
                else np.asarray([np.nan if v is None else v for v in y], dtype=np.float64)
            )
            if not len(labels):
                continue
            if width is None:
                width = x.shape[1]
            elif x.shape[1] != width:
                raise IngestError(f"ingest: {self.path}: rows of {x.shape[1]} features after rows of {width}")
            # A negative label is a bad row (dropped and counted when fed), not a class.
            if not np.isnan(labels).all():
                top = max(top, int(np.nanmax(labels)))
            ticks, rows = max(ticks, tick), rows + len(labels)
        if width is None:
            raise IngestError(f"ingest: {self.path} holds no rows")
        return SourceShape(width, top + 1, ticks + 1, rows)

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

    Returns
    -------
    list of Receipt
        One per stored batch.
    """
    inbox = Path(inbox)
    last = -1
    if inbox.exists():
        with Inbox(inbox, n_features=n_features, n_classes=n_classes) as box:
            last = box.last_tick
    name = source_name or repr(source)

    def fresh() -> Iterator[Batch]:
        for tick, x, y in source.batches():
            if through_tick is not None and tick > through_tick:
                return
            if tick > last:
                yield tick, _flat(np.asarray(x, dtype=np.float64)), y

    return ingest(
        inbox, fresh(), n_features=n_features, n_classes=n_classes, on_invalid="drop", source=name
    )


def _flat(x: np.ndarray) -> np.ndarray:
    """Rows of any fixed shape as flat rows (C order, as a task's ``INPUT_SHAPE`` undoes)."""
    if x.ndim == 1:
        return x.reshape(len(x), 1) if x.size else x.reshape(0, 0)
    return x.reshape(len(x), -1)


def _read(path: Path, next_tick: int) -> Iterator[Batch]:
    if path.suffix in (".csv", ".jsonl"):
        from clients.ingest import iter_batches

        with path.open("rb") as stream:
            yield from iter_batches(
                stream, path.suffix[1:], next_tick, path.name, strict=False  # type: ignore[arg-type]
            )
    elif path.suffix == ".npz":
        yield from _read_npz(path, next_tick)
    else:
        yield from _read_parquet(path, next_tick)


def _read_npz(path: Path, next_tick: int) -> Iterator[Batch]:
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


def _read_parquet(path: Path, next_tick: int) -> Iterator[Batch]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow ships with the tracking extra
        raise IngestError(f"ingest: {path.name}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        handle = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001  # pyarrow raises its own types for a bad file
        raise IngestError(f"ingest: {path.name} cannot be read as Parquet ({str(exc)[:120]})") from None
    names = handle.schema_arrow.names
    if "label" not in names:
        raise IngestError(f"ingest: {path.name} has no 'label' column")
    features = [n for n in names if n not in ("label", "tick")]
    for group in handle.iter_batches(batch_size=CHUNK_ROWS):
        columns = {n: group.column(n).to_numpy(zero_copy_only=False) for n in group.schema.names}
        try:
            x = np.column_stack([np.asarray(columns[n], dtype=np.float64) for n in features])
        except (TypeError, ValueError):
            raise IngestError(f"ingest: {path.name}: every column but label and tick must be numeric") from None
        y = columns["label"]
        if y.dtype.kind == "O" and all(v is None or isinstance(v, int) for v in y):
            y = np.asarray([np.nan if v is None else v for v in y], dtype=np.float64)
        if y.dtype.kind not in "iuf":
            raise IngestError(f"ingest: {path.name}: label must be integers (null: none), got {y.dtype}")
        yield from _split_ticks(path.name, x, y, columns.get("tick"), next_tick)
