"""A device's error reaches the person running the federation; a run where devices failed is no success."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.client_app import app as client_app
from clients.client_app import forget_devices
from fedge.contracts.config_load import load_config
from fedge.core.ports import RunFailed
from fedge.engines.inprocess import InProcessGrid
from fedge.runner import feed_devices
from fedge.server.app import run_server

SMALL = ["scenario.clients=3", "scenario.ticks=3", "scenario.schedule.at=2", "run.reply_timeout=30"]


def _stock_flower_app() -> ClientApp:
    """A Message-API ClientApp as Flower's quickstart writes it: train and evaluate, no query."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"]
        metrics = MetricRecord({"num-examples": 10, "train_loss": 0.1})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": 10, "eval_acc": 0.5})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def _run(tmp_path: Path, app: ClientApp, feed: bool = True, *extra: str) -> dict:
    overrides = [f'run.output_dir="{tmp_path}"', *SMALL, *extra]
    cfg = load_config(None, overrides)
    folder = tmp_path / "run"
    if feed:
        feed_devices(cfg, folder)
    run_config = {"scenario": "", "overrides": ";".join(overrides), "run-dir": str(folder)}
    grid = InProcessGrid(app, cfg.scenario.clients, run_config)
    try:
        return run_server(grid, cfg, folder, on_tick=lambda *_: None)
    finally:
        grid.close()
        forget_devices()


def test_a_clientapp_without_fedge_handlers_stops_the_run_with_one_line_saying_so(
    tmp_path: Path,
) -> None:
    with pytest.raises(RunFailed) as failed:
        _run(tmp_path, _stock_flower_app())
    message = str(failed.value)
    assert "\n" not in message
    assert "no `query` handler" in message and "clients.client_app:app" in message
    assert "node" in message, "it names the nodes it polled"


def test_devices_that_all_fail_end_the_run_as_failed_naming_the_error(tmp_path: Path) -> None:
    # No inbox on any device: every device's handler fails on the first poll.
    with pytest.raises(RunFailed) as failed:
        _run(tmp_path, client_app, False)
    message = str(failed.value)
    assert "every device failed on the first poll" in message
    assert "no inbox" in message and "\n" not in message
    summary = tmp_path / "run" / "summary.json"
    assert not summary.exists(), "a failed run writes no summary that reads as a result"


def test_a_device_that_errors_in_a_round_is_reported_as_an_error_not_a_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class OneBrokenDevice:
        """fedge's ClientApp, except that device 1's training always fails."""

        def __call__(self, msg: Message, context: Context) -> Message:
            failing = int(context.node_config.get("partition-id", 0)) == 1
            if failing and msg.metadata.message_type == "train":
                raise RuntimeError("disk full while reading the window")
            return client_app(msg, context)

    summary = _run(tmp_path, OneBrokenDevice(), True, "campaign.min_devices=2")  # type: ignore[arg-type]
    shorts = summary["short_rounds"]
    assert shorts, "the rounds went on without the failing device"
    assert all(s["failed"] and "disk full" in s["failed"][0][1] for s in shorts if s["kind"] == "train")
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "answered with an error: RuntimeError: disk full" in said
    assert "no reply from" not in said.split("answered with an error")[0].split("round 1 train")[-1]
    assert summary["versions"], "the campaign completed with the two healthy devices"
    assert np.isfinite(summary["campaigns"][0]["candidate_acc"])


def test_a_device_whose_scoring_fails_is_named_not_silently_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenScoring:
        """fedge's ClientApp, except that device 1 cannot score the models in service."""

        def __call__(self, msg: Message, context: Context) -> Message:
            failing = int(context.node_config.get("partition-id", 0)) == 1
            if failing and msg.metadata.message_type == "evaluate.scores":
                raise RuntimeError("model file unreadable while scoring")
            return client_app(msg, context)

    summary = _run(tmp_path, BrokenScoring(), True, "clustering.enabled=true")  # type: ignore[arg-type]
    assert "model file unreadable" in summary["device_errors"]["device 1"]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "device 1 replied with an error: RuntimeError: model file unreadable" in said


def test_a_device_with_nothing_held_out_is_left_out_of_the_averages_not_made_nan(
    tmp_path: Path,
) -> None:
    from clients.inbox import Inbox, inbox_path

    overrides = [f'run.output_dir="{tmp_path}"', *SMALL]
    cfg = load_config(None, overrides)
    folder = tmp_path / "run"
    feed_devices(cfg, folder)
    # Device 2's application has delivered three rows: it can train, but holds nothing out
    # (a device with no labelled row at all is left out earlier, by campaign.min_labels).
    empty = inbox_path(folder / "devices" / "device-2.sqlite")
    empty.unlink()
    with Inbox(empty, n_features=2, n_classes=2) as few:
        few.append(0, [[0.1, 0.2], [0.7, 0.3], [0.4, 0.9]], [0, 1, 0])
    run_config = {"scenario": "", "overrides": ";".join(overrides), "run-dir": str(folder)}
    grid = InProcessGrid(client_app, cfg.scenario.clients, run_config)
    try:
        summary = run_server(grid, cfg, folder, on_tick=lambda *_: None)
    finally:
        grid.close()
        forget_devices()
    first = summary["campaigns"][0]
    assert np.isfinite(first["candidate_acc"]) and first["candidate_acc"] > 0.5
    assert summary["unevaluated"]["0"] == [2], "the summary says who was left out"
    tags = summary["versions"][0]["tags"]
    assert tags["fedge.unevaluated_devices"] == "2"
