"""Float and vector targets: kept by the inbox and the store, read from folders, learned end to end.

A regression task learns from float targets (one value per row) or vector targets
(``k`` values per row, ``N_OUTPUTS = k``). The targets here are smooth functions of
the inputs, so they are genuinely not whole numbers; from ``DRIFT_AT`` on they are
shifted, which the devices' error streams (``|err| > tolerance``) must detect.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import importable

from clients.inbox import Inbox, IngestError, inbox_path, ingest, read_schema
from clients.ingest import main
from clients.sources import FolderSource
from clients.store import DeviceStore
from clients.targets import CLASS, FLOAT, Targets
from fedge.contracts.config import ConfigError
from fedge.contracts.config_load import load_config
from fedge.runner import RunRequest, quiet_tick, run

TASKS = Path(__file__).resolve().parent / "tasks"
DEVICES, TICKS, ROWS, WIDTH, DRIFT_AT = 3, 10, 80, 4, 5
SHIFT = 1.0


@pytest.fixture(autouse=True)
def task_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tests/tasks`` importable here and in every process a run starts."""
    importable(monkeypatch, TASKS)


def smooth(x: np.ndarray, tick: int, outputs: int = 1) -> np.ndarray:
    """The targets of rows ``x``: one or two smooth functions, shifted from ``DRIFT_AT`` on."""
    a = np.sin(2.0 * x[:, 0]) + 0.5 * x[:, 1] ** 2 + 0.3 * x[:, 2] * x[:, 3]
    b = np.cos(1.5 * x[:, 2]) - 0.6 * x[:, 0] * x[:, 1]
    y = np.stack([a, b], axis=1)[:, :outputs]
    if tick >= DRIFT_AT:
        y = y + np.array([SHIFT, -SHIFT])[:outputs]
    return y[:, 0] if outputs == 1 else y


def rows(device: int, tick: int, outputs: int = 1) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng([device, tick, outputs]).uniform(-1.0, 1.0, size=(ROWS, WIDTH))
    return x, smooth(x, tick, outputs)


def _cells(values: np.ndarray) -> list[str]:
    return ["" if np.isnan(v) else f"{v:.6f}" for v in values]


def _csv(path: Path, x: np.ndarray, y: np.ndarray, ticks: np.ndarray, target: list[str]) -> None:
    lines = [",".join(["tick", *(f"f{i}" for i in range(WIDTH)), *target])]
    ys = y.reshape(len(y), -1)
    for i in range(len(x)):
        lines.append(",".join([str(int(ticks[i])), *_cells(x[i]), *_cells(ys[i])]))
    path.write_text("\n".join(lines) + "\n")


def write_float_folder(root: Path) -> Path:
    """device-0: one CSV with a float ``target`` column, some cells empty (no label yet);
    device-1: one CSV per tick with a ``label`` column; device-2: one ``.npz`` per tick."""
    (root / "device-1").mkdir(parents=True)
    (root / "device-2").mkdir()
    whole = [rows(0, t) for t in range(TICKS)]
    x0 = np.concatenate([x for x, _ in whole])
    y0 = np.concatenate([y for _, y in whole])
    y0[::10] = np.nan  # every tenth row arrives without its target
    _csv(root / "device-0.csv", x0, y0, np.repeat(np.arange(TICKS), ROWS), ["target"])
    for t in range(TICKS):
        x, y = rows(1, t)
        _csv(root / "device-1" / f"{t:03d}.csv", x, y, np.full(ROWS, t), ["label"])
        x, y = rows(2, t)
        np.savez(root / "device-2" / f"{t:03d}.npz", x=x, y=y.astype(np.float32))
    return root


def write_vector_folder(root: Path) -> Path:
    """Two values per row: device-0 CSV columns ``target_0, target_1``; device-1 JSON lines
    with a list ``y``; device-2 ``.npz`` with ``y`` of shape ``(n, 2)``."""
    root.mkdir(parents=True)
    (root / "device-2").mkdir()
    parts = [[rows(d, t, outputs=2) for t in range(TICKS)] for d in range(DEVICES)]
    x0 = np.concatenate([x for x, _ in parts[0]])
    y0 = np.concatenate([y for _, y in parts[0]])
    _csv(root / "device-0.csv", x0, y0, np.repeat(np.arange(TICKS), ROWS), ["target_0", "target_1"])
    with (root / "device-1.jsonl").open("w") as out:
        for t, (x, y) in enumerate(parts[1]):
            for xi, yi in zip(x, y, strict=True):
                out.write(json.dumps({"tick": t, "x": xi.tolist(), "y": yi.tolist()}) + "\n")
    for t, (x, y) in enumerate(parts[2]):
        np.savez(root / "device-2" / f"{t:03d}.npz", x=x, y=y)
    return root


