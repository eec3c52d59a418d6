"""The egress policy, enforced on every message a device sends.

:func:`egress_violations` compares a reply with :data:`fedge.contracts.protocol.EGRESS`;
:func:`make_egress_mod` turns that into a Flower client mod that blocks any
reply outside the contract (the server receives an error instead, and the
device logs why) and records every outgoing message in the device's
keyed, hash-chained audit log (:class:`fedge.privacy.audit.AuditLog`; the key
file beside the log is created with it). The drift reports a device sends say
how long that log is and how its chain ends, so the server can tell later
whether it was cut short or rewritten (:class:`fedge.privacy.anchors.AuditAnchors`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable, Mod

from clients.health import note_failure
from clients.secagg import secagg_egress_violations
from fedge.contracts.compression import CODECS, encoded_shapes
from fedge.contracts.protocol import COMPRESSION, CONFIG, EGRESS
from fedge.privacy.audit import AuditLog
from fedge.privacy.secagg_protocol import DEVICE_REPLIES as SECAGG_REPLIES

log = logging.getLogger("fedge.device")

EGRESS_BLOCKED = 4031
HANDLER_FAILED = 5001

_KINDS = {"arrays": ArrayRecord, "config": ConfigRecord, "metrics": MetricRecord}


def egress_violations(request: Message, reply: Message) -> list[str]:
    """Every way ``reply`` breaks the egress policy (empty when it may leave)."""
    if reply.has_error():
        return []
    if request.metadata.message_type in SECAGG_REPLIES:
        # Secure aggregation's key exchange: its own, equally strict contract.
        return secagg_egress_violations(request, reply)
    kind = request.metadata.message_type.split(".")[0]
    allowed = EGRESS.get(kind)
    if allowed is None:
        return [f"no reply is allowed to a {kind!r} message"]
    problems = []
    for name, record in reply.content.items():
        if name not in allowed:
            problems.append(f"record {name!r} is not allowed in a {kind} reply")
            continue
        want, keys = allowed[name]
        if not isinstance(record, _KINDS[want]):
            problems.append(f"record {name!r} must be {want}, got {type(record).__name__}")
            continue
        if isinstance(record, ArrayRecord):
            problems += _array_violations(name, record, request)
        else:
            for key, value in record.items():
                if key not in keys:
                    problems.append(f"{name}.{key} is not an allowed key")
                elif not isinstance(value, (bool, int, float)):
                    problems.append(f"{name}.{key} must be a scalar, got {type(value).__name__}")
    return problems


def _array_violations(name: str, record: ArrayRecord, request: Message) -> list[str]:
    sent = request.content.array_records.get(name) if request.has_content() else None
    if sent is None:
        return [f"arrays {name!r} were not part of the request"]
    expected = {k: tuple(a.shape) for k, a in sent.items()}
    codec = _upload_codec(request)
    if codec is None:
        return [f"arrays {name!r}: the request asks for an unknown compression"]
    expected = encoded_shapes(expected, codec)
    got = {k: tuple(a.shape) for k, a in record.items()}
    if got != expected:
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        missing = sorted(set(expected) - set(got))
        detail = f"extra {extra}, wrong shape {wrong}, missing {missing}"
        return [f"arrays {name!r} do not mirror the model sent ({detail})"]
    return []


def _upload_codec(request: Message) -> str | None:
    """The codec the request asks the reply's arrays to be encoded with (None: unknown)."""
    config = request.content.config_records.get(CONFIG) if request.has_content() else None
    codec = config.get(COMPRESSION, "none") if config is not None else "none"
    return codec if isinstance(codec, str) and codec in CODECS else None


#: Decimal numbers in an exception's text: they may be sample values, so they never leave.
_DECIMALS = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+(?=[eE][-+]?\d))(?:[eE][-+]?\d+)?")
_ERROR_LINE_LIMIT = 200


def error_summary(exc: BaseException) -> str:
    """What the server hears of a failed handler: the type and first line, samples masked.

    The first line of the message is kept (it says what went wrong, e.g. ``no inbox at
    <path>``); decimal numbers in it are replaced by ``<number>`` because an exception
    may quote a sample value, and the line is cut at 200 characters.

    >>> error_summary(ValueError("row 3: value 0.8125 out of range\\nmore"))
    'device handler failed (ValueError: row 3: value <number> out of range)'
    """
    text = str(exc).strip().splitlines()
    first = _DECIMALS.sub("<number>", text[0]) if text else ""
    first = first[:_ERROR_LINE_LIMIT]
    return f"device handler failed ({type(exc).__name__}{': ' + first if first else ''})"


def make_egress_mod(audit_path: Callable[[Context], Path]) -> Mod:
    """A client mod enforcing the egress policy and writing the audit log.

    Parameters
    ----------
    audit_path : callable
        Gives the audit log file of the device a context belongs to; it runs
        for every message, so it should be cheap (``clients.client_app``
        resolves a node's paths once).
    """
    logs: dict[Path, AuditLog] = {}

    def egress_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        path = audit_path(context)
        audit = logs.get(path)
        if audit is None:
            audit = logs[path] = AuditLog(path)
        try:
            reply = call_next(msg, context)
        except Exception as exc:  # noqa: BLE001 - the server hears of it, within the policy
            log.warning("handler %s failed on the device: %r", msg.metadata.message_type, exc)
            note_failure(path, exc)  # the next health names its type (a code, no text)
            reply = Message(Error(HANDLER_FAILED, error_summary(exc)), reply_to=msg)
        problems = egress_violations(msg, reply)
        entry = describe(reply)
        if problems:
            log.warning("egress blocked a %s reply: %s", msg.metadata.message_type, "; ".join(problems))
            audit.append({**entry, "blocked": True, "violations": problems})
            return Message(
                Error(EGRESS_BLOCKED, "egress policy blocked the reply: " + "; ".join(problems)),
                reply_to=msg,
            )
        audit.append({**entry, "blocked": False})
        return reply

    return egress_mod


def describe(message: Message) -> dict[str, Any]:
    """What a message carries, without any value: kinds, keys, shapes, bytes."""
    records: dict[str, Any] = {}
    total = 0
    if message.has_content():
        # One pass over the records (RecordDict's typed views are rebuilt on every access).
        for name, record in message.content.items():
            if isinstance(record, ArrayRecord):
                entry: dict[str, Any] = {
                    "kind": "arrays",
                    "shapes": {k: list(a.shape) for k, a in record.items()},
                    "bytes": record.count_bytes(),
                }
            elif isinstance(record, ConfigRecord):
                entry = {"kind": "config", "keys": sorted(record), "bytes": record.count_bytes()}
            elif isinstance(record, MetricRecord):
                entry = {"kind": "metrics", "keys": sorted(record), "bytes": record.count_bytes()}
            else:
                continue
            records[name] = entry
        total = sum(int(r["bytes"]) for r in records.values())
    return {
        "message_type": message.metadata.message_type,
        "records": records,
        "bytes": total,
        "error": message.has_error(),
    }
