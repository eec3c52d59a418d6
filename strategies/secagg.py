"""Secure aggregation (SecAgg+) for Flower's Message-API strategies.

:class:`SecAggGrid` is a Flower ``Grid`` a strategy is handed instead of the
plain one. When the strategy sends its ``train`` messages, the grid runs the
SecAgg+ protocol with the same devices as extra message exchanges:

1. ``query.secagg_setup``: each device makes two key pairs for the round and
   returns the public keys;
2. ``query.secagg_share_keys``: each device gets its neighbours' public keys
   and returns Shamir shares of its private mask seed and of its mask key,
   each encrypted for one neighbour (the server only relays them);
3. ``train``: the strategy's message plus the shares addressed to the device;
   the device trains as usual, weights its update by its number of examples,
   quantises it and returns it under a private mask and pairwise masks;
4. ``query.secagg_unmask``: the devices still present return the shares that
   let the server remove the private masks of those who sent a vector and the
   pairwise masks left by those who dropped out.

The strategy then receives ONE train reply: the weighted average of the
devices' arrays and metrics, with ``num-examples`` set to the total. FedAvg,
FedProx and FedAdam aggregate one reply to itself, so they run unchanged.
Aggregators that need each update (median, trimmed mean, Krum, Bulyan,
server-side DP clipping) cannot work under secure aggregation: hiding the
individual updates is the point.

The server only ever holds public keys, ciphertexts, masked vectors and the
unmasked sum. A round survives devices dropping out at any stage as long as
every device's secrets can still be reconstructed from ``threshold`` shares;
below that it stops with :class:`SecAggError`.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_public_key
from numpy.typing import NDArray

from fedge.engines.view import GridView
from fedge.privacy import secagg_protocol as sp
from fedge.privacy.secagg_settings import (
    SecAggConfig,
    SecAggError,
    SecAggRoundReport,
)

log = logging.getLogger("fedge.secagg")


@dataclass
class _Round:
    token: str
    config: SecAggConfig
    train: dict[int, Message]
    report: SecAggRoundReport
    timeout: float | None
    threshold: int = 0
    neighbours: dict[int, set[int]] = field(default_factory=dict)
    pk1: dict[int, bytes] = field(default_factory=dict)
    pk2: dict[int, bytes] = field(default_factory=dict)


class SecAggGrid(GridView):
    """A grid that runs every ``train`` exchange under SecAgg+ and returns one aggregate reply.

    Parameters
    ----------
    grid : Grid
        The grid to send through (e.g. fedge's ``DeviceGrid`` view of a campaign).
    node_ids : sequence of int or None, default None
        Devices the strategy may sample; None: all of ``grid``'s.
    config : SecAggConfig or None, default None
        Protocol settings; None: the defaults.

    Attributes
    ----------
    reports : list of SecAggRoundReport
        One per secure round, in order.
    """

    def __init__(
        self, grid: Grid, node_ids: Sequence[int] | None = None, config: SecAggConfig | None = None
    ) -> None:
        super().__init__(grid)
        self._nodes = None if node_ids is None else list(node_ids)
        self.config = config or SecAggConfig()
        self.reports: list[SecAggRoundReport] = []
        self._rng = random.SystemRandom()
        self._forward: dict[int, list[tuple[int, bytes]]] = {}

    def __repr__(self) -> str:
        return f"SecAggGrid({self._grid!r}, node_ids={self._nodes!r}, config={self.config!r})"

    def get_node_ids(self) -> Iterable[int]:
        available = list(self._grid.get_node_ids())
        if self._nodes is None:
            return available
        return [n for n in self._nodes if n in set(available)]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        batch = list(messages)
        if any(m.metadata.message_type == sp.TRAIN for m in batch):
            raise SecAggError(
                "under secure aggregation, train messages go through send_and_receive"
            )
        return self._grid.push_messages(batch)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        batch = list(messages)
        train = [m for m in batch if m.metadata.message_type == sp.TRAIN]
        others = [m for m in batch if m.metadata.message_type != sp.TRAIN]
        replies: list[Message] = []
        if others:
            replies += list(self._grid.send_and_receive(others, timeout=timeout))
        if train:
            replies.append(self.secure_round(train, timeout=timeout))
        return replies

    # -- the protocol -------------------------------------------------------------------------

    def secure_round(self, train: Sequence[Message], *, timeout: float | None = None) -> Message:
        """Run SecAgg+ over the devices ``train`` is addressed to; the aggregate as one reply.

        Raises
        ------
        SecAggError
            When fewer devices than the protocol needs remain at some stage.
        """
        by_node = {m.metadata.dst_node_id: m for m in train}
        if len(by_node) != len(train):
            raise SecAggError("secure aggregation: two train messages for one device")
        if len(by_node) < 2:
            raise SecAggError(
                f"secure aggregation needs at least 2 devices in a round, got {len(by_node)}"
            )
        first = train[0]
        config_rec = next(iter(first.content.config_records.values()), ConfigRecord())
        server_round = int(cast(int, config_rec.get(sp.SERVER_ROUND, len(self.reports) + 1)))
        try:
            sp.check_ranges(self.config.quantization_range, self.config.modulus_range, len(by_node))
        except ValueError as exc:
            raise SecAggError(f"secure aggregation: {exc}") from None
        k, t = self.config.shares_and_threshold(len(by_node))
        report = SecAggRoundReport(server_round, len(by_node), k, t)
        self.reports.append(report)
        state = _Round(
            token=f"{server_round}-{uuid.uuid4().hex}",
            config=self.config,
            train=by_node,
            report=report,
            timeout=self.config.timeout if self.config.timeout is not None else timeout,
            threshold=t,
        )
        active = self._setup(state, sorted(by_node), k)
        active = self._share_keys(state, active)
        summed, contributors, dead, layout = self._collect_masked(state, active)
        aggregate = self._unmask(state, summed, contributors, dead)
        report.contributors = len(contributors)
        log.info(
            "secure round %d: %d of %d devices aggregated (threshold %d of %d shares)",
            server_round,
            len(contributors),
            len(by_node),
            t,
            k,
        )
        return self._reply(state, aggregate, len(contributors), layout)

    def _exchange(
        self, state: _Round, stage: str, messages: list[Message]
    ) -> dict[int, ConfigRecord | RecordDict]:
        started = time.perf_counter()
        replies = list(self._grid.send_and_receive(messages, timeout=state.timeout))
        state.report.seconds[stage] = state.report.seconds.get(stage, 0.0) + (
            time.perf_counter() - started
        )
        got: dict[int, ConfigRecord | RecordDict] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                state.report.failures[node] = f"{stage}: {reply.error.reason}"
                continue
            if stage == "train":
                got[node] = reply.content
            elif sp.RECORD in reply.content.config_records:
                got[node] = reply.content.config_records[sp.RECORD]
        sent = [m.metadata.dst_node_id for m in messages]
        state.report.dropped[stage] = sorted(n for n in sent if n not in got)
        return got

    def _abort(self, state: _Round, stage: str, detail: str) -> SecAggError:
        dropped = sum(len(v) for v in state.report.dropped.values())
        return SecAggError(
            f"secure aggregation aborted in round {state.report.server_round} at stage "
            f"{stage!r}: {detail} ({dropped} of {state.report.devices} devices dropped so far; "
            f"threshold {state.threshold} of {state.report.num_shares} shares)"
        )

    def _query(self, state: _Round, node: int, kind: str, values: dict[str, Any]) -> Message:
        record = ConfigRecord(sp.without_empty_lists({sp.ROUND: state.token, **values}))
        group = state.train[node].metadata.group_id
        return Message(RecordDict({sp.RECORD: record}), node, kind, group_id=group)

    def _setup(self, state: _Round, nodes: list[int], k: int) -> list[int]:
        c = state.config
        settings = {
            sp.CLIPPING_RANGE: float(c.clipping_range),
            sp.METRIC_CLIPPING_RANGE: float(c.metric_clipping_range),
            sp.QUANTIZATION_RANGE: c.quantization_range,
            sp.MODULUS_RANGE: c.modulus_range,
            sp.MAX_WEIGHT: float(c.max_weight),
            sp.SERVER_ROUND: state.report.server_round,
        }
        got = self._exchange(
            state, "setup", [self._query(state, n, sp.SETUP, settings) for n in nodes]
        )
        for node, rec in got.items():
            pk1, pk2 = rec.get(sp.PK1), rec.get(sp.PK2)
            if isinstance(pk1, bytes) and isinstance(pk2, bytes):
                state.pk1[node], state.pk2[node] = pk1, pk2
        active = sorted(state.pk1)
        if len(active) < state.threshold:
            raise self._abort(
                state, "setup", f"{len(active)} devices sent keys, {state.threshold} needed"
            )
        order = list(active)
        self._rng.shuffle(order)
        size = min(k, len(order))
        if size >= len(order):
            state.neighbours = {n: set(order) for n in order}
        else:
            half = size // 2
            state.neighbours = {
                n: {order[(i + d) % len(order)] for d in range(-half, half + 1)}
                for i, n in enumerate(order)
            }
        return active

    def _check_neighbourhoods(
        self, state: _Round, stage: str, owners: Iterable[int], present: set[int]
    ) -> None:
        for node in owners:
            alive = len(state.neighbours[node] & present)
            if alive < state.threshold:
                raise self._abort(
                    state,
                    stage,
                    f"device {node} has {alive} neighbours left to hold its shares, "
                    f"{state.threshold} needed",
                )

    def _share_keys(self, state: _Round, active: list[int]) -> list[int]:
        messages = []
        for node in active:
            nbrs = sorted(state.neighbours[node])
            values = {
                sp.NODES: nbrs,
                sp.PK1_LIST: [state.pk1[n] for n in nbrs],
                sp.PK2_LIST: [state.pk2[n] for n in nbrs],
                sp.THRESHOLD: state.threshold,
            }
            messages.append(self._query(state, node, sp.SHARE_KEYS, values))
        got = self._exchange(state, "share_keys", messages)
        self._forward = {n: [] for n in got}
        for src, rec in sorted(got.items()):
            dsts, ctxts = rec.get(sp.DSTS, []), rec.get(sp.CTXTS, [])
            if not isinstance(dsts, list) or not isinstance(ctxts, list) or len(dsts) != len(ctxts):
                state.report.failures[src] = "share_keys: malformed reply"
                continue
            for dst, ctxt in zip(dsts, ctxts, strict=True):
                if (
                    dst in self._forward
                    and dst in state.neighbours[src]
                    and isinstance(ctxt, bytes)
                ):
                    self._forward[dst].append((cast(int, src), ctxt))
        present = set(self._forward)
        self._check_neighbourhoods(state, "share_keys", present, present)
        return sorted(present)

    def _collect_masked(
        self, state: _Round, active: list[int]
    ) -> tuple[list[NDArray[np.int64]], list[int], list[int], _Layout]:
        messages = []
        for node in active:
            original = state.train[node]
            pairs = [p for p in self._forward[node] if p[0] in active]
            content = RecordDict(dict(original.content.items()))
            content[sp.RECORD] = ConfigRecord(
                sp.without_empty_lists(
                    {
                        sp.ROUND: state.token,
                        sp.SRCS: [p[0] for p in pairs],
                        sp.CTXTS: [p[1] for p in pairs],
                        sp.WEIGHT_KEY: state.config.weighted_by_key,
                    }
                )
            )
            md = original.metadata
            messages.append(Message(content, node, sp.TRAIN, ttl=md.ttl, group_id=md.group_id))
        self._forward = {}
        got = self._exchange(state, "train", messages)
        layout = _Layout.of_model(state.train[active[0]], state.config.weighted_by_key)
        summed: list[NDArray[np.int64]] | None = None
        contributors = []
        for node, reply in sorted(got.items()):
            vector = layout.read(cast(RecordDict, reply))
            if vector is None:
                state.report.failures[node] = "train: masked reply does not match the model"
                continue
            contributors.append(node)
            summed = (
                vector if summed is None else [a + b for a, b in zip(summed, vector, strict=True)]
            )
        if summed is None or len(contributors) < 2:
            raise self._abort(state, "train", f"{len(contributors)} masked vectors received")
        modulus = state.config.modulus_range
        summed = [np.mod(s, modulus) for s in summed]
        dead = sorted(set(active) - set(contributors))
        present = set(contributors)
        self._check_neighbourhoods(state, "train", contributors + dead, present)
        return summed, contributors, dead, layout

    def _unmask(
        self,
        state: _Round,
        summed: list[NDArray[np.int64]],
        contributors: list[int],
        dead: list[int],
    ) -> list[NDArray[np.int64]]:
        alive, gone = set(contributors), set(dead)
        messages = [
            self._query(
                state,
                node,
                sp.UNMASK,
                {
                    sp.ACTIVE: sorted(state.neighbours[node] & alive),
                    sp.DEAD: sorted(state.neighbours[node] & gone),
                },
            )
            for node in contributors
        ]
        got = self._exchange(state, "unmask", messages)
        started = time.perf_counter()
        seed_shares: dict[int, list[bytes]] = {n: [] for n in contributors}
        key_shares: dict[int, list[bytes]] = {n: [] for n in dead}
        for holder, rec in sorted(got.items()):
            owners, shares = rec.get(sp.OWNERS, []), rec.get(sp.SHARES, [])
            if not isinstance(owners, list) or not isinstance(shares, list):
                continue
            for owner, share in zip(owners, shares, strict=False):
                if not isinstance(share, bytes) or owner not in state.neighbours[holder]:
                    continue
                if owner in seed_shares:
                    seed_shares[cast(int, owner)].append(share)
                elif owner in key_shares:
                    key_shares[cast(int, owner)].append(share)
        modulus = state.config.modulus_range
        shapes = [s.shape for s in summed]
        total = list(summed)
        for owner, shares in seed_shares.items():
            seed = self._reconstruct(state, owner, shares)
            mask = sp.expand_mask(seed, modulus, shapes)
            total = [a - m for a, m in zip(total, mask, strict=True)]
        for owner, shares in key_shares.items():
            private = sp.key_from_scalar(self._reconstruct(state, owner, shares), state.pk1[owner])
            if private is None:
                raise self._abort(state, "unmask", f"device {owner}'s rebuilt key is not its own")
            for other in sorted(state.neighbours[owner] & alive):
                seed = generate_shared_key(private, bytes_to_public_key(state.pk1[other]))
                mask = sp.expand_mask(seed, modulus, shapes)
                sign = -1 if other > owner else 1
                total = [a + sign * m for a, m in zip(total, mask, strict=True)]
        result = [np.mod(a, modulus) for a in total]
        state.report.seconds["reconstruct"] = time.perf_counter() - started
        ceiling = len(contributors) * state.config.quantization_range
        if any(int(r.max(initial=0)) > ceiling for r in result):
            raise self._abort(state, "unmask", "the unmasked sum is out of range (bad shares)")
        return result

    def _reconstruct(self, state: _Round, owner: int, shares: list[bytes]) -> bytes:
        if len(shares) < state.threshold:
            raise self._abort(
                state,
                "unmask",
                f"{len(shares)} shares of device {owner}'s secret arrived, "
                f"{state.threshold} needed",
            )
        try:
            # Any `threshold` shares determine the secret; interpolating more only costs time
            # (a wrong share shows up in the range check or the public-key check).
            return combine_shares(shares[: state.threshold])
        except ValueError:
            raise self._abort(state, "unmask", f"device {owner}'s shares do not combine") from None

    def _reply(
        self, state: _Round, summed: list[NDArray[np.int64]], contributors: int, layout: _Layout
    ) -> Message:
        c = state.config
        q = c.quantization_range
        weight_q = int(summed[-1])
        if weight_q <= 0:
            raise self._abort(state, "unmask", "the devices' total weight is zero")
        n_model = len(layout.names)
        model = sp.dequantize_sum(summed[:n_model], c.clipping_range, q, contributors)
        metrics = sp.dequantize_sum(summed[n_model:-1], c.metric_clipping_range, q, contributors)
        total_weight = weight_q / q
        arrays = ArrayRecord(
            {
                name: Array((model[i] / total_weight).astype(layout.dtypes[i]))
                for i, name in enumerate(layout.names)
            }
        )
        values: dict[str, Any] = {}
        for j, key in enumerate(layout.metric_keys):
            avg = metrics[j] / total_weight
            values[key] = float(avg) if avg.ndim == 0 else [float(v) for v in avg]
        values[c.weighted_by_key] = round(weight_q * c.max_weight / q)
        content = RecordDict(
            {layout.arrays_name: arrays, layout.metrics_name: MetricRecord(values)}
        )
        return Message(content, reply_to=state.train[min(state.train)])


@dataclass
class _Layout:
    """Names, shapes and order of the values in a masked vector."""

    arrays_name: str
    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[np.dtype[Any]]
    weight_key: str
    metrics_name: str = ""
    metric_keys: list[str] = field(default_factory=list)
    metric_shapes: list[tuple[int, ...]] = field(default_factory=list)

    @classmethod
    def of_model(cls, train: Message, weight_key: str) -> _Layout:
        if len(train.content.array_records) != 1:
            raise SecAggError("secure aggregation: a train message must carry one array record")
        name, record = next(iter(train.content.array_records.items()))
        arrays = [record[k].numpy() for k in record]
        return cls(
            name,
            list(record.keys()),
            [a.shape for a in arrays],
            [np.dtype(a.dtype) for a in arrays],
            weight_key,
        )

    def read(self, content: RecordDict) -> list[NDArray[np.int64]] | None:
        """The masked vector in a device's reply; None when it does not fit the layout."""
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return None
        name, record = next(iter(content.array_records.items()))
        metrics_name, metrics = next(iter(content.metric_records.items()))
        if name != self.arrays_name or list(record.keys()) != self.names:
            return None
        model = [np.asarray(record[k].numpy(), dtype=np.int64) for k in self.names]
        if [a.shape for a in model] != self.shapes:
            return None
        keys = [k for k in metrics if k != self.weight_key]
        if self.weight_key not in metrics:
            return None
        extra = [np.asarray(metrics[k], dtype=np.int64) for k in keys]
        if not self.metrics_name:
            self.metrics_name, self.metric_keys = metrics_name, keys
            self.metric_shapes = [e.shape for e in extra]
        elif (metrics_name, keys, [e.shape for e in extra]) != (
            self.metrics_name,
            self.metric_keys,
            self.metric_shapes,
        ):
            return None
        return [*model, *extra, np.asarray(metrics[self.weight_key], dtype=np.int64)]


def secure_strategy_grid(
    grid: Grid,
    node_ids: Sequence[int] | None = None,
    config: SecAggConfig | None = None,
    **settings: Any,
) -> SecAggGrid:
    """The grid to hand a strategy so its training rounds run under secure aggregation.

    Parameters
    ----------
    grid : Grid
        The campaign's grid.
    node_ids : sequence of int or None
        The campaign's devices (None: all of ``grid``'s).
    config : SecAggConfig or None
        Protocol settings; keyword ``settings`` override single fields.

    Examples
    --------
    ::

        grid = secure_strategy_grid(DeviceGrid(self.grid, nodes), nodes, reconstruction_threshold=0.6)
        result = strategy.start(grid=grid, initial_arrays=..., num_rounds=...)
    """
    base = config or SecAggConfig()
    if settings:
        base = SecAggConfig(**{**vars(base), **settings})
    return SecAggGrid(grid, node_ids, base)
