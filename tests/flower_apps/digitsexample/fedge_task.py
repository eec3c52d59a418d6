"""What fedge needs to know of digitsexample's model: its class and one sample's shape."""

from digitsexample.task import Net

INPUT_SHAPE = (1, 8, 8)
N_OUTPUTS = 10

__all__ = ["INPUT_SHAPE", "N_OUTPUTS", "Net"]
