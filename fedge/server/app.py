"""The fedge Flower ServerApp: the core loop wired onto a Flower ``Grid``.

Same code on every engine: the in-process engine hands :func:`run_server` its
own grid, Flower's simulation and deployment engines hand :func:`main` theirs.
One loop serves one model or one model per cluster of devices.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedge.contracts.config import MIN_SECURE_DEVICES, FedgeConfig
from fedge.contracts.config_load import from_dict
from fedge.contracts.task import task_for
from fedge.contracts.wire import config_from_context, run_dir
from fedge.core.clustering import DriftClustering
from fedge.core.orchestrator import Orchestrator, TickCallback
from fedge.core.pool import ClusterPolicy
from fedge.core.ports import RunFailed
from fedge.core.records import summarize_history
from fedge.core.rollout import RolloutPolicy
from fedge.core.state import JsonState, state_path
from fedge.core.triggers import make_policy
from fedge.engines.quorum import ReplyQuorum, ShortRound
from fedge.scenarios import build_source
from fedge.server.federation import FlowerFederation
from fedge.server.registry import MlflowRegistry
from fedge.server.summary import (
    TickHistory,
    build_summary,
    detected_drifts,
    drift_truth,
    log_tick,
    plot_run,
)
from fedge.tracking import OUTBOX_DIR, Tracker, default_tracking_uri

log = logging.getLogger("fedge.server")

app = ServerApp()


#: The MLflow run a run folder last used (a resumed run closes and links it).
MLFLOW_RUN_FILE = "mlflow-run.json"
#: Every finished tick and its campaigns, one JSON line each (the summary covers a resumed run whole).
TICKS_FILE = "ticks.jsonl"


def _earlier_mlflow_run(folder: Path) -> str:
    try:
        return str(json.loads((folder / MLFLOW_RUN_FILE).read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


#: Seconds between the "waiting for devices" lines while the federation fills up.
WAIT_LOG_EVERY = 5.0


def wait_for_devices(
    grid: Grid,
    expected: int,
    timeout: float,
    *,
    every: float = WAIT_LOG_EVERY,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Wait until ``expected`` devices are connected, saying how many every ``every`` seconds.

    Parameters
    ----------
    grid : Grid
        The federation's grid (its ``get_node_ids`` are the connected devices).
    expected : int
        How many devices the scenario has.
    timeout : float
        Seconds to wait at most (``run.reply_timeout``).
    every : float, default WAIT_LOG_EVERY
        Seconds between the progress lines ``waiting for devices: 1 of 2 connected``.
    clock, sleep : callable
        The time source and the pause (tests pass fakes).

    Returns
    -------
    int
        How many devices are connected. Fewer than ``expected`` after ``timeout``
        is logged as one warning line saying the federation is smaller than the
        scenario; the run goes on with those.
    """
    start = clock()
    said = None
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= expected:
            if said is not None:
                log.info("all %d devices connected", expected)
            return connected
        now = clock()
        if now - start >= timeout:
            log.warning(
                "only %d of %d devices connected after %g s: the federation is smaller than "
                "the scenario (scenario.clients = %d); running with those",
                connected, expected, timeout, expected,
            )
            return connected
        if said is None or now - said >= every:
            log.info("waiting for devices: %d of %d connected", connected, expected)
            said = now
        sleep(min(0.5, max(0.0, timeout - (now - start))))


def sized_to(cfg: FedgeConfig, devices: int) -> FedgeConfig:
    """``cfg`` with ``scenario.clients = devices``, checked like any configuration.

    Raises
    ------
    ConfigError
        The configuration does not hold for that many devices (e.g. ``campaign.min_devices``).
    """
    data = dataclasses.asdict(cfg)
    data["scenario"]["clients"] = devices
    return from_dict(data)


def _federation_size(grid: Grid, timeout: float, settle: float = 2.0) -> int:
    """How many nodes the federation has: the count once it stops growing for ``settle`` s."""
    deadline = time.monotonic() + timeout
    count, since = len(list(grid.get_node_ids())), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, since = now, time.monotonic()
        elif count > 0 and time.monotonic() - since >= settle:
            break
    return count


