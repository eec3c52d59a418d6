"""Run a scenario on an engine and hand back its summary.

This is what the ``fedge run`` command calls; tests call it too.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedge.contracts.config import FedgeConfig, load_config, resolve_path
from fedge.core.orchestrator import TickCallback
from fedge.core.records import CampaignRecord, TickRecord

ENGINES = ("inprocess", "simulation", "deployment")


@dataclass(frozen=True)
class RunRequest:
    """Everything needed to start a run, as the user gave it."""

    scenario: Path | None
    overrides: tuple[str, ...] = ()
    engine: str = "inprocess"

    def config(self) -> FedgeConfig:
        """The validated configuration (raises ConfigError)."""
        return load_config(self.scenario, self.overrides)

    def run_config(self, cfg: FedgeConfig, folder: Path, engine: str) -> dict[str, Any]:
        """Flower run config that lets both apps rebuild the same configuration."""
        return {
            "scenario": str(self.scenario) if self.scenario else "",
            "overrides": ";".join(self.overrides),
            "output-dir": str(cfg.output_dir),
            "run-dir": str(folder),
            "engine": engine,
        }


def new_run_dir(cfg: FedgeConfig) -> Path:
    """A fresh folder for one run: ``<output>/<scenario>/<timestamp>``."""
    base = cfg.output_dir / cfg.scenario.name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = base / stamp
    n = 1
    while folder.exists():
        n += 1
        folder = base / f"{stamp}-{n}"
    return folder


def run(
    request: RunRequest,
    *,
    on_tick: TickCallback | None = None,
    run_dir: Path | None = None,
) -> dict[str, Any]:
    """Run ``request`` and return the summary dict (also in ``<run dir>/summary.json``)."""
    if request.engine not in ENGINES:
        from fedge.contracts.config import ConfigError

        raise ConfigError(f"engine: {request.engine!r} is not allowed; allowed: {', '.join(ENGINES)}")
    scenario = resolve_path(request.scenario) if request.scenario else None
    request = RunRequest(scenario, tuple(request.overrides), request.engine)
    cfg = request.config()
    folder = run_dir or new_run_dir(cfg)
    run_config = request.run_config(cfg, folder, request.engine)
    if request.engine == "deployment":
        from fedge.deploy.launcher import DeployRequest, deploy

        return deploy(DeployRequest(scenario, tuple(request.overrides)), run_dir=folder)
    feed_devices(cfg, folder)
    if request.engine == "simulation":
        from fedge.engines.simulation import run_flower_simulation

        run_flower_simulation(run_config, num_supernodes=cfg.scenario.clients, log_dir=folder)
        return json.loads((folder / "summary.json").read_text())
    return run_inprocess(cfg, run_config, folder, on_tick=on_tick)


def feed_devices(cfg: FedgeConfig, folder: Path) -> None:
    """Put every device's scenario rows into its ingest inbox, as a device application would."""
    for device in range(cfg.scenario.clients):
        feed_device(cfg, device, folder / "devices" / f"device-{device}.sqlite")


def feed_device(cfg: FedgeConfig, device: int, store_path: Path) -> None:
    """Put one device's scenario rows into the inbox beside its store."""
    from clients.inbox import inbox_path
    from fedge.scenarios.feed import feed_scenario

    feed_scenario(cfg, device, inbox_path(store_path))


def run_inprocess(
    cfg: FedgeConfig,
    run_config: dict[str, Any],
    folder: Path,
    *,
    on_tick: TickCallback | None = None,
) -> dict[str, Any]:
    """The ServerApp's loop over an :class:`InProcessGrid` of ClientApps."""
    from clients.client_app import app as client_app
    from clients.client_app import forget_devices
    from fedge.engines.inprocess import InProcessGrid
    from fedge.server.app import run_server

    logging.getLogger("flwr").setLevel(logging.WARNING)
    grid = InProcessGrid(client_app, cfg.scenario.clients, run_config, workers=cfg.run.workers)
    started = time.perf_counter()
    try:
        summary = run_server(grid, cfg, folder, on_tick=on_tick, engine="inprocess")
    finally:
        grid.close()
        forget_devices()
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    text = json.dumps(summary, indent=2)
    (folder / "summary.json").write_text(text)
    return dict(json.loads(text))  # the same plain JSON values every engine returns


def quiet_tick(rec: TickRecord, campaign: CampaignRecord | None) -> None:
    """A tick callback that prints nothing."""


def scenario_files(folder: Path | None = None) -> Sequence[Path]:
    """The ready scenarios shipped in ``experiments/``."""
    from fedge.contracts.config import PROJECT_ROOT

    base = folder or PROJECT_ROOT / "experiments"
    return sorted(base.glob("*.toml"))
