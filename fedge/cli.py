"""The ``fedge`` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import fedge  # noqa: F401  (telemetry defaults before Flower or MLflow load)
from fedge.console import console, fmt, print_summary, privacy_cells, privacy_columns
from fedge.deploy.command import deploy_cmd

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=False,
    help="fedge: on-device drift detection starts federated retraining; "
    "MLflow registers every global model.",
)
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    # soft_wrap: the error stays one line however narrow the terminal is.
    # escape: a message quoting the user's input ("[scenario") is not markup.
    err.print(f"[bold red]fedge: error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler that writes to whatever ``sys.stderr`` is when a record comes.

    rich's live progress display and test runners replace ``sys.stderr`` while a
    command runs; a handler that kept the stream it was made with would write
    past the display, or into a closed stream.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR}


def configure_logging(level: int = logging.WARNING) -> Callable[[], None]:
    """Give the ``fedge`` logger its own stderr handler and level; return the undo.

    Importing ``mlflow.pytorch`` runs ``logging.basicConfig(level=ERROR)``, which
    leaves the root logger at ERROR: a warning that propagated to it (a device
    store moved aside, an unreachable tracking server) would be dropped. fedge's
    loggers therefore stop at their own handler (``propagate = False``), whatever
    another library did to the root logger, before or after.
    """
    logger = logging.getLogger("fedge")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    for handler in list(logger.handlers):
        if isinstance(handler, _StderrHandler):
            logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("fedge: %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False

    def undo() -> None:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]

    return undo


@app.callback()
def _main(
    ctx: typer.Context,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also show fedge's informational lines.")
    ] = False,
    log_level: Annotated[
        str | None,
        typer.Option(help="Lowest level of fedge's log lines on stderr: debug, info, warning, error."),
    ] = None,
) -> None:
    """Configure fedge's logging before any command imports Flower or MLflow."""
    name = log_level or ("info" if verbose else "warning")
    if name.lower() not in LOG_LEVELS:
        _fail(f"--log-level: {name!r} is not allowed; allowed: {', '.join(LOG_LEVELS)}")
    # Undone when the command ends: the CLI may run inside another program (tests).
    ctx.call_on_close(configure_logging(LOG_LEVELS[name.lower()]))


@app.command("run")
def run_cmd(
    scenario: Annotated[
        Path | None, typer.Argument(
            help=f"Scenario TOML file (default: ./{PROJECT_SCENARIO} if there is one, "
            "else the embedded defaults)."
        )
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="inprocess, simulation (Flower's Ray engine) or deployment "
            "(a local Flower deployment with TLS; see `fedge deploy` for its options)."
        ),
    ] = "inprocess",
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: SQLite under the output dir).")
    ] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Where runs, stores and MLflow go.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a config key: section.key=value (repeatable)."),
    ] = None,
    fresh: Annotated[
        bool, typer.Option(help="Ignore the registry's champion and train from scratch.")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress display.")] = False,
    run_dir: Annotated[
        Path | None,
        typer.Option(
            help="Run in this folder. Given the folder of a run that stopped, the run "
            "continues where it was (ticks and rounds carry on, no version is registered twice)."
        ),
    ] = None,
) -> None:
    """Run a drift scenario end to end and print what happened.

    Given ``--run-dir`` of a run that stopped, the run resumes with the
    configuration stored in its ``config.toml``; an override that contradicts
    it is refused.
    """
    from fedge.contracts.config import ConfigError
    from fedge.runner import RunRequest, plan_run

    # In a project folder (``fedge new``) its own scenario and task are the defaults;
    # a resumed run there still needs its task importable.
    project = _project_scenario() if scenario is None else None
    if run_dir is None:
        scenario = scenario or project
    overrides = list(set_ or [])
    if output_dir is not None:
        overrides.append(f"run.output_dir={json.dumps(str(output_dir.expanduser().resolve()))}")
    if tracking_uri is not None:
        overrides.append(f"tracking.uri={json.dumps(tracking_uri)}")
    if fresh:
        overrides.append("run.resume=false")
    request = RunRequest(scenario, tuple(overrides), engine)
    folder = run_dir.expanduser().resolve() if run_dir is not None else None
    if folder is not None and folder.exists() and not folder.is_dir():
        _fail(f"--run-dir {folder}: is a file, not a folder")
        return
    if folder is not None and (folder / "summary.json").exists():
        _fail(f"--run-dir {folder}: holds a finished run (summary.json); give a new folder")
        return
    if folder is not None and fresh and (folder / "devices").exists():
        _fail(f"--run-dir {folder}: --fresh needs a new folder; the devices there remember their ticks")
        return
    try:
        # Everything is checked before the engine, Flower or MLflow are loaded.
        cfg = plan_run(request, folder).cfg
    except ConfigError as exc:
        _fail(str(exc))
        return
    from fedge.core.ports import RunFailed
    from fedge.engines import EngineError
    from fedge.runner import run
    from fedge.tracking import TrackingError

    try:
        if engine == "inprocess" and not quiet:
            summary = _run_with_progress(request, cfg, folder)
        else:
            if not quiet:
                where = "a local Flower deployment" if engine == "deployment" else "Flower's simulation engine"
                console.print(f"Running [bold]{cfg.scenario.name}[/] on {where}…")
            summary = run(request, run_dir=folder)
    except (ConfigError, TrackingError) as exc:
        _fail(str(exc))
        return
    except (EngineError, RunFailed) as exc:
        _fail(str(exc), code=1)
        return
    print_summary(summary)


