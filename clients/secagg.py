"""The device's half of secure aggregation, and the device's privacy mods.

:func:`secagg_mod` is a Flower client mod. It answers the server's
``query.secagg_*`` messages (key generation, Shamir shares of the device's
secrets encrypted for each neighbour, shares for unmasking) and turns the
reply of the ordinary ``train`` handler into a masked vector: the update is
weighted by its number of examples, quantised, and hidden under a private mask
and one pairwise mask per neighbour. The server can remove the masks only from
the sum over devices.

Wire it as an app-wide mod and register the query actions it answers::

    app = ClientApp(mods=[egress_mod, *privacy_mods()])
    register_secagg_actions(app)

The round's secrets live in ``context.state`` (record ``fedge.secagg``): Flower
keeps a node's context on the node's side, across the worker processes that
may handle its messages, and never includes it in a reply.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedge.privacy import secagg_protocol as sp
from fedge.privacy.accounting import LocalDpParams

log = logging.getLogger("fedge.device")

STATE_RECORD = "fedge.secagg"
SECAGG_REFUSED = 4032


class SecAggProtocolError(ValueError):
    """A secure-aggregation message the device refuses to act on."""


@dataclass
class DeviceRound:
    """One device's secrets and progress in one secure-aggregation round.

    Holds the round token and settings from the setup message, this round's
    key pairs, the private mask seed, the neighbours' public keys, the keys of
    the encrypted channels to them, and the shares of every neighbour's
    secrets this device keeps. ``stage`` moves ``setup`` -> ``share_keys``
    -> ``masked`` -> ``done``; a new setup starts over.
    """

    round: str = ""
    server_round: int = 0
    stage: str = ""
    nid: int = 0
    clipping_range: float = 8.0
    metric_clipping_range: float = 64.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    max_weight: float = 1000.0
    sk1: bytes = b""
    pk1: bytes = b""
    sk2: bytes = b""
    pk2: bytes = b""
    threshold: int = 0
    rd_seed: bytes = b""
    nodes: list[int] = field(default_factory=list)
    pk1s: list[bytes] = field(default_factory=list)
    pk2s: list[bytes] = field(default_factory=list)
    channel_keys: list[bytes] = field(default_factory=list)
    share_owners: list[int] = field(default_factory=list)
    b_shares: list[bytes] = field(default_factory=list)
    sk_shares: list[bytes] = field(default_factory=list)

    def to_record(self) -> ConfigRecord:
        """The state as a ConfigRecord (kept in ``context.state``)."""
        return ConfigRecord(cast(Any, sp.without_empty_lists(dict(vars(self)))))

    @classmethod
    def from_record(cls, record: ConfigRecord | None) -> DeviceRound:
        """Read the state back; an empty round when there is none."""
        state = cls()
        if record is None:
            return state
        for key, value in record.items():
            if hasattr(state, key):
                setattr(state, key, list(value) if isinstance(value, list) else value)
        return state

    def pk1_of(self, node: int) -> bytes:
        """A neighbour's mask-agreement public key."""
        return self.pk1s[self.nodes.index(node)]


def _config(msg: Message) -> ConfigRecord:
    record = msg.content.config_records.get(sp.RECORD) if msg.has_content() else None
    if record is None:
        raise SecAggProtocolError(f"{msg.metadata.message_type}: no {sp.RECORD!r} record")
    return record


def _get(config: ConfigRecord, key: str, kind: type | tuple[type, ...]) -> Any:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise SecAggProtocolError(f"secagg: {key!r} must be {kind}, got {value!r}")
    return value


def _int_list(config: ConfigRecord, key: str) -> list[int]:
    value = config.get(key, [])
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise SecAggProtocolError(f"secagg: {key!r} must be a list of ints")
    return list(cast(list[int], value))


def _bytes_list(config: ConfigRecord, key: str) -> list[bytes]:
    value = config.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise SecAggProtocolError(f"secagg: {key!r} must be a list of bytes")
    return list(cast(list[bytes], value))


