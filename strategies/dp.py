"""Central differential privacy for a campaign's strategy, with Flower's own wrappers.

:func:`wrap_strategy_for_dp` puts one of Flower's Message-API fixed-clipping
wrappers around the campaign's strategy:

- ``clipping="server"``: :class:`~flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping`
  clips every device's update on the server, then adds Gaussian noise to the
  aggregate. It needs each update in the clear, so it cannot be combined with
  secure aggregation.
- ``clipping="client"``: :class:`~flwr.serverapp.strategy.DifferentialPrivacyClientSideFixedClipping`
  asks the devices to clip (``clipping_norm`` in the train config, applied by
  Flower's ``fixedclipping_mod`` from :func:`clients.secagg.privacy_mods`) and
  adds the noise to the aggregate. This one works under secure aggregation.

Both add noise of std ``noise_multiplier * clipping_norm / num_sampled_clients``
to the average. The epsilon this costs is accounted by
:class:`fedge.privacy.accounting.PrivacyBudget`.
"""

from __future__ import annotations

from typing import Literal

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

Clipping = Literal["server", "client"]


def wrap_strategy_for_dp(
    strategy: Strategy,
    noise_multiplier: float,
    clipping_norm: float,
    num_sampled_clients: int,
    *,
    clipping: Clipping = "server",
    secure_aggregation: bool = False,
) -> Strategy:
    """``strategy`` wrapped for central DP with fixed clipping.

    Parameters
    ----------
    strategy : Strategy
        The campaign's strategy (FedAvg, FedProx, FedAdam, ...).
    noise_multiplier : float
        Noise std divided by ``clipping_norm`` (``z`` in the accounting).
    clipping_norm : float
        L2 bound of each device's update.
    num_sampled_clients : int
        Devices per round (the noise is scaled to their average).
    clipping : {"server", "client"}, default "server"
        Where updates are clipped.
    secure_aggregation : bool, default False
        True when the strategy will run over a secure-aggregation grid;
        server-side clipping is then refused.

    Raises
    ------
    ValueError
        On a setting that cannot work, in one line.
    """
    if clipping not in ("server", "client"):
        raise ValueError(f"dp.clipping: {clipping!r} is not allowed; allowed: server, client")
    if clipping == "server" and secure_aggregation:
        raise ValueError(
            "dp.clipping: 'server' needs each device's update in the clear; "
            "under secure aggregation use 'client'"
        )
    if clipping == "client":
        return DifferentialPrivacyClientSideFixedClipping(
            strategy, noise_multiplier, clipping_norm, num_sampled_clients
        )
    return DifferentialPrivacyServerSideFixedClipping(
        strategy, noise_multiplier, clipping_norm, num_sampled_clients
    )