def _run_with_progress(request: Any, cfg: Any, folder: Path | None) -> dict[str, Any]:
    from fedge.core.records import CampaignRecord, TickRecord
    from fedge.runner import run

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(cfg.scenario.name, total=cfg.scenario.ticks, status="starting")

        shown: dict[str, str] = {}

        def on_tick(rec: TickRecord, campaign: CampaignRecord | None) -> None:
            drift = f"drift {len(rec.drifted)}/{cfg.scenario.clients}" if rec.drifted else "no drift"
            line = f"tick {rec.tick:>3}  accuracy {fmt(rec.accuracy)}  {drift}"
            if campaign is not None:
                verdict = "[green]promoted[/]" if campaign.promoted else "[yellow]kept champion[/]"
                line += (
                    f"  -> {campaign.reason.split(':')[0]}: v{campaign.version} {verdict}"
                    f" ({campaign.candidate_acc:.3f} vs {campaign.champion_acc:.3f})"
                )
            if rec.refused and rec.refused != shown.get("refused"):
                line += f"  -> [red]no campaign[/]: {rec.refused}"
                shown["refused"] = rec.refused
            progress.console.print(line, highlight=False)
            progress.update(task, advance=1, status=f"accuracy {fmt(rec.accuracy)}")

        return run(request, on_tick=on_tick, run_dir=folder)


#: The scenario file ``fedge run`` reads from the current folder when given none.
PROJECT_SCENARIO = "fedge.toml"


def _project_scenario() -> Path | None:
    """``./fedge.toml`` when it exists (a ``fedge new`` project), its folder made importable.

    The project's task module (``model.task``) lives in that folder: it goes on
    ``sys.path`` here and on ``PYTHONPATH`` for the device processes a run starts.
    """
    found = Path.cwd() / PROJECT_SCENARIO
    if not found.is_file():
        return None
    here = str(Path.cwd())
    if here not in sys.path:
        sys.path.insert(0, here)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if here not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([here, *paths])
    return found


@app.command("new")
def new_cmd(
    name: Annotated[str, typer.Argument(help="The project's name: a folder and a Python package.")],
) -> None:
    """Create a fedge project: a task (model and data), a scenario, a README, a test.

    ``fedge run`` inside the new folder runs its scenario; ``python -m pytest``
    runs its test.
    """
    from fedge.templates import ProjectError, create_project

    try:
        folder = create_project(Path.cwd(), name)
    except ProjectError as exc:
        _fail(str(exc))
        return
    console.print(f"Created the fedge project [bold]{escape(name)}[/] in {escape(str(folder))}")
    console.print(f"  cd {escape(name)} && fedge run          # its scenario, {PROJECT_SCENARIO}")
    console.print(f"  cd {escape(name)} && python -m pytest   # its test", highlight=False)


app.command("deploy")(deploy_cmd)


@app.command("versions")
def versions_cmd(
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
    output_dir: Annotated[Path, typer.Option(help="Output dir of the runs (for the default URI).")] = Path(
        "fedge-runs"
    ),
    model: Annotated[str | None, typer.Option(help="Registered model name (default: all).")] = None,
) -> None:
    """List registered model versions with their lineage and aliases."""
    from fedge.tracking import TrackingError, default_tracking_uri, list_model_versions

    uri = tracking_uri or default_tracking_uri(output_dir.expanduser().resolve())
    try:
        rows = list_model_versions(uri, model)
    except TrackingError as exc:
        _fail(str(exc))
        return
    if not rows:
        console.print(f"No registered models at {uri}.")
        return
    table = Table(title=f"Model versions at {uri}", title_justify="left")
    private = privacy_columns(rows)
    for col in ("model", "version", "aliases", "parent", "trigger", "devices", "rounds", "run", *private):
        table.add_column(col)
    for v in rows:
        tags = v["tags"]
        row = [
            str(v.get("name", model or "")),
            f"v{v['version']}",
            ", ".join(v["aliases"]),
            tags.get("fedge.parent_version", ""),
            tags.get("fedge.trigger_reason", ""),
            tags.get("fedge.participating_devices", ""),
            tags.get("fedge.campaign_rounds", ""),
            str(v.get("run_id", ""))[:8],
        ]
        table.add_row(*row, *privacy_cells(tags, private))
    console.print(table)