def _fit_to_federation(grid: Grid, cfg: FedgeConfig, folder: Path) -> FedgeConfig:
    """``flwr run .`` without fedge's runner: the scenario takes the federation's size.

    Flower's local simulation has as many nodes as its ``num-supernodes`` (2 by
    default); the scenario runs on that many devices, and their inboxes get the
    scenario's rows (the runner does this for ``fedge run``).
    """
    from clients.inbox import inbox_path
    from fedge.scenarios.feed import feed_scenario

    nodes = _federation_size(grid, cfg.run.reply_timeout)
    if nodes and nodes != cfg.scenario.clients:
        log.warning(
            "the federation has %d nodes, the scenario %d devices: running it on %d devices "
            "(the federation's num-supernodes sets how many)",
            nodes, cfg.scenario.clients, nodes,
        )
        cfg = sized_to(cfg, nodes)
    for device in range(cfg.scenario.clients):
        feed_scenario(cfg, device, inbox_path(folder / "devices" / f"device-{device}.sqlite"))
    return cfg


def cluster_policy_for(cfg: FedgeConfig) -> ClusterPolicy | None:
    """The configured clustering policy, or None for one global model."""
    if not cfg.clustering.enabled:
        return None
    return DriftClustering(
        switch_margin=cfg.clustering.switch_margin,
        fit_margin=cfg.clustering.fit_margin,
        merge_distance=cfg.clustering.merge_distance,
        max_models=cfg.clustering.max_models,
        samples=cfg.scenario.samples_per_tick,
        split_z=cfg.clustering.split_z,
        drift_z=cfg.clustering.drift_z,
        fingerprint=cfg.clustering.fingerprint,
        min_size=max(
            cfg.campaign.min_devices,
            MIN_SECURE_DEVICES if cfg.privacy.secure_aggregation else 1,
        ),
    )


