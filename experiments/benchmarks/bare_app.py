"""A hand-rolled Flower ClientApp: the same model and data as a fedge device, nothing else.

No store, no drift monitor, no validation, no egress policy: what a user would
write without fedge. It trains on the rows a fedge device holds after the first
tick (the same hold-out split), read from one NumPy file per node
(:func:`experiments.benchmarks.common.write_bare_data`), so both do the same
learning work. It imports Flower, torch and NumPy only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

app = ClientApp()

#: The data file and model size, set by :func:`configure`.
_SETUP: dict[str, object] = {}
_DATA: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}


def configure(data: Path, hidden: int, layers: int, holdout_every: int) -> None:
    """Train on ``data/device-<pid>.npz`` (arrays ``x`` and ``y``) with an MLP of this size."""
    _SETUP.update(data=Path(data), hidden=hidden, layers=layers, holdout_every=holdout_every)
    _DATA.clear()


def _data(pid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if pid not in _DATA:
        with np.load(Path(str(_SETUP["data"])) / f"device-{pid}.npz", allow_pickle=False) as f:
            x, y = f["x"].astype(np.float32), f["y"].astype(np.int64)
        hold = np.zeros(len(y), dtype=bool)
        every = int(str(_SETUP["holdout_every"]))
        hold[every - 1 :: every] = True
        _DATA[pid] = (x[~hold], y[~hold], x[hold], y[hold])
    return _DATA[pid]


def _model(n_features: int, n_classes: int) -> nn.Module:
    width, depth = int(str(_SETUP["hidden"])), int(str(_SETUP["layers"]))
    parts: list[nn.Module] = []
    size = n_features
    for _ in range(depth):
        parts += [nn.Linear(size, width), nn.ReLU()]
        size = width
    parts.append(nn.Linear(size, n_classes))
    return nn.Sequential(*parts)


def _load(model: nn.Module, arrays: ArrayRecord) -> nn.Module:
    model.load_state_dict({k: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items()})
    return model


def _arrays(model: nn.Module) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().numpy().copy()) for k, v in model.state_dict().items()})


def _num(config: ConfigRecord, key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"config {key!r}: expected a number, got {value!r}")
    return float(value)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local epochs on this node's rows, from the global model."""
    pid = int(str(context.node_config["partition-id"]))
    config = msg.content.config_records["config"]
    x, y, _, _ = _data(pid)
    n_classes = len(msg.content.array_records["arrays"][list(msg.content.array_records["arrays"])[-1]].numpy())
    model = _load(_model(x.shape[1], n_classes), msg.content.array_records["arrays"])
    seed = int(_num(config, "seed", 0)) * 7919 + int(_num(config, "server-round", 0)) + pid * 104729
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=_num(config, "lr", 0.01))
    batch = int(_num(config, "batch-size", 32))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    loss_value = 0.0
    for _ in range(int(_num(config, "local-epochs", 1))):
        order = torch.randperm(len(yt))
        for start in range(0, len(yt), batch):
            idx = order[start : start + batch]
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            optimiser.step()
            loss_value = float(loss)
    metrics = MetricRecord({"num-examples": len(y), "train_loss": loss_value})
    return Message(RecordDict({"arrays": _arrays(model), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy of the global model on this node's held-out rows."""
    pid = int(str(context.node_config["partition-id"]))
    _, _, xh, yh = _data(pid)
    n_classes = len(msg.content.array_records["arrays"][list(msg.content.array_records["arrays"])[-1]].numpy())
    model = _load(_model(xh.shape[1], n_classes), msg.content.array_records["arrays"])
    with torch.no_grad():
        logits = model(torch.from_numpy(xh))
        acc = float((logits.argmax(1).numpy() == yh).mean()) if len(yh) else 0.0
        loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(yh))) if len(yh) else 0.0
    metrics = MetricRecord({"num-examples": len(yh), "eval_acc": acc, "eval_loss": loss})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
