"""A user's own task (model, input shape, label kind) runs end to end and loads back from MLflow.

The task modules live in ``tests/tasks/``, outside the fedge package; the tests
put that folder on ``PYTHONPATH`` (as a user installs their own package), so
the in-process engine and Flower's simulation workers import them by name.
Devices get their rows only from their inbox, written here before the run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import digits, importable
from torch import nn

from clients.inbox import Inbox, inbox_path
from fedge.contracts import model as nets
from fedge.contracts.config import ConfigError
from fedge.contracts.config_load import load_config
from fedge.runner import RunRequest, quiet_tick, run

TASKS = Path(__file__).resolve().parent / "tasks"
CLIENTS, TICKS, DRIFT_AT, ROWS = 3, 6, 3, 120


@pytest.fixture(autouse=True)
def task_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tests/tasks`` importable here and in every process a run starts."""
    importable(monkeypatch, TASKS)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    return digits()


def _overrides(task: str, out: Path) -> tuple[str, ...]:
    # The devices' own applications fill their inboxes (below); no generator is involved.
    return (
        'scenario.name="task-test"',
        'data.source="inbox"',
        "data.n_features=64",
        "data.n_classes=10",
        f"scenario.clients={CLIENTS}",
        f"scenario.ticks={TICKS}",
        f'model.task="{task}"',
        "campaign.rounds=2",
        "campaign.initial_rounds=4",
        "campaign.local_epochs=3",
        "campaign.lr=0.01",
        "trigger.cooldown=1",
        f'run.output_dir="{out}"',
    )


def _write_inboxes(folder: Path, drift: str) -> int:
    """Each device's own digits, flat rows of 64, ``ROWS`` per tick; drift from ``DRIFT_AT`` on.

    ``drift="swap"``: labels 1 and 2 swap; ``drift="mirror"``: a digit's value v becomes 9 - v.
    Returns the number of rows written.
    """
    x, y = _digits()
    rng = np.random.default_rng(0)
    parts = np.array_split(rng.permutation(len(y)), CLIENTS)
    written = 0
    for device, part in enumerate(parts):
        path = inbox_path(folder / "devices" / f"device-{device}.sqlite")
        with Inbox(path, n_features=64, n_classes=10) as inbox:
            for tick in range(TICKS):
                idx = rng.choice(part, size=ROWS, replace=True)
                labels = y[idx].copy()
                if tick >= DRIFT_AT and drift == "swap":
                    labels = np.where(labels == 1, 2, np.where(labels == 2, 1, labels))
                elif tick >= DRIFT_AT and drift == "mirror":
                    labels = 9 - labels
                inbox.append(tick, x[idx], labels)
                written += len(idx)
    return written


def _run(
    task: str, tmp_path: Path, engine: str, drift: str, more: tuple[str, ...] = ()
) -> tuple[dict, Path]:
    folder = tmp_path / "run"
    _write_inboxes(folder, drift)
    overrides = (*_overrides(task, tmp_path / "out"), *more)
    summary = run(RunRequest(None, overrides, engine), on_tick=quiet_tick, run_dir=folder)
    print(task, engine, [t["accuracy"] for t in summary["ticks"]],
          [(c["tick"], c["version"], c["promoted"], c["candidate_acc"]) for c in summary["campaigns"]])
    return summary, folder


def _champion(summary: dict) -> tuple[nn.Module, dict[str, str]]:
    """The champion as MLflow gives it back, and its version's tags."""
    import mlflow
    import mlflow.pytorch

    uri = summary["tracking_uri"]
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = "fedge-task-test"
    version = client.get_model_version_by_alias(name, "champion")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    loaded = mlflow.pytorch.load_model(f"models:/{name}@champion", map_location="cpu")
    return loaded, dict(version.tags)


