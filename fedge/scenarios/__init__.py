"""Drift scenarios for experiments: data generators, concept schedules and their pairing.

A :class:`Scenario` pairs a :class:`Generator` with a :class:`ConceptSchedule`
and hands each client its batch for each time step. Batches are a pure function
of ``(seed, client, step)``: asking twice, or in any order, gives the same arrays.

Examples
--------
>>> from fedge.scenarios import ConceptSchedule, Scenario, make_generator
>>> schedule = ConceptSchedule.sudden(n_clients=2, n_steps=4, at=2)
>>> scenario = Scenario(make_generator("sine2"), schedule, seed=7, samples_per_step=5)
>>> x, y = scenario.batch(client=0, step=3)
>>> x.shape, y.shape
((5, 2), (5,))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from fedge.scenarios.generators import (
    GENERATOR_NAMES,
    Circle2Generator,
    DigitsSwapGenerator,
    Generator,
    Sea4Generator,
    SeaCsvGenerator,
    Sine2Generator,
    make_generator,
)
from fedge.scenarios.real_data import REAL_DATA_GENERATORS, PartitionedDataset
from fedge.scenarios.schedules import SCHEDULE_KINDS, ConceptSchedule, build_schedule

__all__ = [
    "GENERATOR_NAMES",
    "SCHEDULE_KINDS",
    "Circle2Generator",
    "ConceptSchedule",
    "DigitsSwapGenerator",
    "Generator",
    "PartitionedDataset",
    "Scenario",
    "ScenarioSpec",
    "Sea4Generator",
    "SeaCsvGenerator",
    "Sine2Generator",
    "build_scenario",
    "build_schedule",
    "build_source",
    "corrupt_rows",
    "make_generator",
]


def corrupt_rows(
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    fraction: float,
    n_classes: int,
    rng: np.random.Generator,
) -> NDArray[np.int64]:
    """Corrupt ``round(fraction * len(y))`` distinct rows of ``x`` and ``y`` in place.

    The first half of the chosen rows (the larger half when the count is odd) gets
    one feature set to NaN, +inf or -inf; the rest get the label -1 or ``n_classes``.

    Parameters
    ----------
    x : numpy.ndarray
        Features of shape ``(n, n_features)``, modified in place.
    y : numpy.ndarray
        Labels of shape ``(n,)``, modified in place.
    fraction : float
        Share of rows to corrupt, in [0, 1].
    n_classes : int
        Valid labels are ``0 .. n_classes - 1``.
    rng : numpy.random.Generator
        Chooses the rows, the features and the bad values.

    Returns
    -------
    numpy.ndarray
        Sorted indices of the corrupted rows.
    """
    n = len(y)
    count = round(fraction * n)
    if count == 0:
        return np.empty(0, dtype=np.int64)
    rows = rng.choice(n, size=count, replace=False)
    n_bad_x = count - count // 2
    bad_x, bad_y = rows[:n_bad_x], rows[n_bad_x:]
    columns = rng.integers(0, x.shape[1], size=n_bad_x)
    x[bad_x, columns] = rng.choice(np.array([np.nan, np.inf, -np.inf], dtype=np.float32), n_bad_x)
    y[bad_y] = rng.choice(np.array([-1, n_classes], dtype=np.int64), len(bad_y))
    return np.sort(rows).astype(np.int64)


class Scenario:
    """Per-client, per-step labelled batches following a concept schedule.

    Parameters
    ----------
    generator : Generator
        Source of labelled samples; must have at least ``schedule.n_concepts`` concepts.
    schedule : ConceptSchedule
        Which concept each client draws from at each step.
    seed : int
        Non-negative base seed; the batch of ``(client, step)`` uses
        ``numpy.random.default_rng([seed, client, step])``.
    samples_per_step : int
        Rows per client per step, at least 1.
    bad_row_fraction : float, default=0.0
        Share of rows, in [0, 1], corrupted as described in :func:`corrupt_rows`,
        for exercising data validation on devices.
    """

    def __init__(
        self,
        generator: Generator,
        schedule: ConceptSchedule,
        seed: int,
        samples_per_step: int,
        bad_row_fraction: float = 0.0,
    ) -> None:
        if schedule.n_concepts > generator.n_concepts:
            raise ValueError(
                f"scenario: schedule uses {schedule.n_concepts} concepts, generator "
                f"{generator.name!r} has {generator.n_concepts}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"scenario.seed: must be an int >= 0, got {seed!r}")
        if (
            isinstance(samples_per_step, bool)
            or not isinstance(samples_per_step, int)
            or samples_per_step < 1
        ):
            raise ValueError(
                f"scenario.samples_per_step: must be an int >= 1, got {samples_per_step!r}"
            )
        if (
            isinstance(bad_row_fraction, bool)
            or not isinstance(bad_row_fraction, int | float)
            or not math.isfinite(bad_row_fraction)
            or not 0.0 <= bad_row_fraction <= 1.0
        ):
            raise ValueError(f"scenario.bad_row_fraction: {bad_row_fraction!r} is outside [0, 1]")
        if isinstance(generator, PartitionedDataset) and schedule.n_clients > generator.n_clients:
            raise ValueError(
                f"scenario: schedule has {schedule.n_clients} clients, generator "
                f"{generator.name!r} was split across {generator.n_clients}"
            )
        self.generator = generator
        self.schedule = schedule
        self.seed = seed
        self.samples_per_step = samples_per_step
        self.bad_row_fraction = bad_row_fraction

    @property
    def n_clients(self) -> int:
        """Number of clients in the schedule."""
        return self.schedule.n_clients

    @property
    def n_steps(self) -> int:
        """Number of time steps in the schedule."""
        return self.schedule.n_steps

    @property
    def n_features(self) -> int:
        """Width of a feature row."""
        return self.generator.n_features

    @property
    def n_classes(self) -> int:
        """Number of classes; valid labels are ``0 .. n_classes - 1``."""
        return self.generator.n_classes

    def batch(self, client: int, step: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """The batch ``client`` sees at ``step``.

        Parameters
        ----------
        client : int
            Client index in ``0 .. n_clients - 1``.
        step : int
            Time step in ``0 .. n_steps - 1``.

        Returns
        -------
        tuple of numpy.ndarray
            ``x`` float32 of shape ``(samples_per_step, n_features)`` and ``y`` int64
            of shape ``(samples_per_step,)``, fresh arrays the caller may modify.
        """
        concept = self.schedule.concept(step, client)
        rng = np.random.default_rng([self.seed, client, step])
        if isinstance(self.generator, PartitionedDataset):
            # A real dataset: the device reads the next rows of its own partition.
            x, y = self.generator.sample_partition(client, step, concept, self.samples_per_step)
        else:
            x, y = self.generator.sample(concept, self.samples_per_step, rng)
        x = np.array(x, dtype=np.float32, copy=True)
        y = np.array(y, dtype=np.int64, copy=True)
        if self.bad_row_fraction > 0.0:
            corrupt_rows(x, y, self.bad_row_fraction, self.n_classes, rng)
        return x, y

    def example_rows(self, k: int = 5) -> NDArray[np.float32]:
        """The first ``k`` rows of client 0 at step 0, bad rows made finite (an input example)."""
        x, _ = self.batch(0, 0)
        return np.nan_to_num(x[:k]).astype(np.float32)

    def __repr__(self) -> str:
        return (
            f"Scenario(generator={self.generator!r}, schedule={self.schedule!r}, "
            f"seed={self.seed!r}, samples_per_step={self.samples_per_step!r}, "
            f"bad_row_fraction={self.bad_row_fraction!r})"
        )


_PROJECT_ROOT = Path(__file__).resolve().parents[2]


class ScenarioSpec(Protocol):
    """The configuration fields :func:`build_scenario` reads (``fedge.contracts.config.ScenarioConfig``)."""

    @property
    def generator(self) -> str: ...
    @property
    def generator_params(self) -> Mapping[str, Any]: ...
    @property
    def schedule(self) -> Mapping[str, Any]: ...
    @property
    def seed(self) -> int: ...
    @property
    def clients(self) -> int: ...
    @property
    def ticks(self) -> int: ...
    @property
    def samples_per_tick(self) -> int: ...
    @property
    def bad_row_fraction(self) -> float: ...


def _resolve(value: Any) -> Any:
    """A relative path that does not exist from here is taken relative to the project."""
    if not isinstance(value, str):
        return value
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or not (_PROJECT_ROOT / path).exists():
        return value
    return str(_PROJECT_ROOT / path)


def build_scenario(spec: ScenarioSpec) -> Scenario:
    """Build the scenario a configuration describes.

    Parameters
    ----------
    spec : ScenarioSpec
        ``generator`` and ``generator_params`` go to :func:`make_generator` (a
        real-data generator also gets ``n_clients = clients`` and, unless given,
        ``seed``);
        ``schedule`` is a table with ``kind`` and that kind's options for
        :func:`build_schedule` over ``clients`` clients and ``ticks`` steps;
        ``seed``, ``samples_per_tick`` and ``bad_row_fraction`` go to :class:`Scenario`.
        Relative ``schedule.file`` and ``generator_params.source`` paths are tried
        as given, then relative to the project folder.

    Returns
    -------
    Scenario

    Raises
    ------
    ValueError
        One line; schedule mistakes name the ``scenario.schedule.<key>``.
    OSError
        If a data file cannot be read.
    """
    generator_params = dict(spec.generator_params)
    if spec.generator in REAL_DATA_GENERATORS:
        if "n_clients" in generator_params:
            raise ValueError(
                "scenario.generator_params.n_clients: not allowed; the data is split "
                "across scenario.clients devices"
            )
        generator_params["n_clients"] = spec.clients
        generator_params.setdefault("seed", spec.seed)
    if "source" in generator_params:
        generator_params["source"] = _resolve(generator_params["source"])
    generator = make_generator(spec.generator, **generator_params)
    params = dict(spec.schedule)
    if "kind" not in params:
        raise ValueError(f"scenario.schedule.kind: required; allowed: {', '.join(SCHEDULE_KINDS)}")
    kind = params.pop("kind")
    if "file" in params:
        params["file"] = _resolve(params["file"])
    try:
        schedule = build_schedule(kind, spec.clients, spec.ticks, **params)
    except ValueError as exc:
        message = str(exc)
        if message.startswith("schedule."):
            raise ValueError(f"scenario.{message}") from None
        raise
    return Scenario(
        generator,
        schedule,
        seed=spec.seed,
        samples_per_step=spec.samples_per_tick,
        bad_row_fraction=spec.bad_row_fraction,
    )


def build_source(cfg: Any) -> Any:
    """The run's data: the scenario of ``[scenario]``, or the devices' own data (``[data]``).

    Both give ``n_clients``, ``n_steps``, ``n_features``, ``n_classes``,
    ``schedule`` (None for the devices' own data) and ``example_rows``.
    """
    if cfg.data.source == "scenario":
        return build_scenario(cfg.scenario)
    from fedge.scenarios.user_data import UserData

    return UserData(cfg)