def _run(task: str, root: Path, out: Path, engine: str = "inprocess") -> dict:
    overrides = (
        'data.source="folder"',
        f"data.path={json.dumps(str(root))}",
        f'model.task="{task}"',
        f'scenario.name="{task}"',
        "campaign.initial_rounds=10",
        "campaign.rounds=8",
        "campaign.local_epochs=8",
        "campaign.lr=0.03",
        "trigger.cooldown=1",
        f"run.output_dir={json.dumps(str(out))}",
    )
    summary = run(RunRequest(None, overrides, engine), on_tick=quiet_tick, run_dir=out / "run")
    print(task, engine, [t["accuracy"] for t in summary["ticks"]],
          [(c["tick"], c["version"], c["promoted"], c["candidate_acc"]) for c in summary["campaigns"]])
    return summary


def _check_run(summary: dict, task: str, meta: str) -> torch.nn.Module:
    """The drift is detected and retrained; the champion loads back and predicts the shifted targets."""
    from fedge.models import load_model

    assert not summary["device_errors"], summary["device_errors"]
    ticks = summary["ticks"]
    assert len(ticks) == TICKS and all(t["n_samples"] == DEVICES * ROWS for t in ticks[1:])
    before, after = ticks[DRIFT_AT - 1]["accuracy"], ticks[DRIFT_AT]["accuracy"]
    # accuracy: the share of predictions within half a standard deviation of the window's targets
    assert before > 0.5 and after < 0.2, (before, after)
    assert any(c["tick"] >= DRIFT_AT and c["promoted"] for c in summary["campaigns"]), summary["campaigns"]
    assert ticks[-1]["accuracy"] > 0.5, "the retrained model fits the shifted targets"
    box = inbox_path(Path(summary["run_dir"]) / "devices" / "device-0.sqlite")
    with sqlite3.connect(box) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'targets'").fetchone()[0] == meta
    net = load_model(f"fedge-{task}", tracking_uri=summary["tracking_uri"])
    assert type(net).__name__ == "SmoothNet"
    return net


def _errors(net: torch.nn.Module, outputs: int) -> tuple[float, float]:
    """The champion's mean absolute error on fresh rows: against the old and the shifted targets."""
    x = np.random.default_rng(99).uniform(-1.0, 1.0, size=(500, WIDTH)).astype(np.float32)
    with torch.no_grad():
        got = net(torch.as_tensor(x)).numpy().reshape(500, -1)
    old = smooth(x, 0, outputs).reshape(500, -1)
    new = smooth(x, DRIFT_AT, outputs).reshape(500, -1)
    return float(np.abs(got - old).mean()), float(np.abs(got - new).mean())


# -- the inbox and the store ----------------------------------------------------------------------
def test_float_targets_round_trip_through_the_inbox_with_unlabelled_rows_and_late_labels(tmp_path: Path) -> None:
    path = tmp_path / "device-0.inbox.sqlite"
    receipts = ingest(path, [(0, [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], [0.37, None, float("nan")]),
                             (1, [[0.7, 0.8]], np.array([-1.25]))], n_features=2, targets="float")
    assert read_schema(path).targets == FLOAT and read_schema(path).n_classes == 1
    with Inbox(path) as inbox:
        batch = inbox.take()
        np.testing.assert_allclose(batch.y, [0.37, np.nan, np.nan, -1.25], rtol=1e-6)
        assert batch.y.dtype == np.float32 and batch.ids.tolist() == [1, 2, 3, 4]
        assert inbox.append_labels([2, 3], [2.5, -0.125], tick=1).accepted == 2
        late = inbox.take_labels()
        assert late.ids.tolist() == [2, 3] and late.labels.tolist() == [2.5, -0.125]
        with pytest.raises(IngestError, match="late label 0: label inf is not one of the inbox's float targets"):
            inbox.append_labels([1], [float("inf")])
    assert [r.first_row for r in receipts] == [1, 4]