def _check_cnn_champion(summary: dict) -> None:
    import digits_cnn

    assert summary["champion"] >= 1, "a campaign registered and promoted a version"
    loaded, tags = _champion(summary)
    assert tags["fedge.task"] == "digits_cnn"
    assert tags["fedge.model_class"] == "digits_cnn.Net"
    # MLflow's pickle-free pt2 format gives back the exported program of the user's class:
    # its state is exactly that class's, and it predicts on image batches.
    net = digits_cnn.Net()
    net.load_state_dict(loaded.state_dict())
    net.eval()
    x, y = _digits()
    images = torch.as_tensor(x[:200].reshape(-1, 1, 8, 8))
    with torch.no_grad():
        ours = net(images)
        theirs = loaded(images)
    assert theirs.shape == (200, 10)
    assert torch.allclose(ours, theirs, atol=1e-5)
    acc = float((theirs.argmax(1).numpy() == y[:200]).mean())
    assert acc > 0.5, f"the federated CNN learned the digits (accuracy {acc:.2f})"
    _check_loads_as_the_users_class(summary, images, theirs)


def _check_loads_as_the_users_class(summary: dict, images: torch.Tensor, expected: torch.Tensor) -> None:
    """fedge.models.load_model gives the task's own class back, and refuses changed weights."""
    import digits_cnn
    import mlflow

    from fedge.models import ModelLoadError, load_model

    uri = summary["tracking_uri"]
    from fedge.contracts.signing import public_key_path

    key = public_key_path(Path(summary["config"]["run.output_dir"]))
    assert key.is_file(), key
    net = load_model("fedge-task-test", tracking_uri=uri, public_key=key)
    assert type(net) is digits_cnn.Net, type(net)
    with torch.no_grad():
        assert torch.allclose(net(images), expected, atol=1e-5)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("fedge-task-test", "champion").version
    client.set_model_version_tag("fedge-task-test", version, "fedge.model_sha256", "00" * 32)
    with pytest.raises(ModelLoadError, match="do not match their registered digest"):
        load_model("fedge-task-test", tracking_uri=uri)
    with pytest.raises(ModelLoadError, match="no alias 'nope'"):
        load_model("fedge-task-test", tracking_uri=uri, alias="nope")


def _signature_shape(summary: dict) -> list:
    import mlflow
    from mlflow.models import Model

    uri = summary["tracking_uri"]
    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts("models:/fedge-task-test@champion")
    inputs = Model.load(str(Path(local) / "MLmodel")).signature.inputs.to_dict()
    return list(inputs[0]["tensor-spec"]["shape"])


def test_a_cnn_task_on_digit_images_runs_in_process_and_loads_back(tmp_path: Path) -> None:
    summary, _ = _run("digits_cnn", tmp_path, "inprocess", drift="swap")
    assert summary["ticks"][-1]["tick"] == TICKS - 1
    assert not summary["device_errors"], summary["device_errors"]
    _check_cnn_champion(summary)
    assert _signature_shape(summary) == [-1, 1, 8, 8], "the signature has the task's image shape"
    assert summary["ticks"][DRIFT_AT - 1]["accuracy"] > 0.5


def test_a_cnn_task_runs_on_flower_simulation(tmp_path: Path) -> None:
    summary, _ = _run("digits_cnn", tmp_path, "simulation", drift="swap")
    assert summary["engine"] == "simulation"
    assert summary["ticks"][-1]["tick"] == TICKS - 1
    _check_cnn_champion(summary)


