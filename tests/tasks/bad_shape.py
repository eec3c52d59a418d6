"""A task whose model does not accept its declared input shape."""

from torch import nn

INPUT_SHAPE = (1, 8, 8)


def build_model(n_features: int, n_outputs: int) -> nn.Module:
    """A linear model on flat rows: fails on (n, 1, 8, 8)."""
    return nn.Linear(n_features, n_outputs)
