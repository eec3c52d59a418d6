"""The fedge Flower ServerApp: the core loop wired onto a Flower ``Grid``.

Same code on every engine: the in-process engine hands :func:`run_server` its
own grid, Flower's simulation and deployment engines hand :func:`main` theirs.
One loop serves one model or one model per cluster of devices.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedge.contracts.config import FedgeConfig
from fedge.contracts.task import task_for
from fedge.contracts.wire import config_from_context, run_dir
from fedge.core.clustering import DriftClustering
from fedge.core.orchestrator import Orchestrator, TickCallback
from fedge.core.pool import ClusterPolicy
from fedge.core.ports import RunFailed
from fedge.core.records import summarize_history
from fedge.core.state import JsonState, state_path
from fedge.core.triggers import make_policy
from fedge.engines.quorum import ReplyQuorum, ShortRound
from fedge.scenarios import build_scenario
from fedge.server.federation import FlowerFederation
from fedge.server.registry import MlflowRegistry
from fedge.server.summary import TickHistory, build_summary, log_tick, plot_run
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
    scenario = build_scenario(cfg.scenario)
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
        orch = Orchestrator(
            federation,
            MlflowRegistry(tracker, scenario, cfg),
            tracker,
            make_policy(
                cfg.trigger.policy,
                quorum=cfg.trigger.quorum,
                cooldown=cfg.trigger.cooldown,
                period=cfg.trigger.period,
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
            strategy=cfg.campaign.strategy,
            resume=cfg.run.resume,
            warm_start=cfg.campaign.warm_start,
            on_tick=history.recorder(on_tick or log_tick, lambda: orch.record),
            state=JsonState(state_path(cfg.output_dir, cfg.model_name)),
            run_id=str(folder),
        )
        record = orch.run(range(scenario.n_steps))
        if record.ticks and federation.errors and not any(t.n_samples or t.accuracy is not None
                                                          for t in record.ticks):
            who = ", ".join(sorted(federation.errors))
            raise RunFailed(
                f"no device reported in any tick; {who} answered with errors, e.g. "
                f"{next(iter(sorted(set(federation.errors.values()))))}"
            )
        summary = build_summary(cfg, history.whole(record), scenario, tracker, uri, folder, engine)
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
        plot = plot_run(record, scenario.schedule.drift_steps(), folder / "accuracy.png")
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
    run_server(grid, cfg, folder, engine=engine)
