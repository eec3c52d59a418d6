"""The promotion gate's noise margin: how much better a candidate must score to count as better.

The gate compares the candidate's and the champion's federated accuracy on the
devices' held-out samples. With ``n`` samples behind both figures, a gap of a
point or two is sampling noise: promoting on it replaces a model with one that
is no better, and on a population that mixes concepts often worse. With
``campaign.gate_z = z`` a candidate must beat the champion by ``z`` standard
errors of the accuracy difference. Both models score the same samples, so the
difference is paired: its variance is ``(d - delta**2) / n`` where ``d`` is the
fraction of samples exactly one of them gets right (the devices report it) and
``delta`` the accuracy gap. Without ``d`` (an app that does not report it) the
unpaired ``2 p (1 - p) / n`` is used, which is larger.

>>> round(gate_margin(0.79, 0.77, 0.08, 100, 1.645), 3)
0.046
>>> round(gate_margin(0.79, 0.77, float("nan"), 100, 1.645), 3)
0.096
>>> gate_margin(0.79, 0.77, 0.08, 100, 0.0)
0.0
"""

from __future__ import annotations

import math

#: Below this a candidate's lead is a rounding artefact, never an improvement.
TIE = 1e-6


def gate_margin(candidate: float, champion: float, discordant: float, n: int, z: float) -> float:
    """The lead (accuracy, 0..1) a candidate needs over the champion at ``z`` standard errors.

    Parameters
    ----------
    candidate, champion : float
        Their accuracies on the same ``n`` held-out samples.
    discordant : float
        Fraction of those samples exactly one of the two gets right (NaN: unknown).
    n : int
        Held-out samples behind the accuracies (0 or less: unknown, no margin).
    z : float
        Standard errors required (0: no margin).
    """
    if z <= 0 or n <= 0:
        return 0.0
    if math.isfinite(discordant):
        var = max(discordant - (candidate - champion) ** 2, 1.0 / n) / n
    else:
        p = min(max((candidate + champion) / 2.0, 0.5 / n), 1.0 - 0.5 / n)
        var = 2.0 * p * (1.0 - p) / n
    return z * math.sqrt(var)


def promotes(candidate: float, champion: float, min_improvement: float, margin: float) -> bool:
    """Whether the candidate's lead exceeds ``min_improvement`` and, when there is one, the noise ``margin``.

    A negative ``min_improvement`` (promote even a somewhat worse candidate) is kept as given.
    """
    lead = candidate - champion
    return lead > min_improvement + TIE and (margin <= 0 or lead > margin + TIE)
