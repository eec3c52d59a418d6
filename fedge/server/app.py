"""The fedge Flower ServerApp: the orchestrator wired onto a Flower ``Grid``.

Same code on every engine: the in-process engine hands ``main`` its own grid,
Flower's simulation and deployment engines hand it theirs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    FedAdam,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from fedge.contracts import model as nets
from fedge.contracts import protocol as p
from fedge.contracts.config import FedgeConfig
from fedge.engines.quorum import ReplyQuorum, ShortRound, missing_by_round
from fedge.engines.view import GridView
from fedge.core.pool import ClusterPolicy, MultiModelOrchestrator, summarize_history
from fedge.core.orchestrator import (
    CampaignOutcome,
    CampaignRecord,
    CampaignRefused,
    Orchestrator,
    RoundMetrics,
    RunRecord,
    TickRecord,
    drift_recoveries,
)
from fedge.scenarios import Scenario, build_scenario
from fedge.core.state import JsonState, state_path
from fedge.tracking import OUTBOX_DIR, Tracker, TrackingError, default_tracking_uri, ui_command
from fedge.core.triggers import make_policy
from fedge.contracts.wire import config_from_context, from_arrays, run_dir, to_arrays
from strategies.compressed import CompressedUploads
from fedge.core.clustering import DriftClustering
from strategies.fedavg import FedAvg
from strategies.private_campaign import PrivateCampaigns, equal_weights
from strategies.screening import UpdateScreening
from strategies.secagg import SecAggError

log = logging.getLogger("fedge.server")

app = ServerApp()


class DeviceGrid(GridView):
    """A view of a grid restricted to some nodes, replying in a fixed node order.

    Flower strategies sample from ``get_node_ids()``; handing them this view is
    how a campaign trains only the chosen devices. Replies come back sorted by
    the given order so aggregation is the same arithmetic on every engine.
    """

    def __init__(self, grid: Grid, node_ids: Sequence[int]) -> None:
        super().__init__(grid)
        self._nodes = list(node_ids)
        self._rank = {n: i for i, n in enumerate(self._nodes)}

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        return sorted(replies, key=lambda m: self._rank.get(m.metadata.src_node_id, len(self._rank)))


def make_strategy(cfg: FedgeConfig, n_devices: int) -> Strategy:
    """The configured Flower strategy, sized for a campaign over ``n_devices``."""
    # Every device of the campaign is asked; a round counts when campaign.min_devices
    # of them reply within run.reply_timeout (enforced by fedge.engines.quorum.ReplyQuorum).
    quorum = min(cfg.campaign.min_devices, n_devices)
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": quorum,
        "min_evaluate_nodes": quorum,
        "min_available_nodes": quorum,
    }
    c = cfg.campaign
    strategy: Strategy
    if c.strategy == "fedprox":
        strategy = FedProx(proximal_mu=c.proximal_mu, **common)
    elif c.strategy == "fedadam":
        strategy = FedAdam(eta=c.server_lr, eta_l=c.lr, **common)
    elif c.strategy == "fedmedian":
        strategy = FedMedian(**common)
    elif c.strategy == "fedtrimmedavg":
        strategy = FedTrimmedAvg(beta=c.trim_beta, **common)
    elif c.strategy in ("krum", "multikrum"):
        # Krum needs n > 2f + 2 updates; assume no more attackers than that allows.
        malicious = min(c.assumed_malicious, max(0, (n_devices - 3) // 2))
        kind = Krum if c.strategy == "krum" else MultiKrum
        strategy = kind(num_malicious_nodes=malicious, **common)
    else:
        strategy = FedAvg(**common)
    if c.screen_updates:
        strategy = UpdateScreening(strategy, norm_factor=c.screen_norm_factor)
    if c.compression != "none":
        # Decode first: screening and aggregation see the weights the devices meant.
        strategy = CompressedUploads(strategy, c.compression)
    return strategy


def _metric(records: Mapping[int, Any], rnd: int, key: str) -> float:
    rec = records.get(rnd)
    if rec is None or key not in rec:
        return float("nan")
    return float(rec[key])


class FlowerFederation:
    """The orchestrator's view of the devices, over a Flower grid.

    Devices are known by their stable partition ids (from their reports); the
    Flower node ids, which change between runs and engines, stay in here.
    """

    def __init__(self, grid: Grid, cfg: FedgeConfig, expected_devices: int) -> None:
        self.grid = grid
        self.cfg = cfg
        self.expected = expected_devices
        self.node_of: dict[int, int] = {}
        self.deployed: dict[int, int] = {}
        ledger = state_path(cfg.output_dir, cfg.model_name).with_suffix(".privacy.json")
        self.privacy = PrivateCampaigns(cfg, ledger)
        #: Per device, the ticks of the reports its last reply carried (acknowledged next poll).
        self.received: dict[int, list[int]] = {}
        self.late: list[p.DriftReport] = []
        self._seen_late: dict[int, set[int]] = {}
        self._joined = False

    def _nodes(self) -> list[int]:
        """The nodes to poll: those online now; the first poll waits for every device.

        The first poll waits up to ``run.reply_timeout`` for all expected devices
        to connect; later polls take whoever is online, so a dead device costs
        no waiting (it delivers its reports when it is back).
        """
        nodes = sorted(self.grid.get_node_ids())
        if self._joined:
            return nodes
        deadline = time.monotonic() + self.cfg.run.reply_timeout
        while len(nodes) < self.expected and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = sorted(self.grid.get_node_ids())
        self._joined = True
        if len(nodes) < self.expected:
            log.warning(
                "%d of %d devices online after %g s; polling those",
                len(nodes),
                self.expected,
                self.cfg.run.reply_timeout,
            )
        return nodes

    def poll(self, tick: int, champion: tuple[int, nets.Weights] | None) -> list[p.DriftReport]:
        version = champion[0] if champion else 0
        arrays = to_arrays(champion[1]) if champion else None
        messages = []
        for node in self._nodes():
            content = RecordDict(
                {p.CONFIG: ConfigRecord({p.TICK: tick, p.CHAMPION_VERSION: version})}
            )
            if arrays is not None and self.deployed.get(node) != version:
                content[p.ARRAYS] = arrays
            messages.append(Message(content, node, "query", group_id=f"tick-{tick}"))
        return self._collect_reports(tick, messages)

    def _collect_reports(self, tick: int, messages: list[Message]) -> list[p.DriftReport]:
        """Send the polls, read the reports; a bad reply is logged and skipped, a silent node too.

        Each query acknowledges the reports its device sent last time; the older
        reports a reply carries (store and forward) are kept in :attr:`late`.
        """
        device_of = {node: device for device, node in self.node_of.items()}
        for msg in messages:
            acked = self.received.get(device_of.get(msg.metadata.dst_node_id, -1))
            if acked:
                msg.content.config_records[p.CONFIG][p.REPORTS_RECEIVED] = list(acked)
        self.late = []
        reports = []
        answered = set()
        wait = self.cfg.run.reply_timeout
        for reply in self.grid.send_and_receive(messages, timeout=wait):
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                log.warning("tick %d: node %s replied with an error: %s", tick, node, reply.error)
                continue
            try:
                report = p.DriftReport.from_dict(reply.content[p.REPORT])
                late = [
                    p.DriftReport.from_dict(reply.content[name])
                    for name in p.LATE_REPORTS
                    if name in reply.content
                ]
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("tick %d: node %s sent an unreadable report: %s", tick, node, exc)
                continue
            self.node_of[report.device] = node
            self.deployed[node] = report.model_version
            # What its previous reply carried may come again (the acknowledgement was lost,
            # or this server restarted before sending it).
            before = set(self.received.get(report.device, []))
            self.received[report.device] = [report.tick, *(r.tick for r in late)]
            if report.tick != tick:
                late.append(report)
            else:
                reports.append(report)
            self.late += [
                r for r in late if r.tick not in before and self._first_delivery(report.device, r, tick)
            ]
        silent = sorted({m.metadata.dst_node_id for m in messages} - answered)
        if silent:
            log.warning(
                "tick %d: no reply within %g s from node %s; went on without it",
                tick,
                wait,
                ", ".join(str(n) for n in silent),
            )
        return sorted(reports, key=lambda r: r.device)

    def _first_delivery(self, device: int, report: p.DriftReport, tick: int) -> bool:
        """Whether a late report is new here (an unacknowledged one may come twice)."""
        if report.device != device or report.tick >= tick:
            return False
        seen = self._seen_late.setdefault(device, set())
        if report.tick in seen:
            return False
        seen.add(report.tick)
        if len(seen) > 4096:
            seen.discard(min(seen))
        return True

    def late_reports(self) -> list[p.DriftReport]:
        """Reports of earlier ticks that arrived with the latest poll, by device and tick."""
        return sorted(self.late, key=lambda r: (r.device, r.tick))

    def checkpoint(self) -> dict[str, Any]:
        """What a restarted server needs to acknowledge the reports this one received."""
        return {"received": {str(d): ticks for d, ticks in self.received.items()}}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take over :meth:`checkpoint` of a server that stopped."""
        received = state.get("received", {})
        if isinstance(received, Mapping):
            self.received = {
                int(d): [int(t) for t in ticks]
                for d, ticks in received.items()
                if isinstance(ticks, list)
            }

    def campaign(
        self,
        devices: Sequence[int],
        start: nets.Weights,
        *,
        tick: int,
        rounds: int,
        first_round: int,
    ) -> CampaignOutcome:
        nodes = [self.node_of[d] for d in devices if d in self.node_of]
        if len(nodes) < self.cfg.campaign.min_devices:
            raise CampaignRefused(
                f"{len(nodes)} devices would take part; campaign.min_devices is "
                f"{self.cfg.campaign.min_devices}"
            )
        self.privacy.admit(rounds, len(nodes), label=f"tick {tick}")
        strategy = make_strategy(self.cfg, len(nodes))
        grid: Grid = DeviceGrid(self.grid, nodes)
        strategy, grid = self.privacy.apply(strategy, grid, nodes)
        c = self.cfg.campaign
        train_config = ConfigRecord(
            {
                p.LOCAL_EPOCHS: c.local_epochs,
                p.LR: c.lr,
                p.BATCH_SIZE: c.batch_size,
                p.SEED: self.cfg.scenario.seed * 100003 + tick,
                p.TICK: tick,
                p.EQUAL_WEIGHTS: equal_weights(self.cfg.privacy),
            }
        )
        try:
            result = self._start(strategy, grid, start, rounds, train_config, tick)
        except SecAggError as exc:
            raise CampaignRefused(f"campaign abandoned: {exc}") from None
        self.privacy.check_complete(grid)
        evidence = self.privacy.evidence(grid)
        train, ev = result.train_metrics_clientapp, result.evaluate_metrics_clientapp
        # Devices the quorum went on without, per round: the counts say who trained.
        missing = missing_by_round(self.grid, tick)
        metrics = tuple(
            RoundMetrics(
                round=first_round + r - 1,
                train_loss=_metric(train, r, p.TRAIN_LOSS),
                eval_acc=_metric(ev, r, p.EVAL_ACC),
                eval_loss=_metric(ev, r, p.EVAL_LOSS),
                champion_acc=_metric(ev, r, p.CHAMPION_ACC),
                n_devices=len(nodes) - len(missing.get(r, ())),
            )
            for r in range(1, rounds + 1)
        )
        absent = set(nodes).intersection(*(missing.get(r, set()) for r in range(1, rounds + 1)))
        return CampaignOutcome(
            from_arrays(result.arrays),
            metrics,
            len(nodes) - len(absent),
            evidence.tags,
            evidence.metrics,
        )

    def _start(
        self,
        strategy: Strategy,
        grid: Grid,
        start: nets.Weights,
        rounds: int,
        train_config: ConfigRecord,
        tick: int,
    ) -> Any:
        """The strategy's rounds over ``grid``; Flower's result."""
        return strategy.start(
            grid=grid,
            initial_arrays=to_arrays(start),
            num_rounds=rounds,
            train_config=train_config,
            evaluate_config=ConfigRecord({p.TICK: tick}),
            timeout=self.cfg.run.reply_timeout,
        )


