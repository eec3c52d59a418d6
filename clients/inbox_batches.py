"""Checking and staging the batches of one ingest call, before the inbox stores any.

:class:`clients.inbox.Inbox` stores batches; this module decides whether a batch may be
stored. Each ``(tick, x, y)`` batch is checked against the inbox's
:class:`InboxSchema` (a non-negative 64-bit tick, the row width, finite numbers,
known labels, ticks that do not go back), and a bad batch is refused whole with an
:class:`IngestError` naming the tick, the row and the problem, or with
``on_invalid="drop"`` its bad rows are dropped and counted. The checked batches of a
call wait in a :class:`Staging` area, in memory up to a number of rows and beyond it
in SQLite's private temporary database, so the inbox holds its write lock only while
it copies them in.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Self

import numpy as np

from clients.crypto import RecordCipher, new_key
from clients.targets import CLASS, Targets
from clients.validation import REJECT_REASONS, UNLABELLED, validate_rows

OnInvalid = Literal["raise", "drop"]
BatchInput = tuple[int, "np.ndarray | Sequence[Any]", "np.ndarray | Sequence[Any]"]

_REASON_TEXT = {
    "wrong_width": "wrong number of features",
    "non_finite": "a feature is NaN, infinite or not a number",
    "unknown_label": "the label is not one of the device's classes",
}
_TARGET_TEXT = {
    "float": "the target is not a finite 32-bit number",
    "vector": "the target is not a list of {k} finite 32-bit numbers",
}
__all__ = ["UNLABELLED"]  # re-exported: the label an inbox keeps for a row without one
_INT64_MAX = 2**63 - 1


class IngestError(ValueError):
    """Device data that cannot be ingested; the message names the tick, row and problem."""


# Users meet it as clients.inbox.IngestError (its documented home, and what a traceback
# names); it is defined here only because checking a batch is what raises it.
IngestError.__module__ = "clients.inbox"


@dataclass(frozen=True)
class InboxSchema:
    """The shape of the rows an inbox holds, fixed when it is created.

    Parameters
    ----------
    n_features : int
        Row width.
    n_classes : int
        Number of classes; labels are ``0 .. n_classes - 1``. For float or vector
        targets, the values per row (1, or the vector's length).
    targets : Targets, default class labels
        The kind of target each row holds (:mod:`clients.targets`).
    """

    n_features: int
    n_classes: int
    targets: Targets = CLASS

    def __repr__(self) -> str:
        kind = "" if self.targets.is_class else f", targets={self.targets.meta!r}"
        return f"InboxSchema(n_features={self.n_features}, n_classes={self.n_classes}{kind})"


def _no_rejects() -> dict[str, int]:
    return {**{reason: 0 for reason in REJECT_REASONS}, "total": 0}


@dataclass(frozen=True)
class Receipt:
    """What :meth:`clients.inbox.Inbox.append` stored.

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
    first_row : int, default 0
        Sample id of the batch's first input row: row ``k`` of the input (kept or
        dropped) is sample ``first_row + k``, the id a late label names
        (:meth:`clients.inbox.Inbox.append_labels`).
    rows : int, default 0
        Input rows, kept or dropped (the ids ``first_row .. first_row + rows - 1``).
    """

    batch_id: int
    tick: int
    accepted: int
    rejected: dict[str, int] = field(default_factory=_no_rejects)
    first_row: int = 0
    rows: int = 0


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
        The targets: ``int64`` class labels ``(n,)`` (:data:`UNLABELLED` for a row
        without one), or ``float32`` values ``(n,)`` / ``(n, k)`` (NaN: none).
    rejected : dict of str to int
        Rows dropped at ingest, per reason, and ``"total"``.
    unauthenticated : int
        Rows of batches whose sealed bytes failed authentication (changed on
        disk): skipped, never read as data.
    ids : numpy.ndarray, optional
        ``int64`` sample id of each row (0: a row stored before inboxes gave ids).
    """

    last_batch_id: int
    x: np.ndarray
    y: np.ndarray
    rejected: dict[str, int]
    unauthenticated: int = 0
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def empty(self) -> bool:
        """Whether no batch was taken."""
        return self.last_batch_id == 0


