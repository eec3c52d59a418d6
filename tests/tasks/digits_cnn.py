"""A small CNN on 8x8 digit images: a task module as a user would write it."""

from __future__ import annotations

from torch import nn

INPUT_SHAPE = (1, 8, 8)
N_OUTPUTS = 10
LABEL_KIND = "class"


class Net(nn.Module):
    """Two convolutions, one pooling, one linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(16 * 4 * 4, N_OUTPUTS)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))
