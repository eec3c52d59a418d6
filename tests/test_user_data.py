"""The devices' own data: a folder per device (CSV, NumPy, Parquet) or Python, no generator ever."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest

from clients.inbox import Inbox, IngestError, inbox_path, ingest
from clients.sources import FolderSource, feed
from fedge import scenarios
from fedge.contracts.config import ConfigError
from fedge.contracts.config_load import load_config
from fedge.runner import RunRequest, run

DEVICES, TICKS, ROWS, WIDTH, CLASSES, DRIFT_AT = 3, 12, 60, 5, 3, 6
CENTRES = np.random.default_rng(7).normal(scale=3.0, size=(CLASSES, WIDTH))


def _tick_rows(device: int, tick: int) -> tuple[np.ndarray, np.ndarray]:
    """Blobs around fixed centres; from DRIFT_AT on, every device's labels are rotated."""
    rng = np.random.default_rng([device, tick])
    c = rng.integers(0, CLASSES, ROWS)
    x = CENTRES[c] + rng.normal(size=(ROWS, WIDTH))
    y = (c + 1) % CLASSES if tick >= DRIFT_AT else c
    return x, y


def _csv(path: Path, x: np.ndarray, y: np.ndarray, ticks: np.ndarray | None = None) -> None:
    header = ([] if ticks is None else ["tick"]) + [f"f{i}" for i in range(WIDTH)] + ["label"]
    lines = [",".join(header)]
    for i in range(len(y)):
        cells = ([] if ticks is None else [str(int(ticks[i]))]) + [f"{v:.5f}" for v in x[i]] + [str(int(y[i]))]
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")


def write_folder(root: Path) -> Path:
    """device-0: one CSV per tick (no tick column); device-1: one CSV with a tick column;
    device-2: one .npz per tick, rows stored as (1, 5) "images"."""
    root.mkdir(parents=True)
    (root / "device-0").mkdir()
    (root / "device-2").mkdir()
    whole_x, whole_y, whole_t = [], [], []
    for t in range(TICKS):
        x, y = _tick_rows(0, t)
        _csv(root / "device-0" / f"tick-{t:03d}.csv", x, y)
        x, y = _tick_rows(1, t)
        whole_x.append(x), whole_y.append(y), whole_t.append(np.full(ROWS, t))
        x, y = _tick_rows(2, t)
        np.savez(root / "device-2" / f"{t:03d}.npz", x=x.reshape(ROWS, 1, WIDTH), y=y)
    _csv(root / "device-1.csv", np.concatenate(whole_x), np.concatenate(whole_y), np.concatenate(whole_t))
    (root / "device-2" / "notes.txt").write_text("not data: ignored")
    return root


def test_a_folder_of_own_data_runs_with_no_generator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_folder(tmp_path / "data")

    def no_generator(*_: object, **__: object) -> None:
        raise AssertionError("a built-in generator was built for a run on the devices' own data")

    monkeypatch.setattr(scenarios, "build_scenario", no_generator)
    monkeypatch.setattr("fedge.scenarios.feed.build_scenario", no_generator)
    out = tmp_path / "out"
    summary = run(
        RunRequest(
            None,
            (
                'data.source="folder"',
                f"data.path={json.dumps(str(root))}",
                f"run.output_dir={json.dumps(str(out))}",
                'scenario.name="own-data"',
                "scenario.bad_row_fraction=0.0",
            ),
        )
    )
    assert not summary["device_errors"], summary["device_errors"]
    ticks = summary["ticks"]
    assert len(ticks) == TICKS, "the run covers the folder's ticks"
    assert all(t["n_samples"] == DEVICES * ROWS for t in ticks[1:]), "every device read its own rows"
    before, after = ticks[DRIFT_AT - 1]["accuracy"], ticks[DRIFT_AT]["accuracy"]
    assert before > 0.75 and after < 0.5, (before, after)
    assert any(c["tick"] >= DRIFT_AT and c["promoted"] for c in summary["campaigns"]), summary["campaigns"]
    assert ticks[-1]["accuracy"] > 0.8, "the retrained model fits the rotated labels"
    assert summary["drift_steps"] == [], "own data has no schedule: no invented drift table"

    config = load_config(Path(summary["run_dir"]) / "config.toml")
    assert (config.scenario.clients, config.data.n_features, config.data.n_classes) == (DEVICES, WIDTH, CLASSES)
    for device in range(DEVICES):
        box = inbox_path(Path(summary["run_dir"]) / "devices" / f"device-{device}.sqlite")
        with sqlite3.connect(box) as conn:
            origin = conn.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()[0]
            sources = {s for (s,) in conn.execute("SELECT DISTINCT source FROM batches")}
        assert origin == "device" and "scenario" not in sources


