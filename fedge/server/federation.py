"""The orchestrator's devices over a Flower ``Grid``: polls, scores and campaigns.

One federation for one model or many: a poll deploys each device its own
cluster's model, ``evaluate.scores`` scores every model of the pool on every
device's latest samples, and a campaign runs the configured Flower strategy
(with screening, compression, SecAgg+ and DP as configured) over one cluster's
devices. Privacy budgets are kept per model lineage (registry alias).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedge.contracts import protocol as p
from fedge.contracts.config import FedgeConfig
from fedge.contracts.diagnostics import DeviceDiagnostics, config_digest
from fedge.contracts.signing import (
    REFUSAL_NAMES,
    ModelSeal,
    ModelSigner,
    server_signer,
    signing_state_dir,
)
from fedge.contracts.wire import from_arrays, to_arrays
from fedge.core.pool import CHAMPION_ALIAS
from fedge.core.ports import (
    CampaignOutcome,
    CampaignRefused,
    Deployed,
    RoundMetrics,
    RunFailed,
    Scores,
    Weights,
)
from fedge.core.state import state_path
from fedge.engines.quorum import error_line, missing_by_round
from fedge.privacy.anchors import ANCHORS_FILE, AuditAnchors
from fedge.privacy.secagg_settings import SecAggError
from fedge.server.diagnostics import DiagnosticsDesk
from fedge.server.fleet import FLEET_FILE, FleetRegister
from fedge.server.strategy import DeviceGrid, make_strategy
from strategies.private_campaign import PrivateCampaigns, equal_weights

log = logging.getLogger("fedge.server")


def _metric(records: Mapping[int, Any], rnd: int, key: str) -> float:
    rec = records.get(rnd)
    if rec is None or key not in rec:
        return float("nan")
    return float(rec[key])


def _lineage_of(tags: Mapping[str, str]) -> str:
    cluster = tags.get("fedge.cluster", "")
    return f"cluster-{cluster}" if cluster != "" else CHAMPION_ALIAS


#: What Flower says when a ClientApp has no handler for a message type.
_NO_HANDLER = "function registered with name"


def _first_poll_failure(errors: Mapping[str, str]) -> str:
    """One line for a first poll that no device answered with a report."""
    who = ", ".join(sorted(errors))
    reasons = sorted(set(errors.values()))
    if all(_NO_HANDLER in r for r in reasons):
        return (
            f"the ClientApp on {who} has no `query` handler ({reasons[0]}): it is not a fedge "
            "ClientApp, and fedge's drift monitoring answers that message; run "
            "`clients.client_app:app` on the devices, or wrap your own Flower app with "
            "`clients.flower_app.with_fedge` (docs/tasks.md#adding-fedge-to-an-existing-flower-app)"
        )
    return f"every device failed on the first poll: {who}: {reasons[0]}" + (
        f" (and {len(reasons) - 1} other errors)" if len(reasons) > 1 else ""
    )


class FlowerFederation:
    """The orchestrator's view of the devices, over a Flower grid.

    Devices are known by their stable partition ids (from their reports); the
    Flower node ids, which change between runs and engines, stay in here.

    Parameters
    ----------
    grid : Grid
        Flower's grid (wrapped in the reply quorum by the ServerApp).
    cfg : FedgeConfig
        The run configuration.
    expected_devices : int
        How many devices the first poll waits for (up to ``run.reply_timeout``).
    families : bool, default False
        Tell each device which cluster its model belongs to (several models in
        service), so its detector restarts only when the cluster changes.
    history : iterable of dict, default ()
        Registered versions with their tags: DP campaigns of each lineage are
        charged again from them when no ledger file exists.
    folder : Path, optional
        The run folder: the devices' audit-log anchors (entry count and chain
        head of every report) are kept there, so ``fedge audit`` can check each
        device's log against what the server saw.
    """

    def __init__(
        self,
        grid: Grid,
        cfg: FedgeConfig,
        expected_devices: int,
        *,
        families: bool = False,
        history: Iterable[Mapping[str, Any]] = (),
        folder: Path | None = None,
    ) -> None:
        self.grid = grid
        self.cfg = cfg
        self.expected = expected_devices
        self.families = families
        self.history = list(history)
        self.node_of: dict[int, int] = {}
        self.deployed: dict[int, int] = {}
        self.privacy_by_lineage: dict[str, PrivateCampaigns] = {}
        #: Per device, the ticks of the reports its last reply carried (acknowledged next poll).
        self.received: dict[int, list[int]] = {}
        self.late: list[p.DriftReport] = []
        self._seen_late: dict[int, set[int]] = {}
        self._joined = False
        self._polled = False
        #: Devices whose last reply was an error: device or node -> "Type: first line".
        self.errors: dict[str, str] = {}
        #: Per node, the version its last model-carrying poll offered.
        self.offered: dict[int, int] = {}
        #: Per device that refused a model: count, reason, the version offered and kept.
        self.refusals: dict[int, dict[str, Any]] = {}
        #: Per device, the labelled samples its window held at its latest report (-1: unknown).
        self.labelled: dict[int, int] = {}
        if not families:
            # One model: its lineage's account is replayed now, so a run that trains
            # nothing still reports what the lineage has spent.
            self.privacy_for(CHAMPION_ALIAS)
        #: Every device's health and status, kept in (and resumed from) the run folder.
        self.fleet = FleetRegister(cfg.fleet, folder / FLEET_FILE if folder is not None else None)
        self.anchors_path = folder / ANCHORS_FILE if folder is not None else None
        #: Operators' diagnostics requests (``fedge diagnose``) and the answers, in the run folder.
        self.diagnostics = DiagnosticsDesk(folder)
        #: Called with (kind, tick, payload) for run events (the ServerApp logs them to MLflow).
        self.on_event: Callable[[str, int, Mapping[str, Any]], None] | None = None
        self.anchors = (
            AuditAnchors.load(self.anchors_path) if self.anchors_path is not None else AuditAnchors()
        )

    # -- privacy per lineage -------------------------------------------------------------------
    def privacy_for(self, lineage: str) -> PrivateCampaigns:
        """The privacy account of one model lineage (created and replayed on first use)."""
        found = self.privacy_by_lineage.get(lineage)
        if found is not None:
            return found
        base = state_path(self.cfg.output_dir, self.cfg.model_name)
        suffix = ".privacy.json" if lineage == CHAMPION_ALIAS else f".{lineage}.privacy.json"
        account = PrivateCampaigns(self.cfg, base.with_suffix(suffix))
        account.restore(v for v in self.history if _lineage_of(dict(v.get("tags", {}))) == lineage)
        self.privacy_by_lineage[lineage] = account
        return account

    @property
    def privacy(self) -> PrivateCampaigns:
        """The account of the single-model lineage (``champion``)."""
        return self.privacy_for(CHAMPION_ALIAS)

    def budgets(self) -> dict[str, Any]:
        """Each lineage's privacy budget summary (lineages with a budget only)."""
        return {
            lineage: account.budget.summary()
            for lineage, account in sorted(self.privacy_by_lineage.items())
            if account.budget is not None
        }

    # -- polls ---------------------------------------------------------------------------------
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

    def poll(
        self, tick: int, deployment: Mapping[int, Deployed], default: Deployed | None
    ) -> list[p.DriftReport]:
        """Query every node; a node whose model is stale gets its model with the query."""
        encoded: dict[int, tuple[ArrayRecord, ModelSeal]] = {}
        device_of = {node: device for device, node in self.node_of.items()}
        messages = []
        asked = self.diagnostics.refresh()
        for node in self._nodes():
            device = device_of.get(node)
            target = deployment.get(device, default) if device is not None else default
            config: dict[str, int | str | bool] = {p.TICK: tick, p.CHAMPION_VERSION: 0}
            if device in asked:
                config[p.DIAGNOSE] = True
            content = RecordDict()
            if target is not None:
                config[p.CHAMPION_VERSION] = target.version
                if self.families:
                    config[p.MODEL_FAMILY] = target.cluster
                if self.deployed.get(node) != target.version:
                    if target.version not in encoded:
                        # Every deployed model carries its seal; a device installs nothing else.
                        seal = self.signer.seal(target.version, target.weights)
                        encoded[target.version] = to_arrays(target.weights), seal
                    arrays, seal = encoded[target.version]
                    content[p.ARRAYS] = arrays
                    config[p.MODEL_SHA256] = seal.sha256
                    config[p.MODEL_SIGNATURE] = seal.signature
                    config[p.MODEL_SIGNING_KEY] = seal.key
                    self.offered[node] = target.version
            content[p.CONFIG] = ConfigRecord(dict(config))
            messages.append(Message(content, node, "query", group_id=f"tick-{tick}"))
        return self._collect_reports(tick, messages)

    @property
    def signer(self) -> ModelSigner:
        """The server's model-signing key (``<output>/state/model-signing.key``, made on first use)."""
        return server_signer(signing_state_dir(self.cfg.output_dir))

    def _note_refusal(self, tick: int, node: int, report: p.DriftReport) -> None:
        """A device says it refused models: keep its count and reason, warn once per offer."""
        known = self.refusals.get(report.device)
        # The count is the device's lifetime total: only a rise is a new refusal.
        if report.models_refused <= (known["refused"] if known else 0):
            return
        reason = REFUSAL_NAMES.get(report.model_refusal, f"code {report.model_refusal}")
        offered = self.offered.get(node, 0)
        if known is None or (known["reason"], known["version"]) != (reason, offered):
            log.warning(
                "tick %d: device %d refused %s (%s); it keeps v%d",
                tick,
                report.device,
                f"model v{offered}" if offered else "the model in its store",
                reason,
                report.model_version,
            )
        self.refusals[report.device] = {
            "refused": report.models_refused,
            "reason": reason,
            "version": offered,
            "kept_version": report.model_version,
        }

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
        self.amended: dict[int, list[int]] = {}
        reports = []
        answered = set()
        wait = self.cfg.run.reply_timeout
        for reply in self.grid.send_and_receive(messages, timeout=wait):
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                self._node_error(tick, node, device_of.get(node), reply)
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
            self._note_late_labels(tick, node, reply)
            self.anchors.record_all([report, *late])
            self.fleet.observe(tick, report, self._health(tick, node, reply))
            self._note_diagnostics(tick, node, reply)
            self.node_of[report.device] = node
            self.deployed[node] = report.model_version
            self.labelled[report.device] = report.window_labelled
            self._note_refusal(tick, node, report)
            self.errors.pop(f"device {report.device}", None)
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
        if self.anchors_path is not None:
            self.anchors.save(self.anchors_path)
        self.fleet.end_tick(tick)
        first, self._polled = not self._polled, True
        if first and not reports and not self.late and answered and self.errors:
            raise RunFailed(_first_poll_failure(self.errors))
        silent = sorted({m.metadata.dst_node_id for m in messages} - answered)
        if silent:
            log.warning(
                "tick %d: no reply within %g s from node %s; went on without it",
                tick,
                wait,
                ", ".join(str(n) for n in silent),
            )
        return sorted(reports, key=lambda r: r.device)

    def _node_error(self, tick: int, node: int, device: int | None, reply: Message) -> None:
        """A node answered with an error: remember its type and first line, say it once."""
        reason = error_line(reply)
        who = f"device {device}" if device is not None else f"node {node}"
        if self.errors.get(who) != reason:
            log.warning("tick %d: %s replied with an error: %s", tick, who, reason)
        self.errors[who] = reason
        if device is not None:
            self.fleet.observe_error(tick, device, reason)

    def _health(self, tick: int, node: int, reply: Message) -> p.DeviceHealth | None:
        """The reply's ``health`` record (None when it has none; an unreadable one is logged)."""
        if p.HEALTH not in reply.content.config_records:
            return None
        try:
            return p.DeviceHealth.from_dict(reply.content.config_records[p.HEALTH])
        except ValueError as exc:
            log.warning("tick %d: node %s sent an unreadable health record: %s", tick, node, exc)
            return None

    def _note_diagnostics(self, tick: int, node: int, reply: Message) -> None:
        """Keep a reply's diagnostic summary in the run folder and as a run event."""
        record = reply.content.config_records.get(p.DIAGNOSTICS)
        if record is None:
            return
        try:
            answer = self.diagnostics.answered(DeviceDiagnostics.from_dict(record), config_digest(self.cfg))
        except ValueError as exc:
            log.warning("tick %d: node %s sent unreadable diagnostics: %s", tick, node, exc)
            return
        if answer is not None and self.on_event is not None:
            self.on_event("diagnostics", tick, answer)

    def fleet_counts(self) -> dict[str, int]:
        """Devices per status after the latest poll (see :mod:`fedge.server.fleet`)."""
        return dict(self.fleet.counts)

    def failed_devices(self, tick: int) -> set[int]:
        """Devices that failed at ``tick``: an error reply, a refused model, a failed handler."""
        return self.fleet.failed(tick)

    def fleet_table(self) -> dict[str, Any]:
        """The fleet table (written to the run folder when there is one)."""
        if self.anchors_path is not None:
            self.fleet.write_table(self.anchors_path.parent)
        return self.fleet.summary()

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

    def _note_late_labels(self, tick: int, node: int, reply: Message) -> None:
        if p.LATE_LABELS not in reply.content:
            return
        try:
            found = p.read_late_labels(reply.content[p.LATE_LABELS])
        except (ValueError, TypeError) as exc:
            log.warning("tick %d: node %s sent unreadable late labels: %s", tick, node, exc)
            return
        for sample_tick, (labels, errors) in found.items():
            have = self.amended.setdefault(sample_tick, [0, 0])
            have[0], have[1] = have[0] + labels, have[1] + errors

    def late_labels(self) -> dict[int, tuple[int, int]]:
        """Late labels of the latest poll by the tick of their samples: ``{tick: (labels, errors)}``."""
        return {t: (v[0], v[1]) for t, v in sorted(getattr(self, "amended", {}).items())}

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

    # -- scores --------------------------------------------------------------------------------
    def score(self, tick: int, models: Mapping[int, Weights]) -> Scores:
        """Fraction of each device's latest samples every model gets right."""
        return {d: {k: c / n for k, c in right.items()} for d, (n, right) in self.score_counts(tick, models).items()}

    def score_counts(self, tick: int, models: Mapping[int, Weights]) -> dict[int, tuple[int, dict[int, int]]]:
        """Per device: how many of its latest samples were scored and how many each model got right."""
        keys = sorted(models)[: p.MAX_SCORED_MODELS]
        content = RecordDict({p.scored_model(i): to_arrays(models[k]) for i, k in enumerate(keys)})
        content[p.CONFIG] = ConfigRecord({p.TICK: tick})
        messages = [
            Message(content, node, f"{MessageType.EVALUATE}.{p.SCORES}", group_id=f"scores-{tick}")
            for node in self.node_of.values()
        ]
        device_of = {node: device for device, node in self.node_of.items()}
        out: dict[int, tuple[int, dict[int, int]]] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.cfg.run.reply_timeout):
            device = device_of.get(reply.metadata.src_node_id)
            if reply.has_error():  # said and counted like any other device error
                self._node_error(tick, reply.metadata.src_node_id, device, reply)
                continue
            if device is None:
                continue
            metrics = reply.content.metric_records[p.METRICS]
            n = int(metrics.get(p.NUM_EXAMPLES, 0))  # type: ignore[arg-type]
            if n <= 0:
                continue
            out[device] = n, {
                k: int(metrics[p.scored_correct(i)])  # type: ignore[arg-type]
                for i, k in enumerate(keys)
                if p.scored_correct(i) in metrics
            }
        return out

    # -- campaigns -----------------------------------------------------------------------------
    def campaign(
        self,
        devices: Sequence[int],
        start: Weights,
        *,
        tick: int,
        rounds: int,
        first_round: int,
        lineage: str = CHAMPION_ALIAS,
    ) -> CampaignOutcome:
        """The configured strategy's ``rounds`` rounds over ``devices``, from ``start``.

        Devices whose latest report holds fewer labelled samples than
        ``campaign.min_labels`` are left out (and named in the outcome).
        """
        need = self.cfg.campaign.min_labels
        scarce = tuple(d for d in devices if 0 <= self.labelled.get(d, -1) < need)
        if scarce:
            log.info("tick %d: device(s) %s hold fewer than campaign.min_labels=%d labelled samples; "
                     "left out of the campaign", tick, ",".join(map(str, scarce)), need)
        nodes = [self.node_of[d] for d in devices if d in self.node_of and d not in scarce]
        if len(nodes) < self.cfg.campaign.min_devices:
            labels = f" ({len(scarce)} left out with fewer than {need} labels)" if scarce else ""
            raise CampaignRefused(
                f"{len(nodes)} devices would take part{labels}; campaign.min_devices is "
                f"{self.cfg.campaign.min_devices}"
            )
        privacy = self.privacy_for(lineage)
        privacy.admit(rounds, len(nodes), label=f"tick {tick}")
        strategy = make_strategy(self.cfg, len(nodes))
        grid: Grid = DeviceGrid(self.grid, nodes)
        strategy, grid = privacy.apply(strategy, grid, nodes)
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
        privacy.check_complete(grid)
        evidence = privacy.evidence(grid)
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
                n_devices=len(nodes) - len(missing.get(r, set()) & set(nodes)),
                discordant=_metric(ev, r, p.DISCORDANT),
            )
            for r in range(1, rounds + 1)
        )
        absent = set(nodes).intersection(*(missing.get(r, set()) for r in range(1, rounds + 1)))
        tags = dict(evidence.tags)
        if scarce:
            tags["fedge.too_few_labels"] = ",".join(map(str, scarce))
        gate_labels = getattr(self.grid, "evaluated", {}).get(tick, -1)
        tags["fedge.gate_labels"] = str(gate_labels)
        empty = sorted(set(nodes) & set(getattr(self.grid, "unevaluated", {}).get(tick, set())))
        if empty:
            device_of = {node: device for device, node in self.node_of.items()}
            left_out = ",".join(str(device_of.get(n, n)) for n in empty)
            tags["fedge.unevaluated_devices"] = left_out
            log.info(
                "tick %d: device(s) %s had nothing held out to evaluate; left out of the averages",
                tick,
                left_out,
            )
        return CampaignOutcome(
            from_arrays(result.arrays),
            metrics,
            len(nodes) - len(absent),
            tags,
            evidence.metrics,
            too_few_labels=scarce,
            gate_labels=gate_labels,
        )

    def _start(
        self,
        strategy: Strategy,
        grid: Grid,
        start: Weights,
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