class MlflowRegistry:
    """The orchestrator's registry port over :class:`fedge.tracking.Tracker`."""

    def __init__(self, tracker: Tracker, scenario: Scenario, cfg: FedgeConfig) -> None:
        self.tracker = tracker
        self.cfg = cfg
        self.scenario = scenario
        x, _ = scenario.batch(0, 0)
        self.input_example = np.nan_to_num(x[:5]).astype(np.float32)

    def _model(self, weights: nets.Weights | None = None) -> Any:
        m = nets.build_model(
            self.scenario.n_features,
            self.scenario.n_classes,
            self.cfg.model.hidden,
            self.cfg.model.layers,
        )
        return nets.set_weights(m, weights) if weights is not None else m

    def register(self, weights: nets.Weights, tags: Mapping[str, str]) -> int:
        return self.tracker.register_model(self._model(weights), self.input_example, tags)

    def promote(self, version: int) -> None:
        self.tracker.set_champion(version)

    def versions(self) -> list[dict[str, Any]]:
        """Every registered version with its tags (a resumed run looks for its own)."""
        return self.tracker.versions()

    def champion(self) -> tuple[int, nets.Weights] | None:
        found = self.tracker.champion()
        if found is None:
            return None
        version, weights = found
        try:
            self._model(weights)
        except ValueError as exc:
            log.warning("champion v%d does not fit this model (%s); starting fresh", version, exc)
            return None
        return version, {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}