def run_server(
    grid: Grid,
    cfg: FedgeConfig,
    folder: Path,
    *,
    on_tick: TickCallback | None = None,
    engine: str = "",
    cluster_policy: ClusterPolicy | None = None,
) -> dict[str, Any]:
    """Run the whole loop on ``grid`` and return the run summary (also written to ``folder``).

    With ``clustering.enabled`` in ``cfg``, or a ``cluster_policy`` given, one
    model serves each cluster of devices; otherwise one model serves them all.
    """
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    scenario = build_source(cfg)
    truth = drift_truth(scenario)
    uri = cfg.tracking.uri or default_tracking_uri(cfg.output_dir)
    tracker = Tracker(
        uri,
        cfg.tracking.experiment,
        cfg.model_name,
        run_name=folder.name,
        outbox=folder / OUTBOX_DIR,
        sync_root=cfg.output_dir,
    )
    earlier = _earlier_mlflow_run(folder)
    run_tags = {"fedge.scenario": cfg.scenario.name, "fedge.run_dir": str(folder), "fedge.engine": engine}
    if earlier:
        run_tags["fedge.resumed_from_run"] = earlier
    tracker.start(cfg.flat(), tags=run_tags)
    (folder / MLFLOW_RUN_FILE).write_text(json.dumps({"run_id": tracker.run_id}))
    if earlier and earlier != tracker.run_id:
        # The process that ran this folder before was killed: its MLflow run says so now.
        tracker.end_earlier_run(earlier, "KILLED")
        log.info("MLflow run %s of this run folder was left open; marked KILLED", earlier)
    history = TickHistory(folder / TICKS_FILE)
    status = "FAILED"
    short_rounds: list[dict[str, Any]] = []

    def on_short(short: ShortRound) -> None:
        short_rounds.append(asdict(short))
        tracker.log_event("round_short", short.tick, asdict(short))

    # Said while it lasts: a federation smaller than the scenario used to wait in silence.
    wait_for_devices(grid, scenario.n_clients, cfg.run.reply_timeout)
    # Every wait for devices is bounded by run.reply_timeout; rounds need campaign.min_devices.
    grid = ReplyQuorum(grid, cfg.campaign.min_devices, cfg.run.reply_timeout, on_short)
    clusters = cluster_policy if cluster_policy is not None else cluster_policy_for(cfg)
    task = task_for(cfg)
    try:
        # The privacy account belongs to the devices' data, not to one process or
        # model: a restarted (or --fresh) server replays each lineage's DP campaigns.
        federation = FlowerFederation(
            grid,
            cfg,
            scenario.n_clients,
            families=clusters is not None,
            history=tracker.versions() if cfg.run.resume else (),
            folder=folder,
        )
        federation.on_event = tracker.log_event  # e.g. a device's diagnostics answer
        orch = Orchestrator(
            federation,
            MlflowRegistry(tracker, scenario, cfg),
            tracker,
            make_policy(
                cfg.trigger.policy,
                quorum=cfg.trigger.quorum,
                cooldown=cfg.trigger.cooldown,
                period=cfg.trigger.period,
                signals=cfg.trigger.signals,
                accuracy_floor=cfg.trigger.accuracy_floor,
                accuracy_source=cfg.trigger.accuracy_source,
                memory=cfg.trigger.memory,
            ),
            # The task's own initialisation under the run's seed, for every layer type.
            task.initial_weights(
                task.n_features(scenario.n_features),
                task.n_outputs(scenario.n_classes),
                cfg.scenario.seed,
            ),
            clusters=clusters,
            rounds=cfg.campaign.rounds,
            initial_rounds=cfg.campaign.initial_rounds,
            participants=cfg.campaign.participants,
            min_improvement=cfg.campaign.min_improvement,
            gate_z=cfg.campaign.gate_z,
            standby_z=cfg.campaign.standby_z,
            strategy=cfg.campaign.strategy,
            resume=cfg.run.resume,
            warm_start=cfg.campaign.warm_start,
            on_tick=history.recorder(on_tick or log_tick, lambda: orch.record),
            state=JsonState(state_path(cfg.output_dir, cfg.model_name)),
            run_id=str(folder),
            rollout=RolloutPolicy.from_config(cfg.rollout),
        )
        record = orch.run(range(scenario.n_steps))
        if record.ticks and federation.errors and not any(t.n_samples or t.accuracy is not None
                                                          for t in record.ticks):
            who = ", ".join(sorted(federation.errors))
            raise RunFailed(
                f"no device reported in any tick; {who} answered with errors, e.g. "
                f"{next(iter(sorted(set(federation.errors.values()))))}"
            )
        whole = history.whole(record)
        if whole.ticks and not any(t.n_samples for t in whole.ticks):
            rejected = sum(t.rejected for t in whole.ticks)
            raise RunFailed(
                f"no device held a usable row in any of {len(whole.ticks)} ticks ({rejected} rows "
                f"rejected); check data.source ({cfg.data.source!r}) and the devices' inboxes"
            )
        summary = build_summary(cfg, whole, scenario, tracker, uri, folder, engine, truth)
        summary["rounds_used"] = orch.rounds_done
        summary["model_rounds"] = orch.model_rounds
        summary["resumed_at"] = record.resumed_at
        summary["recovered"] = list(record.recovered)
        summary["late_reports"] = [asdict(r) for r in record.late]
        summary["short_rounds"] = short_rounds
        summary["device_errors"] = dict(federation.errors)
        device_of = {node: device for device, node in federation.node_of.items()}
        summary["unevaluated"] = {
            str(tick): sorted(device_of.get(n, n) for n in nodes)
            for tick, nodes in sorted(grid.unevaluated.items())
        }
        summary["model_refusals"] = {str(d): r for d, r in sorted(federation.refusals.items())}
        summary["audit_anchors"] = federation.anchors.to_dict()
        if clusters is not None:
            summary["clusters"] = summarize_history(record.history)
        budgets = federation.budgets()
        if budgets:
            summary["privacy_budget"] = budgets.get("champion") if clusters is None else budgets
        summary["wall_seconds"] = round(time.perf_counter() - started, 2)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
        tracker.log_dict(summary, "summary.json")
        plot = plot_run(
            whole, summary["drift_steps"], folder / "accuracy.png", detected_drifts(whole)
        )
        if plot is not None:
            tracker.log_artifact(plot)
        status = "FINISHED"
        return summary
    finally:
        tracker.end(status)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """ServerApp entry point for Flower's simulation and deployment engines."""
    logging.basicConfig(level=logging.INFO)
    # The root logger may already be configured (and quiet) by an import; fedge's own
    # lines (ticks, campaigns, devices that did not answer) must reach the run's log.
    ours = logging.getLogger("fedge")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False
    cfg = config_from_context(context)
    folder = run_dir(cfg, context)
    engine = str(context.run_config.get("engine", "flower"))
    if not context.run_config.get("run-dir"):
        # Started by `flwr run .` itself, not by fedge's runner (which sizes and feeds).
        cfg = _fit_to_federation(grid, cfg, folder)
    run_server(grid, cfg, folder, engine=engine)