def _expect(state: DeviceRound, config: ConfigRecord, stage: str) -> None:
    token = _get(config, sp.ROUND, str)
    if token != state.round:
        raise SecAggProtocolError(
            f"secagg: round {token!r} is not the round set up ({state.round!r})"
        )
    if state.stage != stage:
        raise SecAggProtocolError(
            f"secagg: expected the {stage!r} stage to be done, at {state.stage!r}"
        )


def setup(state: DeviceRound, msg: Message) -> dict[str, Any]:
    """Stage 1: fresh key pairs for this round; the public halves go to the server."""
    config = _config(msg)
    vars(state).update(vars(DeviceRound()))
    state.round = _get(config, sp.ROUND, str)
    state.nid = msg.metadata.dst_node_id
    state.server_round = int(_get(config, sp.SERVER_ROUND, int))
    state.clipping_range = float(_get(config, sp.CLIPPING_RANGE, (int, float)))
    state.metric_clipping_range = float(_get(config, sp.METRIC_CLIPPING_RANGE, (int, float)))
    state.quantization_range = _get(config, sp.QUANTIZATION_RANGE, int)
    state.modulus_range = _get(config, sp.MODULUS_RANGE, int)
    state.max_weight = float(_get(config, sp.MAX_WEIGHT, (int, float)))
    try:
        sp.check_ranges(state.quantization_range, state.modulus_range, 1)
    except ValueError as exc:
        raise SecAggProtocolError(f"secagg setup: {exc}") from None
    if state.clipping_range <= 0 or state.metric_clipping_range <= 0 or state.max_weight <= 0:
        raise SecAggProtocolError("secagg setup: clipping ranges and max weight must be positive")
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    state.sk1, state.pk1 = private_key_to_bytes(sk1), public_key_to_bytes(pk1)
    state.sk2, state.pk2 = private_key_to_bytes(sk2), public_key_to_bytes(pk2)
    state.stage = "setup"
    return {sp.PK1: state.pk1, sp.PK2: state.pk2}


def share_keys(state: DeviceRound, msg: Message) -> dict[str, Any]:
    """Stage 2: Shamir-share the private mask seed and the mask key among the neighbours.

    Each neighbour's pair of shares is encrypted with a key agreed (ECDH) with
    that neighbour, so the server only relays ciphertexts.
    """
    config = _config(msg)
    _expect(state, config, "setup")
    nodes = _int_list(config, sp.NODES)
    pk1s, pk2s = _bytes_list(config, sp.PK1_LIST), _bytes_list(config, sp.PK2_LIST)
    threshold = _get(config, sp.THRESHOLD, int)
    if not len(nodes) == len(pk1s) == len(pk2s) or len(set(nodes)) != len(nodes):
        raise SecAggProtocolError("secagg share_keys: malformed neighbour list")
    if state.nid not in nodes:
        raise SecAggProtocolError("secagg share_keys: this device is not among its neighbours")
    if threshold < 2 or len(nodes) < threshold:
        raise SecAggProtocolError(
            f"secagg share_keys: {len(nodes)} neighbours cannot meet threshold {threshold}"
        )
    if len(set(pk1s + pk2s)) != 2 * len(nodes):
        raise SecAggProtocolError("secagg share_keys: public keys are not unique")
    own = nodes.index(state.nid)
    if pk1s[own] != state.pk1 or pk2s[own] != state.pk2:
        raise SecAggProtocolError("secagg share_keys: this device's public keys were altered")
    state.nodes, state.pk1s, state.pk2s, state.threshold = nodes, pk1s, pk2s, threshold
    state.rd_seed = os.urandom(32)
    b_shares = create_shares(state.rd_seed, threshold, len(nodes))
    sk_shares = create_shares(sp.private_scalar(state.sk1), threshold, len(nodes))
    sk2 = bytes_to_private_key(state.sk2)
    dsts, ctxts = [], []
    state.channel_keys = []
    for idx, node in enumerate(nodes):
        if node == state.nid:
            state.channel_keys.append(b"")
            state.share_owners = [node]
            state.b_shares, state.sk_shares = [b_shares[idx]], [sk_shares[idx]]
            continue
        key = generate_shared_key(sk2, bytes_to_public_key(pk2s[idx]))
        state.channel_keys.append(key)
        plaintext = share_keys_plaintext_concat(state.nid, node, b_shares[idx], sk_shares[idx])
        dsts.append(node)
        ctxts.append(encrypt(key, plaintext))
    state.stage = "share_keys"
    return {sp.DSTS: dsts, sp.CTXTS: ctxts}


