"""SecAgg+ settings, errors and round reports: what both the config check and the protocol use.

Pure Python (no Flower), so validating a run's ``[privacy]`` section does not
load the server's protocol driver (:mod:`strategies.secagg`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedge.privacy import secagg_protocol as sp


class SecAggError(RuntimeError):
    """Secure aggregation could not finish a round; no aggregate was produced."""


@dataclass(frozen=True)
class SecAggConfig:
    """Settings of the SecAgg+ protocol.

    Parameters
    ----------
    num_shares : int or float, default 1.0
        Size of each device's neighbourhood (itself included): the devices it
        masks with and shares its secrets among. An int is a count (> 2); a
        float is a fraction of the round's devices. 1.0 is plain SecAgg, every
        device with every other; smaller values (SecAgg+) cost less at scale.
    reconstruction_threshold : int or float, default 0.6
        Shares needed to rebuild a device's secret: an int count (>= 2) or a
        fraction of ``num_shares``. Higher is safer against collusion, lower
        survives more dropouts (a neighbourhood of ``k`` survives ``k - t``).
    clipping_range : float, default 8.0
        Model values (after weighting) are clipped to ``[-clipping_range,
        clipping_range]`` before quantisation.
    metric_clipping_range : float, default 64.0
        The same for train metrics such as ``train_loss``.
    quantization_range : int, default 2**22
        Quantisation levels per value.
    modulus_range : int, default 2**32
        Masks are uniform modulo this power of two; must exceed the number of
        devices times ``quantization_range``.
    max_weight : float, default 1000.0
        Largest ``num-examples`` a device may report; a device's weight is
        ``num-examples / max_weight`` of the quantisation range.
    weighted_by_key : str, default "num-examples"
        Metric that weights a device's update.
    timeout : float or None, default None
        Seconds to wait for replies at each stage (None: the strategy's).
    """

    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.6
    clipping_range: float = 8.0
    metric_clipping_range: float = 64.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    max_weight: float = 1000.0
    weighted_by_key: str = "num-examples"
    timeout: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_shares, int):
            if self.num_shares <= 2:
                raise ValueError(
                    f"secagg.num_shares: {self.num_shares} must be > 2 (or a fraction)"
                )
        elif not 0 < self.num_shares <= 1:
            raise ValueError(
                f"secagg.num_shares: {self.num_shares} must be in (0, 1] as a fraction"
            )
        t = self.reconstruction_threshold
        if isinstance(t, int):
            if t < 2:
                raise ValueError(f"secagg.reconstruction_threshold: {t} must be >= 2")
            if isinstance(self.num_shares, int) and t > self.num_shares:
                raise ValueError(
                    f"secagg.reconstruction_threshold: {t} exceeds num_shares {self.num_shares}"
                )
        elif not 0 < t <= 1:
            raise ValueError(
                f"secagg.reconstruction_threshold: {t} must be in (0, 1] as a fraction"
            )
        for name in ("clipping_range", "metric_clipping_range", "max_weight"):
            if not getattr(self, name) > 0:
                raise ValueError(f"secagg.{name}: {getattr(self, name)} must be positive")
        sp.check_ranges(self.quantization_range, self.modulus_range, 1)

    def shares_and_threshold(self, n_devices: int) -> tuple[int, int]:
        """Neighbourhood size and reconstruction threshold for a round of ``n_devices``."""
        if isinstance(self.num_shares, int):
            k = min(self.num_shares, n_devices)
        else:
            k = max(3, math.ceil(self.num_shares * n_devices))
            k = min(k, n_devices)
        if k < n_devices and k % 2 == 0:
            k += 1
        t = self.reconstruction_threshold
        threshold = t if isinstance(t, int) else max(2, math.ceil(t * k))
        return k, min(threshold, k)


@dataclass
class SecAggRoundReport:
    """What happened in one secure round (for logs, tracking and the compliance record).

    Parameters
    ----------
    server_round : int
        The strategy's round.
    devices : int
        Devices the strategy addressed.
    num_shares : int
        Neighbourhood size (shares per secret).
    threshold : int
        Shares needed to rebuild a secret.
    contributors : int, default 0
        Devices whose masked vector is in the aggregate.
    dropped : dict of str to list of int
        Per stage (``setup``, ``share_keys``, ``train``, ``unmask``), the devices
        that did not answer it.
    failures : dict of int to str
        Devices that answered with an error or an unusable reply, and why.
    seconds : dict of str to float
        Wall time per exchange, and ``reconstruct``: the server's unmasking work.
    """

    server_round: int
    devices: int
    num_shares: int
    threshold: int
    contributors: int = 0
    dropped: dict[str, list[int]] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def secagg_config(privacy: Any, *, equal_weights: bool, max_weight: float) -> SecAggConfig:
    """The protocol settings of a run's ``[privacy]`` section.

    Parameters
    ----------
    privacy : fedge.contracts.config.PrivacyConfig
        ``secagg_shares`` and ``secagg_threshold``: fractions up to 1, whole counts above.
    equal_weights : bool
        Devices report a weight of 1 (DP campaigns): the quantiser's weight scale is 1.
    max_weight : float
        Otherwise the largest ``num-examples`` a device can report (its window).

    Raises
    ------
    ValueError
        In one line, naming the ``privacy.`` key.
    """

    def count_or_fraction(key: str, value: float) -> int | float:
        if value <= 1:
            return float(value)
        if not float(value).is_integer():
            raise ValueError(
                f"privacy.{key}: {value!r} is neither a fraction up to 1 nor a whole count"
            )
        return int(value)

    shares = count_or_fraction("secagg_shares", privacy.secagg_shares)
    threshold = count_or_fraction("secagg_threshold", privacy.secagg_threshold)
    try:
        return SecAggConfig(
            num_shares=shares,
            reconstruction_threshold=threshold,
            max_weight=1.0 if equal_weights else float(max_weight),
        )
    except ValueError as exc:
        raise ValueError(str(exc).replace("secagg.num_shares", "privacy.secagg_shares").replace(
            "secagg.reconstruction_threshold", "privacy.secagg_threshold")) from None