@dataclass(frozen=True)
class _Checked:
    tick: int
    n: int
    x: bytes
    #: The targets (clients.targets.Targets.encode), then the int64 input position of each row.
    y: bytes
    rejected: str
    #: Rows in the input, kept or dropped (each one is given a sample id).
    n_in: int = 0


def _check_batch(
    tick: object,
    x: np.ndarray | Sequence[Any],
    y: np.ndarray | Sequence[Any],
    schema: InboxSchema,
    on_invalid: OnInvalid,
) -> _Checked:
    """Validate one batch; raise on a malformed batch, or on a bad row with ``"raise"``."""
    if (
        isinstance(tick, bool)
        or not isinstance(tick, int | np.integer)
        or not 0 <= int(tick) <= _INT64_MAX
    ):
        raise IngestError(f"ingest: tick must be a non-negative integer (64-bit), got {_short(tick)}")
    tick = int(tick)
    try:
        rows = validate_rows(x, y, schema.n_features, schema.n_classes, schema.targets)
    except (TypeError, ValueError, OverflowError) as exc:
        message = str(exc).removeprefix("validate_rows: ")
        raise IngestError(
            f"ingest: tick {tick}: {message}; nothing from this batch was stored"
        ) from None
    if rows.rejected["total"] and on_invalid == "raise":
        row, reason = _first_bad_row(x, y, schema)
        kind = schema.targets.kind
        text = _TARGET_TEXT[kind] if reason == "unknown_label" and kind in _TARGET_TEXT else _REASON_TEXT[reason]
        if reason == "unknown_label" and kind == "class" and _fraction(y[row]):
            text = (f"the label {_short(y[row])} is not a class index (the inbox holds class labels; "
                    'float targets need an inbox created with targets="float")')
        raise IngestError(
            f"ingest: tick {tick}, row {row}: {text.format(k=schema.targets.size)}; "
            "nothing from this batch was stored"
        )
    xs = np.ascontiguousarray(rows.x, dtype=np.float32).reshape(-1, schema.n_features)
    ys = rows.y
    labels_and_positions = schema.targets.encode(ys) + np.ascontiguousarray(rows.index, dtype=np.int64).tobytes()
    n_in = rows.n_accepted + rows.rejected["total"]
    return _Checked(
        tick, len(ys), xs.tobytes(), labels_and_positions, json.dumps(dict(rows.rejected)), n_in
    )


