"""Data checks at the source: keep the rows a device can learn from, count the rest.

Bad rows are a fact of life on a device (a sensor drops a value, a label arrives from
an older schema), so they are counted and dropped, never raised. A caller bug, such as
handing over a different number of rows and labels, is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clients.targets import CLASS, UNLABELLED, Targets, check_values

REJECT_REASONS: tuple[str, ...] = ("wrong_width", "non_finite", "unknown_label")
"""Why a row can be rejected, in the order the checks run; a row counts under the first."""

_NUMERIC_KINDS = frozenset("biuf")
_LABEL_KINDS = frozenset("iuf")


@dataclass(frozen=True)
class ValidatedRows:
    """The rows that passed validation, and how many were rejected for which reason.

    Parameters
    ----------
    x
        Feature matrix of the accepted rows, ``float32`` with shape ``(m, n_features)``,
        in the order the rows arrived.
    y
        Targets of the accepted rows: class labels ``int64`` with shape ``(m,)``
        (:data:`UNLABELLED` for a row that came without one), or float targets
        ``float32`` ``(m,)`` / vector targets ``float32`` ``(m, k)`` (NaN: none).
    rejected
        Rejected row counts with the keys ``"non_finite"``, ``"wrong_width"``,
        ``"unknown_label"`` and ``"total"`` (the sum of the other three).
    """

    x: np.ndarray
    y: np.ndarray
    rejected: dict[str, int]
    #: Position of each accepted row in the input (a row's sample id is counted from it).
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    #: The kind of target ``y`` holds.
    targets: Targets = CLASS

    @property
    def n_accepted(self) -> int:
        """Number of rows that passed."""
        return int(self.y.shape[0])

    @property
    def labelled(self) -> np.ndarray:
        """Mask of the accepted rows that carry a label."""
        return self.targets.labelled(self.y)


def validate_rows(
    x: np.ndarray | Sequence[Any],
    y: np.ndarray | Sequence[Any],
    n_features: int,
    n_classes: int,
    targets: Targets = CLASS,
) -> ValidatedRows:
    """Keep the rows with the expected width, finite features and a known label.

    Each rejected row is counted once, under the first failing check in the order
    width, finite values, label.

    Parameters
    ----------
    x
        Feature rows: a 2-D array, or a sequence of rows where rows may have different
        lengths. A row whose length differs from ``n_features`` (or that is not a flat
        sequence) is ``"wrong_width"``; a row with NaN, an infinity, a value too large for
        ``float32`` or an entry that is not a number is ``"non_finite"``.
    y
        One label per row. Labels that are not integers (integral floats such as ``2.0``
        are accepted; booleans are not labels) or lie outside ``0 .. n_classes - 1`` are
        ``"unknown_label"``. A NumPy column of labels, shape ``(n, 1)``, is read as
        ``(n,)``; a row's label given as a list (``[1]``) is unknown. ``None`` or NaN is
        no label: the row is kept with :data:`UNLABELLED`.
    n_features
        Expected row width, at least 1.
    n_classes
        Number of classes, at least 1 (not read for float or vector targets).
    targets : Targets, default class labels
        The kind of target ``y`` holds (:mod:`clients.targets`). Float targets are
        one number per row, vector targets ``k`` numbers (a ``(n, k)`` array or one
        sequence per row); ``None`` or NaN (a vector of NaN) is no target, and a
        non-finite or partly missing target is ``"unknown_label"``.

    Returns
    -------
    ValidatedRows
        The accepted rows in their original order, and the rejection counts.

    Raises
    ------
    ValueError
        If ``n_features`` or ``n_classes`` is not positive, if ``x`` and ``y`` do not
        hold the same number of rows, or if ``y`` as a whole holds targets of another
        kind or length (e.g. vectors of 3 values for class labels).
    TypeError
        If ``x`` or ``y`` is not a sequence, or ``n_features`` or ``n_classes`` is not an int.

    Examples
    --------
    >>> import numpy as np
    >>> rows = validate_rows([[0.5, 1.0], [np.nan, 1.0], [1.0]], [1, 0, 0], 2, 2)
    >>> rows.x.tolist(), rows.y.tolist()
    ([[0.5, 1.0]], [1])
    >>> rows.rejected
    {'non_finite': 1, 'wrong_width': 1, 'unknown_label': 0, 'total': 2}
    """
    if isinstance(n_features, bool) or not isinstance(n_features, int | np.integer):
        raise TypeError(f"validate_rows: n_features must be an int, got {n_features!r}")
    if isinstance(n_classes, bool) or not isinstance(n_classes, int | np.integer):
        raise TypeError(f"validate_rows: n_classes must be an int, got {n_classes!r}")
    if n_features < 1:
        raise ValueError(f"validate_rows: n_features must be >= 1, got {n_features}")
    if n_classes < 1:
        raise ValueError(f"validate_rows: n_classes must be >= 1, got {n_classes}")

    n_rows = _count(x, "x", "rows")
    n_labels = _count(y, "y", "labels")
    if n_rows != n_labels:
        raise ValueError(f"validate_rows: x has {n_rows} rows but y has {n_labels} labels")

    features, wrong_width, non_finite = _check_features(x, n_rows, int(n_features))
    if targets.is_class:
        labels, unknown_label = _check_labels(y, n_rows, int(n_classes))
    else:
        labels, unknown_label = check_values(y, n_rows, targets)

    non_finite &= ~wrong_width
    unknown_label &= ~(wrong_width | non_finite)
    keep = ~(wrong_width | non_finite | unknown_label)

    rejected = {
        "non_finite": int(np.count_nonzero(non_finite)),
        "wrong_width": int(np.count_nonzero(wrong_width)),
        "unknown_label": int(np.count_nonzero(unknown_label)),
    }
    rejected["total"] = sum(rejected.values())
    return ValidatedRows(
        x=np.ascontiguousarray(features[keep]),
        y=np.ascontiguousarray(labels[keep]),
        rejected=rejected,
        index=np.flatnonzero(keep).astype(np.int64),
        targets=targets,
    )


def _count(values: Any, name: str, what: str) -> int:
    if isinstance(values, np.ndarray) and values.ndim == 0:
        raise TypeError(f"validate_rows: {name} must be a sequence of {what}, got a scalar")
    if isinstance(values, str | bytes):
        raise TypeError(f"validate_rows: {name} must be a sequence of {what}, got a string")
    try:
        return len(values)
    except TypeError:
        raise TypeError(
            f"validate_rows: {name} must be a sequence of {what}, got {type(values).__name__}"
        ) from None


def _check_features(
    x: Any, n_rows: int, n_features: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the float32 features (zeros where unusable) and the width/finite masks."""
    matrix = _as_numeric_matrix(x)
    if matrix is not None:
        if matrix.ndim != 2 or matrix.shape[1] != n_features:
            wrong = np.ones(n_rows, dtype=bool)
            return np.zeros((n_rows, n_features), np.float32), wrong, np.zeros(n_rows, bool)
        with np.errstate(over="ignore", invalid="ignore"):
            features = matrix.astype(np.float32, copy=False)
        non_finite_rows = ~np.isfinite(features).all(axis=1)
        return features, np.zeros(n_rows, dtype=bool), np.asarray(non_finite_rows)

    features = np.zeros((n_rows, n_features), dtype=np.float32)
    wrong_width = np.zeros(n_rows, dtype=bool)
    non_finite = np.zeros(n_rows, dtype=bool)
    for i, row in enumerate(x):
        if isinstance(row, str | bytes) or not hasattr(row, "__len__") or len(row) != n_features:
            wrong_width[i] = True
            continue
        try:
            values = np.asarray(row)
        except (TypeError, ValueError):
            wrong_width[i] = True
            continue
        if values.ndim != 1:
            wrong_width[i] = True
            continue
        if values.dtype.kind not in _NUMERIC_KINDS:
            numbers = _numbers_only(row)
            if numbers is None:
                non_finite[i] = True
                continue
            values = numbers
        with np.errstate(over="ignore", invalid="ignore"):
            converted = values.astype(np.float32)
        if not np.isfinite(converted).all():
            non_finite[i] = True
            continue
        features[i] = converted
    return features, wrong_width, non_finite


