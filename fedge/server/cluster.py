"""The multi-model loop wired onto a Flower ``Grid``: one model per cluster of devices.

:class:`ClusterFederation` extends :class:`fedge.server.app.FlowerFederation`
with what :class:`fedge.core.pool.MultiModelOrchestrator` needs: a poll that
deploys each device its own cluster's model, an ``evaluate.scores`` exchange
that scores every model in the pool on every device's latest samples, and
campaigns that train all clusters in the same Flower rounds
(:class:`strategies.clustered_fedavg.ClusteredFedAvg`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedge.contracts import model as nets
from fedge.contracts import protocol as p
from fedge.core.pool import Scores
from fedge.core.orchestrator import CampaignOutcome, RoundMetrics
from fedge.server.app import DeviceGrid, FlowerFederation, MlflowRegistry
from fedge.contracts.wire import from_arrays, to_arrays
from strategies.clustered_fedavg import SEPARATOR, ClusteredFedAvg, pack_models, unpack_models

log = logging.getLogger("fedge.server")


def _round_metric(records: Mapping[int, object], rnd: int, key: str) -> float:
    rec = records.get(rnd)
    if rec is None or not isinstance(rec, Mapping) or key not in rec:
        return float("nan")
    return float(rec[key])


class ClusterFederation(FlowerFederation):
    """The devices over a Flower grid when several models are in service."""

    def poll_models(
        self, tick: int, deployment: Mapping[int, tuple[int, int, nets.Weights]]
    ) -> list[p.DriftReport]:
        """Query every node; a node whose model is stale gets its cluster's model."""
        encoded: dict[int, ArrayRecord] = {}
        messages = []
        device_of = {node: device for device, node in self.node_of.items()}
        for node in self._nodes():
            config: dict[str, int] = {p.TICK: tick, p.CHAMPION_VERSION: 0}
            content = RecordDict()
            device = device_of.get(node)
            if device is not None and device in deployment:
                family, version, weights = deployment[device]
                config.update({p.CHAMPION_VERSION: version, p.MODEL_FAMILY: family})
                if self.deployed.get(node) != version:
                    if version not in encoded:
                        encoded[version] = to_arrays(weights)
                    content[p.ARRAYS] = encoded[version]
            content[p.CONFIG] = ConfigRecord(dict(config))
            messages.append(Message(content, node, "query", group_id=f"tick-{tick}"))
        return self._collect_reports(tick, messages)

    def score(self, tick: int, models: Mapping[int, nets.Weights]) -> Scores:
        """Fraction of each device's latest samples every model gets right."""
        keys = sorted(models)[: p.MAX_SCORED_MODELS]
        content = RecordDict({p.scored_model(i): to_arrays(models[k]) for i, k in enumerate(keys)})
        content[p.CONFIG] = ConfigRecord({p.TICK: tick})
        messages = [
            Message(content, node, f"{MessageType.EVALUATE}.{p.SCORES}", group_id=f"scores-{tick}")
            for node in self.node_of.values()
        ]
        device_of = {node: device for device, node in self.node_of.items()}
        out: Scores = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.cfg.run.reply_timeout):
            device = device_of.get(reply.metadata.src_node_id)
            if device is None or reply.has_error():
                continue
            metrics = reply.content.metric_records[p.METRICS]
            n = int(metrics.get(p.NUM_EXAMPLES, 0))  # type: ignore[arg-type]
            if n <= 0:
                continue
            out[device] = {
                k: float(metrics[p.scored_correct(i)]) / n  # type: ignore[arg-type]
                for i, k in enumerate(keys)
                if p.scored_correct(i) in metrics
            }
        return out

    def campaign_clusters(
        self,
        groups: Mapping[int, tuple[Sequence[int], nets.Weights]],
        *,
        tick: int,
        rounds: int,
        first_round: int,
    ) -> dict[int, CampaignOutcome]:
        """Train every cluster on its own devices, all in the same ``rounds`` Flower rounds."""
        assignment = {
            self.node_of[d]: key
            for key, (devices, _) in groups.items()
            for d in devices
            if d in self.node_of
        }
        nodes = sorted(assignment)
        c = self.cfg.campaign
        strategy = ClusteredFedAvg(
            assignment,
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=len(nodes),
            min_evaluate_nodes=len(nodes),
            min_available_nodes=len(nodes),
        )
        train_config = ConfigRecord(
            {
                p.LOCAL_EPOCHS: c.local_epochs,
                p.LR: c.lr,
                p.BATCH_SIZE: c.batch_size,
                p.SEED: self.cfg.scenario.seed * 100003 + tick,
                p.TICK: tick,
            }
        )
        start = pack_models({k: to_arrays(w) for k, (_, w) in groups.items()})
        result = strategy.start(
            grid=DeviceGrid(self.grid, nodes),
            initial_arrays=start,
            num_rounds=rounds,
            train_config=train_config,
            evaluate_config=ConfigRecord({p.TICK: tick}),
            timeout=self.cfg.run.reply_timeout,
        )
        final = unpack_models(result.arrays)
        train, ev = result.train_metrics_clientapp, result.evaluate_metrics_clientapp
        out = {}
        for key, (devices, weights) in groups.items():
            n = sum(1 for d in devices if d in self.node_of)
            prefix = f"{key}{SEPARATOR}"
            metrics = tuple(
                RoundMetrics(
                    round=first_round + r - 1,
                    train_loss=_round_metric(train, r, prefix + p.TRAIN_LOSS),
                    eval_acc=_round_metric(ev, r, prefix + p.EVAL_ACC),
                    eval_loss=_round_metric(ev, r, prefix + p.EVAL_LOSS),
                    champion_acc=_round_metric(ev, r, prefix + p.CHAMPION_ACC),
                    n_devices=n,
                )
                for r in range(1, rounds + 1)
            )
            new = from_arrays(final[key]) if key in final else dict(weights)
            out[key] = CampaignOutcome(new, metrics, n)
        return out


class ClusterRegistry(MlflowRegistry):
    """The registry port with one alias per cluster."""

    def set_alias(self, version: int, alias: str) -> None:
        """Point ``alias`` (e.g. ``cluster-2``) at ``version``."""
        self.tracker.set_champion(version, alias)
