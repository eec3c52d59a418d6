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
import io
import itertools
import sys
from collections.abc import Iterator, Sequence
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
    _targets,
    ingest,
    read_schema,
)
from clients.inbox_batches import _cut
from clients.inbox_labels import read_label_file
from clients.ingest_rows import _INT64_MAX, _Rows
from clients.targets import CLASS, Targets


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
    targets: Targets | None = CLASS,
) -> Iterator[tuple[int, Any, Any]]:
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
    targets : Targets or None, default class labels
        The kind of target to read (:mod:`clients.ingest_rows` names the columns):
        float or vector targets are numbers, an empty cell no label. None reads
        any numeric target, a number or a list (a folder scan, which then tells
        the kinds apart).

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
    parser = _Rows(name, default_tick, n_features, n_classes, strict, targets)
    arrays = targets is None or not targets.is_class
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
                    yield pending_tick, *_joined(pending, arrays)
                    pending, pending_rows = [], 0
                while a < b:  # fill each batch of a tick up to chunk_rows
                    take = b - a if chunk_rows is None else min(b - a, chunk_rows - pending_rows)
                    pending.append((x[a : a + take], ys[a : a + take]))
                    pending_tick, pending_rows, a = tick, pending_rows + take, a + take
                    if chunk_rows is not None and pending_rows >= chunk_rows:
                        yield pending_tick, *_joined(pending, arrays)
                        pending, pending_rows = [], 0
        if pending:
            yield pending_tick, *_joined(pending, arrays)
    finally:
        if wrapper is not None:
            # Leave the caller's binary stream open (a TextIOWrapper closes it when collected).
            with contextlib.suppress(ValueError):
                wrapper.detach()


def _joined(pieces: list[tuple[Any, Any]], arrays: bool = False) -> tuple[Any, Any]:
    xs = [x for x, _ in pieces]
    joined_x = np.concatenate(xs) if isinstance(xs[0], np.ndarray) else [r for x in xs for r in x]
    if arrays and all(isinstance(ys, np.ndarray) for _, ys in pieces):
        return joined_x, np.concatenate([ys for _, ys in pieces])  # float targets, parsed a column at a time
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
    targets: Targets | str | None = None,
) -> list[Receipt]:
    """Append a CSV or JSON-lines file to the inbox at ``path``, all or nothing, reading it in chunks.

    Parameters are those of :func:`iter_batches` and :func:`ingest`. A new inbox
    (``n_features`` and ``n_classes`` given, no file yet) is created only if the
    whole input is accepted; ``targets`` (default class labels) is the kind of
    target it holds (``n_classes`` may then be left out), and for an existing
    inbox it is checked against the one recorded.

    Raises
    ------
    IngestError
        The input or the inbox was refused; the inbox is as it was.
    """
    path = Path(path)
    kind = _targets(targets)
    if kind is not None and not kind.is_class and n_classes is None:
        n_classes = kind.size
    if path.exists():
        schema = read_schema(path)
        for given, have, what in ((n_features, schema.n_features, "features"), (n_classes, schema.n_classes, "classes")):
            if given is not None and int(given) != have:
                raise IngestError(f"ingest: {path} holds rows with {have} {what}, {given} were given")
        if kind is not None and kind != schema.targets:
            raise IngestError(f"ingest: {path} holds {schema.targets.describe()}, {kind.describe()} were given")
    elif n_features is None or n_classes is None:
        raise IngestError(f"ingest: no inbox at {path} (a new inbox needs the row width and classes)")
    else:
        schema = InboxSchema(_positive(n_features, "n_features"), _positive(n_classes, "n_classes"), kind or CLASS)
    batches = iter_batches(
        stream,
        fmt,
        default_tick,
        name,
        n_features=schema.n_features,
        n_classes=schema.n_classes,
        strict=on_invalid == "raise",
        chunk_rows=chunk_rows,
        targets=schema.targets,
    )
    return ingest(
        path,
        batches,
        n_features=schema.n_features,
        n_classes=schema.n_classes,
        on_invalid=on_invalid,
        source=name,
        targets=schema.targets,
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
        "--targets",
        help="kind of target (only to create a new inbox): class (default), float (a 'label' or 'target' "
        "column), vector:K (columns label_0 .. label_<K-1>; JSON \"y\": a list)",
    )
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
            targets=args.targets,
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
    with Inbox.open_existing(args.inbox) as inbox:
        ids, labels = read_label_file(stream, fmt, name, inbox.targets)
        receipt = inbox.append_labels(
            ids, labels, tick=args.tick, on_invalid="drop" if args.drop_invalid else "raise", source=name
        )
    print(f"stored {receipt.accepted} late labels (arriving at tick {receipt.tick}); dropped {receipt.dropped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

