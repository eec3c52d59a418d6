"""Regression: the digit's value (0..9) as a number, from its 64 pixels."""

from __future__ import annotations

from torch import nn

LABEL_KIND = "regression"


class ValueNet(nn.Module):
    """A small MLP with one output."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_features, 32), nn.Tanh(), nn.Linear(32, 1))

    def forward(self, x):
        return self.body(x).squeeze(-1)


def build_model(n_features: int, n_outputs: int) -> nn.Module:
    """The model factory fedge calls (``n_outputs`` is 1 for a regression)."""
    return ValueNet(n_features)


def loss(output, target):
    """Huber loss: the task's own loss replaces fedge's default (MSE)."""
    return nn.functional.smooth_l1_loss(output.reshape(-1), target)
