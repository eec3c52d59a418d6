"""digitsexample: the model, the data loaders and the train / test loops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """A LeNet-style CNN sized for 1x8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 2 * 2, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = x.flatten(1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def load_data(
    partition_id: int, num_partitions: int, batch_size: int, data_dir: str
) -> tuple[DataLoader, DataLoader]:
    """This node's images, read afresh from ``<data_dir>/partition-<id>.npz``: 80 % train, 20 % val.

    The file holds ``x`` (n, 64) in [0, 1] and ``y`` (n,); it is whatever the
    node has collected by now, so a loader made later sees newer data.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition {partition_id} is not one of {num_partitions}")
    with np.load(Path(data_dir) / f"partition-{partition_id}.npz", allow_pickle=False) as data:
        x = torch.as_tensor(data["x"], dtype=torch.float32).reshape(-1, 1, 8, 8)
        y = torch.as_tensor(data["y"], dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(42))
    cut = int(0.8 * len(y))
    train, val = order[:cut], order[cut:]
    trainloader = DataLoader(
        TensorDataset(x[train], y[train]),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(partition_id),
    )
    valloader = DataLoader(TensorDataset(x[val], y[val]), batch_size=batch_size)
    return trainloader, valloader


def train(net: nn.Module, trainloader: DataLoader, epochs: int, lr: float, device: torch.device) -> float:
    """Train ``net`` in place; the mean loss per batch over all epochs."""
    net.to(device)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * max(len(trainloader), 1))


def test(net: nn.Module, testloader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Mean loss per batch and accuracy of ``net`` on ``testloader``."""
    net.to(device)
    net.eval()
    criterion = nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images.to(device))
            loss += criterion(outputs, labels.to(device)).item()
            correct += (outputs.argmax(1) == labels.to(device)).sum().item()
    return loss / max(len(testloader), 1), correct / max(len(testloader.dataset), 1)
