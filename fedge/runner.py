"""Run a scenario on an engine and hand back its summary.

This is what the ``fedge run`` command calls; tests call it too.

Every run folder holds ``config.toml``, the run's whole resolved configuration,
written (owner-only) when the run starts. The ServerApp and the ClientApps read
their configuration from that file, and a stopped run given again with
``--run-dir`` resumes from it: an override that contradicts it is refused with
one line naming the key and both values, so a resumed run can never silently
become another run (a ``scenario.ticks`` lower than the ticks already done used
to end it at once and mark it finished).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedge.contracts.config import ConfigError, FedgeConfig
from fedge.contracts.config_load import (
    apply_overrides,
    from_dict,
    load_config,
    new_run_dir,
    read_toml,
    resolve_path,
)
from fedge.core.orchestrator import TickCallback
from fedge.core.records import CampaignRecord, TickRecord

ENGINES = ("inprocess", "simulation", "deployment")

#: The run's resolved configuration, inside its run folder.
CONFIG_FILE = "config.toml"

#: Keys a resumed run may change: how long to wait and how many worker processes
#: change neither the numbers nor where anything is stored.
MAY_CHANGE_ON_RESUME = ("run.reply_timeout", "run.workers")


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


@dataclass(frozen=True)
class RunPlan:
    """A validated run, before anything is created.

    Parameters
    ----------
    cfg : FedgeConfig
        The configuration the run uses.
    folder : Path
        Its run folder (may not exist yet).
    resumed : bool
        True when ``folder`` holds the ``config.toml`` of a run that started before.
    """

    cfg: FedgeConfig
    folder: Path
    resumed: bool


def config_data(cfg: FedgeConfig) -> dict[str, Any]:
    """``cfg`` as nested plain tables, ``run.output_dir`` absolute (what ``config.toml`` holds)."""
    data = dataclasses.asdict(cfg)
    data["run"]["output_dir"] = str(cfg.output_dir)
    return data


def _normalised(cfg: FedgeConfig) -> dict[str, Any]:
    flat = cfg.flat()
    flat["run.output_dir"] = str(cfg.output_dir)
    return flat


def resumed_config(stored: Path, request: RunRequest) -> FedgeConfig:
    """The configuration of the run whose ``config.toml`` is ``stored``, as ``request`` asks.

    Without a scenario file the request's overrides apply on top of the stored
    configuration; with one, the file and overrides must describe the same run.

    Raises
    ------
    ConfigError
        The stored file is unusable, or the request changes a key other than
        :data:`MAY_CHANGE_ON_RESUME` (the message names the key and both values).
    """
    folder = stored.parent
    try:
        data = read_toml(stored)
        before = from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"--run-dir {folder}: its {CONFIG_FILE} is unusable: {exc}") from None
    if request.scenario is None:
        asked = from_dict(apply_overrides(data, request.overrides))
    else:
        asked = load_config(request.scenario, request.overrides)
    old, new = _normalised(before), _normalised(asked)
    for key in sorted(set(old) | set(new)):
        if key in MAY_CHANGE_ON_RESUME or old.get(key) == new.get(key):
            continue
        shown_old = repr(old[key]) if key in old else "unset"
        shown_new = repr(new[key]) if key in new else "unset"
        raise ConfigError(
            f"--run-dir {folder}: {key} is {shown_old} in this run, {shown_new} was asked for; "
            "a resumed run keeps its configuration (give a new run folder to change it)"
        )
    return asked


def plan_run(request: RunRequest, run_dir: Path | None = None) -> RunPlan:
    """Validate ``request`` for ``run_dir`` (a new folder when None); nothing is created.

    Raises
    ------
    ConfigError
        The engine, the configuration or a resumed run's override is refused.
    """
    if request.engine not in ENGINES:
        raise ConfigError(f"engine: {request.engine!r} is not allowed; allowed: {', '.join(ENGINES)}")
    scenario = resolve_path(request.scenario) if request.scenario else None
    request = RunRequest(scenario, tuple(request.overrides), request.engine)
    stored = run_dir / CONFIG_FILE if run_dir is not None else None
    if stored is not None and stored.is_file():
        return RunPlan(resumed_config(stored, request), run_dir, resumed=True)  # type: ignore[arg-type]
    cfg = request.config()
    return RunPlan(cfg, run_dir or new_run_dir(cfg), resumed=False)


def write_config(cfg: FedgeConfig, folder: Path) -> Path:
    """Write ``cfg`` to ``<folder>/config.toml`` (owner-only), replacing it in one step."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = folder / CONFIG_FILE
    text = (
        "# The whole configuration of this run, written when it started.\n"
        "# `fedge run --run-dir <this folder>` resumes the run from it.\n"
        + tomli_w.dumps(config_data(cfg))
    )
    fd, tmp = tempfile.mkstemp(prefix=f".{CONFIG_FILE}.", dir=folder)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def run(
    request: RunRequest,
    *,
    on_tick: TickCallback | None = None,
    run_dir: Path | None = None,
) -> dict[str, Any]:
    """Run ``request`` and return the summary dict (also in ``<run dir>/summary.json``).

    A ``run_dir`` holding a ``config.toml`` resumes that run with the configuration
    stored there (see :func:`resumed_config`).
    """
    plan = plan_run(request, run_dir)
    cfg, folder = plan.cfg, plan.folder
    if cfg.run.client_app and request.engine != "inprocess":
        raise ConfigError(
            f"run.client_app: only the in-process engine takes it; {request.engine} runs the "
            "clientapp of the app's pyproject.toml ([tool.flwr.app.components])"
        )
    if cfg.run.client_app:
        load_client_app(cfg.run.client_app)  # refused before anything is created
    stored = folder / CONFIG_FILE
    # The output folder holds the registry and the state even when the run folder
    # is elsewhere (``--run-dir``); it is created here, after every check passed.
    cfg.output_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if cfg.tracking.uri:
        # A store fedge cannot use is refused before the run folder is made.
        from fedge.tracking import check_tracking_uri

        check_tracking_uri(cfg.tracking.uri)
    if request.engine != "deployment":
        # Before the configuration is stored: inboxes that refuse the rows leave no run behind.
        feed_devices(cfg, folder)
    if not plan.resumed:
        write_config(cfg, folder)
    # Both apps read the stored file; a resumed run adds only the keys it may change.
    before, now = _normalised(load_config(stored)), _normalised(cfg)
    changed = tuple(
        f"{key}={json.dumps(now[key])}" for key in MAY_CHANGE_ON_RESUME if before[key] != now[key]
    )
    request = RunRequest(stored, changed, request.engine)
    run_config = request.run_config(cfg, folder, request.engine)
    if request.engine == "deployment":
        from fedge.deploy.runs import DeployRequest, deploy

        return deploy(DeployRequest(stored, changed), run_dir=folder)
    if request.engine == "simulation":
        from fedge.engines.simulation import run_flower_simulation

        run_flower_simulation(run_config, num_supernodes=cfg.scenario.clients, log_dir=folder)
        return dict(json.loads((folder / "summary.json").read_text()))
    return run_inprocess(cfg, run_config, folder, on_tick=on_tick)


