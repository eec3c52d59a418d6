"""``fedge deploy``: one command for a whole local Flower deployment of a scenario."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    err.print(f"[bold red]fedge: error:[/] {first}", highlight=False)
    raise typer.Exit(code)


def deploy_cmd(
    scenario: Annotated[
        Path | None, typer.Argument(help="Scenario TOML file (default: the embedded defaults).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a config key: section.key=value (repeatable)."),
    ] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Where runs, stores and MLflow go.")] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="Use this MLflow server instead of starting one."),
    ] = None,
    credentials: Annotated[
        Path | None,
        typer.Option(help="Folder for tls/ and keys/ (default: <output dir>/deployment)."),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Plain text and no SuperNode authentication (trusted machine only).",
        ),
    ] = False,
    cert_host: Annotated[
        list[str] | None,
        typer.Option(help="Extra name or address for the SuperLink certificate (repeatable)."),
    ] = None,
    mlflow_auth: Annotated[
        bool,
        typer.Option(
            "--mlflow-auth/--no-mlflow-auth",
            help="Start the MLflow server with its basic-auth app (password in <credentials>/mlflow/).",
        ),
    ] = True,
    timeout: Annotated[float, typer.Option(help="Seconds the run may take.")] = 3600.0,
    fresh: Annotated[
        bool, typer.Option(help="Ignore the registry's champion and train from scratch.")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress lines.")] = False,
) -> None:
    """Start a SuperLink, one SuperNode per device, an MLflow server and the run, with TLS on.

    The number of SuperNodes is the scenario's ``scenario.clients`` (change it
    with ``--set scenario.clients=N``).
    """
    from fedge.contracts.config import ConfigError
    from fedge.deploy import DeployError
    from fedge.deploy.runs import DeployRequest, deploy

    overrides = list(set_ or [])
    if output_dir is not None:
        overrides.append(f'run.output_dir="{output_dir.expanduser().resolve()}"')
    if tracking_uri is not None:
        overrides.append(f'tracking.uri="{tracking_uri}"')
    if fresh:
        overrides.append("run.resume=false")
    if timeout <= 0:
        _fail(f"--timeout: must be positive, got {timeout}", 2)
    if insecure:
        err.print(
            "[yellow]fedge: warning:[/] --insecure: plain text, and any SuperNode may join.",
            highlight=False,
        )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    request = DeployRequest(
        scenario,
        tuple(overrides),
        insecure=insecure,
        credentials=credentials.expanduser().resolve() if credentials else None,
        timeout=timeout,
        cert_hosts=tuple(cert_host or ()),
        mlflow_auth=mlflow_auth,
    )

    def say(message: str) -> None:
        if not quiet:
            console.print(f"[dim]deploy:[/] {message}", highlight=False)

    try:
        summary = deploy(request, on_status=say)
    except ConfigError as exc:
        _fail(str(exc), 2)
        return
    except DeployError as exc:
        _fail(str(exc), 1)
        return
    except KeyboardInterrupt:
        _fail("interrupted; every process of the deployment was stopped", 130)
        return
    _print(summary)


def _print(summary: dict[str, Any]) -> None:
    try:
        from fedge.console import print_summary
    except ImportError:
        console.print_json(data={k: summary[k] for k in ("scenario", "engine", "champion", "run_dir")})
        return
    print_summary(summary)
