"""Rows are checked at the source: good rows kept in order, bad rows counted by reason."""

from __future__ import annotations

import numpy as np
import pytest

from clients.validation import UNLABELLED, ValidatedRows, validate_rows

REASONS = ("non_finite", "wrong_width", "unknown_label")


def _counts(rows: ValidatedRows) -> tuple[int, int, int, int]:
    r = rows.rejected
    return r["non_finite"], r["wrong_width"], r["unknown_label"], r["total"]


def test_clean_array_passes_unchanged_as_float32_and_int64() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6))
    y = rng.integers(0, 4, size=500)

    rows = validate_rows(x, y, n_features=6, n_classes=4)

    assert rows.x.dtype == np.float32 and rows.x.shape == (500, 6)
    assert rows.y.dtype == np.int64
    np.testing.assert_array_equal(rows.x, x.astype(np.float32))
    np.testing.assert_array_equal(rows.y, y)
    assert rows.rejected == {"non_finite": 0, "wrong_width": 0, "unknown_label": 0, "total": 0}


def test_array_rows_with_nan_inf_or_float32_overflow_are_non_finite() -> None:
    x = np.arange(20, dtype=np.float64).reshape(5, 4)
    x[1, 2] = np.nan
    x[3, 0] = -np.inf
    x[4, 3] = 1e300
    y = np.array([0, 1, 0, 1, 0])

    rows = validate_rows(x, y, n_features=4, n_classes=2)

    assert _counts(rows) == (3, 0, 0, 3)
    np.testing.assert_array_equal(rows.x, x[[0, 2]].astype(np.float32))
    np.testing.assert_array_equal(rows.y, [0, 0])


def test_labels_outside_range_or_not_integers_are_unknown_and_nan_is_no_label() -> None:
    x = np.ones((7, 2))
    y = np.array([0, 2, 3, -1, 1.5, np.nan, 1.0])

    rows = validate_rows(x, y, n_features=2, n_classes=3)

    assert _counts(rows) == (0, 0, 3, 3)
    np.testing.assert_array_equal(rows.y, [0, 2, UNLABELLED, 1])
    np.testing.assert_array_equal(rows.index, [0, 1, 5, 6])
    assert rows.y.dtype == np.int64


def test_label_objects_that_are_not_numbers_are_unknown_and_none_is_no_label() -> None:
    rows = validate_rows([[1.0], [2.0], [3.0], [4.0]], [1, "1", None, np.int32(0)], 1, 2)

    assert _counts(rows) == (0, 0, 1, 1)
    np.testing.assert_array_equal(rows.x[:, 0], [1.0, 3.0, 4.0])
    np.testing.assert_array_equal(rows.y, [1, UNLABELLED, 0])


def test_array_of_the_wrong_width_rejects_every_row() -> None:
    rows = validate_rows(np.zeros((4, 3)), [0, 0, 0, 0], n_features=5, n_classes=1)

    assert _counts(rows) == (0, 4, 0, 4)
    assert rows.x.shape == (0, 5) and rows.x.dtype == np.float32
    assert rows.y.shape == (0,) and rows.y.dtype == np.int64


def test_ragged_rows_each_counted_once_with_width_then_finite_then_label() -> None:
    x = [
        [1.0, 2.0, 3.0],  # good
        [1.0, 2.0],  # short
        [1.0, 2.0, 3.0, 4.0],  # long, and a bad label: width wins
        [np.nan, 2.0, 3.0],  # non-finite, and a bad label: non-finite wins
        [4.0, "a", 6.0],  # not a number
        [7.0, None, 9.0],  # not a number
        "abc",  # not a row
        5.0,  # not a row
        [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],  # nested
        [1.0, 1.0, 1.0],  # bad label only
        (7, 8, 9),  # good, tuple of ints
    ]
    y = [0, 1, 9, 9, 0, 1, 0, 1, 0, 9, 1]

    rows = validate_rows(x, y, n_features=3, n_classes=2)

    assert _counts(rows) == (3, 5, 1, 9)
    np.testing.assert_array_equal(rows.x, np.array([[1, 2, 3], [7, 8, 9]], dtype=np.float32))
    np.testing.assert_array_equal(rows.y, [0, 1])


def test_good_rows_keep_their_arrival_order() -> None:
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    bad = [1, 4, 5, 8]
    x[bad, 1] = np.inf
    y = np.arange(10) % 2

    rows = validate_rows(x, y, n_features=3, n_classes=2)

    good = [i for i in range(10) if i not in bad]
    np.testing.assert_array_equal(rows.x[:, 0], x[good, 0])
    np.testing.assert_array_equal(rows.y, y[good])


def test_rejected_always_has_every_reason_and_total() -> None:
    rows = validate_rows([], [], n_features=2, n_classes=2)

    assert set(rows.rejected) == {*REASONS, "total"}
    assert rows.x.shape == (0, 2) and rows.y.shape == (0,)


def test_output_does_not_alias_the_callers_array() -> None:
    x = np.ones((3, 2), dtype=np.float32)

    rows = validate_rows(x, [0, 1, 0], n_features=2, n_classes=2)
    rows.x[0, 0] = 99.0

    assert x[0, 0] == 1.0


def test_length_mismatch_is_a_caller_error_in_one_line() -> None:
    with pytest.raises(ValueError, match="x has 3 rows but y has 2 labels") as info:
        validate_rows(np.zeros((3, 2)), [0, 1], n_features=2, n_classes=2)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("n_features", "n_classes"), [(0, 2), (2, 0)])
def test_non_positive_sizes_are_rejected(n_features: int, n_classes: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        validate_rows(np.zeros((1, 2)), [0], n_features=n_features, n_classes=n_classes)
