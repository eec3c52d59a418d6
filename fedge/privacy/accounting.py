"""Differential-privacy accounting: how much epsilon a campaign costs and how much is left.

Pure Python and NumPy. The central-DP cost of a campaign is accounted with
Rényi differential privacy (RDP) for the (Poisson-subsampled) Gaussian
mechanism, composed over rounds and converted to ``(epsilon, delta)``:

- one round with noise multiplier ``z`` (noise std / clipping norm) and
  sampling rate ``q`` has RDP ``eps(a) = log(A_a) / (a - 1)`` at integer order
  ``a``, with ``A_a = sum_k C(a, k) (1 - q)^(a - k) q^k exp((k^2 - k) / (2 z^2))``
  (Mironov, Talwar and Zhang, 2019); with ``q = 1`` this is ``a / (2 z^2)``;
- ``R`` rounds cost ``R * eps(a)`` (RDP composes by addition);
- the conversion to ``(epsilon, delta)`` is
  ``min_a eps(a) + log(1 - 1/a) - log(delta * a) / (a - 1)``
  (Balle et al., 2020; Canonne, Kamath and Steinke, 2020).

fedge chooses a campaign's devices by their drift reports, not at random, so
the honest sampling rate is ``q = 1`` (no amplification by sampling); lower
rates only apply when devices are sampled uniformly at random.

Local DP (Flower's ``LocalDpMod``) is accounted per release from the noise the
mod actually adds (:class:`LocalDpParams`).

Examples
--------
>>> budget = PrivacyBudget(epsilon_limit=8.0, delta=1e-5, noise_multiplier=2.0)
>>> round(budget.cost(rounds=5), 2)
5.38
>>> budget.affordable_rounds()
9
>>> print(budget.refusal(rounds=40))
privacy budget: a 40-round campaign (z=2, q=1) costs epsilon 19.054, 8 is left of 8 (delta 1e-05)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

#: RDP orders evaluated: fine steps near 1 (used when q = 1), then integers.
DEFAULT_ORDERS: tuple[float, ...] = (
    tuple(1.0 + x / 10.0 for x in range(1, 100)) + tuple(float(a) for a in range(11, 64))
) + (128.0, 256.0, 512.0, 1024.0)


class PrivacyBudgetExceeded(RuntimeError):
    """A campaign would spend more epsilon than the budget has left."""


def _check(noise_multiplier: float, sampling_rate: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier: {noise_multiplier} must be positive")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate: {sampling_rate} must be in (0, 1]")


def _log_a(order: int, q: float, z: float) -> float:
    k = np.arange(order + 1, dtype=np.float64)
    log_binom = (
        math.lgamma(order + 1)
        - np.array([math.lgamma(i + 1) for i in k])
        - np.array([math.lgamma(order - i + 1) for i in k])
    )
    terms = log_binom + k * math.log(q) + (order - k) * math.log1p(-q) + (k * k - k) / (2 * z * z)
    top = float(terms.max())
    return top + math.log(float(np.exp(terms - top).sum()))


def gaussian_rdp(
    noise_multiplier: float, sampling_rate: float = 1.0, orders: Sequence[float] = DEFAULT_ORDERS
) -> NDArray[np.float64]:
    """RDP of one release of the (subsampled) Gaussian mechanism, per order.

    Parameters
    ----------
    noise_multiplier : float
        Noise standard deviation divided by the L2 sensitivity (clipping norm).
    sampling_rate : float, default 1.0
        Probability that a given device takes part in the release (Poisson
        sampling); 1.0 means no amplification by sampling.
    orders : sequence of float, default DEFAULT_ORDERS
        RDP orders (> 1). With ``sampling_rate < 1`` only integer orders are
        evaluated; the others are reported as infinite.
    """
    _check(noise_multiplier, sampling_rate)
    z = noise_multiplier
    out = np.empty(len(orders), dtype=np.float64)
    for i, order in enumerate(orders):
        if order <= 1:
            raise ValueError(f"RDP order {order} must be > 1")
        if sampling_rate == 1.0:
            out[i] = order / (2 * z * z)
        elif float(order).is_integer():
            out[i] = _log_a(int(order), sampling_rate, z) / (order - 1)
        else:
            out[i] = math.inf
    return out


def rdp_to_epsilon(
    rdp: Sequence[float] | NDArray[np.float64],
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> tuple[float, float]:
    """The smallest epsilon the RDP curve ``rdp`` guarantees at ``delta``, and its order."""
    if not 0 < delta < 1:
        raise ValueError(f"delta: {delta} must be in (0, 1)")
    best, best_order = math.inf, math.nan
    for order, value in zip(orders, rdp, strict=True):
        if not math.isfinite(value):
            continue
        eps = value + math.log1p(-1.0 / order) - math.log(delta * order) / (order - 1)
        if eps < best:
            best, best_order = eps, order
    return max(0.0, float(best)), float(best_order)


def campaign_epsilon(
    rounds: int, noise_multiplier: float, sampling_rate: float = 1.0, delta: float = 1e-5
) -> float:
    """Epsilon at ``delta`` of ``rounds`` releases of the (subsampled) Gaussian mechanism."""
    if rounds < 0:
        raise ValueError(f"rounds: {rounds} must be >= 0")
    if rounds == 0:
        return 0.0
    return rdp_to_epsilon(rounds * gaussian_rdp(noise_multiplier, sampling_rate), delta)[0]


@dataclass(frozen=True)
class Spend:
    """One accounted campaign."""

    rounds: int
    noise_multiplier: float
    sampling_rate: float
    epsilon: float
    label: str = ""


@dataclass
class PrivacyBudget:
    """A privacy budget shared by every campaign that trains one model lineage.

    Parameters
    ----------
    epsilon_limit : float
        Total epsilon the compliance owner signed off on.
    delta : float
        The delta every epsilon is reported at (well below 1 / devices).
    noise_multiplier : float or None, default None
        Default ``z`` of campaigns (noise std / clipping norm).
    sampling_rate : float, default 1.0
        Default ``q`` of campaigns (1.0: devices not sampled at random).
    orders : sequence of float, default DEFAULT_ORDERS
        RDP orders of the accountant.

    Attributes
    ----------
    spends : list of Spend
        The campaigns charged so far, in order.
    """

    epsilon_limit: float
    delta: float
    noise_multiplier: float | None = None
    sampling_rate: float = 1.0
    orders: Sequence[float] = DEFAULT_ORDERS
    spends: list[Spend] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon_limit) and self.epsilon_limit > 0):
            raise ValueError(f"epsilon_limit: {self.epsilon_limit} must be positive")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta: {self.delta} must be in (0, 1)")
        self._rdp = np.zeros(len(self.orders), dtype=np.float64)

    def _params(self, z: float | None, q: float | None) -> tuple[float, float]:
        z = self.noise_multiplier if z is None else z
        if z is None:
            raise ValueError("noise_multiplier: not set on the budget nor given")
        q = self.sampling_rate if q is None else q
        _check(z, q)
        return z, q

    def _epsilon(self, rdp: NDArray[np.float64]) -> float:
        if not rdp.any():
            return 0.0
        return rdp_to_epsilon(rdp, self.delta, self.orders)[0]

    @property
    def spent(self) -> float:
        """Epsilon spent so far by all charged campaigns together (RDP-composed)."""
        return self._epsilon(self._rdp)

    @property
    def remaining(self) -> float:
        """Epsilon left before the limit."""
        return max(0.0, self.epsilon_limit - self.spent)

    def cost(
        self, rounds: int, noise_multiplier: float | None = None, sampling_rate: float | None = None
    ) -> float:
        """Epsilon of a campaign of ``rounds`` rounds on its own."""
        z, q = self._params(noise_multiplier, sampling_rate)
        return self._epsilon(rounds * gaussian_rdp(z, q, self.orders))

    def spent_after(
        self, rounds: int, noise_multiplier: float | None = None, sampling_rate: float | None = None
    ) -> float:
        """Cumulative epsilon if a campaign of ``rounds`` rounds ran next."""
        z, q = self._params(noise_multiplier, sampling_rate)
        return self._epsilon(self._rdp + rounds * gaussian_rdp(z, q, self.orders))

    def can_afford(
        self, rounds: int, noise_multiplier: float | None = None, sampling_rate: float | None = None
    ) -> bool:
        """True when a campaign of ``rounds`` rounds stays within the limit."""
        return self.spent_after(rounds, noise_multiplier, sampling_rate) <= self.epsilon_limit

    def affordable_rounds(
        self,
        noise_multiplier: float | None = None,
        sampling_rate: float | None = None,
        most: int = 10_000,
    ) -> int:
        """The most rounds (up to ``most``) the remaining budget pays for."""
        low, high = 0, most
        while low < high:
            mid = (low + high + 1) // 2
            if self.can_afford(mid, noise_multiplier, sampling_rate):
                low = mid
            else:
                high = mid - 1
        return low

    def refusal(
        self, rounds: int, noise_multiplier: float | None = None, sampling_rate: float | None = None
    ) -> str | None:
        """One line saying why a campaign is refused, or None when it is affordable."""
        if self.can_afford(rounds, noise_multiplier, sampling_rate):
            return None
        z, q = self._params(noise_multiplier, sampling_rate)
        return (
            f"privacy budget: a {rounds}-round campaign (z={z:g}, q={q:g}) costs epsilon "
            f"{self.cost(rounds, z, q):.3f}, {self.remaining:.3g} is left of "
            f"{self.epsilon_limit:g} (delta {self.delta:g})"
        )

    def charge(
        self,
        rounds: int,
        noise_multiplier: float | None = None,
        sampling_rate: float | None = None,
        label: str = "",
        *,
        enforce: bool = True,
    ) -> Spend:
        """Record a campaign; refuses one that would exceed the limit.

        ``enforce=False`` records a campaign that already happened (e.g. read
        back from the registry after a restart) even when it went over.

        Raises
        ------
        PrivacyBudgetExceeded
            With the one-line :meth:`refusal`; nothing is recorded.
        """
        reason = self.refusal(rounds, noise_multiplier, sampling_rate)
        if reason is not None and enforce:
            raise PrivacyBudgetExceeded(reason)
        z, q = self._params(noise_multiplier, sampling_rate)
        spend = Spend(rounds, z, q, self.cost(rounds, z, q), label)
        self._rdp = self._rdp + rounds * gaussian_rdp(z, q, self.orders)
        self.spends.append(spend)
        return spend

    def summary(self) -> dict[str, Any]:
        """Plain values for tracking: limit, delta, spent, remaining, campaigns."""
        return {
            "epsilon_limit": self.epsilon_limit,
            "delta": self.delta,
            "epsilon_spent": round(self.spent, 6),
            "epsilon_remaining": round(self.remaining, 6),
            "campaigns": [vars(s) for s in self.spends],
        }


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(epsilon: float, sensitivity: float, noise_std: float) -> float:
    """Exact delta of one Gaussian release at ``epsilon`` (Balle and Wang, 2018, Thm. 8)."""
    a = sensitivity / (2 * noise_std)
    b = epsilon * noise_std / sensitivity
    high = _normal_cdf(-a - b)
    return _normal_cdf(a - b) - (math.exp(epsilon) * high if high > 0 else 0.0)


def gaussian_epsilon(sensitivity: float, noise_std: float, delta: float) -> float:
    """Smallest epsilon of one Gaussian release at ``delta`` (exact, by bisection)."""
    if sensitivity <= 0 or noise_std <= 0:
        raise ValueError("sensitivity and noise_std must be positive")
    if gaussian_delta(0.0, sensitivity, noise_std) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while gaussian_delta(high, sensitivity, noise_std) > delta:
        high *= 2
        if high > 700:
            return math.inf
    for _ in range(100):
        mid = (low + high) / 2
        if gaussian_delta(mid, sensitivity, noise_std) > delta:
            low = mid
        else:
            high = mid
    return high


@dataclass(frozen=True)
class LocalDpParams:
    """The parameters of Flower's ``LocalDpMod`` and what they actually guarantee.

    ``LocalDpMod`` clips a device's update to L2 norm ``clipping_norm`` and
    adds Gaussian noise of std ``sensitivity * sqrt(2 ln(1.25 / delta)) /
    epsilon`` (the classic calibration, valid for ``epsilon <= 1``). Two
    clipped updates differ by at most ``2 * clipping_norm``, which is the
    sensitivity this class accounts with unless told otherwise.

    Parameters
    ----------
    clipping_norm : float
        L2 clipping norm of the update.
    sensitivity : float
        Sensitivity ``LocalDpMod`` calibrates its noise to.
    epsilon : float
        Epsilon ``LocalDpMod`` calibrates its noise to.
    delta : float
        Delta ``LocalDpMod`` calibrates its noise to.
    """

    clipping_norm: float
    sensitivity: float
    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not self.clipping_norm > 0 or not self.sensitivity > 0:
            raise ValueError("local DP: clipping_norm and sensitivity must be positive")
        if not self.epsilon > 0 or not 0 < self.delta < 1:
            raise ValueError("local DP: epsilon must be positive and delta in (0, 1)")

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise ``LocalDpMod`` adds to every value."""
        return self.sensitivity * math.sqrt(2 * math.log(1.25 / self.delta)) / self.epsilon

    def epsilon_per_release(self, sensitivity: float | None = None) -> float:
        """Exact epsilon at ``delta`` of one released update.

        Parameters
        ----------
        sensitivity : float or None, default None
            L2 sensitivity to account with; None: ``2 * clipping_norm``.
        """
        s = 2 * self.clipping_norm if sensitivity is None else sensitivity
        return gaussian_epsilon(s, self.noise_std, self.delta)

    def epsilon_after(
        self, releases: int, sensitivity: float | None = None, delta: float | None = None
    ) -> float:
        """Epsilon of ``releases`` updates from one device, RDP-composed."""
        s = 2 * self.clipping_norm if sensitivity is None else sensitivity
        return campaign_epsilon(
            releases, self.noise_std / s, 1.0, self.delta if delta is None else delta
        )


