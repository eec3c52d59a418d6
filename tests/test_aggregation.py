"""fedge's weighted averaging gives Flower's FedAvg result."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords as flower_aggregate

from fedge.contracts.wire import from_arrays, to_arrays
from fedge.engines.inprocess import InProcessGrid
from strategies.aggregation import aggregate_arrayrecords, array_view, weighted_average
from strategies.fedavg import FedAvg


def _replies(seed: int = 0) -> list[RecordDict]:
    rng = np.random.default_rng(seed)
    return [
        RecordDict(
            {
                "arrays": ArrayRecord(
                    {
                        "w": Array(rng.standard_normal((7, 5)).astype(np.float32)),
                        "b": Array(rng.standard_normal(5)),
                        "steps": Array(rng.integers(0, 9, 3)),
                    }
                ),
                "metrics": MetricRecord({"num-examples": n}),
            }
        )
        for n in (3, 40, 11, 1)
    ]


def test_aggregate_arrayrecords_matches_flower_key_by_key() -> None:
    replies = _replies()
    ours, flowers = aggregate_arrayrecords(replies, "num-examples"), flower_aggregate(
        replies, "num-examples"
    )
    assert list(ours) == list(flowers)
    for key in flowers:
        mine, theirs = ours[key].numpy(), flowers[key].numpy()
        assert mine.shape == theirs.shape
        assert mine.dtype == theirs.dtype
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-7)


def test_large_updates_spanning_several_blocks_match_flower() -> None:
    rng = np.random.default_rng(3)
    size = (4 * 1024 * 1024) // 4 + 12_345  # more than one accumulator block, odd tail
    replies = [
        RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(rng.standard_normal(size).astype(np.float32))}),
                "metrics": MetricRecord({"num-examples": n}),
            }
        )
        for n in (7, 1, 30)
    ]
    ours = aggregate_arrayrecords(replies, "num-examples")["w"].numpy()
    flowers = flower_aggregate(replies, "num-examples")["w"].numpy()
    assert ours.dtype == np.float32 and ours.shape == (size,)
    np.testing.assert_allclose(ours, flowers, rtol=1e-6, atol=1e-6)


def test_weighted_average_is_the_weighted_mean() -> None:
    a = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    b = {"w": np.array([3.0, 6.0], dtype=np.float32)}
    out = weighted_average([a, b], [1, 3])
    assert out["w"].dtype == np.float32
    assert out["w"].tolist() == [2.5, 5.0]


def test_weighted_average_refuses_mismatched_updates() -> None:
    a = {"w": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match="shape"):
        weighted_average([a, {"w": np.zeros(3, np.float32)}], [1, 1])
    with pytest.raises(ValueError, match="no array 'w'"):
        weighted_average([a, {"v": np.zeros(2, np.float32)}], [1, 1])
    with pytest.raises(ValueError, match="positive"):
        weighted_average([a, a], [0, 0])


def test_array_view_shares_the_serialised_bytes() -> None:
    array = Array(np.arange(12, dtype=np.float32).reshape(3, 4))
    view = array_view(array)
    assert view.shape == (3, 4) and not view.flags.writeable
    assert np.shares_memory(view, np.frombuffer(array.data, dtype=np.uint8))
    np.testing.assert_array_equal(view, array.numpy())


def _noisy_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        rng = np.random.default_rng(pid)
        weights = from_arrays(msg.content.array_records["arrays"])
        update = {k: v + rng.standard_normal(v.shape).astype(v.dtype) for k, v in weights.items()}
        metrics = MetricRecord({"num-examples": 5 + 7 * pid})
        return Message(RecordDict({"arrays": to_arrays(update), "metrics": metrics}), reply_to=msg)

    return app


def test_fedavg_rounds_match_flower_fedavg() -> None:
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

    start = {"w": np.zeros((4, 3), np.float32), "b": np.ones(3, np.float32)}
    results = []
    for cls in (FedAvg, FlowerFedAvg):
        grid = InProcessGrid(_noisy_app(), 5, {})
        strategy = cls(fraction_evaluate=0.0, min_train_nodes=5, min_available_nodes=5)
        result = strategy.start(
            grid=grid, initial_arrays=to_arrays(start), num_rounds=3, train_config=ConfigRecord({})
        )
        results.append(from_arrays(result.arrays))
    ours, flowers = results
    for key in flowers:
        np.testing.assert_allclose(ours[key], flowers[key], rtol=1e-5, atol=1e-6)
