"""fedge's drift monitoring around an existing Flower Message-API ClientApp.

:func:`with_fedge` takes the ``ClientApp`` a user already has (written in the
shape of Flower's quickstarts: an ``@app.train()`` and an ``@app.evaluate()``
handler that read ``msg.content["arrays"]`` and ``msg.content["config"]``)
and returns a new ``ClientApp`` that fedge's ServerApp can drive:

- ``query`` (the monitoring tick) and ``evaluate.scores`` (model assignment)
  are fedge's own handlers from :mod:`clients.client_app`: the device's store,
  window, drift monitor, signed deployment and reports, on the rows of the
  device's ingest inbox;
- ``train`` and ``evaluate`` call the user's handlers as written. Their
  context carries the campaign's ``local-epochs``, ``batch-size`` and ``lr`` in
  ``run_config`` (where Flower's quickstarts read them), and their replies are
  brought into fedge's contract: only the metrics the egress policy allows
  leave, ``num-examples`` must be there, an upload is compressed when the
  server asks for it, and ``champion_acc`` (the model the device serves, scored
  by the user's own ``evaluate`` on the user's own data) is added so the
  promotion gate compares like with like;
- every reply passes fedge's egress policy and audit log, and the privacy mods
  (secure aggregation, local DP, client-side clipping), exactly as in fedge's
  own ClientApp.

The model the devices monitor with is the run's task (``model.task``, see
docs/tasks.md): a module naming the user's model class, so the weights the
server sends and registers are the ``state_dict`` of that class and load into
the user's code unchanged.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import TypeAlias

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.client_app import audit_path, device_for, local_dp_for, query, scores
from clients.egress import make_egress_mod
from clients.secagg import privacy_mods, register_secagg_actions
from fedge.contracts import protocol as p
from fedge.contracts.config import FedgeConfig
from fedge.contracts.wire import config_from_context, from_arrays, to_arrays

log = logging.getLogger("fedge.device")

#: Where the docs say how to add fedge to an existing Flower app.
DOC = "docs/tasks.md#adding-fedge-to-an-existing-flower-app"

#: Campaign settings put into the user's ``run_config`` (Flower's quickstart keys).
CAMPAIGN_KEYS = (p.LOCAL_EPOCHS, p.BATCH_SIZE, p.LR)


#: What a ``MetricRecord`` holds.
Metrics: TypeAlias = dict[str, int | float | list[int] | list[float]]


class FlowerAppError(ValueError):
    """The wrapped app, or the run it is used in, does not fit fedge; one line naming the fix."""


def with_fedge(app: ClientApp, *, task: str | None = None) -> ClientApp:
    """A ClientApp that runs ``app``'s ``train`` and ``evaluate`` under fedge's monitoring.

    ``app`` itself is left as it is; its handlers, mods and lifespan run as
    written whenever fedge's server sends a ``train`` or ``evaluate`` message.
    Other actions ``app`` may register are not reachable through the returned
    app (fedge's server never sends them), and a ``query`` handler of its own is
    replaced by fedge's monitoring tick.

    Parameters
    ----------
    app : flwr.clientapp.ClientApp
        The existing ClientApp, with ``@app.train()`` and ``@app.evaluate()``
        handlers in the shape of Flower's quickstarts.
    task : str, optional
        The import path of the task module that names ``app``'s model class
        (e.g. ``"mypkg.fedge_task"``). Given, a run whose ``model.task`` is
        another module is refused on the first message with one line, instead
        of failing later when ``app`` loads weights of another model.

    Returns
    -------
    flwr.clientapp.ClientApp
        The monitored app: point the SuperNode (or the in-process engine) at it.

    Raises
    ------
    TypeError
        ``app`` is not a Flower ``ClientApp``.

    Examples
    --------
    >>> from flwr.clientapp import ClientApp
    >>> app = with_fedge(ClientApp())
    >>> type(app).__name__
    'ClientApp'
    """
    if not isinstance(app, ClientApp):
        raise TypeError(
            f"with_fedge: expected a flwr.clientapp.ClientApp, got {type(app).__name__}"
        )
    if task is not None and not isinstance(task, str):
        raise TypeError(f"with_fedge: task must be a module path string, got {task!r}")
    # The egress mod is outermost, as in fedge's own app: it checks and records what
    # really leaves, after the privacy mods masked or noised it.
    monitored = ClientApp(
        mods=[make_egress_mod(audit_path), *privacy_mods(local_dp=local_dp_for)]
    )
    register_secagg_actions(monitored)

    @monitored.query()
    def monitor(msg: Message, context: Context) -> Message:
        """fedge's monitoring tick (see :func:`clients.client_app.query`)."""
        _check_task(context, task)
        return query(msg, context)

    @monitored.evaluate(p.SCORES)
    def score(msg: Message, context: Context) -> Message:
        """fedge's model-assignment scores (see :func:`clients.client_app.scores`)."""
        _check_task(context, task)
        return scores(msg, context)

    @monitored.train()
    def train(msg: Message, context: Context) -> Message:
        """The user's ``train`` handler, its reply brought into fedge's train contract."""
        cfg = _check_task(context, task)
        config = _config(msg)
        reply = app(msg, user_context(context, config, cfg))
        if reply.has_error():
            return reply
        return _train_reply(msg, reply, context, config)

    @monitored.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """The user's ``evaluate`` on the candidate, then on the model the device serves."""
        cfg = _check_task(context, task)
        config = _config(msg)
        view = user_context(context, config, cfg)
        reply = app(msg, view)
        if reply.has_error():
            return reply
        metrics = _allowed(
            _metrics(reply, "evaluate"), "evaluate", (p.CHAMPION_ACC, *p.SCORE_KEYS)
        )
        if p.EVAL_ACC not in metrics:
            raise FlowerAppError(
                f"the app's evaluate reply has no {p.EVAL_ACC!r} metric (it sent "
                f"{sorted(_metrics(reply, 'evaluate'))}); fedge's promotion gate needs it ({DOC})"
            )
        metrics[p.CHAMPION_ACC] = _champion_acc(app, msg, view, config, context)
        return Message(RecordDict({p.METRICS: MetricRecord(metrics)}), reply_to=msg)

    return monitored


def user_context(context: Context, config: ConfigRecord, cfg: FedgeConfig) -> Context:
    """The node's context as the user's handlers expect it under a fedge run.

    Flower's quickstarts read ``local-epochs`` and ``batch-size`` from
    ``run_config`` and ``partition-id`` / ``num-partitions`` from
    ``node_config``. Under fedge the campaign decides the first two: the values
    the server sent with the message, else the run's ``[campaign]`` section.
    The node's ``state`` is the same object, so what the user keeps there
    persists across messages.
    """
    c = cfg.campaign
    defaults: dict[str, int | float] = {
        p.LOCAL_EPOCHS: c.local_epochs,
        p.BATCH_SIZE: c.batch_size,
        p.LR: c.lr,
    }
    run_config = dict(context.run_config)
    for key in CAMPAIGN_KEYS:
        value = config.get(key, defaults[key])
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"message config {key!r}: expected a number, got {value!r}")
        run_config[key] = int(value) if key != p.LR else float(value)
    node_config = dict(context.node_config)
    node_config.setdefault("partition-id", 0)
    node_config.setdefault("num-partitions", cfg.scenario.clients)
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=node_config,
        state=context.state,
        run_config=run_config,
        series_id=context.series_id,
    )


