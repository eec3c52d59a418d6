"""The fedge Flower ClientApp: thin ``query``, ``train`` and ``evaluate`` handlers.

Each handler finds this node's :class:`~clients.device.Device` (its store lives
in ``<run dir>/devices/device-<partition id>.sqlite``), does one thing, and
replies with the records :mod:`fedge.contracts.protocol` allows.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.device import Device
from clients.device_data import take_amendments
from clients.diagnostics import device_diagnostics
from clients.egress import make_egress_mod
from clients.health import device_health, note_opened
from clients.secagg import privacy_mods, register_secagg_actions
from fedge.contracts import protocol as p
from fedge.contracts.signing import ModelSeal
from fedge.contracts.wire import config_from_context, from_arrays, run_dir, to_arrays
from fedge.privacy.accounting import LocalDpParams, local_dp_params

log = logging.getLogger("fedge.device")

_DEVICES: dict[Path, Device] = {}


_PATHS: dict[tuple[object, ...], tuple[int, Path]] = {}


def store_path(context: Context) -> tuple[int, Path]:
    """This node's partition id and the path of its on-device store.

    Resolving it takes the run configuration apart and touches the disk; a
    node's context says the same on every message, so it is done once per
    (run, node, node config, run config).
    """
    key = (
        context.run_id,
        context.node_id,
        tuple(sorted(context.node_config.items())),
        tuple(sorted(context.run_config.items())),
    )
    found = _PATHS.get(key)
    if found is None:
        cfg = config_from_context(context)
        device_id = int(context.node_config.get("partition-id", 0))
        found = device_id, run_dir(cfg, context) / "devices" / f"device-{device_id}.sqlite"
        _PATHS[key] = found
    return found


def audit_path(context: Context) -> Path:
    """The device's audit log, beside its store."""
    return store_path(context)[1].with_suffix(".audit.jsonl")


def local_dp_for(context: Context) -> LocalDpParams | None:
    """Local DP parameters of this node's run (None unless ``privacy.dp = "local"``)."""
    return local_dp_params(config_from_context(context).privacy)


# Every reply passes the egress policy and lands in the device's audit log; the
# egress mod is outermost, so it checks and records what really leaves (a masked
# update under secure aggregation, a noised one under local DP).
app = ClientApp(mods=[make_egress_mod(audit_path), *privacy_mods(local_dp=local_dp_for)])
register_secagg_actions(app)


def device_for(context: Context) -> Device:
    """The node's device, opened once per process and reopened from its store after a restart."""
    device_id, path = store_path(context)
    device = _DEVICES.get(path)
    if device is None:
        device = Device(config_from_context(context), device_id, path)
        _DEVICES[path] = device
        note_opened(path)
    else:
        device.sync()
    return device


def forget_devices() -> None:
    """Close every open device (simulates a device restart in tests)."""
    for device in _DEVICES.values():
        device.close()
    _DEVICES.clear()


def _number(config: ConfigRecord, key: str, default: float | None = None) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"message config {key!r}: expected a number, got {value!r}")
    return value


def _ticks(config: ConfigRecord, key: str) -> list[int]:
    value = config.get(key, [])
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        raise TypeError(f"message config {key!r}: expected a list of ticks, got {value!r}")
    return [int(t) for t in items]  # type: ignore[arg-type]


