"""Secure aggregation: the server sees noise, the aggregate is right, dropouts are survived."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from clients.egress import egress_violations
from clients.secagg import (
    make_secagg_mod,
    privacy_mods,
    register_secagg_actions,
    secagg_egress_violations,
)
from fedge.engines.inprocess import InProcessGrid
from fedge.engines.view import GridView
from fedge.privacy import secagg_protocol as sp
from fedge.privacy.secagg_settings import SecAggConfig, SecAggError
from strategies.secagg import SecAggGrid, secure_strategy_grid

SHAPES = {"w": (40, 25), "b": (25,)}


def delta_of(pid: int) -> dict[str, np.ndarray]:
    """A structured, device-specific update (what a device adds to the global model)."""
    out = {}
    for name, shape in SHAPES.items():
        grid = np.linspace(0, 6 * np.pi, int(np.prod(shape))).reshape(shape)
        out[name] = (0.5 * np.sin(grid + pid) + 0.1 * pid).astype(np.float32)
    return out


def examples_of(pid: int) -> int:
    return 20 * (pid + 1)


def loss_of(pid: int) -> float:
    return 0.3 + 0.1 * pid


def toy_app(*, require: bool = False) -> ClientApp:
    app = ClientApp(mods=[make_secagg_mod(require=require), *privacy_mods()[1:]])
    register_secagg_actions(app)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        start = msg.content.array_records["arrays"]
        delta = delta_of(pid)
        arrays = ArrayRecord({k: Array(start[k].numpy() + delta[k]) for k in start})
        metrics = MetricRecord({"num-examples": examples_of(pid), "train_loss": loss_of(pid)})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": 1, "eval_acc": 0.5})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def values(record: object, key: str) -> np.ndarray:
    """The NumPy array under ``key`` of an ArrayRecord."""
    return cast(ArrayRecord, record)[key].numpy()


def initial() -> ArrayRecord:
    return ArrayRecord({k: Array(np.zeros(s, dtype=np.float32)) for k, s in SHAPES.items()})


def expected_average(pids: Iterable[int]) -> tuple[dict[str, np.ndarray], float, int]:
    pids = list(pids)
    w = np.array([examples_of(p) for p in pids], dtype=np.float64)
    arrays = {
        k: sum(wi * delta_of(p)[k].astype(np.float64) for wi, p in zip(w, pids)) / w.sum()
        for k in SHAPES
    }
    loss = float(sum(wi * loss_of(p) for wi, p in zip(w, pids)) / w.sum())
    return arrays, loss, int(w.sum())


def tolerance(config: SecAggConfig, pids: Iterable[int]) -> float:
    """Worst-case quantisation error of the weighted average: one step per device, unweighted."""
    pids = list(pids)
    step = 2 * config.clipping_range / config.quantization_range
    total_weight = sum(examples_of(p) for p in pids) / config.max_weight
    return len(pids) * step / total_weight


class Recorder(GridView):
    """Passes messages through and keeps every reply that reached the server."""

    def __init__(self, grid: InProcessGrid, drop_before: dict[str, set[int]] | None = None) -> None:
        super().__init__(grid)
        self.grid = grid
        self.replies: list[tuple[str, Message]] = []
        self.requests: list[Message] = []
        self.drop_before = drop_before or {}

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        batch = list(messages)
        kind = batch[0].metadata.message_type if batch else ""
        self.grid.offline |= self.drop_before.pop(kind, set())
        self.requests += batch
        replies = list(self.grid.send_and_receive(batch, timeout=timeout))
        self.replies += [(kind, r) for r in replies]
        return replies


def fedavg(n: int) -> FedAvg:
    return FedAvg(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)


def pid_of(node: int) -> int:
    return node - 1000


def test_the_server_sees_each_devices_update_as_noise() -> None:
    n = 4
    recorder = Recorder(InProcessGrid(toy_app(), n, {}))
    grid = SecAggGrid(recorder, config=SecAggConfig())
    fedavg(n).start(grid=grid, initial_arrays=initial(), num_rounds=1)
    masked = [r for kind, r in recorder.replies if kind == sp.TRAIN]
    assert len(masked) == n
    for reply in masked:
        pid = pid_of(reply.metadata.src_node_id)
        seen = np.concatenate([values(reply.content["arrays"], k).ravel() for k in SHAPES])
        truth = np.concatenate([delta_of(pid)[k].ravel() for k in SHAPES])
        assert abs(np.corrcoef(seen.astype(np.float64), truth)[0, 1]) < 0.1
        assert 0.4 < seen.mean() / 2**32 < 0.6  # spread over the whole modulus, like uniform noise
        metrics = reply.content["metrics"]
        assert metrics["num-examples"] != examples_of(pid)
        assert metrics["train_loss"] != pytest.approx(loss_of(pid))

    # The same measurement without secure aggregation sees the updates themselves.
    plain = Recorder(InProcessGrid(toy_app(), n, {}))
    fedavg(n).start(grid=plain, initial_arrays=initial(), num_rounds=1)
    reply = next(r for kind, r in plain.replies if kind == sp.TRAIN)
    seen = values(reply.content["arrays"], "w").ravel()
    truth = delta_of(pid_of(reply.metadata.src_node_id))["w"].ravel()
    assert np.corrcoef(seen, truth)[0, 1] > 0.99


def test_only_the_unmasked_aggregate_reaches_the_strategy_and_it_is_the_weighted_average() -> None:
    n = 5
    config = SecAggConfig()
    grid = secure_strategy_grid(InProcessGrid(toy_app(), n, {}), config=config)
    result = fedavg(n).start(grid=grid, initial_arrays=initial(), num_rounds=1)
    want, loss, _ = expected_average(range(n))
    tol = tolerance(config, range(n))
    for k in SHAPES:
        got = result.arrays[k].numpy()
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want[k], rtol=0, atol=tol)
    assert np.abs(result.arrays["w"].numpy() - want["w"]).max() > 0  # quantised, not copied
    assert result.train_metrics_clientapp[1]["train_loss"] == pytest.approx(loss, abs=1e-3)
    assert grid.reports[0].contributors == n


def test_a_campaign_survives_dropouts_at_every_stage_down_to_the_threshold() -> None:
    n = 6
    config = SecAggConfig(num_shares=1.0, reconstruction_threshold=3)
    after_setup, after_share_keys, after_masking = 1001, 1002, 1003
    recorder = Recorder(
        InProcessGrid(toy_app(), n, {}),
        drop_before={
            sp.SHARE_KEYS: {after_setup},
            sp.TRAIN: {after_share_keys},
            sp.UNMASK: {after_masking},
        },
    )
    grid = SecAggGrid(recorder, config=config)
    result = FedAvg(min_train_nodes=n, min_available_nodes=n, fraction_evaluate=0.0).start(
        grid=grid, initial_arrays=initial(), num_rounds=1
    )
    # The device that dropped after masking still counts: its vector arrived.
    contributed = [0, 3, 4, 5]
    want, loss, _ = expected_average(contributed)
    for k in SHAPES:
        np.testing.assert_allclose(
            result.arrays[k].numpy(), want[k], rtol=0, atol=tolerance(config, contributed)
        )
    assert result.train_metrics_clientapp[1]["train_loss"] == pytest.approx(loss, abs=1e-3)
    report = grid.reports[0]
    assert report.dropped["share_keys"] == [after_setup]
    assert report.dropped["train"] == [after_share_keys]
    assert report.dropped["unmask"] == [after_masking]
    assert report.contributors == 4


def test_below_the_threshold_the_round_stops_with_a_clear_error() -> None:
    n = 5
    recorder = Recorder(InProcessGrid(toy_app(), n, {}), drop_before={sp.UNMASK: {1000, 1001}})
    grid = SecAggGrid(recorder, config=SecAggConfig(num_shares=1.0, reconstruction_threshold=4))
    with pytest.raises(SecAggError, match=r"round 1 at stage 'unmask'.*4 needed"):
        fedavg(n).start(grid=grid, initial_arrays=initial(), num_rounds=1)


def test_one_device_alone_is_never_aggregated_securely() -> None:
    grid = SecAggGrid(InProcessGrid(toy_app(), 1, {}))
    with pytest.raises(SecAggError, match="at least 2 devices"):
        fedavg(1).start(grid=grid, initial_arrays=initial(), num_rounds=1)


@pytest.mark.parametrize(
    "make",
    [
        lambda n: FedAvg(min_train_nodes=n, min_available_nodes=n, fraction_evaluate=0.0),
        lambda n: FedProx(
            proximal_mu=0.1, min_train_nodes=n, min_available_nodes=n, fraction_evaluate=0.0
        ),
        lambda n: FedAdam(
            eta=0.05, min_train_nodes=n, min_available_nodes=n, fraction_evaluate=0.0
        ),
    ],
    ids=["fedavg", "fedprox", "fedadam"],
)
def test_message_api_strategies_run_unchanged_and_agree_with_plain_aggregation(
    make: Callable[[int], Strategy],
) -> None:
    n = 4
    plain, secure = make(n), make(n)
    config = SecAggConfig()
    want = plain.start(grid=InProcessGrid(toy_app(), n, {}), initial_arrays=initial(), num_rounds=3)
    got = secure.start(
        grid=secure_strategy_grid(InProcessGrid(toy_app(), n, {}), config=config),
        initial_arrays=initial(),
        num_rounds=3,
    )
    for k in SHAPES:
        np.testing.assert_allclose(
            got.arrays[k].numpy(),
            want.arrays[k].numpy(),
            rtol=0,
            atol=3 * tolerance(config, range(n)),
        )
    for r in (1, 2, 3):
        assert got.train_metrics_clientapp[r]["train_loss"] == pytest.approx(
            want.train_metrics_clientapp[r]["train_loss"], abs=1e-3
        )


def test_seeded_runs_give_identical_aggregates() -> None:
    runs = []
    for _ in range(2):
        grid = secure_strategy_grid(InProcessGrid(toy_app(), 3, {}))
        runs.append(fedavg(3).start(grid=grid, initial_arrays=initial(), num_rounds=2))
    for k in SHAPES:
        np.testing.assert_array_equal(runs[0].arrays[k].numpy(), runs[1].arrays[k].numpy())


def test_a_device_that_requires_secure_aggregation_refuses_a_plain_train() -> None:
    grid = InProcessGrid(toy_app(require=True), 2, {})
    result = fedavg(2).start(grid=grid, initial_arrays=initial(), num_rounds=1)
    assert 1 not in result.train_metrics_clientapp  # nothing was aggregated


def test_a_device_never_reveals_both_secrets_of_one_neighbour() -> None:
    n = 3
    tampered = {"done": False}

    class Tamper(Recorder):
        def send_and_receive(
            self, messages: Iterable[Message], *, timeout: float | None = None
        ) -> Iterable[Message]:
            batch = list(messages)
            if batch and batch[0].metadata.message_type == sp.UNMASK:
                record = batch[0].content.config_records[sp.RECORD]
                active = cast(list[int], record[sp.ACTIVE])
                record[sp.DEAD] = [n for n in active if n != batch[0].metadata.dst_node_id][:1]
                tampered["done"] = True
            return super().send_and_receive(batch, timeout=timeout)

    recorder = Tamper(InProcessGrid(toy_app(), n, {}))
    grid = SecAggGrid(recorder, config=SecAggConfig(reconstruction_threshold=2))
    fedavg(n).start(grid=grid, initial_arrays=initial(), num_rounds=1)
    assert tampered["done"]
    refused = [r for kind, r in recorder.replies if kind == sp.UNMASK and r.has_error()]
    assert len(refused) == 1
    assert "both active and dropped" in str(refused[0].error.reason)


def test_bad_settings_are_refused_with_the_key_named() -> None:
    with pytest.raises(ValueError, match="secagg.reconstruction_threshold"):
        SecAggConfig(num_shares=3, reconstruction_threshold=5)
    with pytest.raises(ValueError, match="modulus_range"):
        SecAggConfig(modulus_range=3 * 2**30)
    grid = SecAggGrid(InProcessGrid(toy_app(), 3, {}), config=SecAggConfig(modulus_range=2**23))
    with pytest.raises(SecAggError, match="does not fit modulus_range"):
        fedavg(3).start(grid=grid, initial_arrays=initial(), num_rounds=1)


def test_config_from_the_train_message_reaches_the_device_without_the_secagg_record() -> None:
    seen: list[list[str]] = []
    app = ClientApp(mods=privacy_mods())
    register_secagg_actions(app)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        seen.append(sorted(msg.content.keys()))
        arrays = msg.content["arrays"]
        metrics = MetricRecord({"num-examples": 5, "train_loss": 0.1})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    grid = secure_strategy_grid(InProcessGrid(app, 3, {}))
    fedavg(3).start(
        grid=grid,
        initial_arrays=initial(),
        num_rounds=1,
        train_config=ConfigRecord({"lr": 0.1}),
    )
    assert seen == [["arrays", "config"]] * 3


def test_the_egress_check_passes_protocol_replies_and_blocks_anything_else() -> None:
    recorder = Recorder(InProcessGrid(toy_app(), 3, {}))
    fedavg(3).start(grid=SecAggGrid(recorder), initial_arrays=initial(), num_rounds=1)
    requests = {}
    for kind, reply in recorder.replies:
        assert not reply.has_error()
        if kind in sp.DEVICE_REPLIES:
            request = Message(RecordDict(), reply.metadata.src_node_id, kind, group_id="")
            requests[kind] = request
            assert secagg_egress_violations(request, reply) == []
    assert set(requests) == set(sp.DEVICE_REPLIES)
    leak = Message(
        RecordDict(
            {
                sp.RECORD: ConfigRecord({sp.PK1: b"k", "rd_seed": b"secret"}),
                "report": ConfigRecord({"x": 1}),
            }
        ),
        reply_to=requests[sp.SETUP],
    )
    problems = secagg_egress_violations(requests[sp.SETUP], leak)
    assert "secagg.rd_seed is not an allowed key" in problems
    assert any("record 'report'" in p for p in problems)


def test_the_masked_train_reply_passes_the_devices_train_egress_policy() -> None:
    recorder = Recorder(InProcessGrid(toy_app(), 3, {}))
    fedavg(3).start(grid=SecAggGrid(recorder), initial_arrays=initial(), num_rounds=1)
    by_id = {m.metadata.message_id: m for m in recorder.requests}
    masked = [
        (by_id[r.metadata.reply_to_message_id], r) for k, r in recorder.replies if k == sp.TRAIN
    ]
    assert len(masked) == 3
    for request, reply in masked:
        assert egress_violations(request, reply) == []
