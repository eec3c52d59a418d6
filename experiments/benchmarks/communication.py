"""Item 5: bytes on the wire per round and device, and what update compression saves.

The drift scenario ``experiments/sine2_sudden.toml`` runs on the in-process
engine once per codec; a grid that serialises every message with Flower's own
protobuf encoding counts the bytes each way. Accuracy is the mean prequential
accuracy over all ticks with a deployed model.
"""

from __future__ import annotations

import logging
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.common.serde import recorddict_to_proto

from experiments.benchmarks.common import Figure
from fedge.contracts.config import PROJECT_ROOT
from fedge.engines.inprocess import InProcessGrid
from fedge.runner import RunRequest, quiet_tick

SCENARIO = PROJECT_ROOT / "experiments" / "sine2_sudden.toml"


class CountingGrid(InProcessGrid):
    """An in-process grid that counts the serialised bytes of every message, by type."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.down: dict[str, list[int]] = defaultdict(list)
        self.up: dict[str, list[int]] = defaultdict(list)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for msg in messages:
            self.down[msg.metadata.message_type].append(_size(msg))
        return super().push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(super().pull_messages(message_ids))
        for reply in replies:
            if not reply.has_error():
                self.up[reply.metadata.message_type].append(_size(reply))
        return replies


def _size(msg: Message) -> int:
    return int(recorddict_to_proto(msg.content).ByteSize()) if msg.has_content() else 0


def _run(codec: str, out: Path) -> tuple[float, CountingGrid]:
    from clients.client_app import app as client_app
    from clients.client_app import forget_devices
    from fedge.server.app import run_server

    overrides = (f'campaign.compression="{codec}"', f'run.output_dir="{out}"', "run.resume=false")
    request = RunRequest(SCENARIO, overrides, "inprocess")
    cfg = request.config()
    folder = out / "run"
    grid = CountingGrid(client_app, cfg.scenario.clients, request.run_config(cfg, folder, "inprocess"))
    try:
        summary = run_server(grid, cfg, folder, on_tick=quiet_tick, engine="inprocess")
    finally:
        forget_devices()
    accs = [t["accuracy"] for t in summary["ticks"] if t["accuracy"] is not None]
    return sum(accs) / len(accs), grid


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0


def run(codecs: tuple[str, ...] = ("none", "float16", "int8")) -> list[Figure]:
    """Bytes per train round and device each way, per codec, and the accuracy change."""
    logging.getLogger("fedge").setLevel(logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    results: dict[str, tuple[float, CountingGrid]] = {}
    with tempfile.TemporaryDirectory(prefix="fedge-bench-comm-") as tmp:
        for codec in codecs:
            results[codec] = _run(codec, Path(tmp) / codec)
    base_acc, base = results["none"]
    base_up = _mean(base.up["train"])
    per_round = (
        _mean(base.down["train"]) + base_up + _mean(base.down["evaluate"]) + _mean(base.up["evaluate"])
    )
    figures = [
        Figure(
            "5 communication",
            "bytes per round per device, uncompressed (train + evaluate, both ways)",
            f"{per_round:,.0f} B (train down {_mean(base.down['train']):,.0f}, up {base_up:,.0f}; "
            f"query {_mean(base.down['query']):,.0f} down / {_mean(base.up['query']):,.0f} up per tick)",
        )
    ]
    for codec in codecs:
        if codec == "none":
            continue
        acc, grid = results[codec]
        up = _mean(grid.up["train"])
        figures.append(
            Figure(
                "5 communication",
                f"{codec} uploads with error feedback (sine2-sudden, {SCENARIO.name})",
                f"{up:,.0f} B vs {base_up:,.0f} B per train reply; accuracy "
                f"{100 * acc:.2f}% vs {100 * base_acc:.2f}%",
                f"{base_up / up:.2f}x fewer bytes, {100 * (acc - base_acc):+.2f} points",
                ">= 3x fewer bytes, < 0.5 points lost" if codec == "int8" else "",
                (base_up / up >= 3 and (base_acc - acc) < 0.005) if codec == "int8" else None,
            )
        )
    return figures