def _receive_shares(state: DeviceRound, config: ConfigRecord) -> list[int]:
    srcs, ctxts = _int_list(config, sp.SRCS), _bytes_list(config, sp.CTXTS)
    if len(srcs) != len(ctxts) or len(set(srcs)) != len(srcs):
        raise SecAggProtocolError("secagg train: malformed forwarded shares")
    if len(srcs) + 1 < state.threshold:
        raise SecAggProtocolError(
            f"secagg train: shares from {len(srcs)} neighbours, {state.threshold - 1} needed"
        )
    for src, ctxt in zip(srcs, ctxts, strict=True):
        if src == state.nid or src not in state.nodes:
            raise SecAggProtocolError(f"secagg train: node {src} is not a neighbour")
        key = state.channel_keys[state.nodes.index(src)]
        actual_src, dst, b_share, sk_share = share_keys_plaintext_separate(decrypt(key, ctxt))
        if actual_src != src or dst != state.nid:
            raise SecAggProtocolError(f"secagg train: share from {src} was addressed elsewhere")
        state.share_owners.append(src)
        state.b_shares.append(b_share)
        state.sk_shares.append(sk_share)
    return srcs


def _single(records: Any, kind: str) -> tuple[str, Any]:
    if len(records) != 1:
        raise SecAggProtocolError(f"secagg train: the reply needs exactly one {kind} record")
    return cast(tuple[str, Any], next(iter(records.items())))


def mask_reply(state: DeviceRound, reply: Message, srcs: list[int], weight_key: str) -> RecordDict:
    """Stage 3: the train reply's arrays and metrics, weighted, quantised and masked."""
    arrays_name, arrays = _single(reply.content.array_records, "array")
    metrics_name, metrics = _single(reply.content.metric_records, "metric")
    weight = metrics.get(weight_key)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise SecAggProtocolError(f"secagg train: metric {weight_key!r} must be positive")
    if weight > state.max_weight:
        raise SecAggProtocolError(
            f"secagg train: {weight_key} {weight} exceeds max_weight {state.max_weight:g}"
        )
    q_weight = max(1, round(weight / state.max_weight * state.quantization_range))
    scale = q_weight / state.quantization_range
    names = list(arrays.keys())
    model = [np.asarray(arrays[k].numpy(), dtype=np.float64) * scale for k in names]
    metric_keys = [k for k in metrics if k != weight_key]
    metric_values = [np.asarray(metrics[k], dtype=np.float64) * scale for k in metric_keys]
    seed = sp.rounding_seed(state.server_round, state.nid)
    vector = sp.quantize_seeded(model, state.clipping_range, state.quantization_range, seed)
    vector += sp.quantize_seeded(
        metric_values, state.metric_clipping_range, state.quantization_range, seed + 1
    )
    vector.append(np.asarray(q_weight, dtype=np.int64))
    shapes = [v.shape for v in vector]
    total = [
        v + m
        for v, m in zip(
            vector, sp.expand_mask(state.rd_seed, state.modulus_range, shapes), strict=True
        )
    ]
    sk1 = bytes_to_private_key(state.sk1)
    for node in srcs:
        seed_ij = generate_shared_key(sk1, bytes_to_public_key(state.pk1_of(node)))
        pairwise = sp.expand_mask(seed_ij, state.modulus_range, shapes)
        sign = 1 if state.nid > node else -1
        total = [t + sign * m for t, m in zip(total, pairwise, strict=True)]
    masked = [np.mod(t, state.modulus_range).astype(np.int64) for t in total]
    out_arrays = ArrayRecord({k: Array(masked[i]) for i, k in enumerate(names)})
    out_metrics: dict[str, Any] = {}
    for j, key in enumerate(metric_keys):
        value = masked[len(names) + j]
        out_metrics[key] = int(value) if value.ndim == 0 else [int(v) for v in value]
    out_metrics[weight_key] = int(masked[-1])
    return RecordDict({arrays_name: out_arrays, metrics_name: MetricRecord(out_metrics)})