def feed_devices(cfg: FedgeConfig, folder: Path) -> None:
    """Put every device's rows into its ingest inbox, as a device application would.

    Raises
    ------
    ConfigError
        An inbox refused the rows (one line: mixing generated and own rows, a bad file).
    """
    from clients.inbox import IngestError

    for device in range(cfg.scenario.clients):
        try:
            feed_device(cfg, device, folder / "devices" / f"device-{device}.sqlite")
        except IngestError as exc:
            raise ConfigError(f"device {device}: {exc}") from None


def feed_device(cfg: FedgeConfig, device: int, store_path: Path) -> None:
    """Put one device's scenario rows into the inbox beside its store."""
    from clients.inbox import inbox_path
    from fedge.scenarios.feed import feed_scenario

    feed_scenario(cfg, device, inbox_path(store_path))


def load_client_app(spec: str) -> Any:
    """The ClientApp named ``module:attribute`` (``""``: fedge's own).

    Raises
    ------
    ConfigError
        Not of that form, not importable, or not a Flower ClientApp (one line).
    """
    from flwr.clientapp import ClientApp

    if not spec:
        from clients.client_app import app

        return app
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"run.client_app: {spec!r} is not of the form 'module:attribute'")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # noqa: BLE001  # the user's module: any failure is one line
        raise ConfigError(f"run.client_app: {spec!r} cannot be loaded ({type(exc).__name__}: {exc})") from None
    if not isinstance(found, ClientApp):
        raise ConfigError(f"run.client_app: {spec!r} is a {type(found).__name__}, not a Flower ClientApp")
    return found


def run_inprocess(
    cfg: FedgeConfig,
    run_config: dict[str, Any],
    folder: Path,
    *,
    on_tick: TickCallback | None = None,
) -> dict[str, Any]:
    """The ServerApp's loop over an :class:`InProcessGrid` of ClientApps."""
    from clients.client_app import forget_devices
    from fedge.engines.inprocess import InProcessGrid
    from fedge.server.app import run_server

    logging.getLogger("flwr").setLevel(logging.WARNING)
    client_app = load_client_app(cfg.run.client_app)
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