TickCallback = Callable[[TickRecord, CampaignRecord | None], None]


def _log_tick(rec: TickRecord, campaign: CampaignRecord | None) -> None:
    acc = "-" if rec.accuracy is None else f"{rec.accuracy:.3f}"
    log.info("tick %d: accuracy %s, drift %.0f%%", rec.tick, acc, 100 * rec.drift_fraction)
    if campaign is not None:
        verdict = "promoted" if campaign.promoted else "kept champion"
        log.info(
            "tick %d: campaign (%s) -> v%d %s (%.3f vs %.3f)",
            rec.tick,
            campaign.reason,
            campaign.version,
            verdict,
            campaign.candidate_acc,
            campaign.champion_acc,
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

    With ``clustering.enabled`` in ``cfg``, or a ``cluster_policy`` given, several
    models serve the devices (:class:`fedge.core.pool.MultiModelOrchestrator`).
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
    tracker.start(
        cfg.flat(),
        tags={"fedge.scenario": cfg.scenario.name, "fedge.run_dir": str(folder), "fedge.engine": engine},
    )
    status = "FAILED"
    short_rounds: list[dict[str, Any]] = []

    def on_short(short: ShortRound) -> None:
        short_rounds.append(asdict(short))
        tracker.log_event("round_short", short.tick, asdict(short))

    # Every wait for devices is bounded by run.reply_timeout; rounds need campaign.min_devices.
    grid = ReplyQuorum(grid, cfg.campaign.min_devices, cfg.run.reply_timeout, on_short)
    if cluster_policy is None and cfg.clustering.enabled:
        cluster_policy = DriftClustering(
            switch_margin=cfg.clustering.switch_margin,
            fit_margin=cfg.clustering.fit_margin,
            merge_distance=cfg.clustering.merge_distance,
            max_models=cfg.clustering.max_models,
        )
    try:
        if cluster_policy is not None:
            summary = _run_clusters(
                grid, cfg, folder, scenario, tracker, uri, engine, cluster_policy, on_tick
            )
            summary["wall_seconds"] = round(time.perf_counter() - started, 2)
            (folder / "summary.json").write_text(json.dumps(summary, indent=2))
            tracker.log_dict(summary, "summary.json")
            status = "FINISHED"
            return summary
        federation = FlowerFederation(grid, cfg, scenario.n_clients)
        # The privacy account belongs to the devices' data, not to one process or
        # model: a restarted (or --fresh) server replays the lineage's DP campaigns.
        federation.privacy.restore(tracker.versions() if cfg.run.resume else ())
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
            nets.initial_weights(
                nets.build_model(
                    scenario.n_features, scenario.n_classes, cfg.model.hidden, cfg.model.layers
                ),
                cfg.scenario.seed,
            ),
            rounds=cfg.campaign.rounds,
            initial_rounds=cfg.campaign.initial_rounds,
            participants=cfg.campaign.participants,
            min_improvement=cfg.campaign.min_improvement,
            strategy=cfg.campaign.strategy,
            resume=cfg.run.resume,
            warm_start=cfg.campaign.warm_start,
            on_tick=on_tick or _log_tick,
            state=JsonState(state_path(cfg.output_dir, cfg.model_name)),
            run_id=str(folder),
        )
        record = orch.run(range(scenario.n_steps))
        summary = build_summary(cfg, record, scenario, tracker, uri, folder, engine)
        summary["rounds_used"] = orch.rounds_done
        summary["model_rounds"] = orch.rounds_done
        summary["resumed_at"] = record.resumed_at
        summary["recovered"] = list(record.recovered)
        summary["late_reports"] = [asdict(r) for r in record.late]
        summary["short_rounds"] = short_rounds
        if federation.privacy.budget is not None:
            summary["privacy_budget"] = federation.privacy.budget.summary()
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


