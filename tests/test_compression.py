"""Compressed uploads: fewer bytes, the same model within the codec's precision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from inprocess_helpers import fed_device

from fedge.contracts import model as nets
from fedge.contracts import protocol as p
from fedge.contracts.compression import BLOCK, decode_update, encode_update, encoded_shapes
from fedge.contracts.config import FedgeConfig
from fedge.contracts.config_load import load_config
from fedge.contracts.wire import from_arrays, to_arrays
from fedge.engines.inprocess import InProcessGrid
from strategies.compressed import CompressedUploads


def _model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((33, 17)).astype(np.float32),
        "b": rng.standard_normal(17).astype(np.float32),
    }


@pytest.mark.parametrize(("codec", "tolerance"), [("float16", 2e-3), ("int8", 2e-2)])
def test_decoded_upload_is_the_trained_model_within_the_codec_precision(
    codec: str, tolerance: float
) -> None:
    start, trained = _model(0), _model(1)
    sent = encode_update(trained, start, codec)
    back = decode_update(sent.arrays, start, codec)
    assert list(back) == list(trained)
    for key in trained:
        assert back[key].dtype == np.float32 and back[key].shape == trained[key].shape
        np.testing.assert_allclose(back[key], trained[key], atol=tolerance)
    assert {k: v.shape for k, v in sent.arrays.items()} == encoded_shapes(
        {k: v.shape for k, v in start.items()}, codec
    )


def test_int8_upload_is_a_quarter_of_the_float32_bytes() -> None:
    start, trained = _model(0), _model(1)
    raw = sum(v.nbytes for v in trained.values())
    sent = sum(v.nbytes for v in encode_update(trained, start, "int8").arrays.values())
    assert sent <= raw / 4 + 4 * (raw // 4 // BLOCK + 1)


def test_error_feedback_carries_what_the_codec_lost_into_the_next_upload() -> None:
    start = {"w": np.zeros(1000, np.float32)}
    step = {"w": np.full(1000, 1e-3, np.float32)}
    step["w"][0] = 1.0  # one large value makes its block's scale coarse: 1e-3 rounds to 0
    residual = None
    total = np.zeros(1000, np.float32)
    for _ in range(50):
        sent = encode_update(step, start, "int8", residual)
        total += decode_update(sent.arrays, start, "int8")["w"]
        residual = sent.residual
    # without feedback the small values would never arrive; with it they add up
    np.testing.assert_allclose(total[1:], 50 * 1e-3, rtol=0.1)
    once = decode_update(encode_update(step, start, "int8").arrays, start, "int8")["w"]
    assert once[1:BLOCK].max() == 0


def test_unknown_codec_and_mismatched_upload_are_refused() -> None:
    start = _model(0)
    with pytest.raises(ValueError, match="allowed: none, float16, int8"):
        encode_update(start, start, "zip")
    sent = encode_update(_model(1), start, "int8")
    with pytest.raises(ValueError, match="values"):
        decode_update(sent.arrays, {"w": start["w"]}, "int8")


def _device_app() -> ClientApp:
    app = ClientApp()
    residuals: dict[int, np.ndarray] = {}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        start = from_arrays(msg.content.array_records["arrays"])
        trained = {k: v + 0.1 * (pid + 1) for k, v in start.items()}
        codec = str(msg.content.config_records["config"].get(p.COMPRESSION, "none"))
        sent = encode_update(trained, start, codec, residuals.get(pid))
        residuals[pid] = sent.residual
        content = RecordDict(
            {"arrays": to_arrays(sent.arrays), "metrics": MetricRecord({"num-examples": 10})}
        )
        return Message(content, reply_to=msg)

    return app


def test_compressed_uploads_wrapper_aggregates_like_uncompressed_fedavg() -> None:
    start = _model(3)
    results = {}
    for codec in ("none", "int8"):
        base = FedAvg(fraction_evaluate=0.0, min_train_nodes=4, min_available_nodes=4)
        strategy = base if codec == "none" else CompressedUploads(base, codec)
        result = strategy.start(
            grid=InProcessGrid(_device_app(), 4, {}),
            initial_arrays=to_arrays(start),
            num_rounds=2,
            train_config=ConfigRecord({}),
        )
        results[codec] = from_arrays(result.arrays)
    for key in start:
        np.testing.assert_allclose(results["int8"][key], results["none"][key], atol=2e-2)
        np.testing.assert_allclose(results["none"][key], start[key] + 0.5, atol=1e-5)


def test_device_keeps_its_residual_across_a_restart_and_drops_it_for_a_new_campaign(
    tmp_path: Path,
) -> None:
    cfg = load_config(None, ["scenario.clients=1", "scenario.bad_row_fraction=0.0"])
    start = {k: np.zeros_like(v) for k, v in _device_model(cfg).items()}
    trained = {k: v + np.float32(3e-3) for k, v in start.items()}
    first = next(iter(trained))
    trained[first] = trained[first].copy()
    trained[first].flat[0] = 1.0  # a coarse block scale: the small steps are lost once
    device = fed_device(cfg, 0, tmp_path / "d.sqlite")
    device.encode_upload(trained, start, "int8", tick=3)
    device.close()
    restarted = fed_device(cfg, 0, tmp_path / "d.sqlite")
    again = decode_update(restarted.encode_upload(trained, start, "int8", tick=3), start, "int8")
    fresh = decode_update(restarted.encode_upload(trained, start, "int8", tick=9), start, "int8")
    restarted.close()
    # the carried residual makes the second upload larger than a first one is
    assert again[first].flat[1] > fresh[first].flat[1]


def _device_model(cfg: FedgeConfig) -> dict[str, np.ndarray]:
    return nets.get_weights(nets.build_model(2, 2, cfg.model.hidden, cfg.model.layers))


def test_a_run_with_int8_uploads_passes_egress_and_learns_like_one_without(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedge.runner import RunRequest, quiet_tick, run

    small = ("scenario.clients=2", "scenario.ticks=4", "scenario.schedule.at=2",
             "campaign.rounds=1", "campaign.initial_rounds=2")
    summaries = {}
    for codec in ("none", "int8"):
        overrides = (*small, f'campaign.compression="{codec}"', f'run.output_dir="{tmp_path / codec}"')
        summaries[codec] = run(RunRequest(None, overrides, "inprocess"), on_tick=quiet_tick)
    assert "egress blocked" not in caplog.text
    plain, packed = summaries["none"], summaries["int8"]
    assert [c["tick"] for c in packed["campaigns"]] == [c["tick"] for c in plain["campaigns"]]
    assert [c["candidate_acc"] for c in packed["campaigns"]] == pytest.approx(
        [c["candidate_acc"] for c in plain["campaigns"]], abs=0.05
    )
