"""Behaviour of fedge.tracking against real SQLite MLflow stores."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedge.tracking import (
    Tracker,
    TrackingError,
    default_tracking_uri,
    list_model_versions,
    ui_command,
)


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _assert_same_state(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value)


X = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store per module: creating an MLflow database takes seconds."""
    return default_tracking_uri(tmp_path_factory.mktemp("store"))


@pytest.fixture
def names(request: pytest.FixtureRequest) -> tuple[str, str]:
    """An experiment and a model name that no other test uses."""
    test = request.node.name.replace("[", "-").replace("]", "")
    return f"exp-{test}", f"model-{test}"


@pytest.fixture
def client(store: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store, registry_uri=store)


def _model_dir(client: Any, model_name: str, version: int) -> str:
    """Artifact folder of a registered version, found without MLflow's global URI."""
    source = client.get_model_version(model_name, str(version)).source
    location = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    return urllib.parse.unquote(urllib.parse.urlsplit(location).path)


def test_default_tracking_uri_is_an_absolute_sqlite_file_in_the_output_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri(Path("out"))
    assert uri == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    assert uri.startswith("sqlite:////")


def test_params_tags_and_metrics_land_in_the_run(
    store: str, names: tuple[str, str], client: Any
) -> None:
    experiment, model_name = names
    tracker = Tracker(store, experiment, model_name, run_name="sine2-run")
    run_id = tracker.start(
        {"rounds": 3, "lr": 0.05, "clients": [1, 2], "notes": "x" * 7000},
        tags={"fedge.scenario": "sine2"},
    )
    tracker.log_metrics({"accuracy": 0.5, "loss": 1.25}, step=1)
    tracker.log_metrics({"accuracy": 0.75}, step=2)
    tracker.end()

    run = client.get_run(run_id)
    assert run.info.run_name == "sine2-run"
    assert run.info.status == "FINISHED"
    assert run.data.tags["fedge.scenario"] == "sine2"
    params = run.data.params
    assert (params["rounds"], params["lr"], params["clients"]) == ("3", "0.05", "[1, 2]")
    assert len(params["notes"]) == 6000 and params["notes"].endswith("...")
    history = client.get_metric_history(run_id, "accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]
    assert run.data.metrics["loss"] == 1.25

    db_dir = Path(store.removeprefix("sqlite:///")).parent
    exp = client.get_experiment(tracker.experiment_id)
    assert exp.artifact_location == (db_dir / "mlartifacts").as_uri()


def test_event_is_a_json_artifact_with_its_payload_and_is_counted(
    store: str, names: tuple[str, str], client: Any
) -> None:
    tracker = Tracker(store, *names)
    run_id = tracker.start({})
    reports = {"devices": [{"node": np.int64(3), "drift": True, "errors": np.array([0.5, 1.0])}]}
    tracker.log_event("drift_trigger", 7, reports)
    tracker.log_event("drift_trigger", 12, {"devices": [{"node": 4, "drift": True}]})

    local = client.download_artifacts(run_id, "events/tick-0007-drift_trigger.json")
    record = json.loads(Path(local).read_text())
    assert record["kind"] == "drift_trigger" and record["tick"] == 7
    assert record["payload"] == {"devices": [{"node": 3, "drift": True, "errors": [0.5, 1.0]}]}

    run = client.get_run(run_id)
    assert run.data.tags["fedge.last_event"] == "events/tick-0012-drift_trigger.json"
    counts = client.get_metric_history(run_id, "events/drift_trigger")
    assert [(m.step, m.value) for m in counts] == [(7, 1.0), (12, 2.0)]
    assert [(e["kind"], e["tick"]) for e in tracker.events] == [
        ("drift_trigger", 7),
        ("drift_trigger", 12),
    ]
    assert tracker.events[0]["payload"] == record["payload"]


def test_repeated_event_in_one_tick_keeps_both_artifacts(
    store: str, names: tuple[str, str], client: Any
) -> None:
    tracker = Tracker(store, *names)
    run_id = tracker.start({})
    tracker.log_event("campaign", 4, {"reason": "drift"})
    tracker.log_event("campaign", 4, {"reason": "periodic"})
    files = sorted(a.path for a in client.list_artifacts(run_id, "events"))
    assert files == ["events/tick-0004-campaign-2.json", "events/tick-0004-campaign.json"]
    with pytest.raises(ValueError, match="event kind"):
        tracker.log_event("drift trigger/../x", 5, {})


def test_register_model_twice_gives_versions_1_and_2_with_tags_and_signature(
    store: str, names: tuple[str, str], client: Any
) -> None:
    import mlflow

    experiment, model_name = names
    tracker = Tracker(store, experiment, model_name)
    run_id = tracker.start({})
    first, second = _net(0), _net(1)

    assert tracker.register_model(first, X, {"round": "3", "parent": "0"}) == 1
    assert tracker.register_model(second, X, {"round": "6", "parent": "1"}) == 2

    for version, model, tags in [(1, first, {"round": "3"}), (2, second, {"round": "6"})]:
        mv = client.get_model_version(model_name, str(version))
        assert mv.tags["round"] == tags["round"]
        assert mv.run_id == run_id
        where = _model_dir(client, model_name, version)
        signature = mlflow.models.Model.load(where).signature
        assert signature is not None
        assert signature.inputs.to_dict()[0]["tensor-spec"] == {
            "dtype": "float32",
            "shape": (-1, 2),
        }
        loaded = mlflow.pytorch.load_model(where)
        with torch.no_grad():
            np.testing.assert_allclose(
                loaded(torch.from_numpy(X)).numpy(), model(torch.from_numpy(X)).numpy(), rtol=1e-6
            )


def test_register_model_keeps_training_mode_and_a_dynamic_batch(
    store: str, names: tuple[str, str], client: Any
) -> None:
    import mlflow

    experiment, model_name = names
    tracker = Tracker(store, experiment, model_name)
    tracker.start({})
    model = _net(2).train()
    version = tracker.register_model(model, X[:1].astype(np.float64), {})
    assert model.training
    loaded = mlflow.pytorch.load_model(_model_dir(client, model_name, version))
    assert loaded(torch.from_numpy(X)).shape == (5, 2)


def test_register_model_prints_nothing(
    store: str, names: tuple[str, str], capfd: pytest.CaptureFixture[str]
) -> None:
    tracker = Tracker(store, *names)
    tracker.start({"rounds": 1})
    capfd.readouterr()
    tracker.set_champion(tracker.register_model(_net(0), X, {"round": "1"}))
    tracker.end()
    assert capfd.readouterr() == ("", "")


def test_set_champion_moves_the_alias_and_champion_returns_its_weights(
    store: str, names: tuple[str, str]
) -> None:
    tracker = Tracker(store, *names)
    tracker.start({})
    first, second = _net(0), _net(1)
    v1 = tracker.register_model(first, X, {})
    v2 = tracker.register_model(second, X, {})

    tracker.set_champion(v1)
    found = tracker.champion()
    assert found is not None and found[0] == v1
    _assert_same_state(found[1], _state(first))

    tracker.set_champion(v2)
    holders = [v["version"] for v in tracker.versions() if "champion" in v["aliases"]]
    assert holders == [v2]
    found = tracker.champion()
    assert found is not None and found[0] == v2
    _assert_same_state(found[1], _state(second))


def test_champion_is_none_without_a_registered_model_or_alias(
    store: str, names: tuple[str, str]
) -> None:
    tracker = Tracker(store, *names)
    assert tracker.champion() is None
    assert tracker.versions() == []
    tracker.start({})
    tracker.register_model(_net(0), X, {})
    assert tracker.champion() is None
    assert tracker.champion("staging") is None


def test_restarted_server_finds_the_same_champion(store: str, names: tuple[str, str]) -> None:
    experiment, model_name = names
    model = _net(5)
    with Tracker(store, experiment, model_name) as tracker:
        tracker.start({})
        tracker.register_model(_net(4), X, {})
        tracker.set_champion(tracker.register_model(model, X, {}))

    fresh = Tracker(store, experiment, model_name, run_name="after-restart")
    found = fresh.champion()
    assert found is not None and found[0] == 2
    _assert_same_state(found[1], _state(model))

    script = (
        "import json, sys\n"
        "from fedge.tracking import Tracker\n"
        "version, state = Tracker(*sys.argv[1:4]).champion()\n"
        "print(json.dumps([version, {k: v.tolist() for k, v in state.items()}]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, store, experiment, model_name],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    version, state = json.loads(done.stdout)
    assert version == 2
    _assert_same_state(
        {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}, _state(model)
    )


def test_versions_ascend_with_aliases_tags_and_lineage(store: str, names: tuple[str, str]) -> None:
    tracker = Tracker(store, *names)
    run_id = tracker.start({})
    for round_ in (3, 6, 9):
        tracker.register_model(_net(round_), X, {"round": str(round_)})
    tracker.set_champion(2)

    rows = tracker.versions()
    assert [r["version"] for r in rows] == [1, 2, 3]
    assert [r["tags"]["round"] for r in rows] == ["3", "6", "9"]
    assert [r["aliases"] for r in rows] == [[], ["champion"], []]
    assert all(r["run_id"] == run_id for r in rows)
    created = [r["created"] for r in rows]
    assert created == sorted(created)


def test_list_model_versions_covers_every_model_or_one(store: str, names: tuple[str, str]) -> None:
    experiment, model_name = names
    a = Tracker(store, experiment, f"{model_name}-a")
    a.start({})
    a.register_model(_net(0), X, {})
    b = Tracker(store, experiment, f"{model_name}-b")
    b.start({})
    b.register_model(_net(1), X, {})
    b.register_model(_net(2), X, {})

    everything = [(r["name"], r["version"]) for r in list_model_versions(store)]
    assert [row for row in everything if row[0].startswith(model_name)] == [
        (f"{model_name}-a", 1),
        (f"{model_name}-b", 1),
        (f"{model_name}-b", 2),
    ]
    assert [r["version"] for r in list_model_versions(store, f"{model_name}-b")] == [1, 2]
    assert list_model_versions(store, f"{model_name}-unknown") == []


def test_list_model_versions_does_not_create_a_missing_store(tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path)
    with pytest.raises(TrackingError, match="no MLflow tracking store"):
        list_model_versions(uri)
    assert list(tmp_path.iterdir()) == []


def test_trackers_on_two_stores_in_one_process_stay_apart(
    store: str, names: tuple[str, str], tmp_path: Path
) -> None:
    import mlflow

    global_uri = mlflow.get_tracking_uri()
    experiment, model_name = names
    other_uri = default_tracking_uri(tmp_path)
    here = Tracker(store, experiment, model_name)
    there = Tracker(other_uri, experiment, model_name)
    here.start({})
    there.start({})
    model_here, model_there = _net(7), _net(8)
    here.set_champion(here.register_model(model_here, X, {"store": "here"}))
    there.set_champion(there.register_model(model_there, X, {"store": "there"}))

    assert [r["tags"]["store"] for r in here.versions()] == ["here"]
    assert [r["tags"]["store"] for r in there.versions()] == ["there"]
    here_champion, there_champion = here.champion(), there.champion()
    assert here_champion is not None and there_champion is not None
    _assert_same_state(here_champion[1], _state(model_here))
    _assert_same_state(there_champion[1], _state(model_there))
    assert mlflow.get_tracking_uri() == global_uri


def test_logging_needs_a_started_run_and_end_is_idempotent(
    store: str, names: tuple[str, str], client: Any
) -> None:
    tracker = Tracker(store, *names)
    with pytest.raises(RuntimeError, match="start"):
        tracker.log_metrics({"accuracy": 1.0}, step=0)
    tracker.end()
    run_id = tracker.start({})
    with pytest.raises(RuntimeError, match="already started"):
        tracker.start({})
    tracker.end("FAILED")
    tracker.end("FINISHED")
    assert client.get_run(run_id).info.status == "FAILED"
    with pytest.raises(RuntimeError, match="ended"):
        tracker.log_event("drift_trigger", 1, {})
    with pytest.raises(ValueError, match="status"):
        tracker.end("DONE")


def test_log_dict_and_log_artifact_store_files_in_the_run(
    store: str, names: tuple[str, str], client: Any, tmp_path: Path
) -> None:
    tracker = Tracker(store, *names)
    run_id = tracker.start({})
    tracker.log_dict({"accuracy": np.float32(0.5), "ticks": np.arange(3)}, "summary.json")
    plot = tmp_path / "accuracy.png"
    plot.write_bytes(b"\x89PNG")
    tracker.log_artifact(plot)
    tracker.log_artifact(plot, "plots")
    with pytest.raises(FileNotFoundError):
        tracker.log_artifact(tmp_path / "missing.png")

    summary = Path(client.download_artifacts(run_id, "summary.json")).read_text()
    assert json.loads(summary) == {"accuracy": 0.5, "ticks": [0, 1, 2]}
    paths = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.json", "accuracy.png", "plots"} <= paths


@pytest.mark.parametrize(
    "uri",
    [
        "foo://bar",
        "sqlite:///{tmp}/missing/x/y.db",
        "http://127.0.0.1:1",
        "sqlite://",
        "",
    ],
)
def test_bad_tracking_uri_raises_one_line_tracking_error(uri: str, tmp_path: Path) -> None:
    uri = uri.format(tmp=tmp_path)
    with pytest.raises(TrackingError) as caught:
        Tracker(uri, "exp", "model")
    message = str(caught.value)
    assert "\n" not in message
    assert uri in message if uri else "empty" in message
    error = caught.value
    assert error.__cause__ is None
    assert error.__suppress_context__ or error.__context__ is None
    assert not (tmp_path / "missing").exists()


def test_ui_command_opens_the_store(tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path / "with space")
    command = ui_command(uri)
    assert command.startswith("mlflow ui --backend-store-uri ")
    assert shlex.split(command) == ["mlflow", "ui", "--backend-store-uri", uri]