def _as_numeric_matrix(x: Any) -> np.ndarray | None:
    """Return ``x`` as a numeric array when it is one already or converts cleanly."""
    if isinstance(x, np.ndarray):
        return x if x.dtype.kind in _NUMERIC_KINDS else None
    try:
        matrix = np.asarray(x)
    except (TypeError, ValueError):
        return None
    if matrix.dtype.kind not in _NUMERIC_KINDS or matrix.ndim != 2:
        return None
    return matrix


def _numbers_only(row: Any) -> np.ndarray | None:
    """Convert a row of mixed Python objects when every entry is a real number."""
    out = []
    for value in row:
        if not isinstance(value, bool | np.bool_ | int | float | np.integer | np.floating):
            return None
        try:
            out.append(float(value))
        except OverflowError:
            return None
    return np.asarray(out, dtype=np.float64)


def _check_labels(y: Any, n_rows: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Return int64 labels (0 where unusable, UNLABELLED where absent) and the unknown-label mask."""
    try:
        arr = np.asarray(y)
    except (TypeError, ValueError, OverflowError):
        arr = None
    if isinstance(y, np.ndarray) and arr is not None and arr.ndim == 2 and arr.shape[1] == 1:
        # Only a NumPy column vector: in a list, ``[1]`` is a malformed label, not a 1.
        arr = arr[:, 0]
    if isinstance(y, np.ndarray) and arr is not None and arr.ndim == 2 and arr.dtype.kind in "iuf" and n_rows:
        raise ValueError(f"validate_rows: y holds vectors of {arr.shape[1]} values per row, the inbox holds class labels")
    # Booleans are not class labels ("true" is not class 1), so only ints and floats.
    if arr is not None and arr.ndim == 1 and arr.dtype.kind in _LABEL_KINDS:
        absent = np.zeros(n_rows, dtype=bool)
        if arr.dtype.kind == "f":
            absent = np.isnan(arr)
            with np.errstate(invalid="ignore"):
                integral = np.isfinite(arr) & (np.floor(arr) == arr)
        else:
            integral = np.ones(n_rows, dtype=bool)
        with np.errstate(invalid="ignore"):
            in_range = integral & (arr >= 0) & (arr < n_classes)
        labels = np.where(in_range, arr, 0).astype(np.int64)
        labels[absent] = UNLABELLED
        return labels, ~(in_range | absent)

    labels = np.zeros(n_rows, dtype=np.int64)
    unknown = np.ones(n_rows, dtype=bool)
    for i, value in enumerate(y):
        if value is None or (isinstance(value, float | np.floating) and np.isnan(value)):
            labels[i] = UNLABELLED
            unknown[i] = False
            continue
        label = _as_label(value)
        if label is not None and 0 <= label < n_classes:
            labels[i] = label
            unknown[i] = False
    return labels, unknown


def _as_label(value: object) -> int | None:
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating) and np.isfinite(value) and float(value).is_integer():
        return int(value)
    return None
