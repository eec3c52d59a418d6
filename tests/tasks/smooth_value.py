"""Regression with float targets: a smooth function of the inputs, one value per sample."""

from __future__ import annotations

from torch import nn

LABEL_KIND = "regression"


class SmoothNet(nn.Module):
    """A small MLP with one output, shape ``(n, 1)``."""

    def __init__(self, n_features: int, n_outputs: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(n_features, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, n_outputs)
        )

    def forward(self, x):
        return self.body(x)


def build_model(n_features: int, n_outputs: int) -> nn.Module:
    """The model factory fedge calls (``n_outputs`` is 1: float targets)."""
    return SmoothNet(n_features, n_outputs)