def test_a_regression_task_runs_in_process_with_a_tolerance_accuracy(tmp_path: Path) -> None:
    import digits_value

    summary, _ = _run(
        "digits_value", tmp_path, "inprocess", drift="mirror",
        more=("campaign.initial_rounds=10", "campaign.rounds=4", "campaign.lr=0.03"),
    )
    assert not summary["device_errors"], summary["device_errors"]
    assert summary["champion"] >= 1
    before = summary["ticks"][DRIFT_AT - 1]["accuracy"]
    after = summary["ticks"][DRIFT_AT]["accuracy"]
    # accuracy = share of predictions within 0.5 std of the labels (about 1.4 digits);
    # always answering the mean value 4.5 would get about 0.4
    assert before > 0.6, before
    assert after < before - 0.2, "mirrored values are far off: the tolerance accuracy falls"
    assert any(c["tick"] >= DRIFT_AT for c in summary["campaigns"]), "the drift was retrained"
    loaded, tags = _champion(summary)
    assert tags["fedge.model_class"] == "digits_value.ValueNet"
    net = digits_value.ValueNet(64)
    net.load_state_dict(loaded.state_dict())
    x, _ = _digits()
    with torch.no_grad():
        values = loaded(torch.as_tensor(x[:300]))
    assert values.shape == (300,), "one value per sample"
    assert values.dtype == torch.float32


def test_a_regression_task_runs_on_flower_simulation_and_loads_back_as_its_class(tmp_path: Path) -> None:
    import digits_value

    from fedge.models import load_model

    summary, _ = _run(
        "digits_value", tmp_path, "simulation", drift="mirror",
        more=("campaign.initial_rounds=10", "campaign.rounds=4", "campaign.lr=0.03"),
    )
    assert summary["engine"] == "simulation" and not summary["device_errors"], summary["device_errors"]
    assert summary["ticks"][DRIFT_AT - 1]["accuracy"] > 0.6
    net = load_model("fedge-task-test", tracking_uri=summary["tracking_uri"])
    assert type(net) is digits_value.ValueNet
    x, _ = _digits()
    with torch.no_grad():
        assert net(torch.as_tensor(x[:10])).shape == (10,), "one value per sample"


@pytest.mark.parametrize(
    ("task", "says"),
    [
        ("bad_import", "'bad_import' cannot be imported (ModuleNotFoundError: No module named"),
        ("bad_no_factory", "'bad_no_factory' has no model factory"),
        ("bad_shape", "does not accept input of shape (n, 1, 8, 8)"),
        ("no_such_task_module", "cannot be imported"),
        ("os/../x", "is not a module path"),
    ],
)
def test_an_unusable_task_is_one_line_at_config_load(task: str, says: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ['scenario.generator="digits-swap"', f'model.task="{task}"'])
    text = str(err.value)
    assert says in text
    assert "\n" not in text and "Traceback" not in text


def test_the_cli_turns_a_bad_task_into_one_line(tmp_path: Path) -> None:
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TASKS), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "run", "--set", 'model.task="bad_shape"',
         "--set", 'scenario.generator="digits-swap"', "--set", f'run.output_dir="{tmp_path}"'],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "model.task" in line]
    assert len(lines) == 1 and "does not accept input of shape" in lines[0], proc.stderr


def test_initial_weights_are_seeded_for_every_layer_type() -> None:
    def make() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(144),
            nn.Linear(144, 3), nn.Embedding(5, 2),
        )

    a = nets.initial_weights(make(), seed=7)
    b = nets.initial_weights(make(), seed=7)
    c = nets.initial_weights(make(), seed=8)
    assert set(a) == set(b)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    for key in ("0.weight", "4.weight", "5.weight"):  # conv, linear, embedding
        assert not np.array_equal(a[key], c[key]), key
    # the caller's random stream is untouched (the seed acts in a fork of the RNG state)
    model = make()
    torch.manual_seed(123)
    untouched = torch.rand(3)
    torch.manual_seed(123)
    nets.initial_weights(model, seed=7)
    assert torch.equal(torch.rand(3), untouched)

def test_a_task_built_under_the_seed_gives_the_same_weights_everywhere() -> None:
    from fedge.contracts.task import load_task

    task = load_task("digits_cnn")
    one, two = task.initial_weights(64, 10, 5), task.initial_weights(64, 10, 5)
    other = task.initial_weights(64, 10, 6)
    assert all(np.array_equal(one[k], two[k]) for k in one)
    assert not np.array_equal(one["features.0.weight"], other["features.0.weight"])
