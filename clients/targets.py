"""What a row's target is, and how it is checked and kept: a class index, a float, or a vector.

A device's rows carry one target each, of the kind its task learns (see
:mod:`fedge.contracts.task`):

``"class"``
    A class index ``0 .. n_classes - 1`` (``int64``); a row without a label holds
    :data:`UNLABELLED`. Every inbox and store written before target kinds existed
    holds class labels.
``"float"``
    One number per row (``float32``, shape ``(n,)``), for a regression.
``"vector"``
    A fixed number ``k`` of numbers per row (``float32``, shape ``(n, k)``), for a
    regression with ``k`` outputs.

A float or vector row without a target holds NaN (every value of a vector NaN);
a target with some but not all values NaN, an infinity, or a value beyond
``float32`` is a bad target (counted under ``"unknown_label"``, like an unknown
class). An inbox and a store record their kind (:attr:`Targets.meta`) when they
are created, and refuse rows of another kind or length in one line.

Examples
--------
>>> spec = Targets.parse("vector:2")
>>> values, bad = check_values([[0.5, 1.0], None, [1.0, float("inf")]], 3, spec)
>>> values[:2].tolist(), bad.tolist()
([[0.5, 1.0], [nan, nan]], [False, False, True])
>>> spec.missing(values).tolist()
[False, True, True]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TARGET_KINDS: tuple[str, ...] = ("class", "float", "vector")
UNLABELLED = -1
"""The class label a row without one is kept with (in the inbox, the store and the checks).

A row comes without a label when its label is ``None`` or NaN: it is valid, never
rejected, and waits for a late label (or none) in the device's window. Float and
vector targets keep NaN instead.
"""
MAX_TARGET_SIZE = 4096
"""Most values a vector target may hold."""
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Targets:
    """The kind of a row's target and its number of values.

    Parameters
    ----------
    kind : {"class", "float", "vector"}, default "class"
        See the module docstring.
    size : int, default 1
        Values per row: ``k`` for a vector, 1 otherwise.

    Raises
    ------
    ValueError
        An unknown kind, or a size that does not fit it.
    """

    kind: str = "class"
    size: int = 1

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"targets {self.kind!r} is not a target kind; known: {', '.join(TARGET_KINDS)}")
        size = self.size
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or not 1 <= size <= MAX_TARGET_SIZE:
            raise ValueError(f"a vector target holds 1..{MAX_TARGET_SIZE} values, got {size!r}")
        if self.kind != "vector" and size != 1:
            raise ValueError(f"{self.kind} targets hold one value per row, got size {size}")

    @classmethod
    def parse(cls, text: str | None) -> Targets:
        """The targets a meta value names: ``"class"``, ``"float"`` or ``"vector:<k>"`` (None: class)."""
        if text is None or text == "class":
            return CLASS
        if text == "float":
            return FLOAT
        kind, _, size = str(text).partition(":")
        if kind == "vector" and size.isdigit() and size.isascii():
            return cls("vector", int(size))
        raise ValueError(f"targets {text!r} is not a target kind; known: class, float, vector:<k>")

    @property
    def meta(self) -> str:
        """How an inbox or store records the kind: ``"class"``, ``"float"``, ``"vector:<k>"``."""
        return f"vector:{self.size}" if self.kind == "vector" else self.kind

    @property
    def is_class(self) -> bool:
        """Whether the targets are class indices."""
        return self.kind == "class"

    def describe(self) -> str:
        """The kind in words, for messages: ``"class labels"``, ``"vector targets of 3 values"``."""
        if self.kind == "class":
            return "class labels"
        if self.kind == "float":
            return "float targets (one value per row)"
        return f"vector targets of {self.size} values"

    @property
    def dtype(self) -> type[np.generic]:
        """``numpy.int64`` for class labels, ``numpy.float32`` otherwise."""
        return np.int64 if self.kind == "class" else np.float32

    @property
    def itemsize(self) -> int:
        """Bytes one row's target takes when packed (:meth:`encode`)."""
        return 8 if self.kind == "class" else 4 * self.size

    def shape(self, n: int) -> tuple[int, ...]:
        """The shape of ``n`` rows' targets: ``(n,)`` or ``(n, k)`` for a vector."""
        return (n, self.size) if self.kind == "vector" else (n,)

    def empty(self) -> np.ndarray:
        """No targets, of the right dtype and shape."""
        return np.zeros(self.shape(0), dtype=self.dtype)

    def encode(self, y: np.ndarray) -> bytes:
        """Little-endian bytes of ``y`` (``int64`` labels or ``float32`` values)."""
        return np.ascontiguousarray(y, dtype="<i8" if self.kind == "class" else "<f4").tobytes()

    def decode(self, raw: bytes, n: int) -> np.ndarray:
        """Inverse of :meth:`encode` for ``n`` rows (a fresh, writable array)."""
        wire = "<i8" if self.kind == "class" else "<f4"
        return np.frombuffer(raw, dtype=wire, count=n * self.size).astype(self.dtype).reshape(self.shape(n))

    def missing(self, y: np.ndarray) -> np.ndarray:
        """Mask of the rows without a target (:data:`UNLABELLED`, or NaN)."""
        y = np.asarray(y)
        if self.kind == "class":
            return y == UNLABELLED
        nan = np.isnan(y)
        return nan.any(axis=1) if nan.ndim == 2 else nan

    def labelled(self, y: np.ndarray) -> np.ndarray:
        """Mask of the rows with a target."""
        return ~self.missing(y)

    def unlabelled(self, n: int) -> np.ndarray:
        """``n`` rows' worth of "no target"."""
        fill = UNLABELLED if self.kind == "class" else np.nan
        return np.full(self.shape(n), fill, dtype=self.dtype)

    def as_input(self, y: np.ndarray) -> np.ndarray:
        """Stored targets as the row checks take them again (no class label: NaN)."""
        if self.kind == "class":
            y = np.asarray(y)
            return np.where(y == UNLABELLED, np.nan, y.astype(np.float64))
        return np.asarray(y)


