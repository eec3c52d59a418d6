"""Running a Flower app on a local deployment, and ``fedge deploy`` of one scenario.

:func:`submit_run` starts an app on a :class:`~fedge.deploy.launcher.LocalDeployment`
with ``flwr run``; :func:`wait_for_run` waits for it while watching the
deployment's processes, :func:`stop_run`, :func:`run_status` and
:func:`save_run_log` are the rest of Flower's run control. :func:`deploy` is what
``fedge deploy`` runs: it starts everything for one scenario
(:func:`~fedge.deploy.launcher.start_deployment`), runs it, and hands back the
ServerApp's ``summary.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedge.deploy import DeployError
from fedge.deploy.certs import DEFAULT_HOSTS
from fedge.deploy.launcher import CONNECTION, LocalDeployment, start_deployment, toml_string

FINISHED_OK = "finished:completed"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    raise DeployError(f"run config: unsupported value {value!r}")


def submit_run(
    dep: LocalDeployment, run_config: Mapping[str, object], app: Path | None = None
) -> int:
    """Start the app with ``flwr run <app> <connection>``; returns the run id.

    ``app`` is another Flower app than :attr:`LocalDeployment.app_dir` (pinned SuperNodes refuse it).
    """
    path = dep.folder / "run-config.toml"
    path.write_text(
        "".join(f"{toml_string(str(k))} = {_toml_value(v)}\n" for k, v in run_config.items()),
        encoding="utf-8",
    )
    target = dep.app_dir if app is None else Path(app).expanduser().resolve()
    reply = dep.flwr("run", str(target), "--run-config", str(path), timeout=120.0)
    run_id = int(reply["run-id"])
    (dep.folder / "run-id").write_text(f"{run_id}\n", encoding="utf-8")
    return run_id


def stop_run(dep: LocalDeployment, run_id: int) -> None:
    """Stop a run with ``flwr stop`` (the ServerApp process ends; nodes keep their state)."""
    dep.flwr("stop", str(run_id), timeout=60.0)


def run_status(dep: LocalDeployment, run_id: int) -> tuple[str, str]:
    """The run's status and its details, e.g. ``("finished:completed", "N/A")``."""
    reply = dep.flwr("list", "--run-id", str(run_id))
    run = reply["runs"][0]
    return str(run["status"]), str(run.get("status-details", ""))


def wait_for_run(
    dep: LocalDeployment,
    run_id: int,
    timeout: float,
    on_wait: Callable[[str], None] | None = None,
    *,
    done_file: Path | None = None,
    poll: float = 10.0,
) -> str:
    """Wait for the run to finish and save its log; returns the final status.

    A SuperLink or SuperNode that exits while the run is going stops the wait
    with an error naming it. Each status query starts a ``flwr`` process, so
    the SuperLink is asked every ``poll`` seconds, and every second once
    ``done_file`` (what the app writes last) exists.
    """
    deadline = time.monotonic() + timeout
    status = "pending"
    asked = time.monotonic()
    while not status.startswith("finished"):
        if time.monotonic() > deadline:
            dep.group.run("flwr", [str(dep.bin_dir / "flwr"), "stop", str(run_id), CONNECTION])
            save_run_log(dep, run_id)
            raise DeployError(f"run {run_id} did not finish within {timeout:.0f} s; stopped it")
        for proc in [dep.superlink, *(n.process for n in dep.supernodes)]:
            if proc is not None and not proc.running():
                save_run_log(dep, run_id)
                raise DeployError(proc.describe_exit())
        time.sleep(1.0)
        finishing = done_file is not None and done_file.exists()
        if not finishing and time.monotonic() - asked < poll:
            continue
        asked = time.monotonic()
        status, _ = run_status(dep, run_id)
        if on_wait is not None:
            on_wait(status)
    save_run_log(dep, run_id)
    return status


def save_run_log(dep: LocalDeployment, run_id: int) -> Path:
    """Write the run's log as Flower keeps it to ``logs/run-<id>.log``."""
    path = dep.group.log_dir / f"run-{run_id}.log"
    done = dep.group.run(
        "flwr", [str(dep.bin_dir / "flwr"), "log", str(run_id), CONNECTION, "--show"], timeout=60
    )
    path.write_text(done.stdout + done.stderr, encoding="utf-8")
    return path