def unmask(state: DeviceRound, msg: Message) -> dict[str, Any]:
    """Stage 4: shares of the private mask seeds of the neighbours that sent masked vectors,
    and of the mask keys of those that dropped out; never both for one device."""
    config = _config(msg)
    _expect(state, config, "masked")
    active, dead = _int_list(config, sp.ACTIVE), _int_list(config, sp.DEAD)
    if set(active) & set(dead):
        raise SecAggProtocolError("secagg unmask: a device cannot be both active and dropped")
    if state.nid not in active or state.nid in dead:
        raise SecAggProtocolError("secagg unmask: this device sent its vector; it is active")
    if not set(active + dead) <= set(state.nodes):
        raise SecAggProtocolError("secagg unmask: asked about devices that are not neighbours")
    if len(active) < state.threshold:
        raise SecAggProtocolError(
            f"secagg unmask: {len(active)} active neighbours, threshold {state.threshold}"
        )
    owners, shares = [], []
    for node in active:
        if node in state.share_owners:
            owners.append(node)
            shares.append(state.b_shares[state.share_owners.index(node)])
    for node in dead:
        if node in state.share_owners:
            owners.append(node)
            shares.append(state.sk_shares[state.share_owners.index(node)])
    state.stage = "done"
    return {sp.OWNERS: owners, sp.SHARES: shares}


_STAGES: dict[str, Callable[[DeviceRound, Message], dict[str, Any]]] = {
    sp.SETUP: setup,
    sp.SHARE_KEYS: share_keys,
    sp.UNMASK: unmask,
}


def _refuse(msg: Message, reason: str) -> Message:
    log.warning("secure aggregation refused: %s", reason)
    return Message(Error(SECAGG_REFUSED, reason), reply_to=msg)


def _save(context: Context, state: DeviceRound) -> None:
    context.state.config_records[STATE_RECORD] = state.to_record()


def make_secagg_mod(*, require: bool = False) -> Mod:
    """A client mod running the device's side of secure aggregation.

    Parameters
    ----------
    require : bool, default False
        When True the device refuses plain (unmasked) ``train`` messages, so
        its update can only ever leave masked.
    """

    def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        kind = msg.metadata.message_type
        state = DeviceRound.from_record(context.state.config_records.get(STATE_RECORD))
        if kind in _STAGES:
            try:
                values = _STAGES[kind](state, msg)
            except SecAggProtocolError as exc:
                return _refuse(msg, str(exc))
            _save(context, state)
            record = ConfigRecord(sp.without_empty_lists(values))
            return Message(RecordDict({sp.RECORD: record}), reply_to=msg)
        if kind != sp.TRAIN:
            return call_next(msg, context)
        if not msg.has_content() or sp.RECORD not in msg.content.config_records:
            if require:
                return _refuse(msg, "this device sends its update only under secure aggregation")
            return call_next(msg, context)
        config = msg.content.config_records[sp.RECORD]
        try:
            _expect(state, config, "share_keys")
            srcs = _receive_shares(state, config)
            weight_key = _get(config, sp.WEIGHT_KEY, str)
        except SecAggProtocolError as exc:
            return _refuse(msg, str(exc))
        original = msg.content
        msg.content = RecordDict({k: v for k, v in original.items() if k != sp.RECORD})
        try:
            reply = call_next(msg, context)
        finally:
            msg.content = original
        if reply.has_error():
            return reply
        try:
            content = mask_reply(state, reply, srcs, weight_key)
        except SecAggProtocolError as exc:
            return _refuse(msg, str(exc))
        state.stage = "masked"
        _save(context, state)
        return Message(content, reply_to=msg)

    return secagg_mod


#: The mod with defaults (plain train messages pass through unmasked).
secagg_mod: Mod = make_secagg_mod()


