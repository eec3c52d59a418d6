"""FedAvg with fedge's single-pass weighted averaging."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from strategies.aggregation import aggregate_arrayrecords


class FedAvg(FlowerFedAvg):
    """Flower's FedAvg, aggregating with :func:`strategies.aggregation.aggregate_arrayrecords`.

    Takes exactly the parameters of :class:`flwr.serverapp.strategy.FedAvg`
    (``fraction_train=1.0``, ``fraction_evaluate=1.0``, ``min_train_nodes=2``,
    ``min_evaluate_nodes=2``, ``min_available_nodes=2``,
    ``weighted_by_key="num-examples"``, ``arrayrecord_key="arrays"``,
    ``configrecord_key="config"``, ...); the arithmetic is the same weighted
    mean, computed in one pass over each reply's arrays without copying them.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies' arrays (weighted mean) and metrics."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        arrays = aggregate_arrayrecords(contents, self.weighted_by_key)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return arrays, metrics
