"""Late labels in the ingest inbox: a label for a sample that was ingested earlier.

Every row an inbox stores has a sample id (its :class:`clients.inbox.Receipt` says
which: ``first_row .. first_row + rows - 1`` in input order). When the label of such a
row becomes known later (an operator's verdict, a delayed sensor, a returned parcel),
the device application appends ``(sample id, label)`` pairs with
:meth:`clients.inbox.Inbox.append_labels` or ``fedge-ingest INBOX --labels FILE``. The
device takes them at the tick they arrived for, scores each sample with the prediction
its model made when the sample arrived, and feeds the label-based detector in arrival
order.

A label batch is one sealed record (AES-256-GCM under the inbox's key, bound to its row,
tick and count): ids and labels together, so a stolen inbox holds neither in the clear.

Label files
-----------
CSV with a header holding ``id`` and ``label`` columns (others are ignored), or JSON
lines ``{"id": 17, "y": 1}``. An id is a positive integer the inbox has issued; a label
is one of the inbox's classes. An inbox of float targets takes a number (``label`` or
``target`` column, ``"y": 0.37``); one of vector targets ``k`` numbers (columns
``label_0 .. label_<k-1>`` or ``target_0 ..``, ``"y": [0.1, 2.5]``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from clients.crypto import RecordAuthenticationError, RecordCipher
from clients.inbox_batches import IngestError, OnInvalid, _short
from clients.targets import CLASS, Targets, check_values

LABELS_TABLE = (
    "CREATE TABLE IF NOT EXISTS labels ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " tick INTEGER NOT NULL,"
    " n INTEGER NOT NULL,"
    " record BLOB NOT NULL,"
    " source TEXT NOT NULL,"
    " received REAL NOT NULL)"
)
_INT64_MAX = 2**63 - 1
log = logging.getLogger("fedge.device")


@dataclass(frozen=True)
class LabelReceipt:
    """What :meth:`clients.inbox.Inbox.append_labels` stored.

    Parameters
    ----------
    batch_id : int
        Id of the stored label batch (0: nothing was stored).
    tick : int
        The tick the labels arrived at (the device takes them when it monitors it).
    accepted : int
        Labels stored.
    dropped : int
        Labels dropped as malformed (only with ``on_invalid="drop"``).
    """

    batch_id: int
    tick: int
    accepted: int
    dropped: int = 0


@dataclass(frozen=True)
class LateLabels:
    """Labels a device took from its inbox, in arrival order.

    Parameters
    ----------
    last_id : int
        Id of the newest label batch included (the reader's next cursor); 0 if none.
    ticks, ids, labels : numpy.ndarray
        Per label: the tick it arrived at, its sample id and the label (``int64``
        class, or ``float32`` values ``(n,)`` / ``(n, k)``: the inbox's targets).
    unauthenticated : int
        Labels of batches that failed authentication (changed on disk): skipped.
    """

    last_id: int
    ticks: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    unauthenticated: int = 0

    @property
    def empty(self) -> bool:
        """Whether no label batch was taken."""
        return self.last_id == 0


def check_labels(
    ids: Sequence[Any] | np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    n_classes: int,
    last_row: int,
    on_invalid: OnInvalid,
    targets: Targets = CLASS,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The well-formed ``(id, label)`` pairs; a bad one raises (``"raise"``) or is dropped.

    An id must be one the inbox has issued (``1 .. last_row``) and a label one of the
    classes (float or vector targets: finite numbers, ``k`` of them for a vector);
    whether the sample is still in the device's window is the device's to say.
    """
    if on_invalid not in ("raise", "drop"):
        raise IngestError(f"ingest: on_invalid={on_invalid!r} is not allowed; allowed: raise, drop")
    try:
        pairs = list(zip(ids, labels, strict=True))
    except (TypeError, ValueError):
        raise IngestError("ingest: late labels need one sample id per label") from None
    good_ids: list[int] = []
    good_labels: list[Any] = []
    for i, (sample, label) in enumerate(pairs):
        problem = None
        value: Any = label
        if not _is_int(sample) or not 1 <= int(sample) <= last_row:
            problem = f"sample id {_short(sample)} was never issued by this inbox (ids are 1..{last_row})"
        elif targets.is_class:
            if not _is_int(label) or not 0 <= int(label) < n_classes:
                problem = f"label {_short(label)} is not one of the classes 0..{n_classes - 1}"
            else:
                value = int(label)
        else:
            value = _late_value(label, targets)
            if value is None:
                problem = f"label {_short(label)} is not one of the inbox's {targets.describe()}"
        if problem is None:
            good_ids.append(int(sample))
            good_labels.append(value)
        elif on_invalid == "raise":
            raise IngestError(f"ingest: late label {i}: {problem}; nothing from this call was stored")
    labels_out = (
        np.asarray(good_labels, dtype=np.int64)
        if targets.is_class
        else np.asarray(good_labels, dtype=np.float32).reshape(targets.shape(len(good_labels)))
    )
    return np.asarray(good_ids, dtype=np.int64), labels_out, len(pairs) - len(good_ids)


def _late_value(label: object, targets: Targets) -> np.ndarray | None:
    """A late float or vector target's values; None if it is not a (complete, finite) target."""
    if isinstance(label, np.ndarray) and label.ndim == 0:
        label = label.item()
    try:
        values, bad = check_values([label], 1, targets)
    except ValueError:
        return None
    if bad[0] or targets.missing(values)[0]:
        return None  # a late label is a label: "no target" is not one
    return values[0]


def _is_int(value: object) -> bool:
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, int | np.integer):
        return abs(int(value)) <= _INT64_MAX
    return isinstance(value, float) and value.is_integer() and abs(value) <= 2**53


def _aad(batch_id: int, tick: int, n: int) -> bytes:
    return b"fedge-inbox-labels|%d|%d|%d" % (batch_id, tick, n)


def store_labels(
    conn: sqlite3.Connection,
    cipher: RecordCipher,
    tick: int,
    ids: np.ndarray,
    labels: np.ndarray,
    source: str,
    now: float,
    targets: Targets = CLASS,
) -> int:
    """Seal and insert one label batch (the caller holds the write transaction); its id."""
    (top,) = conn.execute(
        "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'labels'), 0),"
        " COALESCE((SELECT MAX(id) FROM labels), 0))"
    ).fetchone()
    batch_id = int(top) + 1
    n = len(ids)
    plain = np.ascontiguousarray(ids, dtype="<i8").tobytes() + targets.encode(labels)
    conn.execute(
        "INSERT INTO labels (id, tick, n, record, source, received) VALUES (?, ?, ?, ?, ?, ?)",
        (batch_id, tick, n, cipher.seal(plain, _aad(batch_id, tick, n)), source, now),
    )
    return batch_id


def take_labels(
    conn: sqlite3.Connection,
    cipher: RecordCipher,
    after: int,
    through_tick: int | None,
    targets: Targets = CLASS,
) -> tuple[LateLabels, list[tuple[int, int, str]]]:
    """Label batches newer than ``after`` up to ``through_tick``; and those that did not open."""
    query = "SELECT id, tick, n, record FROM labels WHERE id > ?"
    params: list[int] = [int(after)]
    if through_tick is not None:
        query += " AND tick <= ?"
        params.append(int(through_tick))
    ticks: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    failed: list[tuple[int, int, str]] = []
    last = 0
    for batch_id, tick, n, record in conn.execute(query + " ORDER BY id", params).fetchall():
        last = int(batch_id)
        try:
            plain = cipher.open(bytes(record), _aad(batch_id, tick, n))
            if len(plain) != (8 + targets.itemsize) * n:
                raise RecordAuthenticationError("the label batch does not hold its count")
        except RecordAuthenticationError as exc:
            failed.append((int(batch_id), int(n), str(exc)))
            continue
        ticks.append(np.full(n, int(tick), dtype=np.int64))
        ids.append(np.frombuffer(plain, dtype="<i8", count=n).astype(np.int64))
        labels.append(targets.decode(plain[8 * n :], n))
    empty = np.zeros(0, dtype=np.int64)
    at, names = (np.concatenate(a) if a else empty.copy() for a in (ticks, ids))
    values = np.concatenate(labels) if labels else targets.empty()
    return LateLabels(last, at, names, values, sum(f[1] for f in failed)), failed


def read_label_file(
    stream: IO[str] | IO[bytes],
    fmt: Literal["csv", "jsonl"],
    name: str = "<input>",
    targets: Targets = CLASS,
) -> tuple[list[int], list[Any]]:
    """Sample ids and labels of a label file; anything unreadable is one line naming the line.

    Range checks (ids the inbox issued, known classes, finite values) are
    :func:`check_labels`'s. With float or vector ``targets`` a label is read as
    numbers (see the module docstring for the columns).
    """
    text: IO[str] = (
        io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")  # type: ignore[arg-type, type-var]
        if isinstance(stream.read(0), bytes)
        else stream  # type: ignore[assignment]
    )
    ids: list[int] = []
    labels: list[Any] = []
    try:
        if fmt == "csv":
            reader = csv.reader(text)
            header = [h.strip() for h in next(reader, [])]
            columns = _label_columns(header, targets)
            if "id" not in header or columns is None:
                wanted = "'label'" if targets.kind == "class" else "a target column (see fedge-ingest --help)"
                raise IngestError(f"ingest: {name}: a label file needs 'id' and {wanted} columns")
            at_id = header.index("id")
            for row in reader:
                if not "".join(row).strip():
                    continue
                where = f"ingest: {name} line {reader.line_num}"
                if len(row) != len(header):
                    raise IngestError(f"{where}: {len(row)} fields, the header has {len(header)}")
                ids.append(_whole(row[at_id], f"{where}, column 'id'"))
                if targets.is_class:
                    labels.append(_whole(row[columns[0]], f"{where}, column 'label'"))
                else:
                    cells = [_decimal(row[c], f"{where}, column {header[c]!r}") for c in columns]
                    labels.append(cells if targets.kind == "vector" else cells[0])
        else:
            for lineno, line in enumerate(text, start=1):
                if not line.strip():
                    continue
                where = f"ingest: {name} line {lineno}"
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise IngestError(f"{where}: not JSON") from None
                if not isinstance(obj, dict) or "id" not in obj or "y" not in obj:
                    raise IngestError(f"{where}: expected an object with 'id' and 'y'")
                ids.append(_whole(obj["id"], f"{where}, field 'id'"))
                labels.append(_whole(obj["y"], f"{where}, field 'y'") if targets.is_class else obj["y"])
    except UnicodeDecodeError as exc:
        raise IngestError(f"ingest: {name}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise IngestError(f"ingest: {name}: not readable as CSV ({exc})") from None
    finally:
        if text is not stream:
            text.detach()  # type: ignore[attr-defined]  # leave the caller's stream open
    return ids, labels


def _label_columns(header: list[str], targets: Targets) -> list[int] | None:
    """Where a label file's label sits: one column (``label``/``target``) or ``k`` (``label_<i>``)."""
    if targets.kind != "vector":
        names = ("label",) if targets.is_class else ("label", "target")
        found = [header.index(n) for n in names if n in header]
        return found[:1] or None
    for stem in ("label", "target"):
        wanted = [f"{stem}_{i}" for i in range(targets.size)]
        if all(w in header for w in wanted):
            return [header.index(w) for w in wanted]
    return None


def _decimal(value: str, where: str) -> float:
    """A decimal number's text as a float (empty: NaN, which the range checks refuse)."""
    text = value.strip()
    try:
        number = float(text) if text and text.isascii() and "_" not in text else float("nan")
    except ValueError:
        raise IngestError(f"{where}: {_short(value)} is not a number") from None
    return number


def _whole(value: object, where: str) -> int:
    """A decimal integer (text or JSON number) as an int, or a one-line refusal."""
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit() and text.isascii() and len(text) <= 19:
            return int(text)
    elif _is_int(value):
        return int(value)  # type: ignore[call-overload]
    raise IngestError(f"{where}: {_short(value)} is not an integer")


class LabelQueue:
    """The late-label half of :class:`clients.inbox.Inbox` (which supplies the connection)."""

    path: Path
    _cipher: RecordCipher
    n_classes: int
    last_tick: int

    @property
    def targets(self) -> Targets:
        """The kind of target the inbox holds (:class:`clients.inbox.Inbox` records it)."""
        raise NotImplementedError

    def _connection(self) -> sqlite3.Connection:
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def append_labels(
        self,
        ids: np.ndarray | Sequence[Any],
        labels: np.ndarray | Sequence[Any],
        *,
        tick: int | None = None,
        on_invalid: OnInvalid = "raise",
        source: str = "",
    ) -> LabelReceipt:
        """Store labels for samples ingested earlier, by sample id (all of them or none).

        Parameters
        ----------
        ids : array-like of int
            Sample ids, as the receipts of :meth:`append` give them.
        labels : array-like
            One label per id, of the inbox's kind: a class, a number, or ``k`` numbers.
        tick : int, optional
            The tick the labels arrived at; the device takes them when it monitors
            that tick (default: the latest tick the inbox holds).
        on_invalid : {"raise", "drop"}, default "raise"
            Refuse the call for an id the inbox never issued or an unknown class (a
            target that is not finite, or of another length), or drop and count those labels.
        source : str, default ""
            Free text kept with the labels.

        Raises
        ------
        IngestError
            A malformed label (with ``"raise"``), or a tick that is not a non-negative integer.
        """
        targets: Targets = self.targets
        arrived = max(self.last_tick, 0) if tick is None else tick
        if isinstance(arrived, bool) or not isinstance(arrived, int | np.integer) or not 0 <= arrived < 2**63:
            raise IngestError(f"ingest: tick must be a non-negative integer (64-bit), got {arrived!r}")
        try:
            with self._write() as conn:
                last_row = int(conn.execute("SELECT value FROM meta WHERE key = 'last_row'").fetchone()[0])
                good_ids, good, dropped = check_labels(ids, labels, self.n_classes, last_row, on_invalid, targets)
                if not len(good_ids):
                    return LabelReceipt(0, int(arrived), 0, dropped)
                batch_id = store_labels(
                    conn, self._cipher, int(arrived), good_ids, good, source, time.time(), targets
                )
        except sqlite3.Error as exc:
            raise IngestError(f"ingest: cannot write to {self.path} ({exc}); no label was stored") from exc
        return LabelReceipt(batch_id, int(arrived), len(good_ids), dropped)

    def take_labels(self, after: int = 0, through_tick: int | None = None) -> LateLabels:
        """Late labels newer than label batch ``after`` that arrived up to ``through_tick``."""
        labels, failed = take_labels(self._connection(), self._cipher, after, through_tick, self.targets)
        for batch_id, n, reason in failed:
            log.warning("inbox %s: label batch %d (%d labels) failed authentication (%s); skipped",
                        self.path, batch_id, n, reason)
        return labels

    def prune_labels(self, through_batch: int) -> int:
        """Delete label batches up to and including ``through_batch`` (already taken)."""
        with self._write() as conn:
            return int(conn.execute("DELETE FROM labels WHERE id <= ?", (int(through_batch),)).rowcount)

