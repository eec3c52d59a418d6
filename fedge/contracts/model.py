"""fedge's default task: a small feed-forward classifier in PyTorch, and weight helpers.

A run with ``model.task`` set trains the user's model instead (see
:mod:`fedge.contracts.task`); the weight helpers below serve every task.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

Weights = dict[str, np.ndarray]


def build_model(n_features: int, n_classes: int, hidden: int = 32, layers: int = 2) -> nn.Module:
    """Feed-forward net: ``layers`` hidden layers of width ``hidden`` with ReLU.

    Parameters
    ----------
    n_features : int
        Input width.
    n_classes : int
        Number of output logits.
    hidden : int, default 32
        Width of each hidden layer.
    layers : int, default 2
        Number of hidden layers.
    """
    blocks: list[nn.Module] = []
    width = n_features
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    blocks.append(nn.Linear(width, n_classes))
    return nn.Sequential(*blocks)


def initial_weights(model: nn.Module, seed: int) -> Weights:
    """Seeded initial weights, the same on every machine, for every layer type.

    Each submodule's own ``reset_parameters`` (linear, convolution, normalisation,
    recurrent, embedding layers ...) runs under ``torch.manual_seed(seed)`` inside
    a fork of the RNG state, so the caller's random stream is left as it was.
    A model whose parameters are made elsewhere is better built under the seed
    (:meth:`fedge.contracts.task.Task.initial_weights`).
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return get_weights(model)


def get_weights(model: nn.Module) -> Weights:
    """The model's state as NumPy arrays (copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: Mapping[str, np.ndarray]) -> nn.Module:
    """Load NumPy weights into ``model``; a shape mismatch raises ValueError."""
    state = model.state_dict()
    if set(state) != set(weights):
        raise ValueError(
            f"model weights: expected keys {sorted(state)}, got {sorted(weights)}"
        )
    for key, value in weights.items():
        if tuple(state[key].shape) != tuple(np.shape(value)):
            raise ValueError(
                f"model weights: {key} has shape {np.shape(value)}, "
                f"expected {tuple(state[key].shape)}"
            )
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()})
    return model


def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Class predictions for ``x``."""
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64)
    with torch.no_grad():
        logits = model(torch.as_tensor(x, dtype=torch.float32))
    return logits.argmax(dim=1).numpy().astype(np.int64)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``(x, y)``."""
    if len(x) == 0:
        return float("nan"), float("nan")
    with torch.no_grad():
        logits = model(torch.as_tensor(x, dtype=torch.float32))
        target = torch.as_tensor(y, dtype=torch.long)
        loss = nn.functional.cross_entropy(logits, target).item()
        acc = (logits.argmax(dim=1) == target).float().mean().item()
    return float(acc), float(loss)


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    proximal_mu: float = 0.0,
) -> float:
    """Train ``model`` in place with Adam; returns the mean loss of the last epoch.

    With ``proximal_mu > 0`` the FedProx proximal term
    ``mu / 2 * ||w - w_global||^2`` keeps the local model near the weights it
    started from (the global model of this round).
    """
    if len(x) == 0:
        return float("nan")
    gen = torch.Generator().manual_seed(seed)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    last = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
                loss = loss + proximal_mu / 2 * prox
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        last = total / count
    model.eval()
    return last