def test_vector_targets_round_trip_through_the_inbox_and_the_store(tmp_path: Path) -> None:
    path = tmp_path / "device-0.inbox.sqlite"
    two = Targets("vector", 2)
    with Inbox(path, n_features=1, targets=two) as inbox:
        inbox.append(0, [[0.0], [1.0], [2.0]], [[0.5, 1.5], None, [np.nan, np.nan]])
        inbox.append(1, np.ones((2, 1)), np.array([[3.0, -3.0], [4.0, -4.0]]))
        inbox.append_labels([2], [[9.5, -9.5]])
        batch, late = inbox.take(), inbox.take_labels()
    assert batch.y.shape == (5, 2) and two.missing(batch.y).tolist() == [False, True, True, False, False]
    assert late.labels.tolist() == [[9.5, -9.5]]
    with DeviceStore(tmp_path / "device-0.sqlite", targets=two) as store:
        store.append(batch.x, batch.y, 0, samples=batch.ids, predictions=np.zeros((5, 2)), predicted_by=1)
        assert store.labelled_count() == 3
        outcome = store.label([2], [[9.5, -9.5]])
    assert outcome[0][0] == "ok" and outcome[0][2].tolist() == [0.0, 0.0], "the arrival prediction, both values"
    with DeviceStore(tmp_path / "device-0.sqlite") as store:  # the kind comes back from the file
        _, y, _ = store.window()
        assert store.targets == two and y[1].tolist() == [9.5, -9.5] and store.labelled_count() == 4
    with pytest.raises(ValueError, match="holds samples with vector targets of 2 values, float targets"):
        DeviceStore(tmp_path / "device-0.sqlite", targets=FLOAT)


@pytest.mark.parametrize(
    ("made", "write", "says"),
    [
        ("float", lambda b: b.append(1, np.zeros((2, 2)), np.zeros((2, 3))),
         "y holds vectors of 3 values per row, the inbox holds float targets"),
        ("vector:2", lambda b: b.append(1, np.zeros((1, 2)), [[1.0, 2.0, 3.0]]),
         "y holds vectors of 3 values per row, the inbox holds vector targets of 2 values"),
        ("vector:2", lambda b: b.append(1, np.zeros((2, 2)), [0.5, 1.5]),
         "y holds one value per row, the inbox holds vector targets of 2 values"),
        ("class", lambda b: b.append(1, np.zeros((2, 2)), np.zeros((2, 2))),
         "y holds vectors of 2 values per row, the inbox holds class labels"),
        ("class", lambda b: b.append(1, np.zeros((1, 2)), [0.37]),
         'the label 0.37 is not a class index (the inbox holds class labels; float targets need an inbox'),
        ("vector:2", lambda b: b.append_labels([1], [[1.0]]),
         "late label 0: label [1.0] is not one of the inbox's vector targets of 2 values"),
    ],
)
def test_a_write_of_another_kind_or_length_is_refused_in_one_line(
    tmp_path: Path, made: str, write, says: str
) -> None:
    path = tmp_path / "device-0.inbox.sqlite"
    targets = Targets.parse(made)
    first = [[1.0, 2.0]] if targets.kind == "vector" else [1]
    ingest(path, [(0, [[0.0, 0.0]], first)], n_features=2, n_classes=2 if targets.is_class else None,
           targets=targets)
    with Inbox(path) as inbox, pytest.raises(IngestError) as refused:
        write(inbox)
    assert says in str(refused.value) and "\n" not in str(refused.value)
    with Inbox(path) as inbox:
        assert len(inbox.take().x) == 1 and inbox.take_labels().empty, "nothing of the refused write was stored"
    other = CLASS if made == "float" else FLOAT
    with pytest.raises(IngestError, match=re.escape(f"holds {targets.describe()}, {other.describe()} were given")):
        Inbox(path, targets=other)