def _run_clusters(
    grid: Grid,
    cfg: FedgeConfig,
    folder: Path,
    scenario: Scenario,
    tracker: Tracker,
    uri: str,
    engine: str,
    policy: ClusterPolicy,
    on_tick: TickCallback | None,
) -> dict[str, Any]:
    """The multi-model loop: one model per cluster of devices."""
    from fedge.server.cluster import ClusterFederation, ClusterRegistry

    orch = MultiModelOrchestrator(
        ClusterFederation(grid, cfg, scenario.n_clients),
        ClusterRegistry(tracker, scenario, cfg),
        tracker,
        policy,
        nets.initial_weights(
            nets.build_model(
                scenario.n_features, scenario.n_classes, cfg.model.hidden, cfg.model.layers
            ),
            cfg.scenario.seed,
        ),
        rounds=cfg.campaign.rounds,
        initial_rounds=cfg.campaign.initial_rounds,
        strategy="clustered-fedavg",
        on_tick=on_tick or _log_tick,
    )
    record = orch.run(range(scenario.n_steps))
    summary = build_summary(cfg, record, scenario, tracker, uri, folder, engine)
    summary["clusters"] = summarize_history(orch.history)
    summary["rounds_used"] = orch.rounds_done
    summary["model_rounds"] = orch.model_rounds
    plot = plot_run(record, scenario.schedule.drift_steps(), folder / "accuracy.png")
    if plot is not None:
        tracker.log_artifact(plot)
    return summary


