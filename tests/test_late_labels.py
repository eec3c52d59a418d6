"""Rows without labels, labels that come late, and campaigns when labels are scarce."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from inprocess_helpers import run_captured
from signing_helpers import deploy_signed, trusting

from clients.device import Device, TooFewLabels
from clients.device_data import take_amendments
from clients.inbox import Inbox, IngestError, inbox_path, ingest
from clients.ingest import iter_batches, main
from clients.validation import UNLABELLED
from fedge.contracts import model as nets
from fedge.contracts.config_load import load_config
from fedge.contracts.protocol import DriftReport

SHIFT_AT = 6
CFG = load_config(None, ["scenario.clients=1", "scenario.bad_row_fraction=0.0"])


def _rows(device: int, tick: int, n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Label = x0 > 0.5; from SHIFT_AT the x1 sensor reads only its upper half (inputs move)."""
    rng = np.random.default_rng([device, tick])
    x = rng.random((n, 2)).astype(np.float32)
    if tick >= SHIFT_AT:
        x[:, 1] = 0.5 + 0.5 * x[:, 1]
    return x, (x[:, 0] > 0.5).astype(np.int64)


def _models() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A model that predicts x0 > 0.5 well, and its mirror image that gets nearly all wrong."""
    x = np.concatenate([_rows(9, t)[0] for t in range(4)])
    model = nets.build_model(2, 2, CFG.model.hidden, CFG.model.layers)
    nets.initial_weights(model, 0)
    nets.train(model, x, (x[:, 0] > 0.5).astype(np.int64), epochs=40, lr=0.05, batch_size=32, seed=0)
    right = nets.get_weights(model)
    names = list(right)
    wrong = dict(right)
    for name in names[-2:]:  # negated logits: the other class wins everywhere
        wrong[name] = -right[name]
    return right, wrong


def test_csv_and_json_rows_without_labels_are_stored_not_rejected(tmp_path: Path) -> None:
    csv_text = "tick,a,b,label\n0,0.1,0.2,1\n0,0.3,0.4,\n0,0.5,0.6,0\n"
    batches = list(iter_batches(io.StringIO(csv_text), "csv", n_features=2, n_classes=2))
    jsonl = '{"x": [0.1, 0.2], "tick": 1}\n{"x": [0.3, 0.4], "y": null, "tick": 1}\n{"x": [0.5, 0.6], "y": 1, "tick": 1}\n'
    batches += list(iter_batches(io.StringIO(jsonl), "jsonl", n_features=2, n_classes=2))
    path = tmp_path / "device-0.inbox.sqlite"
    receipts = ingest(path, batches, n_features=2, n_classes=2)
    assert [r.accepted for r in receipts] == [3, 3]
    assert all(r.rejected["total"] == 0 for r in receipts)
    # Every input row has a sample id, in input order, across calls.
    assert [(r.first_row, r.rows) for r in receipts] == [(1, 3), (4, 3)]
    with Inbox(path) as inbox:
        batch = inbox.take()
    assert batch.y.tolist() == [1, UNLABELLED, 0, UNLABELLED, UNLABELLED, 1]
    assert batch.ids.tolist() == [1, 2, 3, 4, 5, 6]


def test_late_labels_are_scored_with_the_model_of_arrival_and_feed_the_detector(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "fedge.device")
    cfg, signer = trusting(CFG, tmp_path)
    store = tmp_path / "device-0.sqlite"
    data = [_rows(0, t, 50) for t in range(6)]
    receipts = ingest(
        inbox_path(store), [(t, x, [None] * len(y)) for t, (x, y) in enumerate(data)], n_features=2, n_classes=2
    )
    ids = [r.first_row + np.arange(r.rows) for r in receipts]
    right, wrong = _models()
    device = Device(cfg, 0, store)
    assert deploy_signed(device, signer, 1, right, family=0)
    first = device.monitor_tick(0)
    # No label yet: the rows are stored and monitored, nothing is scored or rejected.
    assert (first.n_samples, first.n_labelled, first.rejected, first.accuracy) == (50, 0, 0, None)
    assert first.labels_outstanding == 50 and first.window_labelled == 0
    # The model changes (same lineage: one error stream) before tick 0's labels come.
    assert deploy_signed(device, signer, 2, wrong, family=0)
    for t in (1, 2):
        device.monitor_tick(t)
    seen = device.monitor.samples_seen

    with Inbox(inbox_path(store)) as inbox:
        inbox.append_labels(ids[0], data[0][1], tick=3)
    late = device.monitor_tick(3)
    today = int((nets.predict(device._model, data[0][0]) != data[0][1]).sum())
    assert today >= 45, "the model deployed now gets tick 0's samples wrong"
    # Scored with v1, the model deployed when they arrived, three ticks late.
    assert (late.late_labels, late.label_delay) == (50, 3.0)
    assert late.late_errors <= 3
    # They count at their own tick, not at the tick they arrived: tick 3's own rows
    # have no label yet, so its accuracy rests on nothing; tick 0 gets 50 labels.
    assert (late.n_scored, late.accuracy) == (0, None)
    amended = take_amendments(device)
    assert list(amended) == [0] and amended[0][0] == 50 and amended[0][1] == late.late_errors
    assert take_amendments(device) == {}, "a reply carries them once"
    assert device.monitor.samples_seen == seen + 50
    assert late.labels_outstanding == 4 * 50 - 50 and late.window_labelled == 50
    # What a campaign trains and gates on is the labelled samples only.
    _, y, _, yh = device._split()
    assert len(y) + len(yh) == 50 and (y != UNLABELLED).all() and (yh != UNLABELLED).all()

    with Inbox(inbox_path(store)) as inbox:
        inbox.append_labels(ids[1], data[1][1], tick=4)
    worse = device.monitor_tick(4)
    assert worse.late_errors >= 45 and worse.label_delay == 3.0, "tick 1 was predicted by v2"
    assert worse.drift or worse.drifts_total > late.drifts_total, "the error rise is detected"

    # The drift emptied the window of older ticks: a label for a sample of tick 0 (pruned)
    # and one for a row dropped at ingest are refused, logged and counted, not an error.
    with Inbox(inbox_path(store)) as inbox:
        dropped = inbox.append(6, [[float("nan"), 0.1]], [None], on_invalid="drop")
        inbox.append_labels([int(ids[0][0]), dropped.first_row], [1, 0], tick=6)
        with pytest.raises(IngestError, match="never issued"):
            inbox.append_labels([10**6], [0])
    device.monitor_tick(5)
    refused = device.monitor_tick(6)
    assert (refused.labels_rejected, refused.late_labels) == (2, 0)
    assert "refused 2 late labels" in caplog.text and "sample 1 refused: it is not in the window" in caplog.text


def test_fedge_ingest_labels_names_the_sample_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    box = tmp_path / "device-0.inbox.sqlite"
    samples = tmp_path / "rows.csv"
    samples.write_text("a,b,label\n0.1,0.2,\n0.3,0.4,\n")
    assert main([str(box), str(samples), "--tick", "0", "--features", "2", "--classes", "2"]) == 0
    assert "sample ids 1-2 in file order" in capsys.readouterr().out
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\n2,1\n")
    assert main([str(box), str(labels), "--labels", "--tick", "1"]) == 0
    assert "stored 1 late labels (arriving at tick 1)" in capsys.readouterr().out
    labels.write_text("id,label\n7,1\n")
    assert main([str(box), str(labels), "--labels"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sample id 7 was never issued" in err


def test_a_stolen_inbox_and_store_hold_no_unlabelled_sample_or_late_label(tmp_path: Path) -> None:
    cfg, signer = trusting(CFG, tmp_path)
    store = tmp_path / "device-0.sqlite"
    markers = (1000.0 + np.arange(40, dtype=np.float32) * 0.37).reshape(20, 2)
    receipt = ingest(inbox_path(store), [(0, markers, [None] * 20)], n_features=2, n_classes=2)[0]
    with Inbox(inbox_path(store)) as inbox:
        inbox.append_labels(receipt.first_row + np.arange(20), [1] * 20)
    right, _ = _models()
    device = Device(cfg, 0, store)
    deploy_signed(device, signer, 1, right)
    with Inbox(inbox_path(store)) as inbox:  # a second inbox batch, not yet taken
        inbox.append(1, markers, [None] * 20)
    device.monitor_tick(0)
    device.close()
    raw = b"".join(
        p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("device-0.") and p.is_file()
    )
    found = [v for v in markers.reshape(-1) if np.float32(v).tobytes() in raw]
    assert not found, f"feature values in the clear: {found[:3]}"


def test_a_device_without_labels_refuses_to_train_and_says_why(tmp_path: Path) -> None:
    store = tmp_path / "device-0.sqlite"
    x, _ = _rows(0, 0)
    ingest(inbox_path(store), [(0, x, [None] * len(x))], n_features=2, n_classes=2)
    device = Device(CFG, 0, store)
    device.monitor_tick(0)
    right, _ = _models()
    with pytest.raises(TooFewLabels, match="holds 0 labelled samples.*campaign.min_labels=1"):
        device.train(right, epochs=1, lr=0.01, batch_size=8, seed=0)
    assert device.evaluate(right)["num-examples"] == 0


def test_labels_stop_input_drift_still_starts_a_campaign_and_the_unlabelled_device_stays_out(
    tmp_path: Path,
) -> None:
    folder, devices, ticks = tmp_path / "run", 4, 10
    for d in range(devices):
        store = folder / "devices" / f"device-{d}.sqlite"
        store.parent.mkdir(parents=True, exist_ok=True)
        batches = []
        for t in range(ticks):
            x, y = _rows(d, t)
            labels: list[int | None] = [int(v) for v in y]
            if d == 3 or t >= 3:
                # Device 3 never has a label; the others keep one row in ten from tick 3.
                labels = [v if d != 3 and i % 10 == 0 else None for i, v in enumerate(labels)]
            batches.append((t, x, labels))
        ingest(inbox_path(store), batches, n_features=2, n_classes=2)
    overrides = [
        f'run.output_dir="{tmp_path}"',
        'data.source="inbox"',
        "data.n_features=2",
        "data.n_classes=2",
        f"scenario.clients={devices}",
        f"scenario.ticks={ticks}",
        'monitor.input_test="ks"',
        "trigger.quorum=0.5",
        "trigger.cooldown=1",
        "campaign.initial_rounds=4",
        "campaign.rounds=2",
    ]
    summary, crossed = run_captured(overrides, folder)
    by_tick = {t["tick"]: t for t in summary["ticks"]}
    # Unlabelled rows are never rejected; every row is monitored.
    assert all(by_tick[t]["rejected"] == 0 and by_tick[t]["n_samples"] == 400 for t in range(ticks))
    later = [c for c in summary["campaigns"] if c["tick"] >= 1]
    assert later and later[0]["tick"] == SHIFT_AT and list(later[0]["signals"]) == ["input"], later
    # The device with no label is left out of every campaign, and the record says so.
    assert summary["campaigns"] and all(list(c["too_few_labels"]) == [3] for c in summary["campaigns"])
    # The gate rested on labelled holdout rows only (every fifth labelled row of three devices).
    assert 0 < later[0]["gate_labels"] <= 3 * (3 * 100 + 4 * 10) // 5 + 3
    reports = [
        DriftReport.from_dict(reply.content["report"])
        for request, reply in crossed
        if request.metadata.message_type == "query" and reply.has_content() and "report" in reply.content
    ]
    unlabelled = [r for r in reports if r.device == 3 and r.model_version > 0]
    assert unlabelled and all(r.n_labelled == 0 and r.accuracy is None for r in unlabelled)
    scarce = [r for r in reports if r.device == 0 and r.tick >= 3]
    assert scarce and all(r.n_labelled == 10 and r.n_scored == 10 for r in scarce if r.model_version)


def test_a_late_label_updates_the_prequential_accuracy_of_its_own_tick(tmp_path: Path) -> None:
    """Rows of ticks 1.. come unlabelled; their labels arrive two ticks later and count at their tick."""
    folder, devices, ticks, delay = tmp_path / "run", 3, 7, 2
    for d in range(devices):
        box = inbox_path(folder / "devices" / f"device-{d}.sqlite")
        box.parent.mkdir(parents=True, exist_ok=True)
        data = [_rows(d, t, 60) for t in range(ticks)]
        # Tick 0 is labelled (the first model trains on it); later ticks wait for their labels.
        receipts = ingest(box, [(t, x, y if t == 0 else [None] * len(y)) for t, (x, y) in enumerate(data)],
                          n_features=2, n_classes=2)
        with Inbox(box) as inbox:
            for t in range(1, ticks - delay):
                r = receipts[t]
                inbox.append_labels(r.first_row + np.arange(r.rows), data[t][1], tick=t + delay)
    overrides = [
        f'run.output_dir="{tmp_path}"',
        'data.source="inbox"',
        "data.n_features=2",
        "data.n_classes=2",
        f"scenario.clients={devices}",
        f"scenario.ticks={ticks}",
        "trigger.policy=never",
        "campaign.initial_rounds=6",
        "campaign.lr=0.05",
    ]
    summary, _ = run_captured(overrides, folder)
    by_tick = {t["tick"]: t for t in summary["ticks"]}
    for t in range(1, ticks - delay):
        # Every sample of the tick got its label late, scored against the model of its arrival.
        assert by_tick[t]["late_labels"] == devices * 60 and by_tick[t]["n_scored"] == devices * 60, by_tick[t]
        assert by_tick[t]["accuracy"] is not None and by_tick[t]["accuracy"] > 0.85, by_tick[t]
    for t in range(ticks - delay, ticks):
        assert by_tick[t]["accuracy"] is None, "labels that never came leave the tick unscored"