def _fraction(value: object) -> bool:
    """Whether ``value`` is a finite number with a fraction (a float target, not a class)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, float | np.floating):
        return False
    return bool(np.isfinite(value)) and not float(value).is_integer()


def _first_bad_row(
    x: np.ndarray | Sequence[Any], y: np.ndarray | Sequence[Any], schema: InboxSchema
) -> tuple[int, str]:
    for i, (row, label) in enumerate(zip(x, y, strict=True)):
        single = validate_rows([row], [label], schema.n_features, schema.n_classes, schema.targets)
        for reason in REJECT_REASONS:
            if single.rejected[reason]:
                return i, reason
    return -1, "non_finite"


class Staging:
    """The checked batches of one call, in order: in memory up to ``spill_rows`` rows, then on disk.

    The disk part is SQLite's private temporary database (``connect("")``): it is
    unlinked as soon as it is opened and gone when closed, so a refused or
    interrupted call leaves nothing behind, and a file of any length costs only
    SQLite's page cache in memory. Rows spilled there are sealed (AES-256-GCM)
    under a key that exists only in this object's memory, so the scratch pages
    SQLite writes to the temporary folder never hold a sample in the clear.
    """

    def __init__(self, spill_rows: int) -> None:
        self.spill_rows = spill_rows
        self._memory: list[_Checked] = []
        self._rows = 0
        self._disk: sqlite3.Connection | None = None
        self._cipher: RecordCipher | None = None
        self._seq = 0

    def add(self, batch: _Checked) -> None:
        if self._disk is not None:
            self._insert(batch)
            return
        self._memory.append(batch)
        self._rows += batch.n
        if self._rows > self.spill_rows:
            self._disk = sqlite3.connect("")
            self._cipher = RecordCipher(new_key())
            # A scratch copy: durability does not matter, the inbox commit does.
            self._disk.execute("PRAGMA journal_mode=OFF")
            self._disk.execute("PRAGMA synchronous=OFF")
            self._disk.execute(
                "CREATE TABLE staged (seq INTEGER PRIMARY KEY, tick INTEGER, n INTEGER,"
                " x BLOB, y BLOB, rejected TEXT, n_in INTEGER)"
            )
            for held in self._memory:
                self._insert(held)
            self._memory.clear()

    def _insert(self, batch: _Checked) -> None:
        assert self._disk is not None and self._cipher is not None
        self._seq += 1
        seq = self._seq
        x, y = self._cipher.seal_many([batch.x, batch.y], [b"x%d" % seq, b"y%d" % seq])
        self._disk.execute(
            "INSERT INTO staged (seq, tick, n, x, y, rejected, n_in) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, batch.tick, batch.n, x, y, batch.rejected, batch.n_in),
        )

    def __iter__(self) -> Iterator[_Checked]:
        if self._disk is None:
            yield from self._memory
            return
        # The cursor steps one row at a time, so reading back is bounded too.
        assert self._cipher is not None
        for seq, tick, n, x, y, rejected, n_in in self._disk.execute(
            "SELECT seq, tick, n, x, y, rejected, n_in FROM staged ORDER BY seq"
        ):
            x, y = self._cipher.open_many([x, y], [b"x%d" % seq, b"y%d" % seq])
            yield _Checked(int(tick), int(n), x, y, rejected, int(n_in))

    def close(self) -> None:
        self._memory.clear()
        if self._disk is not None:
            self._disk.close()
            self._disk = None
        self._cipher = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stage(
    batches: Iterable[BatchInput],
    schema: InboxSchema,
    on_invalid: OnInvalid,
    floor: int,
    spill_rows: int,
) -> Staging:
    """Check every batch (ticks not before ``floor`` nor each other) into a staging area."""
    if on_invalid not in ("raise", "drop"):
        raise IngestError(f"ingest: on_invalid={on_invalid!r} is not allowed; allowed: raise, drop")
    staged = Staging(spill_rows)
    try:
        stored_floor = True
        for item in batches:
            try:
                tick, x, y = item
            except (TypeError, ValueError):
                raise IngestError(
                    f"ingest: a batch is a (tick, x, y) triple, got {_short(item)}"
                ) from None
            checked = _check_batch(tick, x, y, schema, on_invalid)
            if checked.tick < floor:
                before = f"the latest stored tick {floor}" if stored_floor else f"tick {floor}"
                raise IngestError(
                    f"ingest: tick {checked.tick} is before {before} "
                    "(the inbox is append-only); nothing from this call was stored"
                )
            floor, stored_floor = checked.tick, False
            staged.add(checked)
    except BaseException:
        staged.close()
        raise
    return staged


def _positive(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < 1:
        raise IngestError(f"ingest: {what} must be a positive integer, got {value!r}")
    return int(value)


def _cut(text: str, limit: int) -> str:
    """``text`` on one line and at most ``limit`` characters."""
    text = " ".join(text.splitlines())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: object, limit: int = 40) -> str:
    """``repr`` cut to ``limit`` characters, for messages about hostile input."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001  # any object may come in; the message must still be one line
        text = f"<{type(value).__name__}>"
    return _cut(text, limit)