@dataclass(frozen=True)
class DeployRequest:
    """What ``fedge deploy`` was asked to do.

    Parameters
    ----------
    scenario : Path or None
        Scenario TOML (``None``: the embedded defaults).
    overrides : tuple of str
        ``section.key=value`` overrides, as for ``fedge run``.
    insecure : bool, default False
        Plain text and no SuperNode authentication.
    credentials : Path or None
        Folder of ``tls/`` and ``keys/``; default ``<output dir>/deployment``.
    timeout : float, default 3600
        Seconds the run may take.
    feed_inbox : bool, default True
        Write each device's scenario rows into its ingest inbox before the run,
        as a device application would.
    cert_hosts : tuple of str
        Extra DNS names or addresses for the SuperLink's certificate (beside
        ``127.0.0.1``, ``localhost`` and ``::1``).
    mlflow_auth : bool, default True
        Start the MLflow server with its basic-auth app (credentials in
        ``<credentials>/mlflow/``); no effect with a ``tracking.uri`` of one's own.
    """

    scenario: Path | None
    overrides: tuple[str, ...] = ()
    insecure: bool = False
    credentials: Path | None = None
    timeout: float = 3600.0
    feed_inbox: bool = True
    cert_hosts: tuple[str, ...] = ()
    mlflow_auth: bool = True


def deploy(
    request: DeployRequest,
    *,
    run_dir: Path | None = None,
    on_status: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Start a whole local deployment for one scenario, run it, and return the summary.

    Raises
    ------
    fedge.contracts.config.ConfigError
        The scenario or an override is invalid (nothing was started).
    DeployError
        A process did not start, a node was refused, or the run failed; no
        process is left behind.
    """
    from fedge.contracts.config_load import load_config, new_run_dir, resolve_path

    scenario = resolve_path(request.scenario) if request.scenario else None
    overrides = list(request.overrides)
    cfg = load_config(scenario, overrides)
    n = cfg.scenario.clients
    folder = Path(run_dir or new_run_dir(cfg)).expanduser().resolve()
    credentials = request.credentials or cfg.output_dir / "deployment"
    say = on_status or (lambda _msg: None)
    if request.feed_inbox:
        from clients.inbox import inbox_path
        from fedge.scenarios.feed import feed_scenario

        for device in range(n):
            feed_scenario(cfg, device, inbox_path(folder / "devices" / f"device-{device}.sqlite"))
    hosts = tuple(dict.fromkeys((*DEFAULT_HOSTS, *request.cert_hosts)))
    with start_deployment(
        folder / "deployment",
        cfg.output_dir,
        n,
        credentials=credentials,
        insecure=request.insecure,
        hosts=hosts,
        tracking_uri=cfg.tracking.uri,
        on_status=say,
        mlflow_auth=request.mlflow_auth,
    ) as dep:
        if not cfg.tracking.uri:
            overrides.append(f"tracking.uri={toml_string(dep.tracking_uri)}")
        run_id = submit_run(
            dep,
            {
                "scenario": str(scenario) if scenario else "",
                "overrides": ";".join(overrides),
                "output-dir": str(cfg.output_dir),
                "run-dir": str(folder),
                "engine": "deployment",
            },
        )
        say(f"run {run_id} started")
        status = wait_for_run(dep, run_id, request.timeout, done_file=folder / "summary.json")
        if status != FINISHED_OK:
            _, details = run_status(dep, run_id)
            log = dep.group.log_dir / f"run-{run_id}.log"
            raise DeployError(f"run {run_id} ended {status} ({details}); log: {log}")
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        raise DeployError(f"run finished but wrote no summary at {summary_path}")
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    if not cfg.tracking.uri:
        from fedge.tracking import ui_command

        # The tracking server stopped with the deployment; its store stays.
        summary["ui_command"] = ui_command(f"sqlite:///{cfg.output_dir / 'mlflow.db'}")
    return summary
