"""ClusteredFedAvg: several models trained in the same Flower rounds, one per cluster of nodes.

All cluster models travel through Flower's ``Strategy.start`` loop as one
``ArrayRecord`` whose keys are prefixed with the cluster id
(:func:`pack_models`); each node receives only its own cluster's model, and
the replies of each cluster are averaged among themselves (FedAvg per
cluster). Evaluation works the same way and reports every metric per cluster
as ``"<cluster>/<metric>"`` beside the overall average.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

SEPARATOR = "/"


def pack_models(models: Mapping[int, ArrayRecord]) -> ArrayRecord:
    """One record holding every cluster's model, keys prefixed by ``"<cluster>/"``.

    >>> import numpy as np
    >>> from flwr.app import Array
    >>> packed = pack_models({3: ArrayRecord({"w": Array(np.zeros(2))})})
    >>> list(packed)
    ['3/w']
    """
    out = ArrayRecord()
    for key, record in sorted(models.items()):
        for name, array in record.items():
            out[f"{key}{SEPARATOR}{name}"] = array
    return out


def unpack_models(packed: ArrayRecord) -> dict[int, ArrayRecord]:
    """Inverse of :func:`pack_models`."""
    out: dict[int, ArrayRecord] = {}
    for full, array in packed.items():
        key, name = full.split(SEPARATOR, 1)
        out.setdefault(int(key), ArrayRecord())[name] = array
    return out


class ClusteredFedAvg(FedAvg):
    """Federated averaging within each cluster of nodes.

    Parameters
    ----------
    assignment : Mapping[int, int]
        Flower node id -> cluster id. Nodes outside it are not sampled.
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (``fraction_train``,
        ``min_train_nodes``, ``weighted_by_key``, ...). Every assigned node the
        grid lists takes part in every round.
    """

    def __init__(self, assignment: Mapping[int, int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.assignment = dict(assignment)
        self._models: dict[int, ArrayRecord] = {}

    def __repr__(self) -> str:
        return f"ClusteredFedAvg(clusters={sorted(set(self.assignment.values()))})"

    def _messages(
        self, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, message_type: str
    ) -> list[Message]:
        self._models = unpack_models(arrays)
        messages = []
        for node in grid.get_node_ids():
            key = self.assignment.get(node)
            if key is None or key not in self._models:
                continue
            content = RecordDict(
                {self.arrayrecord_key: self._models[key], self.configrecord_key: config}
            )
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each node its cluster's model."""
        config["server-round"] = server_round
        return self._messages(arrays, config, grid, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each node its cluster's candidate model."""
        config["server-round"] = server_round
        return self._messages(arrays, config, grid, MessageType.EVALUATE)

    def _groups(self, replies: list[Message]) -> dict[int, list[RecordDict]]:
        groups: dict[int, list[RecordDict]] = {}
        for msg in replies:
            key = self.assignment.get(msg.metadata.src_node_id)
            if key is not None:
                groups.setdefault(key, []).append(msg.content)
        return groups

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg within each cluster; a cluster without replies keeps its model."""
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        groups = self._groups(valid)
        models = dict(self._models)
        for key, contents in groups.items():
            models[key] = aggregate_arrayrecords(contents, self.weighted_by_key)
        metrics = self._metrics(groups, [m.content for m in valid], train=True)
        return pack_models(models), metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted metrics overall and per cluster."""
        valid, _ = self._check_and_log_replies(list(replies), is_train=False)
        if not valid:
            return None
        return self._metrics(self._groups(valid), [m.content for m in valid], train=False)

    def _metrics(
        self, groups: Mapping[int, list[RecordDict]], everything: list[RecordDict], *, train: bool
    ) -> MetricRecord:
        aggregate = self.train_metrics_aggr_fn if train else self.evaluate_metrics_aggr_fn
        out = MetricRecord(dict(aggregate(everything, self.weighted_by_key)))
        for key, contents in sorted(groups.items()):
            for name, value in aggregate(contents, self.weighted_by_key).items():
                out[f"{key}{SEPARATOR}{name}"] = value
        return out