def build_summary(
    cfg: FedgeConfig,
    record: RunRecord,
    scenario: Scenario,
    tracker: Tracker,
    uri: str,
    folder: Path,
    engine: str,
) -> dict[str, Any]:
    """Everything a person wants to know after a run, JSON-ready.

    ``tracking`` says whether the run's MLflow writes landed or wait in its outbox
    (the tracking server unreachable); then ``versions`` lists the versions this
    run registered, by the numbers it used, as ``pending``.
    """
    tracking = tracker.sync_state()
    try:
        versions = [
            {"version": v["version"], "aliases": v["aliases"], "tags": v["tags"]}
            for v in tracker.versions()
        ]
    except TrackingError:
        versions = [
            {"version": v["version"], "aliases": [], "tags": {}, "state": v["state"]}
            for v in tracking["versions"]
        ]
    return {
        "scenario": cfg.scenario.name,
        "engine": engine,
        "run_id": tracker.run_id,
        "run_dir": str(folder),
        "tracking_uri": uri,
        "ui_command": ui_command(uri),
        "model_name": cfg.model_name,
        "policy": cfg.trigger.policy,
        "resumed_from": record.resumed_from,
        "champion": record.champion,
        "drift_steps": list(scenario.schedule.drift_steps()),
        "recoveries": [asdict(r) for r in drift_recoveries(record, scenario.schedule.drift_steps())],
        "campaigns": [asdict(c) for c in record.campaigns],
        "ticks": [asdict(t) for t in record.ticks],
        "versions": versions,
        "tracking": tracking,
        "rejected_rows": sum(t.rejected for t in record.ticks),
        "refused": list(record.refused),
        "config": cfg.flat(),
    }


def plot_run(record: RunRecord, drift_steps: Sequence[int], path: Path) -> Path | None:
    """Accuracy per tick with drifts and campaigns marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ticks = [t.tick for t in record.ticks if t.accuracy is not None]
    acc = [t.accuracy for t in record.ticks if t.accuracy is not None]
    if not ticks:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(ticks, acc, marker="o", label="prequential accuracy")
    for i, step in enumerate(drift_steps):
        ax.axvline(step, color="red", linestyle="--", alpha=0.6, label="drift" if i == 0 else None)
    for i, c in enumerate(record.campaigns):
        ax.axvline(
            c.tick + 0.5,
            color="green" if c.promoted else "grey",
            alpha=0.5,
            label=("campaign" if i == 0 else None),
        )
    ax.set_xlabel("tick")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
