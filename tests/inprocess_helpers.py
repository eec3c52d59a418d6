"""Run a scenario on the in-process engine and keep every message that crossed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Message

from clients.client_app import app as client_app
from clients.client_app import forget_devices
from clients.device import Device
from clients.inbox import inbox_path
from fedge.contracts.config import FedgeConfig
from fedge.contracts.config_load import load_config
from fedge.engines.inprocess import InProcessGrid
from fedge.runner import feed_device, feed_devices
from fedge.server.app import run_server

Exchange = tuple[Message, Message]


def run_captured(
    overrides: Sequence[str],
    folder: Path,
    watch: Callable[[InProcessGrid, Message, Message], None] | None = None,
    on_tick: Callable[..., None] | None = None,
) -> tuple[dict[str, Any], list[Exchange]]:
    """The run's summary and every (request, reply) pair, in order.

    ``watch`` sees each exchange as it happens, with the grid (e.g. to take a
    node offline).
    """
    cfg = load_config(None, overrides)
    run_config = {"scenario": "", "overrides": ";".join(overrides), "run-dir": str(folder)}
    feed_devices(cfg, folder)
    grid = InProcessGrid(client_app, cfg.scenario.clients, run_config)
    crossed: list[Exchange] = []

    def record(request: Message, reply: Message) -> None:
        crossed.append((request, reply))
        if watch is not None:
            watch(grid, request, reply)

    grid.on_exchange = record
    try:
        summary = run_server(grid, cfg, folder, on_tick=on_tick or (lambda *_: None))
    finally:
        forget_devices()
    return summary, crossed


def fed_device(cfg: FedgeConfig, device_id: int, store_path: Path) -> Device:
    """A device whose inbox holds its scenario rows (fed once), as a device application would."""
    if not inbox_path(store_path).exists():
        feed_device(cfg, device_id, store_path)
    return Device(cfg, device_id, store_path)
