"""An existing Flower app gets fedge's drift monitoring by one wrapper; its handlers stay as written.

The app is ``tests/flower_apps/digitsexample`` (the shape of Flower's
quickstart-pytorch, on 8x8 digits): its own data loader reads the node's
``partition-<id>.npz``, its own ``train``/``test`` loops run. fedge monitors
the rows of each device's ingest inbox. From tick ``DRIFT_AT`` on, labels 1 and
2 swap, in the inbox and in the app's data files alike (the node's sensor data
changed).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import digits, importable
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.client_app import forget_devices
from clients.flower_app import DOC, with_fedge
from clients.inbox import Inbox, inbox_path
from fedge.contracts.config_load import load_config
from fedge.contracts.wire import from_arrays, to_arrays
from fedge.core.ports import RunFailed
from fedge.core.records import CampaignRecord, TickRecord
from fedge.engines.inprocess import InProcessGrid
from fedge.server.app import run_server

APPS = Path(__file__).resolve().parent / "flower_apps"
ROOT = Path(__file__).resolve().parents[1]
CLIENTS, TICKS, DRIFT_AT, ROWS = 3, 7, 3, 120


@pytest.fixture(autouse=True)
def app_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tests/flower_apps`` importable here and in every process a run starts."""
    importable(monkeypatch, APPS)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    return digits()


def _swap(y: np.ndarray) -> np.ndarray:
    return np.where(y == 1, 2, np.where(y == 2, 1, y))


def _parts() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return np.array_split(rng.permutation(1797), CLIENTS)


def _write_app_data(data_dir: Path, swapped: bool) -> None:
    """Each node's images for the app's own loader (owner-only: they are samples)."""
    x, y = _digits()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for device, part in enumerate(_parts()):
        labels = _swap(y[part]) if swapped else y[part]
        path = data_dir / f"partition-{device}.npz"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, x=x[part], y=labels)


def _write_inboxes(folder: Path) -> None:
    """What fedge monitors: ``ROWS`` rows per tick from each node's images, swapped from ``DRIFT_AT``."""
    x, y = _digits()
    rng = np.random.default_rng(1)
    for device, part in enumerate(_parts()):
        path = inbox_path(folder / "devices" / f"device-{device}.sqlite")
        with Inbox(path, n_features=64, n_classes=10) as inbox:
            for tick in range(TICKS):
                idx = rng.choice(part, size=ROWS, replace=True)
                labels = _swap(y[idx]) if tick >= DRIFT_AT else y[idx]
                inbox.append(tick, x[idx], labels)


def _overrides(out: Path, task: str = "digitsexample.fedge_task") -> list[str]:
    return [
        'scenario.name="flower-app"',
        # The nodes' own data (written below); no generator is involved.
        'data.source="inbox"',
        "data.n_features=64",
        "data.n_classes=10",
        f"scenario.clients={CLIENTS}",
        f"scenario.ticks={TICKS}",
        f'model.task="{task}"',
        "campaign.rounds=4",
        "campaign.initial_rounds=4",
        "campaign.local_epochs=3",
        "campaign.lr=0.005",
        "campaign.batch_size=32",
        "trigger.cooldown=1",
        "run.reply_timeout=60",
        f'run.output_dir="{out}"',
    ]


def _run(
    tmp_path: Path, app: ClientApp, task: str = "digitsexample.fedge_task"
) -> tuple[dict, list[tuple[Message, Message]]]:
    (tmp_path / "out").mkdir(exist_ok=True)
    overrides = _overrides(tmp_path / "out", task)
    cfg = load_config(None, overrides)
    folder, data_dir = tmp_path / "run", tmp_path / "app-data"
    _write_inboxes(folder)
    _write_app_data(data_dir, swapped=False)
    run_config = {
        "scenario": "",
        "overrides": ";".join(overrides),
        "run-dir": str(folder),
        "data-dir": str(data_dir),  # the app's own setting, as in its pyproject.toml
    }
    grid = InProcessGrid(app, CLIENTS, run_config)
    crossed: list[tuple[Message, Message]] = []
    grid.on_exchange = lambda request, reply: crossed.append((request, reply))

    def on_tick(rec: TickRecord, campaign: CampaignRecord | None) -> None:
        if rec.tick == DRIFT_AT - 1:
            _write_app_data(data_dir, swapped=True)  # the node's data changes with the stream

    try:
        summary = run_server(grid, cfg, folder, on_tick=on_tick)
    finally:
        grid.close()
        forget_devices()
    return summary, crossed


