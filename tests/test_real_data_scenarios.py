"""Real-data scenarios: packaged datasets, Flower Datasets partitions, induced drift, a full run."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedge.contracts.config import ConfigError
from fedge.contracts.config_load import load_config
from fedge.scenarios import build_scenario, make_generator
from fedge.scenarios.real_data import (
    REAL_DATA_GENERATORS,
    SEGMENT_GAINS,
    load_digits_arrays,
    load_segment_arrays,
    partition_rows,
)

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SHIPPED = {
    "digits-shift": EXPERIMENTS / "digits_rotate_dirichlet.toml",
    "segment-gain": EXPERIMENTS / "segment_gain_iid.toml",
}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def spec(name: str, clients: int = 4, **params: object) -> SimpleNamespace:
    return SimpleNamespace(
        generator=name,
        generator_params=params,
        schedule={"kind": "sudden", "at": 4, "fraction": 0.5},
        seed=3,
        clients=clients,
        ticks=8,
        samples_per_tick=50,
        bad_row_fraction=0.0,
    )


# --- datasets and partitions ---------------------------------------------------------------


def test_bundled_datasets_load_without_network(offline: None) -> None:
    x, y = load_digits_arrays()
    assert x.shape == (1797, 64) and 0 <= x.min() and x.max() <= 1
    assert set(np.unique(y)) == set(range(10))
    xs, ys, columns = load_segment_arrays()
    assert xs.shape == (2310, 18) and len(columns) == 18
    # UCI Image Segments is balanced: 330 regions of each of the 7 classes.
    assert np.bincount(ys).tolist() == [330] * 7


@pytest.mark.parametrize("name", sorted(REAL_DATA_GENERATORS))
@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_every_row(
    offline: None, name: str, partitioner: str
) -> None:
    gen = make_generator(name, n_clients=5, partitioner=partitioner, alpha=0.3, seed=1)
    rows = np.concatenate(gen.partitions)
    n_rows = len(gen._y)
    assert len(gen.partitions) == 5
    assert len(rows) == n_rows and len(np.unique(rows)) == n_rows


def test_iid_shares_are_equal_and_dirichlet_skews_the_class_mix(offline: None) -> None:
    _, y = load_digits_arrays()
    iid = partition_rows(y, 5, "iid")
    assert max(map(len, iid)) - min(map(len, iid)) <= 1
    # IID: every device's class mix is near the global 10% per digit.
    iid_mix = np.array([np.bincount(y[p], minlength=10) / len(p) for p in iid])
    assert np.abs(iid_mix - 0.1).max() < 0.07
    skewed = partition_rows(y, 5, "dirichlet", alpha=0.1, seed=2)
    mix = np.array([np.bincount(y[p], minlength=10) / len(p) for p in skewed])
    assert mix.max() > 0.3  # some device is dominated by a few digits
    # A larger alpha is closer to IID.
    flat = partition_rows(y, 5, "dirichlet", alpha=100.0, seed=2)
    flat_mix = np.array([np.bincount(y[p], minlength=10) / len(p) for p in flat])
    assert np.abs(flat_mix - 0.1).max() < np.abs(mix - 0.1).max()


def test_dirichlet_partition_follows_the_seed(offline: None) -> None:
    _, y = load_digits_arrays()
    a = partition_rows(y, 4, "dirichlet", alpha=0.5, seed=7)
    b = partition_rows(y, 4, "dirichlet", alpha=0.5, seed=7)
    c = partition_rows(y, 4, "dirichlet", alpha=0.5, seed=8)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_a_device_streams_its_own_rows_each_once_before_repeating(offline: None) -> None:
    scenario = build_scenario(spec("digits-shift", clients=4, partitioner="dirichlet"))
    gen = scenario.generator
    x_all, y_all = load_digits_arrays()
    part = gen.partitions[2]
    ticks = len(part) // 50
    rows = np.concatenate([gen.stream_rows(2, t, 50) for t in range(ticks)])
    assert len(np.unique(rows)) == len(rows)
    assert set(rows) <= set(part)
    # The scenario's batches are exactly those rows (tick 0 is before the drift).
    x, y = scenario.batch(2, 0)
    np.testing.assert_array_equal(x, x_all[gen.stream_rows(2, 0, 50)])
    np.testing.assert_array_equal(y, y_all[gen.stream_rows(2, 0, 50)])


def test_bad_partition_settings_are_one_line_errors_naming_the_key(offline: None) -> None:
    with pytest.raises(ValueError, match=r"^generator_params\.partitioner: unknown 'shards'"):
        build_scenario(spec("digits-shift", partitioner="shards"))
    with pytest.raises(ValueError, match=r"^generator_params\.alpha: must be a number > 0"):
        build_scenario(spec("segment-gain", partitioner="dirichlet", alpha=0))
    with pytest.raises(ValueError, match=r"^scenario\.generator_params\.n_clients: not allowed"):
        build_scenario(spec("digits-shift", n_clients=3))
    with pytest.raises(ValueError, match=r"unknown parameter 'beta'"):
        build_scenario(spec("digits-shift", beta=1))


def test_a_bad_alpha_in_a_scenario_file_is_a_config_error(tmp_path: Path, offline: None) -> None:
    text = SHIPPED["digits-shift"].read_text().replace("alpha = 0.5", "alpha = -1.0")
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=r"generator_params\.alpha"):
        load_config(bad)


# --- drift where the schedule says ---------------------------------------------------------


def _fit(x: np.ndarray, y: np.ndarray, n_classes: int, epochs: int = 60) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], 64), torch.nn.ReLU(), torch.nn.Linear(64, n_classes)
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model


def _accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_scenario_drifts_on_the_scheduled_devices_at_the_scheduled_tick(
    offline: None, name: str
) -> None:
    cfg = load_config(SHIPPED[name])
    scenario = build_scenario(cfg.scenario)
    at = cfg.scenario.schedule["at"]
    drifted = {c for c, s in scenario.schedule.drift_points() if s == at}
    assert drifted and len(drifted) < scenario.n_clients  # some devices, not all
    pre = [scenario.batch(c, t) for c in range(scenario.n_clients) for t in range(at)]
    model = _fit(
        np.concatenate([x for x, _ in pre]), np.concatenate([y for _, y in pre]), scenario.n_classes
    )
    for client in range(scenario.n_clients):
        before = [scenario.batch(client, t) for t in range(max(0, at - 2), at)]
        after = [scenario.batch(client, t) for t in range(at, at + 2)]
        acc_before = _accuracy(
            model, np.concatenate([x for x, _ in before]), np.concatenate([y for _, y in before])
        )
        acc_after = _accuracy(
            model, np.concatenate([x for x, _ in after]), np.concatenate([y for _, y in after])
        )
        if client in drifted:
            assert acc_after < acc_before - 0.2, (client, acc_before, acc_after)
        else:
            assert acc_after > acc_before - 0.1, (client, acc_before, acc_after)


def test_digits_rotation_turns_each_image_by_90_degrees(offline: None) -> None:
    gen = make_generator("digits-shift")
    x0, y0 = gen.sample(0, 20, np.random.default_rng(1))
    x1, y1 = gen.sample(1, 20, np.random.default_rng(1))
    x2, _ = gen.sample(2, 20, np.random.default_rng(1))
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(x1.reshape(-1, 8, 8), np.rot90(x0.reshape(-1, 8, 8), axes=(1, 2)))
    np.testing.assert_allclose(x2, 1.0 - x0)


def test_segment_gain_scales_only_the_brightness_and_edge_columns(offline: None) -> None:
    gen = make_generator("segment-gain")
    raw, _, columns = load_segment_arrays()
    rows = raw[:50]
    z0, z1 = gen.transform(rows, 0), gen.transform(rows, 1)
    back0 = z0 * gen._std + gen._mean
    back1 = z1 * gen._std + gen._mean
    np.testing.assert_allclose(back0, rows, rtol=1e-4, atol=1e-3)
    for j, column in enumerate(columns):
        if column in ("hue-mean", "saturation-mean", "region-centroid-col"):
            np.testing.assert_allclose(back1[:, j], rows[:, j], rtol=1e-4, atol=1e-3)
        if column in ("intensity-mean", "rawred-mean", "value-mean"):
            np.testing.assert_allclose(back1[:, j], rows[:, j] * SEGMENT_GAINS[1], rtol=1e-4, atol=1e-3)


# --- listed and run like the built-in scenarios --------------------------------------------


def test_fedge_scenarios_lists_the_real_data_scenarios(offline: None) -> None:
    from typer.testing import CliRunner

    from fedge.cli import app

    result = CliRunner().invoke(app, ["scenarios"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name, path in SHIPPED.items():
        line = next(line for line in result.output.splitlines() if path.name in line)
        assert name in line and "sudden" in line


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_real_data_scenario_runs_and_registers_a_version(
    tmp_path: Path, offline: None, name: str
) -> None:
    from fedge.runner import RunRequest, quiet_tick, run

    overrides = (
        f'run.output_dir="{tmp_path}"',
        "scenario.ticks=8",
        "scenario.schedule.at=4",
        "campaign.initial_rounds=3",
        "campaign.rounds=2",
        "campaign.local_epochs=1",
    )
    summary = run(RunRequest(SHIPPED[name], overrides, "inprocess"), on_tick=quiet_tick)
    from fedge.tracking import list_model_versions

    versions = list_model_versions(summary["tracking_uri"], summary["model_name"])
    assert versions, "no model version registered"
    # One model: the champion alias; clustering: one cluster-<key> alias per model.
    aliases = {a for v in versions for a in v["aliases"]}
    assert "champion" in aliases or any(a.startswith("cluster-") for a in aliases), aliases
    assert summary["drift_steps"] == [4]
    assert summary["rejected_rows"] == 0 and not summary["device_errors"]
    assert all(t["n_samples"] > 0 for t in summary["ticks"])
