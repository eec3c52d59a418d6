"""A strategy wrapper that decodes compressed uploads before the strategy aggregates them."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedge.contracts import protocol as p
from fedge.contracts.compression import CODECS, decode_update
from fedge.contracts.wire import from_arrays, to_arrays
from strategies.aggregation import array_view
from strategies.wrapper import StrategyWrapper

log = logging.getLogger("fedge.server")


class CompressedUploads(StrategyWrapper):
    """Ask devices for compressed train replies and decode them for ``strategy``.

    The wrapped strategy samples, configures and aggregates as it always does;
    this wrapper only adds the codec to each train message's config (the
    device encodes its update with it, see :mod:`fedge.contracts.compression`) and turns
    each reply back into full weights, relative to the global model sent that
    round, before the wrapped strategy sees it. A reply that cannot be decoded
    is logged and dropped.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The strategy to wrap.
    codec : {"float16", "int8", "none"}, default="int8"
        The codec devices use for their train replies.
    """

    def __init__(self, strategy: Strategy, codec: str = "int8") -> None:
        if codec not in CODECS:
            raise ValueError(
                f"campaign.compression: {codec!r} is not allowed; allowed: {', '.join(CODECS)}"
            )
        super().__init__(strategy)
        self.codec = codec
        self._sent: dict[int, dict[str, np.ndarray]] = {}

    def __repr__(self) -> str:
        return f"CompressedUploads(strategy={self.strategy!r}, codec={self.codec!r})"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's train messages, with the codec in their config."""
        self._sent = {server_round: from_arrays(arrays)}
        config[p.COMPRESSION] = self.codec
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode each reply's arrays, then let the wrapped strategy aggregate."""
        reference = self._sent.get(server_round)
        kept = []
        for msg in replies:
            if reference is not None and not msg.has_error() and p.ARRAYS in msg.content.array_records:
                try:
                    record = msg.content.array_records[p.ARRAYS]
                    encoded = {k: array_view(v) for k, v in record.items()}
                    decoded = decode_update(encoded, reference, self.codec)
                except (ValueError, TypeError) as exc:
                    log.warning(
                        "round %d: dropped an undecodable reply from node %s: %s",
                        server_round,
                        msg.metadata.src_node_id,
                        exc,
                    )
                    continue
                msg.content[p.ARRAYS] = to_arrays(decoded)
            kept.append(msg)
        return self.strategy.aggregate_train(server_round, kept)

    def summary(self) -> None:
        """The wrapped strategy's summary and the codec."""
        self.strategy.summary()
        log.info("uploads compressed with %s", self.codec)
