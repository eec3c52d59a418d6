"""Regression with vector targets: two smooth functions of the inputs, ``N_OUTPUTS = 2``."""

from __future__ import annotations

from smooth_value import SmoothNet
from torch import nn

LABEL_KIND = "regression"
N_OUTPUTS = 2


def build_model(n_features: int, n_outputs: int) -> nn.Module:
    """The model factory fedge calls (``n_outputs`` is ``N_OUTPUTS``: a vector per sample)."""
    return SmoothNet(n_features, n_outputs)
