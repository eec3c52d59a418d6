"""A hand-rolled Flower ClientApp: the same model and data as a fedge device, nothing else.

No store, no drift monitor, no validation, no egress policy: what a user would
write without fedge. It trains on the rows a fedge device holds after the first
tick (the same hold-out split) so both do the same learning work.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedge.contracts import model as nets
from fedge.contracts.config import FedgeConfig
from fedge.contracts.wire import from_arrays, to_arrays
from fedge.scenarios import Scenario, build_scenario

app = ClientApp()

_CONFIG: list[FedgeConfig] = []
_SCENARIO: list[Scenario] = []
_DATA: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}


def configure(cfg: FedgeConfig) -> None:
    """Use ``cfg``'s scenario and model (the bare app has no run config of its own)."""
    _CONFIG[:] = [cfg]
    _DATA.clear()
    _SCENARIO.clear()


def _data(pid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if pid not in _DATA:
        cfg = _CONFIG[0]
        x, y = build_scenario(cfg.scenario).batch(pid, 0)
        hold = np.zeros(len(y), dtype=bool)
        hold[cfg.campaign.holdout_every - 1 :: cfg.campaign.holdout_every] = True
        _DATA[pid] = (x[~hold], y[~hold], x[hold], y[hold])
    return _DATA[pid]


def _model() -> nn.Module:
    cfg = _CONFIG[0]
    if not _SCENARIO:
        _SCENARIO.append(build_scenario(cfg.scenario))
    scenario = _SCENARIO[0]
    return nets.build_model(scenario.n_features, scenario.n_classes, cfg.model.hidden, cfg.model.layers)


def _num(config: ConfigRecord, key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"config {key!r}: expected a number, got {value!r}")
    return float(value)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local epochs on this node's rows, from the global model."""
    pid = int(context.node_config["partition-id"])
    config = msg.content.config_records["config"]
    x, y, _, _ = _data(pid)
    model = nets.set_weights(_model(), from_arrays(msg.content.array_records["arrays"]))
    seed = int(_num(config, "seed", 0)) * 7919 + int(_num(config, "server-round", 0)) + pid * 104729
    loss = nets.train(
        model,
        x,
        y,
        epochs=int(_num(config, "local-epochs", 1)),
        lr=_num(config, "lr", 0.01),
        batch_size=int(_num(config, "batch-size", 32)),
        seed=seed,
    )
    metrics = MetricRecord({"num-examples": len(y), "train_loss": loss})
    content = RecordDict({"arrays": to_arrays(nets.get_weights(model)), "metrics": metrics})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy of the global model on this node's held-out rows."""
    pid = int(context.node_config["partition-id"])
    _, _, xh, yh = _data(pid)
    model = nets.set_weights(_model(), from_arrays(msg.content.array_records["arrays"]))
    acc, loss = nets.evaluate(model, xh, yh)
    metrics = MetricRecord({"num-examples": len(yh), "eval_acc": acc, "eval_loss": loss})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