def test_no_generated_row_joins_a_user_inbox_and_no_user_row_a_scenario_inbox(tmp_path: Path) -> None:
    box = tmp_path / "device-0.inbox.sqlite"
    ingest(box, [(0, [[0.1, 0.2]], [1])], n_features=2, n_classes=2, source="sensor.csv")
    with pytest.raises(IngestError, match="holds the device application's own rows; generated rows would be mixed"):
        ingest(box, [(1, [[0.3, 0.4]], [0])], source="scenario")
    other = tmp_path / "device-1.inbox.sqlite"
    ingest(other, [(0, [[0.1, 0.2]], [1])], n_features=2, n_classes=2, source="scenario")
    with pytest.raises(IngestError, match="holds a scenario's generated rows; own rows would be mixed"):
        ingest(other, [(1, [[0.3, 0.4]], [0])], source="sensor.csv")
    with Inbox(box) as inbox:
        assert len(inbox.take().x) == 1, "the refused call stored nothing"


def test_feeding_again_stores_only_new_ticks(tmp_path: Path) -> None:
    folder = tmp_path / "device-0"
    folder.mkdir()
    x, y = _tick_rows(0, 0)
    _csv(folder / "a.csv", x, y)
    box = tmp_path / "device-0.inbox.sqlite"
    assert len(feed(FolderSource(folder), box, n_features=WIDTH, n_classes=CLASSES)) == 1
    _csv(folder / "b.csv", *_tick_rows(0, 1))
    receipts = feed(FolderSource(folder), box, n_features=WIDTH, n_classes=CLASSES)
    assert [r.tick for r in receipts] == [1], "the file already fed is not stored twice"


def test_parquet_files_are_read_a_row_group_at_a_time(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    x, y = _tick_rows(0, 0)
    table = pa.table({**{f"f{i}": x[:, i] for i in range(WIDTH)}, "label": y, "tick": np.repeat([0, 1], ROWS // 2)})
    pq.write_table(table, tmp_path / "device-0.parquet", row_group_size=7)
    batches = list(FolderSource(tmp_path / "device-0.parquet").batches())
    assert sum(len(b[2]) for b in batches) == ROWS and {b[0] for b in batches} == {0, 1}
    np.testing.assert_allclose(np.concatenate([b[1] for b in batches]), x)


def test_a_python_source_feeds_the_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "my_stream.py"
    module.write_text(
        "import numpy as np\n"
        "N_FEATURES, N_CLASSES = 2, 2\n"
        "def source(device_id):\n"
        "    for tick in range(4):\n"
        "        rng = np.random.default_rng([device_id, tick])\n"
        "        x = rng.normal(size=(20, 2))\n"
        "        yield tick, x, (x[:, 0] > 0).astype(int)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, ['data.source="python"', 'data.module="my_stream"', "scenario.clients=2", "scenario.ticks=4"])
    from fedge.scenarios.feed import feed_scenario

    receipts = feed_scenario(cfg, 1, tmp_path / "device-1.inbox.sqlite")
    assert [r.tick for r in receipts] == [0, 1, 2, 3] and all(r.accepted == 20 for r in receipts)
    sys.modules.pop("my_stream", None)


@pytest.mark.parametrize(
    ("setup", "overrides", "says"),
    [
        ("none", ['data.source="folder"'], "data.path: required"),
        ("none", ['data.source="folder"', 'data.path="/nonexistent/fedge-data"'], "is not a folder"),
        ("gap", ['data.source="folder"'], "has device-2 but no device-1"),
        ("empty", ['data.source="folder"'], "has no device-<i> folder or file"),
        ("widths", ['data.source="folder"'], "different widths [2, 3]"),
        ("none", ['data.source="python"'], "data.module: required"),
        ("none", ['data.source="python"', 'data.module="no_such_fedge_module"'], "cannot be imported"),
        ("none", ['data.path="/x"'], 'only read with data.source = "folder"'),
    ],
)
def test_unusable_data_is_one_line(tmp_path: Path, setup: str, overrides: list[str], says: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    if setup == "gap":
        for i in (0, 2):
            _csv(root / f"device-{i}.csv", *_tick_rows(i, 0))
    elif setup == "widths":
        (root / "device-0.csv").write_text("a,b,label\n0.1,0.2,0\n")
        (root / "device-1.csv").write_text("a,b,c,label\n0.1,0.2,0.3,0\n")
    if setup != "none":
        overrides = [*overrides, f"data.path={json.dumps(str(root))}"]
    with pytest.raises(ConfigError) as refused:
        load_config(None, overrides)
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_a_run_in_which_no_device_held_a_usable_row_fails_and_says_why(tmp_path: Path) -> None:
    from fedge.core.ports import RunFailed

    root = tmp_path / "data"
    root.mkdir()
    for device in range(2):  # every row has a non-finite feature: dropped and counted at ingest
        (root / f"device-{device}.csv").write_text("tick,a,b,label\n0,nan,0.1,0\n1,0.2,inf,1\n")
    overrides = ('data.source="folder"', f"data.path={json.dumps(str(root))}",
                 f"run.output_dir={json.dumps(str(tmp_path / 'out'))}")
    with pytest.raises(RunFailed, match=r"no device held a usable row in any of 2 ticks \(4 rows rejected\)"):
        run(RunRequest(None, overrides))
