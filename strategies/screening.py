"""Screen client updates before any Flower strategy aggregates them.

:class:`UpdateScreening` wraps a Message-API strategy. Every train reply is
checked against the global model the round started from: same array names,
shapes and dtypes, only finite values, and an update norm that is not far
beyond the others'. Replies that fail are dropped with a logged reason naming
the node; the round goes on with the rest.

>>> import numpy as np
>>> base = {"w": np.zeros(3, np.float32)}
>>> ok = {"w": np.ones(3, np.float32)}
>>> screen_update(ok, base, reference_norm=None)
>>> screen_update({"w": np.array([1, np.nan, 0], np.float32)}, base, reference_norm=None)
'non-finite values in w'
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.wrapper import StrategyWrapper

log = logging.getLogger("fedge.server")


def screen_update(
    update: Mapping[str, np.ndarray],
    base: Mapping[str, np.ndarray],
    *,
    reference_norm: float | None,
    norm_factor: float = 10.0,
) -> str | None:
    """Why ``update`` must not be aggregated, or None when it may.

    Parameters
    ----------
    update : mapping of str to ndarray
        The arrays a client sent.
    base : mapping of str to ndarray
        The global arrays the round started from.
    reference_norm : float or None
        Typical update norm of this round (the median); None skips the norm test.
    norm_factor : float, default 10.0
        An update whose distance to ``base`` exceeds ``norm_factor * reference_norm``
        is refused.
    """
    if set(update) != set(base):
        return f"array names {sorted(update)} differ from the model's {sorted(base)}"
    for name, value in update.items():
        ref = base[name]
        if value.shape != ref.shape:
            return f"{name} has shape {value.shape}, expected {ref.shape}"
        if value.dtype != ref.dtype:
            return f"{name} has dtype {value.dtype}, expected {ref.dtype}"
        if not np.isfinite(value).all():
            return f"non-finite values in {name}"
    if reference_norm is not None and reference_norm > 0:
        norm = update_norm(update, base)
        if norm > norm_factor * reference_norm:
            return f"update norm {norm:.3g} is {norm / reference_norm:.1f}x the round's median"
    return None


def update_norm(update: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> float:
    """L2 distance between two sets of arrays."""
    total = 0.0
    for name, value in update.items():
        diff = value.astype(np.float64) - base[name].astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return float(np.sqrt(total))


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


class UpdateScreening(StrategyWrapper):
    """Drop malformed or outsized client updates, then aggregate with ``strategy``.

    Parameters
    ----------
    strategy : Strategy
        The Flower strategy that aggregates what passes.
    norm_factor : float or None, default 10.0
        Refuse updates whose norm exceeds this multiple of the round's median
        norm (tested when at least 3 updates arrive); None turns the test off.
    name_of : callable, optional
        Names a node in log lines (e.g. its device id); the node id by default.
    arrayrecord_key : str, default "arrays"
        Record holding the model in train messages.
    """

    def __init__(
        self,
        strategy: Strategy,
        norm_factor: float | None = 10.0,
        name_of: Callable[[int], str] | None = None,
        arrayrecord_key: str = "arrays",
    ) -> None:
        super().__init__(strategy)
        self.norm_factor = norm_factor
        self.name_of = name_of or (lambda node: f"node {node}")
        self.arrayrecord_key = arrayrecord_key
        self.rejected: list[tuple[int, int, str]] = []
        self._base: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"UpdateScreening(strategy={self.strategy!r}, norm_factor={self.norm_factor})"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._base = _numpy(arrays)
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        reasons: dict[int, str] = {}
        updates: dict[int, dict[str, np.ndarray]] = {}
        for i, msg in enumerate(replies):
            if msg.has_content() and self.arrayrecord_key in msg.content.array_records:
                update = _numpy(msg.content.array_records[self.arrayrecord_key])
                why = screen_update(update, self._base, reference_norm=None)
                if why is None:
                    updates[i] = update
                else:
                    reasons[i] = why
        if self.norm_factor is not None and len(updates) >= 3:
            norms = {i: update_norm(u, self._base) for i, u in updates.items()}
            reference = float(np.median(list(norms.values())))
            for i, norm in norms.items():
                if reference > 0 and norm > self.norm_factor * reference:
                    reasons[i] = (
                        f"update norm {norm:.3g} is {norm / reference:.1f}x the round's median"
                    )
        kept = []
        for i, msg in enumerate(replies):
            if i in reasons:
                node = msg.metadata.src_node_id
                log.warning(
                    "round %d: rejected the update of %s: %s",
                    server_round, self.name_of(node), reasons[i],
                )
                self.rejected.append((server_round, node, reasons[i]))
                continue
            kept.append(msg)
        return self.strategy.aggregate_train(server_round, kept)