def test_a_quickstart_shaped_app_with_fedge_retrains_on_drift_and_registers_a_model_it_loads(
    tmp_path: Path,
) -> None:
    import mlflow
    import mlflow.pytorch
    from digitsexample.client_app import app as flower_app
    from digitsexample.task import Net

    summary, crossed = _run(tmp_path, with_fedge(flower_app, task="digitsexample.fedge_task"))
    print([t["accuracy"] for t in summary["ticks"]],
          [(c["tick"], c["reason"], c["version"], c["promoted"], c["candidate_acc"],
            c["champion_acc"]) for c in summary["campaigns"]])
    assert not summary["device_errors"], summary["device_errors"]
    ticks = summary["ticks"]
    assert ticks[DRIFT_AT - 1]["accuracy"] > 0.8, "the app's model serves the devices"
    assert ticks[DRIFT_AT]["accuracy"] < ticks[DRIFT_AT - 1]["accuracy"] - 0.1, "the swap hurts"
    after = [c for c in summary["campaigns"] if c["tick"] >= DRIFT_AT]
    assert after and any(c["promoted"] for c in after), "the drift started a campaign that promoted"
    assert "drift" in after[0]["reason"], after[0]["reason"]
    assert after[0]["champion_acc"] > 0, "the gate compared with the model the devices serve"
    assert ticks[-1]["accuracy"] > ticks[DRIFT_AT]["accuracy"] + 0.1, "the retrained model recovers"

    # The app's own handlers trained: the example counts are its loaders' (80 % of a partition).
    sizes = {int(0.8 * len(p)) for p in _parts()}
    trained = [
        reply for request, reply in crossed
        if request.metadata.message_type == "train" and not reply.has_error()
    ]
    assert trained
    assert {int(r.content["metrics"]["num-examples"]) for r in trained} <= sizes
    assert set(trained[0].content["arrays"]) == set(Net().state_dict())
    evaluated = [
        reply.content["metrics"] for request, reply in crossed
        if request.metadata.message_type == "evaluate" and not reply.has_error()
    ]
    assert evaluated and all("champion_acc" in m for m in evaluated)

    # The registered version is the app's model: its own class loads the weights and predicts.
    uri = summary["tracking_uri"]
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("fedge-flower-app", "champion")
    assert int(version.version) == summary["champion"] >= 2
    assert version.tags["fedge.model_class"] == "digitsexample.task.Net"
    loaded = mlflow.pytorch.load_model("models:/fedge-flower-app@champion", map_location="cpu")
    net = Net()
    net.load_state_dict(loaded.state_dict())
    net.eval()
    x, y = _digits()
    images = torch.as_tensor(x.reshape(-1, 1, 8, 8))
    with torch.no_grad():
        predicted = net(images).argmax(1).numpy()
    assert float((predicted == _swap(y)).mean()) > 0.7, "it learned the swapped concept"
    ones = y == 1
    assert float((predicted[ones] == 2).mean()) > 0.5, "images of a 1 are called 2 now"


def test_a_bare_flower_app_stops_the_run_with_one_line_naming_the_doc(tmp_path: Path) -> None:
    from digitsexample.client_app import app as flower_app

    with pytest.raises(RunFailed) as failed:
        _run(tmp_path, flower_app)
    message = str(failed.value)
    assert "\n" not in message
    assert "no `query` handler" in message
    assert "with_fedge" in message and DOC in message


def test_an_app_wrapped_for_another_task_is_refused_on_the_first_poll(tmp_path: Path) -> None:
    from digitsexample.client_app import app as flower_app

    app = with_fedge(flower_app, task="digitsexample.other_task")
    with pytest.raises(RunFailed) as failed:
        _run(tmp_path, app)
    message = str(failed.value)
    assert "\n" not in message
    assert "model.task is 'digitsexample.fedge_task'" in message
    assert "set model.task = 'digitsexample.other_task'" in message


def test_the_users_handler_sees_the_campaign_settings_and_only_allowed_metrics_leave(
    tmp_path: Path,
) -> None:
    seen: list[Context] = []
    kept: list[int] = []
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        seen.append(context)
        mine = context.state.config_records.get("mine")
        kept.append(int(mine["calls"]) if mine is not None else 0)  # type: ignore[arg-type]
        context.state["mine"] = ConfigRecord({"calls": len(seen)})
        metrics = MetricRecord({"train_loss": 0.5, "num-examples": 7, "rows-with-label-3": 11})
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg)

    overrides = _overrides(tmp_path / "out")
    folder = tmp_path / "run"
    run_config = {"scenario": "", "overrides": ";".join(overrides), "run-dir": str(folder)}
    grid = InProcessGrid(with_fedge(app), 1, run_config)
    weights = {"w": np.ones((2, 3), dtype=np.float32)}
    config = {"lr": 0.25, "local-epochs": 4, "batch-size": 16, "server-round": 1}
    try:
        [reply] = grid.send_and_receive(
            [Message(RecordDict({"arrays": to_arrays(weights), "config": ConfigRecord(config)}),
                     1000, "train")]
        )
        [again] = grid.send_and_receive(
            [Message(RecordDict({"arrays": to_arrays(weights), "config": ConfigRecord({"lr": 0.1})}),
                     1000, "train")]
        )
    finally:
        grid.close()
        forget_devices()
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert dict(reply.content["metrics"]) == {"train_loss": 0.5, "num-examples": 7}
    first, second = seen
    assert (first.run_config["lr"], first.run_config["local-epochs"], first.run_config["batch-size"]) == (
        0.25, 4, 16)
    # Settings the server did not send are the run's [campaign] values.
    assert (second.run_config["local-epochs"], second.run_config["batch-size"]) == (3, 32)
    assert first.node_config["partition-id"] == 0 and first.node_config["num-partitions"] == 1
    assert kept == [0, 1], "what the app keeps in the node's state persists across messages"
    assert not again.has_error()
    audit = folder / "devices" / "device-0.audit.jsonl"
    assert audit.exists() and "rows-with-label-3" not in audit.read_text()


