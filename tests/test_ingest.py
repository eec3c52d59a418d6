"""A device application feeds its SuperNode through the ingest inbox; bad data is refused whole."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
from inprocess_helpers import fed_device

from clients.inbox import Inbox, IngestError, inbox_path
from clients.ingest import main
from clients.validation import validate_rows
from fedge.contracts.config_load import load_config
from fedge.scenarios import build_scenario
from fedge.scenarios.feed import feed_scenario


@pytest.fixture
def inbox(tmp_path: Path) -> Inbox:
    return Inbox(tmp_path / "device-0.inbox.sqlite", n_features=2, n_classes=2)


def test_inbox_sits_beside_the_device_store(tmp_path: Path) -> None:
    assert inbox_path(tmp_path / "device-3.sqlite") == tmp_path / "device-3.inbox.sqlite"


def test_rows_are_taken_up_to_the_polled_tick_in_arrival_order(inbox: Inbox) -> None:
    inbox.append(0, [[0.0, 0.1], [0.2, 0.3]], [0, 1])
    inbox.append(1, [[1.0, 1.1]], [1])
    last = inbox.append(3, [[3.0, 3.1]], [0]).batch_id
    first = inbox.take(after=0, through_tick=1)
    np.testing.assert_allclose(first.x, [[0.0, 0.1], [0.2, 0.3], [1.0, 1.1]], rtol=1e-6)
    assert first.y.tolist() == [0, 1, 1]
    rest = inbox.take(after=first.last_batch_id, through_tick=5)
    assert rest.y.tolist() == [0] and rest.last_batch_id == last
    assert inbox.take(after=last).empty


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        ([[0.0, 0.1], [0.2, math.nan]], [0, 1], "tick 4, row 1: a feature is NaN"),
        ([[0.0, 0.1], [0.2, 0.3, 0.4]], [0, 1], "tick 4, row 1: wrong number of features"),
        ([[0.0, 0.1], [0.2, 0.3]], [0, 7], "tick 4, row 1: the label is not one of"),
        ([[0.0, "high"]], [0], "tick 4, row 0: a feature is NaN, infinite or not a number"),
        ([[0.0, 0.1], [0.2, 0.3]], [0], "tick 4: x has 2 rows but y has 1 labels"),
    ],
)
def test_malformed_batch_is_refused_with_a_clear_error_and_nothing_is_stored(
    inbox: Inbox, x: list[list[object]], y: list[int], message: str
) -> None:
    inbox.append(3, [[0.5, 0.5]], [1])
    with pytest.raises(IngestError, match=message) as info:
        inbox.append(4, x, y)
    assert "nothing from this batch was stored" in str(info.value)
    assert "\n" not in str(info.value)
    assert len(inbox) == 1
    assert inbox.take().y.tolist() == [1]
    assert inbox.last_tick == 3


def test_several_batches_are_stored_all_or_none(inbox: Inbox) -> None:
    with pytest.raises(IngestError, match="tick 2, row 0"):
        inbox.append_many([(1, [[0.0, 0.0]], [0]), (2, [[math.inf, 0.0]], [1])])
    assert len(inbox) == 0


def test_the_inbox_is_append_only(inbox: Inbox) -> None:
    inbox.append(5, [[0.0, 0.0]], [0])
    with pytest.raises(IngestError, match="tick 4 is before the latest stored tick 5"):
        inbox.append(4, [[0.0, 0.0]], [0])
    with pytest.raises(IngestError, match="non-negative integer"):
        inbox.append(-1, [[0.0, 0.0]], [0])
    inbox.prune(inbox.take().last_batch_id)
    assert len(inbox) == 0
    with pytest.raises(IngestError, match="append-only"):
        inbox.append(2, [[0.0, 0.0]], [0])


def test_drop_mode_keeps_good_rows_and_counts_the_bad_ones(inbox: Inbox) -> None:
    receipt = inbox.append(0, [[0.0, 0.1], [math.nan, 0.0], [0.3, 0.3]], [0, 1, 9], on_invalid="drop")
    assert receipt.accepted == 1
    assert receipt.rejected == {"non_finite": 1, "wrong_width": 0, "unknown_label": 1, "total": 2}
    taken = inbox.take()
    assert taken.y.tolist() == [0] and taken.rejected["total"] == 2


def test_reopening_checks_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "device-0.inbox.sqlite"
    Inbox(path, n_features=2, n_classes=2).close()
    with pytest.raises(IngestError, match="holds rows with 2 features, 3 were given"):
        Inbox(path, n_features=3)
    with Inbox(path) as again:
        assert (again.n_features, again.n_classes) == (2, 2)
    with pytest.raises(IngestError, match="no inbox at"):
        Inbox(tmp_path / "missing.inbox.sqlite")
    other = tmp_path / "other.sqlite"
    other.write_bytes(b"this is not a database, just some bytes" * 10)
    with pytest.raises(IngestError, match="not a usable inbox"):
        Inbox(other, n_features=2, n_classes=2)


def test_scenario_feed_gives_the_device_the_rows_and_counts_of_its_generator(tmp_path: Path) -> None:
    cfg = load_config(None, ["scenario.clients=2", "scenario.ticks=4", "scenario.schedule.at=2", "scenario.bad_row_fraction=0.1"])
    scenario = build_scenario(cfg.scenario)
    path = tmp_path / "device-1.inbox.sqlite"
    receipts = feed_scenario(cfg, 1, path)
    assert [r.tick for r in receipts] == [0, 1, 2, 3]
    assert feed_scenario(cfg, 1, path) == [], "feeding again stores nothing twice"
    with Inbox(path) as inbox:
        cursor = 0
        for tick in range(4):
            taken = inbox.take(after=cursor, through_tick=tick)
            cursor = taken.last_batch_id
            expected = validate_rows(*scenario.batch(1, tick), scenario.n_features, scenario.n_classes)
            np.testing.assert_array_equal(taken.x, expected.x)
            np.testing.assert_array_equal(taken.y, expected.y)
            assert taken.rejected == expected.rejected


def test_cli_stores_a_csv_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "samples.csv"
    data.write_text("tick,a,b,label\n0,0.1,0.2,0\n0,0.3,0.4,1\n1,0.5,0.6,1\n")
    box = tmp_path / "device-0.inbox.sqlite"
    assert main([str(box), str(data), "--features", "2", "--classes", "2"]) == 0
    assert "stored 3 rows in 2 batches (ticks 0-1)" in capsys.readouterr().out
    with Inbox(box) as inbox:
        assert inbox.take().y.tolist() == [0, 1, 1]


def test_cli_stores_json_lines_with_a_default_tick(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Inbox(tmp_path / "box.sqlite", n_features=2, n_classes=3).close()
    data = tmp_path / "samples.jsonl"
    data.write_text('{"x": [0.1, 0.2], "y": 2}\n\n{"x": [0.3, 0.4], "y": 0, "tick": 8}\n')
    assert main([str(tmp_path / "box.sqlite"), str(data), "--tick", "7"]) == 0
    assert "ticks 7-8" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("tick,a,b,label\n0,0.1,0.2,0\n1,0.3,oops,1\n", "line 3, column 3 (b): not a number: 'oops'"),
        ("tick,a,b,label\n0,0.1,0.2,0\n1,0.3,nan,1\n", "line 3, column 3 (b): 'nan' is not a finite"),
        ("tick,a,b,label\n1,0.1,0.2,0\n0,0.3,0.4,1\n", "line 3: tick 0 comes after tick 1"),
        ("tick,a,b,c,label\n0,0.1,0.2,0.3,0\n", "the header has 3 feature columns, the inbox holds rows of 2"),
        ("tick,a,b,label\n0,0.1,0.2,0\n1,0.3\n", "line 3: 2 fields, the header has 4"),
        ("tick,a,b\n0,0.1,0.2\n", "the header has no 'label' column"),
        ("a,b,label\n0.1,0.2,0\n", "line 2: no tick"),
    ],
)
def test_cli_refuses_a_malformed_file_in_one_line_and_stores_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    box = tmp_path / "box.sqlite"
    with Inbox(box, n_features=2, n_classes=2) as inbox:
        inbox.append(0, [[0.5, 0.5]], [1])
    before = hashlib.sha256(box.read_bytes()).hexdigest()
    data = tmp_path / "samples.csv"
    data.write_text(content)
    assert main([str(box), str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedge-ingest: error: ") and err.count("\n") == 1
    assert message in err
    assert hashlib.sha256(box.read_bytes()).hexdigest() == before, "the inbox is exactly as it was"
    # The key file was made with the inbox, before this call.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box.key", "box.sqlite", "samples.csv"]


def test_cli_bad_arguments_get_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as missing_file:
        main([str(tmp_path / "box.sqlite"), str(tmp_path / "nope.csv")])
    assert missing_file.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
    (tmp_path / "ok.csv").write_text("tick,a,label\n0,1.0,0\n")
    assert main([str(tmp_path / "box.sqlite"), str(tmp_path / "ok.csv")]) == 2
    assert "a new inbox needs the row width" in capsys.readouterr().err


def test_device_reads_only_what_its_application_put_in_the_inbox(tmp_path: Path) -> None:
    from clients.device import Device

    if not hasattr(Device, "read_inbox"):
        pytest.skip("Device reads the inbox once docs/deployment-wiring.patch is applied")
    cfg = load_config(None, ["scenario.clients=1", "scenario.ticks=4", "scenario.schedule.at=2"])
    store = tmp_path / "device-0.sqlite"
    x = [[0.25, 0.5], [0.75, 0.125], [math.nan, 0.5]]
    with Inbox(inbox_path(store), n_features=2, n_classes=2) as inbox:
        inbox.append(0, x, [1, 0, 1], on_invalid="drop")
        inbox.append(2, [[0.5, 0.5]], [0])
    device = fed_device(cfg, 0, store)
    first = device.monitor_tick(0)
    assert (first.n_samples, first.rejected_non_finite) == (2, 1)
    window_x, window_y, _ = device.store.window()
    np.testing.assert_array_equal(window_x, np.asarray(x[:2], dtype=np.float32))
    assert window_y.tolist() == [1, 0]
    assert device.monitor_tick(1).n_samples == 0, "no rows for tick 1, and no generator rows either"
    device.close()
    again = fed_device(cfg, 0, store)
    assert again.monitor_tick(2).n_samples == 1, "a restarted device takes each batch once"
    with Inbox(inbox_path(store)) as inbox:
        assert len(inbox) == 0, "taken batches are pruned"
    again.close()