CLASS = Targets()
FLOAT = Targets("float")


def for_task(regression: bool, n_outputs: int) -> Targets:
    """The targets a task learns from: class labels, or one or ``n_outputs`` values."""
    if not regression:
        return CLASS
    return FLOAT if n_outputs == 1 else Targets("vector", int(n_outputs))


def check_values(y: Any, n_rows: int, targets: Targets) -> tuple[np.ndarray, np.ndarray]:
    """Float or vector targets as ``float32`` (NaN: none) and the mask of bad ones.

    Raises
    ------
    ValueError
        ``y`` as a whole holds targets of another kind or length (e.g. vectors of
        3 values for float targets); one line, the caller refuses the batch.
    """
    k = targets.size
    if n_rows == 0:
        return targets.unlabelled(0), np.zeros(0, dtype=bool)
    try:
        arr = np.asarray(y)
    except (TypeError, ValueError, OverflowError):
        arr = None
    if arr is not None and arr.dtype.kind in "iuf":
        if targets.kind == "float" and arr.ndim == 2 and arr.shape[1] == 1 and isinstance(y, np.ndarray):
            arr = arr[:, 0]
        wanted = 2 if targets.kind == "vector" else 1
        if arr.ndim != wanted or (wanted == 2 and arr.shape[1] != k):
            raise ValueError(f"y holds {_held(arr)}, the inbox holds {targets.describe()}")
        values = arr.astype(np.float64)
        with np.errstate(invalid="ignore"):
            good = np.isfinite(values) & (np.abs(values) <= _FLOAT32_MAX)
        nan = np.isnan(values)
        absent = np.asarray(nan.all(axis=1)) if wanted == 2 else nan
        good = np.asarray(good.all(axis=1)) if wanted == 2 else good
        out = np.where((good | absent).reshape(-1, *([1] * (wanted - 1))), values, np.nan)
        return out.astype(np.float32).reshape(targets.shape(n_rows)), ~(good | absent)
    if arr is not None and arr.ndim == 2 and arr.dtype.kind == "b":
        raise ValueError("y holds booleans; a target is a number")
    out = np.full(targets.shape(n_rows), np.nan, dtype=np.float32)
    bad = np.zeros(n_rows, dtype=bool)
    for i, value in enumerate(y):
        got = _one(value, targets)
        if got is None:
            bad[i] = True
        elif got is not _ABSENT:
            out[i] = got
    return out, bad


_ABSENT = object()


def _one(value: object, targets: Targets) -> Any:
    """One row's target: its values, ``_ABSENT`` (no target) or None (a bad target)."""
    if value is None:
        return _ABSENT
    if targets.kind == "float":
        number = _number(value)
        if number is None:
            return None
        return _ABSENT if np.isnan(number) else (number if abs(number) <= _FLOAT32_MAX else None)
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        return None
    numbers = [_number(v) for v in value]
    if len(numbers) != targets.size or any(v is None for v in numbers):
        return None
    arr = np.asarray(numbers, dtype=np.float64)
    if np.isnan(arr).all():
        return _ABSENT
    return arr if (np.isfinite(arr) & (np.abs(arr) <= _FLOAT32_MAX)).all() else None


def _number(value: object) -> float | None:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if np.isfinite(number) or np.isnan(number) else None


def _held(arr: np.ndarray) -> str:
    if arr.ndim == 2 and arr.shape[1] > 1:
        return f"vectors of {arr.shape[1]} values per row"
    if arr.ndim in (1, 2):
        return "one value per row"
    return f"an array of shape {arr.shape}"
