"""Behaviour of the drift scenario layer: generators, concept schedules, scenarios."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedge.scenarios import (
    GENERATOR_NAMES,
    ConceptSchedule,
    Generator,
    Scenario,
    build_scenario,
    build_schedule,
    make_generator,
)

FEDDRIFT = Path(__file__).resolve().parents[2] / "shared" / "data" / "feddrift"


def feddrift_path(*parts: str) -> Path:
    path = FEDDRIFT.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"FedDrift reference data not present at {path}")
    return path


def draw(name: str, concept: int, n: int = 2000, seed: int = 0, **params: object):
    return make_generator(name, **params).sample(concept, n, np.random.default_rng(seed))


# --- generators ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", GENERATOR_NAMES)
def test_every_generator_returns_float32_features_and_int64_labels_in_range(name: str) -> None:
    gen = make_generator(name)
    assert isinstance(gen, Generator)
    assert gen.name == name
    for concept in range(gen.n_concepts):
        x, y = gen.sample(concept, 50, np.random.default_rng(concept))
        assert x.dtype == np.float32 and x.shape == (50, gen.n_features)
        assert y.dtype == np.int64 and y.shape == (50,)
        assert np.isfinite(x).all()
        assert y.min() >= 0 and y.max() < gen.n_classes


@pytest.mark.parametrize("name", GENERATOR_NAMES)
def test_same_rng_seed_gives_same_sample(name: str) -> None:
    x1, y1 = draw(name, 0, n=100, seed=3)
    x2, y2 = draw(name, 0, n=100, seed=3)
    x3, _ = draw(name, 0, n=100, seed=4)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)


def test_sine2_concept0_labels_points_under_the_sine_and_concept1_flips_them() -> None:
    x0, y0 = draw("sine2", 0)
    x1, y1 = draw("sine2", 1)
    np.testing.assert_array_equal(x0, x1)
    assert ((x0 >= 0) & (x0 <= 1)).all()
    under = x0[:, 1].astype(np.float64) <= np.sin(x0[:, 0].astype(np.float64))
    np.testing.assert_array_equal(y0, under.astype(np.int64))
    np.testing.assert_array_equal(y1, 1 - y0)


def test_circle2_labels_one_outside_the_concept_circle() -> None:
    circles = {0: ((0.2, 0.5), 0.15), 1: ((0.6, 0.5), 0.25)}
    for concept, ((cx, cy), r) in circles.items():
        x, y = draw("circle2", concept, n=20_000)
        assert ((x >= 0) & (x <= 1)).all()
        xf = x.astype(np.float64)
        outside = np.hypot(xf[:, 0] - cx, xf[:, 1] - cy) > r
        np.testing.assert_array_equal(y, outside.astype(np.int64))
        # both circles lie inside the unit square, so the inside share is the circle's area
        assert abs((y == 0).mean() - np.pi * r * r) < 0.01


def test_sea4_without_noise_follows_the_threshold_rule_of_each_concept() -> None:
    for concept, theta in enumerate((8, 9, 7, 9)):
        x, y = draw("sea4", concept, n=3000, noise=0.0)
        assert ((x >= 0) & (x <= 1)).all()
        assert x.max() > 0.9, "features are f / 10 with f ~ U[0, 10]"
        f = x.astype(np.float64) * 10
        np.testing.assert_array_equal(y, (f[:, 1] + f[:, 2] > theta).astype(np.int64))


def test_sea4_noise_flips_about_that_share_of_labels() -> None:
    x, clean = draw("sea4", 0, n=20_000, noise=0.0)
    x_noisy, noisy = draw("sea4", 0, n=20_000, noise=0.1)
    np.testing.assert_array_equal(x, x_noisy)
    assert abs((clean != noisy).mean() - 0.1) < 0.01
    _, default = draw("sea4", 0, n=20_000)
    np.testing.assert_array_equal(default, noisy)


def test_digits_swap_exchanges_exactly_the_concept_pair() -> None:
    x0, y0 = draw("digits-swap", 0, n=3000)
    assert x0.shape[1] == 64 and 0 <= x0.min() and x0.max() <= 1
    assert set(np.unique(y0)) == set(range(10))
    for concept, (a, b) in enumerate(((1, 2), (3, 4), (5, 6)), start=1):
        xk, yk = draw("digits-swap", concept, n=3000)
        np.testing.assert_array_equal(xk, x0)
        np.testing.assert_array_equal(yk[y0 == a], np.full((y0 == a).sum(), b))
        np.testing.assert_array_equal(yk[y0 == b], np.full((y0 == b).sum(), a))
        untouched = (y0 != a) & (y0 != b)
        np.testing.assert_array_equal(yk[untouched], y0[untouched])


def test_digits_swap_rows_are_the_bundled_digits_scaled_to_unit_range() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x, y = draw("digits-swap", 0, n=20)
    table = {
        row.tobytes(): label
        for row, label in zip((bunch.data / 16.0).astype(np.float32), bunch.target, strict=True)
    }
    for row, label in zip(x, y, strict=True):
        assert table[row.tobytes()] == label


def test_sea_csv_source_samples_rows_of_the_concept_file() -> None:
    sea = feddrift_path("sea")
    gen = make_generator("sea4", source=str(sea))
    assert gen.n_concepts == 4 and gen.n_features == 3
    raw = np.loadtxt(sea / "concept3.csv", delimiter=",", skiprows=1)
    rows = {tuple((raw[i, :3] / 10).astype(np.float32)): int(raw[i, 3]) for i in range(len(raw))}
    x, y = gen.sample(2, 200, np.random.default_rng(0))
    assert x.dtype == np.float32 and y.dtype == np.int64
    for row, label in zip(x, y, strict=True):
        assert rows[tuple(row)] == label


def test_sea_csv_source_reads_a_small_feddrift_style_folder(tmp_path: Path) -> None:
    (tmp_path / "concept1.csv").write_text("f1,f2,f3,label\n1,2,3,0\n")
    (tmp_path / "concept2.csv").write_text("f1,f2,f3,label\n10,9,8,1\n")
    gen = make_generator("sea4", source=tmp_path)
    assert gen.n_concepts == 2
    x, y = gen.sample(1, 3, np.random.default_rng(0))
    np.testing.assert_allclose(x, [[1.0, 0.9, 0.8]] * 3, rtol=1e-6)
    np.testing.assert_array_equal(y, [1, 1, 1])
    with pytest.raises(ValueError, match=r"concept 2 is outside 0\.\.1"):
        gen.sample(2, 3, np.random.default_rng(0))


def test_sea_csv_source_errors_name_the_folder_or_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a directory"):
        make_generator("sea4", source=tmp_path / "missing")
    with pytest.raises(ValueError, match="has no concept1.csv"):
        make_generator("sea4", source=tmp_path)
    (tmp_path / "concept1.csv").write_text("f1,f2,f3,label\n1,2,3,0\n1,x,3,1\n")
    with pytest.raises(ValueError, match=r"concept1\.csv line 3: not numeric") as info:
        make_generator("sea4", source=tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "concept1.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match=r"concept1\.csv line 1: expected header f1,f2,f3,label"):
        make_generator("sea4", source=tmp_path)


def test_make_generator_rejects_unknown_names_and_parameters_in_one_line() -> None:
    with pytest.raises(ValueError) as info:
        make_generator("mnist")
    assert str(info.value) == (
        "generator: unknown name 'mnist'; allowed: sine2, circle2, sea4, digits-swap, "
        "digits-shift, segment-gain, river-sea, river-stagger, river-agrawal, river-hyperplane"
    )
    with pytest.raises(ValueError) as info:
        make_generator("sine2", foo=1)
    assert str(info.value) == "generator 'sine2': unknown parameter 'foo'; allowed: (none)"
    with pytest.raises(ValueError, match="unknown parameter 'theta'; allowed: noise, source"):
        make_generator("sea4", theta=3)
    with pytest.raises(ValueError, match=r"noise=1\.5 is outside \[0, 1\]"):
        make_generator("sea4", noise=1.5)
    with pytest.raises(ValueError, match="cannot be combined"):
        make_generator("sea4", noise=0.1, source="x")


def test_sampling_an_unknown_concept_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"generator 'sine2': concept 2 is outside 0\.\.1"):
        draw("sine2", 2)


# --- schedules ----------------------------------------------------------------------------


def test_sudden_switches_the_first_fraction_of_clients_at_the_step_and_stays() -> None:
    sched = ConceptSchedule.sudden(n_clients=10, n_steps=6, at=3, fraction=0.3, to_concept=2)
    assert (sched.n_steps, sched.n_clients, sched.n_concepts) == (6, 10, 3)
    assert sched.drift_points() == [(0, 3), (1, 3), (2, 3)]
    assert sched.drift_steps() == [3]
    assert [sched.concept(s, 1) for s in range(6)] == [0, 0, 0, 2, 2, 2]
    assert [sched.concept(5, c) for c in range(10)] == [2, 2, 2] + [0] * 7
    every = ConceptSchedule.sudden(n_clients=4, n_steps=5, at=1)
    assert every.drift_points() == [(0, 1), (1, 1), (2, 1), (3, 1)]


def test_staggered_switches_client_c_at_start_plus_c_times_every() -> None:
    sched = ConceptSchedule.staggered(n_clients=5, n_steps=8, start=2, every=2)
    assert sched.drift_points() == [(0, 2), (1, 4), (2, 6)]
    assert sched.drift_steps() == [2, 4, 6]
    assert [sched.concept(7, c) for c in range(5)] == [1, 1, 1, 0, 0]
    assert [sched.concept(s, 1) for s in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_stationary_schedule_never_drifts() -> None:
    sched = ConceptSchedule.stationary(n_clients=3, n_steps=4, concept=1)
    assert sched.drift_points() == [] and sched.drift_steps() == []
    assert sched.n_concepts == 2 and sched.concept(3, 2) == 1


def test_drift_points_include_switching_back() -> None:
    sched = ConceptSchedule(np.array([[0, 0], [1, 0], [0, 0], [0, 1]]))
    assert sched.drift_points() == [(0, 1), (0, 2), (1, 3)]
    assert sched.drift_steps() == [1, 2, 3]


def test_schedule_matrix_is_validated_and_kept_read_only() -> None:
    source = np.array([[0, 1], [1, 1]])
    sched = ConceptSchedule(source)
    source[0, 0] = 5
    assert sched.concept(0, 0) == 0
    with pytest.raises(ValueError):
        sched.matrix[0, 0] = 3
    with pytest.raises(ValueError, match="expected shape"):
        ConceptSchedule(np.array([0, 1]))
    with pytest.raises(ValueError, match="integer concept ids"):
        ConceptSchedule(np.array([[0.5]]))
    with pytest.raises(ValueError, match="must be >= 0, got -1 at step 1, client 0"):
        ConceptSchedule(np.array([[0], [-1]]))
    with pytest.raises(ValueError, match=r"step 2 is outside 0\.\.1"):
        sched.concept(2, 0)


def test_cp_file_rows_are_steps_and_columns_are_clients(tmp_path: Path) -> None:
    path = tmp_path / "t.cp"
    path.write_text("0 0 0\n0 1 0\n\n2 1 0\n")
    sched = ConceptSchedule.from_cp_file(path)
    assert (sched.n_steps, sched.n_clients, sched.n_concepts) == (3, 3, 3)
    assert sched.concept(2, 0) == 2
    assert sched.drift_points() == [(1, 1), (0, 2)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0 0\n0 x\n", r"t\.cp line 2: 'x' is not an integer concept id"),
        ("0 0\n0 1.0\n", r"t\.cp line 2: '1\.0' is not an integer"),
        ("0 0\n\n0 0 1\n", r"t\.cp line 3: 3 columns, but line 1 has 2"),
        ("0 -1\n", r"t\.cp line 1: concept id -1 is negative"),
        ("\n  \n", r"t\.cp: no rows"),
    ],
)
def test_malformed_cp_file_error_names_file_and_line(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "t.cp"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        ConceptSchedule.from_cp_file(path)
    assert "\n" not in str(info.value)


def test_feddrift_matrix_a_has_16_client_level_drifts() -> None:
    sched = ConceptSchedule.from_cp_file(feddrift_path("changepoints", "A.cp"))
    assert (sched.n_steps, sched.n_clients, sched.n_concepts) == (11, 10, 2)
    assert len(sched.drift_points()) == 16
    assert sched.drift_points()[0] == (1, 1)
    assert sched.concept(0, 0) == 0 and sched.concept(5, 0) == 1


def test_build_schedule_matches_the_classmethods() -> None:
    assert build_schedule("stationary", 2, 3) == ConceptSchedule.stationary(2, 3)
    assert build_schedule("sudden", 4, 6, at=2, fraction=0.5) == ConceptSchedule.sudden(
        4, 6, at=2, fraction=0.5
    )
    assert build_schedule("staggered", 3, 5, start=1, every=2) == ConceptSchedule.staggered(
        3, 5, start=1, every=2
    )


def test_build_schedule_matrix_takes_shape_from_file_or_checks_it(tmp_path: Path) -> None:
    path = tmp_path / "m.cp"
    path.write_text("0 0\n1 0\n1 1\n")
    assert build_schedule("matrix", None, None, file=str(path)).matrix.shape == (3, 2)
    assert build_schedule("matrix", 2, 3, file=path).drift_points() == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="has 2 clients, the run has n_clients=5"):
        build_schedule("matrix", 5, 3, file=path)
    with pytest.raises(ValueError, match="has 3 steps, the run has n_steps=11"):
        build_schedule("matrix", 2, 11, file=path)
    with pytest.raises(ValueError, match=r"schedule\.file: .*missing\.cp' is not a file"):
        build_schedule("matrix", 2, 3, file=tmp_path / "missing.cp")


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("x", {}, "schedule.kind: unknown 'x'; allowed: stationary, sudden, staggered, matrix"),
        ("sudden", {"at": 20}, "schedule.at: 20 is outside 1..10"),
        ("sudden", {}, "schedule.at: required for kind 'sudden'"),
        ("sudden", {"at": 2, "fraction": 1.5}, "schedule.fraction: 1.5 is outside [0, 1]"),
        ("sudden", {"at": "3"}, "schedule.at: must be an int, got '3'"),
        ("sudden", {"at": 2, "to_concept": 0}, "schedule.to_concept: 0 equals from_concept"),
        ("staggered", {"start": 0}, "schedule.start: 0 is outside 1..10"),
        ("staggered", {"start": 1, "every": -1}, "schedule.every: must be >= 0, got -1"),
        (
            "stationary",
            {"at": 3},
            "schedule.at: unknown parameter for kind 'stationary'; allowed: concept",
        ),
        ("matrix", {}, "schedule.file: required for kind 'matrix'"),
    ],
)
def test_build_schedule_errors_are_one_line_naming_the_key(
    kind: str, params: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        build_schedule(kind, 10, 11, **params)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_build_schedule_needs_the_run_shape_except_for_matrix() -> None:
    with pytest.raises(ValueError, match="schedule.n_clients: required for kind 'sudden'"):
        build_schedule("sudden", None, 11, at=3)
    with pytest.raises(ValueError, match="schedule.n_steps: must be >= 1, got 0"):
        build_schedule("stationary", 3, 0)


# --- scenarios ----------------------------------------------------------------------------


def make_scenario(
    name: str = "sine2", fraction: float = 0.0, seed: int = 11, n: int = 40
) -> Scenario:
    gen = make_generator(name)
    schedule = ConceptSchedule.sudden(n_clients=3, n_steps=4, at=2, to_concept=1)
    return Scenario(gen, schedule, seed=seed, samples_per_step=n, bad_row_fraction=fraction)


def test_scenario_exposes_the_shapes_of_its_parts() -> None:
    scenario = make_scenario("digits-swap")
    assert (scenario.n_clients, scenario.n_steps) == (3, 4)
    assert (scenario.n_features, scenario.n_classes) == (64, 10)
    assert "DigitsSwapGenerator()" in repr(scenario) and "seed=11" in repr(scenario)


def test_scenario_batch_is_deterministic_and_independent_of_call_order() -> None:
    first = make_scenario()
    cells = [(c, s) for c in range(3) for s in range(4)]
    forward = {cell: first.batch(*cell) for cell in cells}
    second = make_scenario()
    backward = {cell: second.batch(*cell) for cell in reversed(cells)}
    for cell in cells:
        np.testing.assert_array_equal(forward[cell][0], backward[cell][0])
        np.testing.assert_array_equal(forward[cell][1], backward[cell][1])
        np.testing.assert_array_equal(first.batch(*cell)[0], forward[cell][0])
    assert not np.array_equal(forward[(0, 0)][0], forward[(1, 0)][0])
    assert not np.array_equal(forward[(0, 0)][0], forward[(0, 1)][0])
    other_seed = make_scenario(seed=12).batch(0, 0)[0]
    assert not np.array_equal(other_seed, forward[(0, 0)][0])


def test_scenario_batch_draws_from_the_scheduled_concept() -> None:
    scenario = make_scenario()
    for client, step in [(0, 0), (0, 3), (2, 1), (2, 2)]:
        x, y = scenario.batch(client, step)
        rng = np.random.default_rng([11, client, step])
        concept = scenario.schedule.concept(step, client)
        x_ref, y_ref = make_generator("sine2").sample(concept, 40, rng)
        np.testing.assert_array_equal(x, x_ref)
        np.testing.assert_array_equal(y, y_ref)
    x, y = scenario.batch(1, 3)
    xf = x.astype(np.float64)
    np.testing.assert_array_equal(y, (xf[:, 1] > np.sin(xf[:, 0])).astype(np.int64))


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
def test_bad_rows_count_is_the_rounded_fraction_split_between_features_and_labels(
    fraction: float,
) -> None:
    scenario = make_scenario("sea4", fraction=fraction, n=37)
    x, y = scenario.batch(1, 2)
    assert x.dtype == np.float32 and y.dtype == np.int64
    bad_x = ~np.isfinite(x).all(axis=1)
    bad_y = (y < 0) | (y >= scenario.n_classes)
    expected = round(fraction * 37)
    assert int((bad_x | bad_y).sum()) == expected
    assert not (bad_x & bad_y).any()
    assert int(bad_x.sum()) == expected - expected // 2
    assert set(np.unique(y[bad_y])) <= {-1, scenario.n_classes}
    clean, _ = make_scenario("sea4", n=37).batch(1, 2)
    np.testing.assert_array_equal(x[~bad_x], clean[~bad_x])
    again_x, again_y = scenario.batch(1, 2)
    np.testing.assert_array_equal(again_x, x)
    np.testing.assert_array_equal(again_y, y)


def test_scenario_rejects_inconsistent_parts() -> None:
    four = ConceptSchedule.stationary(2, 3, concept=3)
    with pytest.raises(ValueError, match="schedule uses 4 concepts, generator 'sine2' has 2"):
        Scenario(make_generator("sine2"), four, seed=0, samples_per_step=10)
    two = ConceptSchedule.stationary(2, 3)
    with pytest.raises(ValueError, match="scenario.bad_row_fraction"):
        Scenario(make_generator("sine2"), two, seed=0, samples_per_step=10, bad_row_fraction=2)
    with pytest.raises(ValueError, match="scenario.seed"):
        Scenario(make_generator("sine2"), two, seed=-1, samples_per_step=10)
    with pytest.raises(ValueError, match=r"client 2 is outside 0\.\.1"):
        Scenario(make_generator("sine2"), two, seed=0, samples_per_step=10).batch(2, 0)


def test_build_scenario_reads_a_configuration_section() -> None:
    spec = SimpleNamespace(
        generator="circle2",
        generator_params={},
        schedule={"kind": "staggered", "start": 1, "every": 2},
        seed=5,
        clients=4,
        ticks=6,
        samples_per_tick=30,
        bad_row_fraction=0.0,
    )
    scenario = build_scenario(spec)
    assert scenario.schedule.drift_points() == [(0, 1), (1, 3), (2, 5)]
    assert scenario.batch(3, 5)[0].shape == (30, 2)
    spec.schedule = {"kind": "sudden", "at": 9}
    with pytest.raises(ValueError, match=r"^scenario\.schedule\.at: 9 is outside 1\.\.5$"):
        build_scenario(spec)