def test_fedge_ingest_creates_a_float_inbox_and_takes_late_float_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    box, rows_csv, labels_csv = tmp_path / "d.inbox.sqlite", tmp_path / "rows.csv", tmp_path / "late.csv"
    rows_csv.write_text("a,b,target\n0.1,0.2,0.75\n0.3,0.4,\n")
    assert main([str(box), str(rows_csv), "--tick", "0", "--features", "2", "--targets", "float"]) == 0
    labels_csv.write_text("id,target\n2,-1.5\n")
    assert main([str(box), str(labels_csv), "--labels"]) == 0
    assert "stored 1 late labels" in capsys.readouterr().out
    with Inbox(box) as inbox:
        assert inbox.take().y[0] == np.float32(0.75) and inbox.take_labels().labels.tolist() == [-1.5]
    capsys.readouterr()
    vector = tmp_path / "v.csv"
    vector.write_text("a,b,label_0,label_1\n0.1,0.2,1,2\n")
    assert main([str(box), str(vector), "--tick", "1"]) == 2
    err = capsys.readouterr().err
    assert "the header has vector target columns (label_0 ..), the inbox holds float targets" in err
    assert err.count("\n") == 1


def test_a_device_scores_late_vector_labels_with_the_arrival_prediction(tmp_path: Path) -> None:
    from signing_helpers import deploy_signed, trusting

    from clients.device import Device
    from fedge.contracts import model as nets
    from fedge.contracts.task import load_task

    cfg, signer = trusting(load_config(None, ['data.source="inbox"', f"data.n_features={WIDTH}",
                                              'model.task="smooth_pair"', "scenario.clients=1"]), tmp_path)
    assert cfg.data.n_classes == 2, "a vector task's values per row, filled in from the task"
    task = load_task("smooth_pair")
    net = task.build(WIDTH, 2)
    x_fit = np.concatenate([rows(5, t, 2)[0] for t in range(4)])
    task.train(net, x_fit.astype(np.float32), smooth(x_fit, 0, 2), epochs=60, lr=0.02, batch_size=32, seed=0)
    store = tmp_path / "device-0.sqlite"
    (x0, y0), (x1, y1) = rows(0, 0, 2), rows(0, 1, 2)
    receipts = ingest(inbox_path(store), [(0, x0, y0), (1, x1, [None] * ROWS)], n_features=WIDTH,
                      targets="vector:2")
    device = Device(cfg, 0, store)
    assert device.store.targets == Targets("vector", 2)
    assert deploy_signed(device, signer, 1, nets.get_weights(net))
    first = device.monitor_tick(0)
    assert first.n_scored == ROWS and first.accuracy > 0.6, first.accuracy
    second = device.monitor_tick(1)
    assert (second.n_samples, second.n_scored, second.labels_outstanding) == (ROWS, 0, ROWS)
    with Inbox(inbox_path(store)) as inbox:  # the right values for half, shifted values for the other half
        late = y1 + np.where(np.arange(ROWS) < ROWS // 2, 0.0, 3.0)[:, None]
        inbox.append_labels(receipts[1].first_row + np.arange(ROWS), late, tick=2)
        inbox.append(2, x1[:1], [[0.0, 0.0]])
    third = device.monitor_tick(2)
    assert third.late_labels == ROWS and third.labels_outstanding == 0
    assert ROWS // 2 <= third.late_errors < ROWS // 2 + ROWS // 5, third.late_errors


# -- folders and configuration --------------------------------------------------------------------
def test_a_folder_scan_tells_float_vector_and_whole_number_targets_apart(tmp_path: Path) -> None:
    floats = write_float_folder(tmp_path / "f")
    vectors = write_vector_folder(tmp_path / "v")
    for entry in ("device-0.csv", "device-1", "device-2"):
        shape = FolderSource(floats / entry).scan()
        assert shape.targets == FLOAT and shape.n_classes == 1 and shape.n_rows == TICKS * ROWS, entry
    for entry in ("device-0.csv", "device-1.jsonl", "device-2"):
        shape = FolderSource(vectors / entry).scan()
        assert shape.targets == Targets("vector", 2) and shape.n_classes == 2, entry
    whole = tmp_path / "w.csv"
    whole.write_text("a,label\n0.5,3\n0.7,1\n")
    assert FolderSource(whole).scan().targets.is_class and FolderSource(whole).scan().n_classes == 4


@pytest.mark.parametrize(
    ("folder", "task", "says"),
    [
        ("float", "", "hold float targets (one value per row), but the task fedge's MLP is a classifier"),
        ("vector", "", "hold vector targets of 2 values, but the task fedge's MLP is a classifier"),
        ("vector", "smooth_value", ("hold vector targets of 2 values, but the task 'smooth_value' learns "
                                    "float targets (one value per row); use N_OUTPUTS = 2 in the task")),
        ("float", "smooth_pair", ("hold float targets (one value per row), but the task 'smooth_pair' learns "
                                  "vector targets of 2 values")),
    ],
)
def test_data_whose_targets_do_not_fit_the_task_is_refused_in_one_line(
    tmp_path: Path, folder: str, task: str, says: str
) -> None:
    root = (write_float_folder if folder == "float" else write_vector_folder)(tmp_path / "data")
    overrides = ['data.source="folder"', f"data.path={json.dumps(str(root))}", f'model.task="{task}"']
    with pytest.raises(ConfigError) as refused:
        load_config(None, overrides)
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_the_target_kind_is_inferred_from_the_task(tmp_path: Path) -> None:
    root = write_vector_folder(tmp_path / "data")
    cfg = load_config(None, ['data.source="folder"', f"data.path={json.dumps(str(root))}",
                             'model.task="smooth_pair"'])
    assert (cfg.data.target, cfg.data.n_classes, cfg.data.n_features) == ("vector", 2, WIDTH)
    with pytest.raises(ConfigError, match='data.target: "float" targets need a regression task'):
        load_config(None, ['data.source="inbox"', "data.n_features=4", 'data.target="float"'])


def test_a_python_source_yields_vector_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pair_stream.py").write_text(
        "import numpy as np\n"
        "N_FEATURES = 4\n"
        "def source(device_id):\n"
        "    for tick in range(3):\n"
        "        x = np.random.default_rng([device_id, tick]).uniform(-1, 1, size=(10, 4))\n"
        "        yield tick, x, np.stack([x[:, 0] * 0.5, np.sin(x[:, 1])], axis=1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, ['data.source="python"', 'data.module="pair_stream"', 'model.task="smooth_pair"',
                             "scenario.clients=2", "scenario.ticks=3"])
    from fedge.scenarios.feed import feed_scenario

    receipts = feed_scenario(cfg, 1, tmp_path / "device-1.inbox.sqlite")
    assert [r.accepted for r in receipts] == [10, 10, 10]
    with Inbox(tmp_path / "device-1.inbox.sqlite") as inbox:
        y = inbox.take().y
    assert y.shape == (30, 2) and not np.allclose(y, np.round(y)), "genuinely non-integer targets"