def test_the_users_upload_is_compressed_when_the_run_asks_and_decodes_to_its_weights(
    tmp_path: Path,
) -> None:
    from fedge.contracts.compression import decode_update, encoded_shapes

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        state = msg.content["arrays"].to_torch_state_dict()
        trained = ArrayRecord({k: v + 0.5 for k, v in state.items()})
        metrics = MetricRecord({"train_loss": 0.5, "num-examples": 7})
        return Message(RecordDict({"arrays": trained, "metrics": metrics}), reply_to=msg)

    overrides = _overrides(tmp_path / "out")
    folder = tmp_path / "run"
    # The device's residual (error feedback) lives in its store, which needs its inbox.
    with Inbox(inbox_path(folder / "devices" / "device-0.sqlite"), n_features=64, n_classes=10) as box:
        box.append(0, np.zeros((4, 64), dtype=np.float32), np.zeros(4, dtype=np.int64))
    run_config = {"scenario": "", "overrides": ";".join(overrides), "run-dir": str(folder)}
    grid = InProcessGrid(with_fedge(app), 1, run_config)
    weights = {"a": np.zeros((3, 4), dtype=np.float32), "b": np.ones(5, dtype=np.float32)}
    config = ConfigRecord({"lr": 0.1, "compression": "float16", "tick": 1})
    try:
        [reply] = grid.send_and_receive(
            [Message(RecordDict({"arrays": to_arrays(weights), "config": config}), 1000, "train")]
        )
    finally:
        grid.close()
        forget_devices()
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    sent = from_arrays(reply.content["arrays"])
    assert {k: v.shape for k, v in sent.items()} == encoded_shapes(
        {k: v.shape for k, v in weights.items()}, "float16"
    )
    decoded = decode_update(sent, weights, "float16")
    assert all(np.allclose(decoded[k], weights[k] + 0.5) for k in weights)


def test_a_reply_without_num_examples_is_refused_with_one_line(tmp_path: Path) -> None:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"train_loss": 0.5})
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg)

    overrides = _overrides(tmp_path / "out")
    run_config = {"scenario": "", "overrides": ";".join(overrides), "run-dir": str(tmp_path / "run")}
    grid = InProcessGrid(with_fedge(app), 1, run_config)
    weights = {"w": np.ones(3, dtype=np.float32)}
    try:
        [reply] = grid.send_and_receive(
            [Message(RecordDict({"arrays": to_arrays(weights), "config": ConfigRecord({"lr": 0.1})}),
                     1000, "train")]
        )
    finally:
        grid.close()
        forget_devices()
    assert reply.has_error()
    assert "no 'num-examples' metric" in reply.error.reason and DOC in reply.error.reason


def test_with_fedge_refuses_what_is_not_a_clientapp() -> None:
    with pytest.raises(TypeError, match="expected a flwr.clientapp.ClientApp, got function"):
        with_fedge(lambda msg, context: msg)  # type: ignore[arg-type]


def test_the_wrapper_loads_only_device_code() -> None:
    code = "import sys, clients.flower_app; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    loaded = set(out.stdout.split())
    forbidden = ("fedge.server", "fedge.core", "fedge.tracking", "fedge.scenarios", "mlflow", "sklearn")
    assert not {m for m in loaded for f in forbidden if m == f or m.startswith(f + ".")}


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("clients.client_app", "is not of the form 'module:attribute'"),
        ("no_such_fedge_app:app", "cannot be loaded (ModuleNotFoundError"),
        ("json:dumps", "is a function, not a Flower ClientApp"),
    ],
)
def test_run_client_app_names_a_flower_client_app_or_is_refused_in_one_line(spec: str, says: str) -> None:
    from fedge.contracts.config import ConfigError
    from fedge.runner import load_client_app

    with pytest.raises(ConfigError, match=re.escape(says)) as refused:
        load_client_app(spec)
    assert "\n" not in str(refused.value)


def test_a_wrapped_app_named_in_run_client_app_is_what_fedge_run_loads(tmp_path: Path) -> None:
    from clients.client_app import app as fedge_app
    from fedge.contracts.config import ConfigError
    from fedge.runner import RunRequest, load_client_app, run

    assert load_client_app("") is fedge_app
    wrapped = load_client_app("digitsexample.monitored_app:app")
    assert isinstance(wrapped, ClientApp) and wrapped is not fedge_app
    with pytest.raises(ConfigError, match="only the in-process engine takes it"):
        run(RunRequest(None, ('run.client_app="digitsexample.monitored_app:app"',
                              f'run.output_dir="{tmp_path}"'), "simulation"))
    assert not any(tmp_path.iterdir()), "refused before anything was created"