def _seal(config: ConfigRecord) -> ModelSeal | None:
    """The seal sent with a model: None when it has none, fields of any form otherwise."""
    keys = (p.MODEL_SHA256, p.MODEL_SIGNATURE, p.MODEL_SIGNING_KEY)
    if not any(k in config for k in keys):
        return None
    # A field of the wrong form fails verification as malformed, never as an exception.
    return ModelSeal(*(v if isinstance(v := config.get(k, ""), str) else "" for k in keys))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Monitoring tick: catch up missed ticks, deploy the champion if sent, report drift.

    The reply carries this tick's report and the outbox's older reports the
    server has not acknowledged (store and forward), each with its own tick, and
    the device's health (:mod:`clients.health`).
    """
    started = time.monotonic()
    device = device_for(context)
    config = msg.content.config_records[p.CONFIG]
    tick = int(_number(config, p.TICK))
    device.acknowledge(_ticks(config, p.REPORTS_RECEIVED))
    previous = device.last_tick
    # Ticks missed while unreachable are tested with the model the device had then.
    device.catch_up(tick)
    if p.ARRAYS in msg.content.array_records:
        version = int(_number(config, p.CHAMPION_VERSION))
        family = int(_number(config, p.MODEL_FAMILY)) if p.MODEL_FAMILY in config else None
        # Installed only if its seal verifies; a refused model leaves the device as it was.
        device.deploy(
            version, from_arrays(msg.content.array_records[p.ARRAYS]), family, _seal(config)
        )
    report = device.report_for(tick)
    content = RecordDict({p.REPORT: ConfigRecord(report.to_dict())})
    for slot, late in enumerate(device.backlog(tick)):
        content[p.late_report(slot)] = ConfigRecord(late.to_dict())
    amended = take_amendments(device)
    if amended:
        content[p.LATE_LABELS] = ConfigRecord(p.late_label_record(amended))
    content[p.HEALTH] = ConfigRecord(device_health(device, report, previous, started).to_dict())
    if config.get(p.DIAGNOSE, False) is True:
        # An operator asked (``fedge diagnose``): counts and codes, checked by the egress policy.
        content[p.DIAGNOSTICS] = ConfigRecord(device_diagnostics(device, tick).to_dict())
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local training pass over the device's window, starting from the global model.

    fedge's ServerApp sends every setting; a stock Flower strategy sends only the
    round (and what its ``train_config`` holds), so the others default to the
    run configuration's ``[campaign]`` values.
    """
    device = device_for(context)
    config = msg.content.config_records.get(p.CONFIG) or ConfigRecord()
    c = device.cfg.campaign
    seed = int(_number(config, p.SEED, device.cfg.scenario.seed)) * 7919 + int(
        _number(config, p.ROUND, 0)
    )
    start = from_arrays(msg.content.array_records[p.ARRAYS])
    weights, n, loss = device.train(
        start,
        epochs=int(_number(config, p.LOCAL_EPOCHS, c.local_epochs)),
        lr=_number(config, p.LR, c.lr),
        batch_size=int(_number(config, p.BATCH_SIZE, c.batch_size)),
        seed=seed + device.device_id * 104729,
        proximal_mu=_number(config, p.PROXIMAL_MU, 0.0),
    )
    if config.get(p.EQUAL_WEIGHTS, False) is True:
        n = 1  # central DP: every device counts once in the average
    codec = str(config.get(p.COMPRESSION, "none"))
    upload = device.encode_upload(weights, start, codec, int(_number(config, p.TICK, 0)))
    content = RecordDict(
        {
            p.ARRAYS: to_arrays(upload),
            p.METRICS: MetricRecord({p.NUM_EXAMPLES: n, p.TRAIN_LOSS: loss}),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the candidate and the deployed champion on the held-out window."""
    device = device_for(context)
    metrics = device.evaluate(from_arrays(msg.content.array_records[p.ARRAYS]))
    return Message(RecordDict({p.METRICS: MetricRecord(dict(metrics))}), reply_to=msg)


@app.evaluate(p.SCORES)
def scores(msg: Message, context: Context) -> Message:
    """How many of the latest samples each model in service gets right (model assignment)."""
    device = device_for(context)
    arrays = msg.content.array_records
    slots = [i for i in range(p.MAX_SCORED_MODELS) if p.scored_model(i) in arrays]
    n, correct = device.score([from_arrays(arrays[p.scored_model(i)]) for i in slots])
    metrics: dict[str, int | float | list[int] | list[float]] = {p.NUM_EXAMPLES: n}
    metrics.update({p.scored_correct(i): c for i, c in zip(slots, correct, strict=True)})
    return Message(RecordDict({p.METRICS: MetricRecord(metrics)}), reply_to=msg)