def effective_noise_multiplier(noise_multiplier: float, weights: Sequence[float]) -> float:
    """The noise multiplier a weighted average really gets.

    Flower's DP wrappers add noise of std ``z * C / m`` to the average of
    ``m`` updates, which is calibrated to equal weights. With FedAvg's
    weighting by examples, one device moves the average by up to
    ``C * w_i / sum(w)``, so the guarantee is that of
    ``z * sum(w) / (m * max(w))``; account with this value.

    Parameters
    ----------
    noise_multiplier : float
        The ``z`` the wrapper was configured with.
    weights : sequence of float
        The devices' weights in the round (e.g. their ``num-examples``).
    """
    if not weights or min(weights) <= 0:
        raise ValueError("weights: need at least one, all positive")
    return noise_multiplier * sum(weights) / (len(weights) * max(weights))


def local_dp_params(privacy: Any) -> LocalDpParams | None:
    """The parameters of Flower's ``LocalDpMod`` for a run's ``[privacy]`` (None unless ``dp = "local"``).

    The noise is calibrated to the true sensitivity of a clipped update, twice
    the clipping norm, so the epsilon the accountant reports is the one the
    devices really give.
    """
    if privacy.dp != "local":
        return None
    return LocalDpParams(
        clipping_norm=privacy.clipping_norm,
        sensitivity=2 * privacy.clipping_norm,
        epsilon=privacy.local_epsilon,
        delta=privacy.delta,
    )
