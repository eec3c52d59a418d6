"""Two-sample tests of a device's inputs against a reference, in NumPy alone.

A device must stay light (no SciPy: see :mod:`clients.detectors`), so the two
tests the label-free monitor uses are written here, small and pinned by tests:

- :func:`ks_test`: the Kolmogorov-Smirnov statistic per feature with the
  asymptotic p-value (Stephens' small-sample correction, as in Numerical
  Recipes' ``probks``), and a multiple-testing correction over the features
  (Bonferroni, Holm or Benjamini-Hochberg).
- :func:`mmd_test`: the maximum mean discrepancy with an RBF kernel whose
  width is the median heuristic, and a permutation p-value drawn with the
  caller's seeded generator, so a test is repeatable.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> ref = rng.normal(size=(200, 3))
>>> ks_test(ref, rng.normal(size=(100, 3))).p_value > 0.01
True
>>> ks_test(ref, rng.normal(size=(100, 3)) + [0, 0, 1]).p_value < 1e-6
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CORRECTIONS: tuple[str, ...] = ("bonferroni", "holm", "bh")
"""Multiple-testing corrections over the per-feature KS tests."""

_KS_TERMS = np.arange(1, 101, dtype=np.float64)


@dataclass(frozen=True)
class TestResult:
    """One two-sample test.

    Parameters
    ----------
    statistic
        KS: the largest per-feature distance between the two ECDFs; MMD: the
        biased squared MMD.
    p_value
        The smallest corrected p-value over the features (KS) or the
        permutation p-value (MMD).
    n_flagged
        Features whose corrected test rejects at ``alpha`` (KS); 1 or 0 (MMD).
    """

    statistic: float
    p_value: float
    n_flagged: int


def ks_statistics(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Per-feature two-sample KS statistic ``sup |F_ref - F_cur|`` (ties handled).

    Parameters
    ----------
    ref, cur
        Samples of shape ``(n, d)`` and ``(m, d)``.

    Returns
    -------
    numpy.ndarray
        ``d`` statistics in [0, 1].
    """
    n, m = len(ref), len(cur)
    pooled = np.concatenate([ref, cur]).astype(np.float64, copy=False)
    order = np.argsort(pooled, axis=0, kind="stable")
    values = np.take_along_axis(pooled, order, axis=0)
    from_ref = order < n
    gap = np.cumsum(from_ref, axis=0) / n - np.cumsum(~from_ref, axis=0) / m
    # Both ECDFs are only compared after the last of a run of equal values.
    last = np.ones(values.shape, dtype=bool)
    last[:-1] = values[:-1] != values[1:]
    return np.abs(np.where(last, gap, 0.0)).max(axis=0)  # type: ignore[no-any-return]


def ks_p_values(statistics: np.ndarray, n: int, m: int) -> np.ndarray:
    """Asymptotic two-sided p-values of KS statistics for samples of ``n`` and ``m``."""
    en = np.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * np.asarray(statistics, dtype=np.float64)
    signs = np.where(_KS_TERMS % 2 == 1, 1.0, -1.0)
    series = 2.0 * (signs * np.exp(-2.0 * np.outer(lam * lam, _KS_TERMS**2))).sum(axis=1)
    # The series does not converge for tiny lambda, where the p-value is 1.
    return np.where(lam < 0.2, 1.0, np.clip(series, 0.0, 1.0))  # type: ignore[no-any-return]


def corrected(p_values: np.ndarray, alpha: float, correction: str) -> tuple[float, int]:
    """The smallest corrected p-value and how many tests reject at ``alpha``.

    Bonferroni and Holm agree on the smallest adjusted p-value (``d * min p``)
    and so on whether any feature drifted; Holm rejects more features after the
    first. Benjamini-Hochberg controls the false discovery rate instead.
    """
    p = np.sort(np.asarray(p_values, dtype=np.float64))
    d = len(p)
    if d == 0:
        return 1.0, 0
    ranks = np.arange(1, d + 1)
    if correction == "bonferroni":
        return float(min(1.0, d * p[0])), int(np.count_nonzero(p * d <= alpha))
    if correction == "holm":
        passing = p <= alpha / (d - ranks + 1)
        stop = int(np.argmin(passing)) if not passing.all() else d
        return float(min(1.0, d * p[0])), stop
    if correction == "bh":
        below = np.nonzero(p <= ranks * alpha / d)[0]
        return float(min(1.0, (p * d / ranks).min())), int(below[-1] + 1) if len(below) else 0
    raise ValueError(f"monitor.input_correction: {correction!r}; allowed: {', '.join(CORRECTIONS)}")


def ks_test(
    ref: np.ndarray, cur: np.ndarray, alpha: float = 0.01, correction: str = "holm"
) -> TestResult:
    """Per-feature KS tests of ``cur`` against ``ref`` with a multiple-testing correction.

    Parameters
    ----------
    ref, cur
        Samples of shape ``(n, d)`` and ``(m, d)``.
    alpha, default=0.01
        Level at which a corrected test counts as flagged.
    correction, default="holm"
        One of :data:`CORRECTIONS`.
    """
    stats = ks_statistics(ref, cur)
    p_value, flagged = corrected(ks_p_values(stats, len(ref), len(cur)), alpha, correction)
    return TestResult(float(stats.max(initial=0.0)), p_value, flagged)


def mmd_test(
    ref: np.ndarray, cur: np.ndarray, rng: np.random.Generator, permutations: int = 200,
    alpha: float = 0.01,
) -> TestResult:
    """Permutation test of the RBF-kernel MMD between ``cur`` and ``ref``.

    The kernel is ``exp(-|x - y|^2 / h)`` with ``h`` the median squared distance
    between pooled samples (the median heuristic). Every permutation's statistic
    is a quadratic form of the same kernel matrix, so all of them cost one
    matrix product.

    Parameters
    ----------
    ref, cur
        Samples of shape ``(n, d)`` and ``(m, d)``.
    rng
        Draws the permutations; seed it for a repeatable p-value.
    permutations, default=200
        Relabellings of the pooled sample; the p-value is at least ``1 / (permutations + 1)``.
    alpha, default=0.01
        Level at which the test counts as flagged.
    """
    n, m = len(ref), len(cur)
    pooled = np.concatenate([ref, cur]).astype(np.float64, copy=False)
    sq = np.einsum("ij,ij->i", pooled, pooled)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (pooled @ pooled.T), 0.0)
    width = float(np.median(dist[np.triu_indices(n + m, 1)]))
    kernel = np.exp(-dist / (width if width > 0 else 1.0))
    # Column 0 is the observed split; each other column a relabelling of the pool.
    weights = np.where(np.arange(n + m) < n, 1.0 / n, -1.0 / m)
    shuffled = np.take(weights, np.argsort(rng.random((n + m, permutations)), axis=0))
    columns = np.column_stack([weights, shuffled])
    mmd2 = np.einsum("ij,ij->j", columns, kernel @ columns)
    p_value = (1 + np.count_nonzero(mmd2[1:] >= mmd2[0])) / (permutations + 1)
    return TestResult(float(mmd2[0]), float(p_value), int(p_value <= alpha))