@app.command("sync")
def sync_cmd(
    path: Annotated[
        Path,
        typer.Argument(help="A run folder, or a folder of runs (e.g. the output dir)."),
    ] = Path("fedge-runs"),
) -> None:
    """Send MLflow writes that runs buffered while their tracking server was unreachable."""
    from fedge.tracking import TrackingError, sync_outboxes

    try:
        results = sync_outboxes(path.expanduser())
    except TrackingError as exc:
        _fail(str(exc))
        return
    if not results:
        console.print(f"Nothing to send: no tracking outbox in {path}.", highlight=False)
    for result in results:
        (err if result.reason else console).print(result.line(), highlight=False, soft_wrap=True)
    if any(result.reason for result in results):
        raise typer.Exit(1)


@app.command("scenarios")
def scenarios_cmd() -> None:
    """List the ready scenarios shipped in experiments/."""
    from fedge.contracts.config import ConfigError
    from fedge.contracts.config_load import load_config
    from fedge.runner import scenario_files

    table = Table(title="Scenarios", title_justify="left")
    for col in ("file", "generator", "clients", "ticks", "schedule", "detector", "policy"):
        table.add_column(col)
    for path in scenario_files():
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            table.add_row(path.name, f"[red]{exc}[/]", "", "", "", "", "")
            continue
        table.add_row(
            str(path.name),
            cfg.scenario.generator,
            str(cfg.scenario.clients),
            str(cfg.scenario.ticks),
            str(cfg.scenario.schedule.get("kind")),
            cfg.monitor.detector,
            cfg.trigger.policy,
        )
    console.print(table)


@app.command("audit")
def audit_cmd(
    log: Annotated[Path, typer.Argument(help="A device's audit log (*.audit.jsonl).")],
) -> None:
    """Verify a device's hash-chained audit log and summarise what it sent."""
    from fedge.privacy.anchors import summarise, verify

    verdict = verify(log)
    if not verdict.ok:
        _fail(f"audit log {log}: chain broken at entry {verdict.broken_at}: {verdict.reason}", 1)
        return
    s = summarise(log)
    console.print(f"[green]chain intact[/]: {verdict.entries} entries in {log}")
    table = Table(title="Outgoing messages", title_justify="left")
    table.add_column("message type")
    table.add_column("count", justify="right")
    for kind, n in sorted(s["by_type"].items()):
        table.add_row(kind, str(n))
    console.print(table)
    console.print(f"bytes sent: {s['bytes_sent']}   blocked: {len(s['blocked'])}")
    for b in s["blocked"]:
        console.print(f"  entry {b['seq']}: {'; '.join(b['violations'])}", highlight=False)


@app.command("fleet")
def fleet_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (it holds fleet.jsonl).")],
    device: Annotated[int | None, typer.Argument(help="One device's history instead of the table.")] = None,
    status: Annotated[str | None, typer.Option(help="Only devices of this status.")] = None,
    sort: Annotated[str, typer.Option(help="device, status, version, last_seen, accuracy, errors.")] = "device",
    watch: Annotated[bool, typer.Option(help="Refresh while the run goes on (Ctrl-C ends).")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 2.0,
    limit: Annotated[int, typer.Option(help="Rows to show after sorting; 0 shows all.")] = 200,
) -> None:
    """The devices of a run: status, version, last seen, accuracy, drift, errors (docs/fleet.md)."""
    from fedge.console_fleet import FleetError, show_fleet
    try:
        show_fleet(console, run_dir, device, status=status, sort=sort, watch=watch, interval=interval, limit=limit)
    except FleetError as exc:
        _fail(str(exc))