def _check_task(context: Context, task: str | None) -> FedgeConfig:
    """The run's configuration, refused when it names another task than the app's."""
    cfg = config_from_context(context)
    if task is not None and cfg.model.task != task:
        raise FlowerAppError(
            f"with_fedge(task={task!r}): this run's model.task is {cfg.model.task!r}; "
            f"set model.task = {task!r} ({DOC})"
        )
    return cfg


def _config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get(p.CONFIG) or ConfigRecord()


def _metrics(reply: Message, kind: str) -> MetricRecord:
    """The user's reply's ``metrics`` record; a reply without one is refused with one line."""
    found = reply.content.metric_records.get(p.METRICS) if reply.has_content() else None
    if found is None:
        raise FlowerAppError(
            f"the app's {kind} reply has no {p.METRICS!r} MetricRecord (Flower's quickstart "
            f"replies RecordDict({{'arrays': ..., 'metrics': ...}})) ({DOC})"
        )
    if p.NUM_EXAMPLES not in found:
        raise FlowerAppError(
            f"the app's {kind} reply has no {p.NUM_EXAMPLES!r} metric (it sent {sorted(found)}); "
            f"the federated average weighs devices by it ({DOC})"
        )
    return found


_WITHHELD: set[tuple[str, str]] = set()


def _allowed(
    metrics: Mapping[str, object], kind: str, reserved: tuple[str, ...] = ()
) -> Metrics:
    """The metrics the egress policy lets leave; the others stay on the device (said once)."""
    allowed = set(p.DEVICE_METRICS[kind]) - set(reserved)
    kept: Metrics = {}
    for key, value in metrics.items():
        if key in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
            kept[key] = value
        elif (kind, key) not in _WITHHELD:
            _WITHHELD.add((kind, key))
            log.info("the app's %s metric %r stays on the device (not in fedge's egress policy)",
                     kind, key)
    return kept