def register_secagg_actions(app: ClientApp) -> None:
    """Register the ``query.secagg_*`` actions on ``app`` so Flower routes them to the mod.

    The registered handlers only run when :func:`secagg_mod` is missing from
    the app's mods; they then reply with an error that says so.
    """

    def not_installed(msg: Message, context: Context) -> Message:
        return _refuse(msg, "secure aggregation is not installed on this device (add secagg_mod)")

    for action in sp.QUERY_ACTIONS:
        app.query(action)(not_installed)


def _on_train(mod: Mod) -> Mod:
    def train_only(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != sp.TRAIN:
            return call_next(msg, context)
        return mod(msg, context, call_next)

    return train_only


def _client_side_clipping(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    configs = msg.content.config_records.values() if msg.has_content() else []
    if any(KEY_CLIPPING_NORM in c for c in configs):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def privacy_mods(
    *,
    local_dp: LocalDpParams | Callable[[Context], LocalDpParams | None] | None = None,
    require_secagg: bool = False,
) -> list[Mod]:
    """The device's privacy mods, outermost first, ready for ``ClientApp(mods=...)``.

    1. secure aggregation (:func:`make_secagg_mod`): answers the server's
       ``query.secagg_*`` messages and masks ``train`` replies when the server
       runs secure aggregation;
    2. local DP (Flower's ``LocalDpMod``) on ``train`` replies, when
       ``local_dp`` gives parameters for this device;
    3. client-side clipping (Flower's ``fixedclipping_mod``) on ``train``
       replies, whenever the server's central-DP wrapper asks for it (its
       ``clipping_norm`` key in the train config).

    A reply passes them innermost first: clipped, then noised, then masked.

    Parameters
    ----------
    local_dp : LocalDpParams, callable or None, default None
        Local DP for every run, or a function of the node's context (e.g.
        reading the run config) returning the parameters or None.
    require_secagg : bool, default False
        Refuse plain ``train`` messages.
    """
    mods: list[Mod] = [make_secagg_mod(require=require_secagg)]
    if local_dp is not None:
        mods.append(_local_dp_mod(local_dp))
    mods.append(_on_train(_client_side_clipping))
    return mods


def _local_dp_mod(local_dp: LocalDpParams | Callable[[Context], LocalDpParams | None]) -> Mod:
    built: dict[LocalDpParams, LocalDpMod] = {}

    def local_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        params = local_dp(context) if callable(local_dp) else local_dp
        if params is None:
            return call_next(msg, context)
        mod = built.get(params)
        if mod is None:
            mod = built[params] = LocalDpMod(
                params.clipping_norm, params.sensitivity, params.epsilon, params.delta
            )
        return mod(msg, context, call_next)

    return _on_train(local_dp_mod)


_KIND_CHECKS: dict[str, Callable[[Any], bool]] = {
    "bytes": lambda v: isinstance(v, bytes),
    "list[int]": lambda v: (
        isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    ),
    "list[bytes]": lambda v: isinstance(v, list) and all(isinstance(x, bytes) for x in v),
}


def secagg_egress_violations(request: Message, reply: Message) -> list[str]:
    """Every way a reply to a ``query.secagg_*`` message breaks the secure-aggregation contract.

    For the device's egress policy: a reply may carry only the ``secagg``
    config record with the keys :data:`fedge.privacy.secagg_protocol.DEVICE_REPLIES`
    lists for its stage (public keys, encrypted shares, share lists), each of
    the listed kind. The masked ``train`` reply already fits the ordinary
    ``train`` policy. Returns an empty list for other message types.
    """
    allowed = sp.DEVICE_REPLIES.get(request.metadata.message_type)
    if allowed is None or reply.has_error():
        return []
    problems = []
    for name, record in reply.content.items():
        if name != sp.RECORD or not isinstance(record, ConfigRecord):
            problems.append(
                f"record {name!r} is not allowed in a {request.metadata.message_type} reply"
            )
            continue
        for key, value in record.items():
            kind = allowed.get(key)
            if kind is None:
                problems.append(f"{name}.{key} is not an allowed key")
            elif not _KIND_CHECKS[kind](value):
                problems.append(f"{name}.{key} must be {kind}")
    return problems