@app.command("dashboard")
def dashboard_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder, finished or still going.")],
    host: Annotated[str, typer.Option(help="Address to listen on (loopback unless --allow-remote).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port; 0 takes a free one.")] = 0,
    allow_remote: Annotated[bool, typer.Option(help="Allow a non-loopback --host.")] = False,
) -> None:
    """The fleet as a local read-only web page: devices, versions, accuracy, rollout (docs/fleet.md)."""
    from fedge.dashboard import DashboardError, serve
    try:
        serve(run_dir, host, port, allow_remote,
              ready=lambda line: console.print(line, highlight=False, soft_wrap=True))
    except DashboardError as exc:
        _fail(str(exc))


@app.command("diagnose")
def diagnose_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (it holds fleet.jsonl).")],
    device: Annotated[str, typer.Argument(help="The device to ask, by number.")],
    show: Annotated[bool, typer.Option(help="Print the device's latest answer instead.")] = False,
) -> None:
    """Ask one device for a diagnostic summary at its next poll (docs/fleet.md#diagnostics)."""
    from fedge.server.diagnostics import DiagnosticsError, diagnose
    try:
        console.print(escape(diagnose(run_dir, device, show)), highlight=False, soft_wrap=True)
    except DiagnosticsError as exc:
        _fail(str(exc))


@app.command("report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (it holds summary.json).")],
    out: Annotated[Path | None, typer.Option(help="Where to write the Markdown report.")] = None,
    log_to_mlflow: Annotated[bool, typer.Option(help="Attach the report to the run.")] = True,
) -> None:
    """Write the compliance report of a run and attach it to its MLflow run."""
    from fedge.privacy.report import write_report
    from fedge.tracking import TrackingError, attach_artifact

    try:
        path = write_report(run_dir, out)
    except FileNotFoundError as exc:
        _fail(str(exc))
        return
    console.print(f"compliance report: {path}")
    if log_to_mlflow:
        summary = json.loads((run_dir / "summary.json").read_text())
        try:
            attach_artifact(summary["tracking_uri"], summary["run_id"], path, "compliance")
        except TrackingError as exc:
            _fail(str(exc), 1)
            return
        console.print(f"attached to MLflow run {summary['run_id']}")