def _train_reply(msg: Message, reply: Message, context: Context, config: ConfigRecord) -> Message:
    """The user's train reply as fedge's contract has it: arrays (compressed if asked) and metrics."""
    arrays = reply.content.array_records.get(p.ARRAYS) if reply.has_content() else None
    if arrays is None:
        raise FlowerAppError(
            f"the app's train reply has no {p.ARRAYS!r} ArrayRecord (Flower's quickstart replies "
            f"ArrayRecord(model.state_dict())) ({DOC})"
        )
    metrics = _allowed(_metrics(reply, "train"), "train")
    if config.get(p.EQUAL_WEIGHTS, False) is True:
        metrics[p.NUM_EXAMPLES] = 1  # central DP: every device counts once in the average
    codec = str(config.get(p.COMPRESSION, "none"))
    if codec != "none":
        # The residual of what the codec drops lives in the device's store (error feedback).
        tick = config.get(p.TICK, 0)
        upload = device_for(context).encode_upload(
            from_arrays(arrays),
            from_arrays(msg.content.array_records[p.ARRAYS]),
            codec,
            int(tick) if isinstance(tick, int) else 0,
        )
        arrays = to_arrays(upload)
    content = RecordDict({p.ARRAYS: arrays, p.METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=msg)


def _champion_acc(
    app: ClientApp, msg: Message, view: Context, config: ConfigRecord, context: Context
) -> float:
    """The user's ``eval_acc`` of the model this device serves (0 when it serves none yet).

    The candidate and the champion are scored by the same handler on the same
    data, so the gate's comparison means what it says.
    """
    device = device_for(context)
    stored = device.store.get_model() if device.version > 0 else None
    if stored is None or stored[0] != device.version:
        return 0.0
    # The same message (metadata shared, content new) with the champion's weights in it.
    again = copy.copy(msg)
    again.content = RecordDict({p.ARRAYS: to_arrays(stored[1]), p.CONFIG: copy.deepcopy(config)})
    reply = app(again, view)
    if reply.has_error():
        log.warning("the app's evaluate failed on the deployed model: %s", reply.error.reason)
        return 0.0
    value = _metrics(reply, "evaluate").get(p.EVAL_ACC, 0.0)
    return float(value) if isinstance(value, (int, float)) else 0.0