# -- end to end -----------------------------------------------------------------------------------
def test_a_folder_of_float_targets_runs_end_to_end_and_the_champion_predicts_them(tmp_path: Path) -> None:
    root = write_float_folder(tmp_path / "data")
    summary = _run("smooth_value", root, tmp_path / "out")
    net = _check_run(summary, "smooth_value", "float")
    to_old, to_new = _errors(net, 1)
    print("float targets: mean |err| against the old targets", round(to_old, 3), "the shifted ones", round(to_new, 3))
    assert to_new < 0.3 and to_old > 0.7, (to_old, to_new)
    tick = summary["ticks"][2]
    assert (tick["n_samples"], tick["n_scored"], tick["rejected"]) == (DEVICES * ROWS, DEVICES * ROWS - ROWS // 10, 0), (
        "device-0's rows without a target were stored and monitored, not rejected nor scored"
    )


def test_a_folder_of_vector_targets_runs_end_to_end_with_two_outputs(tmp_path: Path) -> None:
    root = write_vector_folder(tmp_path / "data")
    summary = _run("smooth_pair", root, tmp_path / "out")
    net = _check_run(summary, "smooth_pair", "vector:2")
    to_old, to_new = _errors(net, 2)
    print("vector targets: mean |err| against the old targets", round(to_old, 3), "the shifted ones", round(to_new, 3))
    assert to_new < 0.3 and to_old > 0.7, (to_old, to_new)


def test_float_targets_run_on_flower_simulation(tmp_path: Path) -> None:
    root = write_float_folder(tmp_path / "data")
    summary = _run("smooth_value", root, tmp_path / "out", engine="simulation")
    assert summary["engine"] == "simulation"
    _check_run(summary, "smooth_value", "float")
