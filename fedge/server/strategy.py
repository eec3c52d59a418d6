"""The configured Flower strategy for one campaign, and the grid view it samples from."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from fedge.contracts.config import FedgeConfig
from fedge.engines.view import GridView
from strategies.compressed import CompressedUploads
from strategies.fedavg import FedAvg
from strategies.screening import UpdateScreening


class DeviceGrid(GridView):
    """A view of a grid restricted to some nodes, replying in a fixed node order.

    Flower strategies sample from ``get_node_ids()``; handing them this view is
    how a campaign trains only the chosen devices. Replies come back sorted by
    the given order so aggregation is the same arithmetic on every engine.
    """

    def __init__(self, grid: Grid, node_ids: Sequence[int]) -> None:
        super().__init__(grid)
        self._nodes = list(node_ids)
        self._rank = {n: i for i, n in enumerate(self._nodes)}

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        return sorted(replies, key=lambda m: self._rank.get(m.metadata.src_node_id, len(self._rank)))


def make_strategy(cfg: FedgeConfig, n_devices: int) -> Strategy:
    """The configured Flower strategy, sized for a campaign over ``n_devices``."""
    # Every device of the campaign is asked; a round counts when campaign.min_devices
    # of them reply within run.reply_timeout (enforced by fedge.engines.quorum.ReplyQuorum).
    quorum = min(cfg.campaign.min_devices, n_devices)
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": quorum,
        "min_evaluate_nodes": quorum,
        "min_available_nodes": quorum,
    }
    c = cfg.campaign
    strategy: Strategy
    if c.strategy == "fedprox":
        strategy = FedProx(proximal_mu=c.proximal_mu, **common)
    elif c.strategy == "fedadam":
        strategy = FedAdam(eta=c.server_lr, eta_l=c.lr, **common)
    elif c.strategy == "fedmedian":
        strategy = FedMedian(**common)
    elif c.strategy == "fedtrimmedavg":
        strategy = FedTrimmedAvg(beta=c.trim_beta, **common)
    elif c.strategy in ("krum", "multikrum"):
        # Krum needs n > 2f + 2 updates; assume no more attackers than that allows.
        malicious = min(c.assumed_malicious, max(0, (n_devices - 3) // 2))
        kind = Krum if c.strategy == "krum" else MultiKrum
        strategy = kind(num_malicious_nodes=malicious, **common)
    else:
        strategy = FedAvg(**common)
    if c.screen_updates:
        strategy = UpdateScreening(strategy, norm_factor=c.screen_norm_factor)
    if c.compression != "none":
        # Decode first: screening and aggregation see the weights the devices meant.
        strategy = CompressedUploads(strategy, c.compression)
    return strategy