@app.command("feddrift")
def feddrift_cmd(
    datasets: Annotated[
        str,
        typer.Option(
            help="Comma-separated datasets: sine2, circle2, sea4, digits-swap, river-sea4, river-stagger, "
            "river-agrawal, river-hyperplane, or GENERATOR:key=value;key=value (list values as 0/2)."
        ),
    ] = "sine2,circle2,sea4,digits-swap",
    policies: Annotated[
        str, typer.Option(help="Comma-separated: never, window, oracle, drift-triggered, drift-clustered.")
    ] = "never,window,oracle,drift-triggered,drift-clustered",
    seeds: Annotated[int, typer.Option(help="Seeds 0 .. N-1 per dataset.")] = 3,
    matrix: Annotated[
        list[str] | None,
        typer.Option(
            help="dataset=MATRIX: a FedDrift matrix (A..F, W..Z, R0..R9), a path to a .cp file, or random-<seed>."
        ),
    ] = None,
    sweep: Annotated[
        bool,
        typer.Option(help="Run the sweep over every matrix of issue 13 (experiments/feddrift_sweep.py) instead."),
    ] = False,
    calibrate: Annotated[bool, typer.Option(help="Calibrate each dataset's detector instead.")] = False,
    jobs: Annotated[int, typer.Option(help="Worker processes.")] = 2,
    rounds: Annotated[int, typer.Option(help="Flower rounds per campaign.")] = 5,
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 5,
    lr: Annotated[float, typer.Option(help="Local Adam learning rate.")] = 0.01,
    batch_size: Annotated[int, typer.Option(help="Local batch size.")] = 16,
    cooldown: Annotated[int, typer.Option(help="drift-triggered: ticks between campaigns.")] = 3,
    delta: Annotated[float | None, typer.Option(help="ADWIN delta (default: calibrated).")] = None,
    results: Annotated[
        Path, typer.Option(help="Where the table and plots go.")
    ] = Path("experiments/results/feddrift"),
    work_dir: Annotated[
        Path | None, typer.Option(help="Where the runs (device stores, MLflow stores) go; default RESULTS/runs.")
    ] = None,
    page: Annotated[
        Path | None,
        typer.Option(help="Where the Markdown page goes; default RESULTS/feddrift.md (docs/feddrift.md to publish)."),
    ] = None,
) -> None:
    """The FedDrift protocol: every retraining policy on the paper's datasets and matrices."""
    import time as _time

    from experiments import feddrift_report as report
    from experiments.feddrift import Benchmark, Settings, run_benchmark
    from experiments.feddrift_sweep import cell_line, sweep_command

    if calibrate:
        from experiments.feddrift_calibrate import run_from_cli

        try:
            return run_from_cli(datasets, results, console.print)
        except ValueError as exc:
            return _fail(str(exc))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    chosen: dict[str, str] = {}
    for item in matrix or []:
        if "=" not in item:
            _fail(f"--matrix {item!r}: expected dataset=NAME, e.g. sea4=C")
        name, value = item.split("=", 1)
        chosen[name.strip()] = value.strip()
    if sweep and chosen:
        _fail("--sweep runs its own matrices; drop --matrix")
    bench = Benchmark(
        datasets=tuple(d.strip() for d in datasets.split(",") if d.strip()),
        seeds=seeds,
        policies=tuple(x.strip() for x in policies.split(",") if x.strip()),
        matrices=chosen,
        jobs=jobs,
        settings=Settings(
            rounds=rounds, local_epochs=local_epochs, lr=lr, batch_size=batch_size, cooldown=cooldown,
            delta=delta,
        ),
    )
    results_dir = results.expanduser().resolve()
    work = (work_dir.expanduser().resolve() if work_dir else results_dir / "runs") / _time.strftime("%Y%m%d-%H%M%S")
    if sweep:
        try:
            failed = sweep_command(results_dir, work, seeds, jobs, bench, lambda t: console.print(t, highlight=False))
        except ValueError as exc:
            _fail(str(exc))
        if failed:
            _fail(f"{len(failed)} sweep cell(s) failed: " + "; ".join(failed))
        return
    total = len(bench.tasks(work))
    started = _time.perf_counter()
    done = 0

    def on_task(rows: list[dict[str, Any]]) -> None:
        nonlocal done
        done += 1
        console.print(cell_line(rows, done, total, _time.perf_counter() - started), highlight=False)

    try:
        rows = run_benchmark(bench, work, on_task=on_task)
    except ValueError as exc:
        return _fail(str(exc))
    seconds = _time.perf_counter() - started
    out = report.write_results(rows, results.expanduser().resolve(), seconds, bench, work)
    table = Table(title=f"FedDrift protocol, {seeds} seeds, {seconds:.0f} s", title_justify="left")
    for col in report.TABLE_COLUMNS:
        table.add_column(col)
    for row in report.table_rows(out["summary"]):
        table.add_row(*row)
    console.print(table)
    for line in report.check_targets(out["summary"]):
        console.print(line, highlight=False)
    target = page.expanduser().resolve() if page is not None else results_dir / "feddrift.md"
    link = os.path.relpath(results.expanduser().resolve(), target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(report.keep_sections(report.render_page(out, bench, link), target))
    console.print(f"Page: {target}", highlight=False)
    console.print(f"Table and plots: {results}   runs and MLflow stores: {work}", highlight=False)


@app.command("bench")
def bench_cmd(
    quick: Annotated[bool, typer.Option(help="Smaller sizes: a few minutes instead of about ten.")] = False,
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="Run only this benchmark (repeatable): engine, overhead, aggregation, device, "
            "communication, mlflow."
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Markdown table to write (default: docs/benchmarks.md).")
    ] = None,
) -> None:
    """Measure fedge against Flower and the machine's limits; print ratios, write the table."""
    try:
        from experiments.benchmarks.suite import DEFAULT_OUTPUT, run_suite
    except ImportError:
        _fail("the benchmarks live in experiments/ of a fedge source checkout (pip install -e .)")
        return
    try:
        run_suite(tuple(only or ()), quick=quick, output=output or DEFAULT_OUTPUT)
    except ValueError as exc:
        _fail(str(exc))


@app.command("soak")
def soak_cmd(
    quick: Annotated[bool, typer.Option(help="5 devices x 60 ticks, 2 deployed x 6: a few minutes.")] = False,
    devices: Annotated[int, typer.Option(help="In-process devices.")] = 20,
    ticks: Annotated[int, typer.Option(help="In-process ticks.")] = 500,
    skip_deployment: Annotated[bool, typer.Option(help="Only the in-process run.")] = False,
    out: Annotated[Path | None, typer.Option(help="Keep the runs here (default: a temporary folder).")] = None,
) -> None:
    """Long run with drifts: memory over time, every campaign's version in the registry."""
    try:
        from experiments.soak import main as soak_main
    except ImportError:
        _fail("the soak benchmark lives in experiments/ of a fedge source checkout (pip install -e .)")
        return
    argv = ["--devices", str(devices), "--ticks", str(ticks)]
    argv += ["--quick"] if quick else []
    argv += ["--skip-deployment"] if skip_deployment else []
    argv += ["--out", str(out)] if out is not None else []
    raise typer.Exit(soak_main(argv))


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
