"""Labelled data generators with several concepts each, for drift scenarios.

A generator draws ``n`` labelled samples from one of its concepts with a caller's
random generator, so the caller decides seeding and the draws are reproducible.
The label rules are module-level functions that tests and baselines can reuse.

Examples
--------
>>> import numpy as np
>>> from fedge.scenarios.generators import make_generator
>>> gen = make_generator("sine2")
>>> x, y = gen.sample(concept=1, n=4, rng=np.random.default_rng(0))
>>> x.shape, x.dtype.name, y.dtype.name
((4, 2), 'float32', 'int64')
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "CIRCLE2_CIRCLES",
    "DIGITS_SWAPS",
    "GENERATOR_NAMES",
    "SEA4_THRESHOLDS",
    "Circle2Generator",
    "DigitsSwapGenerator",
    "Generator",
    "Sea4Generator",
    "SeaCsvGenerator",
    "Sine2Generator",
    "circle2_labels",
    "make_generator",
    "sea_labels",
    "sine2_labels",
    "swap_labels",
]

GENERATOR_NAMES: tuple[str, ...] = (
    "sine2",
    "circle2",
    "sea4",
    "digits-swap",
    "digits-shift",
    "segment-gain",
    "river-sea",
    "river-stagger",
    "river-agrawal",
    "river-hyperplane",
)
"""Registered generators; ``digits-shift`` and ``segment-gain`` are real datasets
split across devices (:mod:`fedge.scenarios.real_data`)."""

CIRCLE2_CIRCLES: tuple[tuple[float, float, float], ...] = ((0.2, 0.5, 0.15), (0.6, 0.5, 0.25))
"""Centre x, centre y and radius of the circle for each CIRCLE-2 concept."""

SEA4_THRESHOLDS: tuple[float, ...] = (8.0, 9.0, 7.0, 9.0)
"""Threshold on ``f2 + f3`` (unscaled, features in [0, 10]) for each SEA-4 concept."""

DIGITS_SWAPS: tuple[tuple[int, int], ...] = ((1, 2), (3, 4), (5, 6))
"""Label pair swapped by digits-swap concept ``k`` is ``DIGITS_SWAPS[k - 1]``."""

SEA_SCALE = 10.0
"""SEA features are drawn from [0, SEA_SCALE] and returned divided by it."""


@runtime_checkable
class Generator(Protocol):
    """A labelled data source with ``n_concepts`` concepts.

    Attributes
    ----------
    name : str
        Registry name of the generator.
    n_features : int
        Width of every feature row.
    n_classes : int
        Labels lie in ``0 .. n_classes - 1``.
    n_concepts : int
        Concept ids lie in ``0 .. n_concepts - 1``.
    """

    name: str
    n_features: int
    n_classes: int
    n_concepts: int

    def sample(
        self, concept: int, n: int, rng: np.random.Generator
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Draw ``n`` samples of concept ``concept`` using ``rng``.

        Parameters
        ----------
        concept : int
            Concept id in ``0 .. n_concepts - 1``.
        n : int
            Number of samples, at least 0.
        rng : numpy.random.Generator
            Source of randomness; the only one used.

        Returns
        -------
        tuple of numpy.ndarray
            ``x`` float32 of shape ``(n, n_features)`` and ``y`` int64 of shape ``(n,)``.
        """
        ...


def sine2_labels(x: NDArray[np.floating[Any]], concept: int) -> NDArray[np.int64]:
    """Label SINE-2 points.

    Parameters
    ----------
    x : numpy.ndarray
        Points of shape ``(n, 2)``.
    concept : int
        0 labels ``1`` where ``x2 <= sin(x1)``; 1 flips that label.

    Returns
    -------
    numpy.ndarray
        int64 labels of shape ``(n,)``.
    """
    xf = np.asarray(x, dtype=np.float64)
    below = (xf[:, 1] <= np.sin(xf[:, 0])).astype(np.int64)
    return below if concept == 0 else 1 - below


def circle2_labels(x: NDArray[np.floating[Any]], concept: int) -> NDArray[np.int64]:
    """Label CIRCLE-2 points: 1 strictly outside the concept's circle, 0 inside or on it.

    Parameters
    ----------
    x : numpy.ndarray
        Points of shape ``(n, 2)``.
    concept : int
        Index into :data:`CIRCLE2_CIRCLES`.

    Returns
    -------
    numpy.ndarray
        int64 labels of shape ``(n,)``.
    """
    cx, cy, r = CIRCLE2_CIRCLES[concept]
    xf = np.asarray(x, dtype=np.float64)
    dist2 = (xf[:, 0] - cx) ** 2 + (xf[:, 1] - cy) ** 2
    return (dist2 > r * r).astype(np.int64)


def sea_labels(x: NDArray[np.floating[Any]], threshold: float) -> NDArray[np.int64]:
    """Noise-free SEA labels of scaled features.

    Parameters
    ----------
    x : numpy.ndarray
        Features of shape ``(n, 3)`` already divided by :data:`SEA_SCALE`.
    threshold : float
        Threshold on the unscaled ``f2 + f3``.

    Returns
    -------
    numpy.ndarray
        int64 labels, 1 where ``f2 + f3 > threshold``.
    """
    xf = np.asarray(x, dtype=np.float64)
    return ((xf[:, 1] + xf[:, 2]) * SEA_SCALE > threshold).astype(np.int64)


def swap_labels(y: NDArray[np.integer[Any]], pair: tuple[int, int] | None) -> NDArray[np.int64]:
    """Exchange the two labels of ``pair`` in ``y``; ``None`` leaves ``y`` unchanged.

    Parameters
    ----------
    y : numpy.ndarray
        Integer labels.
    pair : tuple of int or None
        The two labels to exchange.

    Returns
    -------
    numpy.ndarray
        A new int64 array.
    """
    original = np.asarray(y, dtype=np.int64)
    out = original.copy()
    if pair is not None:
        a, b = pair
        out[original == a] = b
        out[original == b] = a
    return out


def _check_draw(gen: Generator, concept: int, n: int) -> None:
    if isinstance(concept, bool) or not isinstance(concept, int | np.integer):
        raise TypeError(f"generator '{gen.name}': concept must be an int, got {concept!r}")
    if not 0 <= concept < gen.n_concepts:
        raise ValueError(
            f"generator '{gen.name}': concept {concept} is outside 0..{gen.n_concepts - 1}"
        )
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"generator '{gen.name}': n must be an int >= 0, got {n!r}")


def _uniform_unit(rng: np.random.Generator, n: int, width: int) -> NDArray[np.float32]:
    return rng.uniform(0.0, 1.0, size=(n, width)).astype(np.float32)


class Sine2Generator:
    """SINE-2: ``x ~ U[0, 1]^2``; concept 0 labels 1 below ``sin(x1)``, concept 1 flips it.

    Labels are computed from the returned float32 features, so
    :func:`sine2_labels` reproduces them exactly.
    """

    name = "sine2"
    n_features = 2
    n_classes = 2
    n_concepts = 2

    def sample(
        self, concept: int, n: int, rng: np.random.Generator
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Draw ``n`` samples of ``concept``; see :meth:`Generator.sample`."""
        _check_draw(self, concept, n)
        x = _uniform_unit(rng, n, 2)
        return x, sine2_labels(x, int(concept))

    def __repr__(self) -> str:
        return "Sine2Generator()"


class Circle2Generator:
    """CIRCLE-2: ``x ~ U[0, 1]^2``; label 1 outside the concept's circle.

    Concept 0 uses centre (0.2, 0.5) and radius 0.15, concept 1 centre (0.6, 0.5)
    and radius 0.25 (see :data:`CIRCLE2_CIRCLES`).
    """

    name = "circle2"
    n_features = 2
    n_classes = 2
    n_concepts = len(CIRCLE2_CIRCLES)

    def sample(
        self, concept: int, n: int, rng: np.random.Generator
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Draw ``n`` samples of ``concept``; see :meth:`Generator.sample`."""
        _check_draw(self, concept, n)
        x = _uniform_unit(rng, n, 2)
        return x, circle2_labels(x, int(concept))

    def __repr__(self) -> str:
        return "Circle2Generator()"


class Sea4Generator:
    """SEA-4 drawn fresh: ``f1, f2, f3 ~ U[0, 10]``, label ``f2 + f3 > theta``.

    ``theta`` is 8, 9, 7, 9 for concepts 0..3. Features are returned divided by 10.

    Parameters
    ----------
    noise : float, default=0.1
        Probability, in [0, 1], that a label is flipped.
    """

    name = "sea4"
    n_features = 3
    n_classes = 2
    n_concepts = len(SEA4_THRESHOLDS)

    def __init__(self, noise: float = 0.1) -> None:
        if isinstance(noise, bool) or not isinstance(noise, int | float) or not 0 <= noise <= 1:
            raise ValueError(f"generator 'sea4': noise={noise!r} is outside [0, 1]")
        self.noise = float(noise)

    def sample(
        self, concept: int, n: int, rng: np.random.Generator
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Draw ``n`` samples of ``concept``; see :meth:`Generator.sample`."""
        _check_draw(self, concept, n)
        x = (rng.uniform(0.0, SEA_SCALE, size=(n, 3)) / SEA_SCALE).astype(np.float32)
        y = sea_labels(x, SEA4_THRESHOLDS[concept])
        flip = rng.random(n) < self.noise
        y[flip] = 1 - y[flip]
        return x, y

    def __repr__(self) -> str:
        return f"Sea4Generator(noise={self.noise!r})"


_SEA_COLUMNS = ("f1", "f2", "f3", "label")


def _read_sea_csv(path: Path) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    xs: list[list[float]] = []
    ys: list[int] = []
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != _SEA_COLUMNS:
            raise ValueError(
                f"{path} line 1: expected header {','.join(_SEA_COLUMNS)}, got {header!r}"
            )
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            line = reader.line_num
            if len(row) != 4:
                raise ValueError(f"{path} line {line}: expected 4 columns, got {len(row)}")
            try:
                f = [float(cell) for cell in row[:3]]
                label = int(float(row[3]))
            except ValueError:
                raise ValueError(f"{path} line {line}: not numeric: {','.join(row)}") from None
            if label not in (0, 1) or not all(math.isfinite(v) for v in f):
                raise ValueError(f"{path} line {line}: bad row: {','.join(row)}")
            xs.append(f)
            ys.append(label)
    if not ys:
        raise ValueError(f"{path}: no data rows")
    x = (np.asarray(xs, dtype=np.float64) / SEA_SCALE).astype(np.float32)
    return x, np.asarray(ys, dtype=np.int64)


_SEA_CACHE: dict[tuple[str, int, int], tuple[NDArray[np.float32], NDArray[np.int64]]] = {}


def _read_sea_csv_cached(path: Path) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """:func:`_read_sea_csv` once per process and file version (every device builds a generator)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _SEA_CACHE:
        x, y = _read_sea_csv(path)
        x.flags.writeable = False
        y.flags.writeable = False
        _SEA_CACHE[key] = (x, y)
    return _SEA_CACHE[key]


class SeaCsvGenerator:
    """SEA rows resampled from FedDrift-format files ``concept1.csv``, ``concept2.csv``, ...

    Concept ``k`` draws rows, uniformly with replacement, from ``concept{k+1}.csv``
    (header ``f1,f2,f3,label``). Features are returned divided by 10; labels are
    used as stored, noise included. All files are read when the generator is built.

    Parameters
    ----------
    source : str or pathlib.Path
        Directory holding ``concept1.csv`` and any consecutive ``concept{k}.csv``.
    """

    name = "sea4"
    n_features = 3
    n_classes = 2

    def __init__(self, source: str | Path) -> None:
        self.source = source
        folder = Path(source)
        if not folder.is_dir():
            raise ValueError(f"generator 'sea4': source {str(source)!r} is not a directory")
        files: list[Path] = []
        while (folder / f"concept{len(files) + 1}.csv").is_file():
            files.append(folder / f"concept{len(files) + 1}.csv")
        if not files:
            raise ValueError(
                f"generator 'sea4': source {str(source)!r} has no concept1.csv "
                "(expected concept1.csv, concept2.csv, ...)"
            )
        self._data = [_read_sea_csv_cached(p) for p in files]
        self.n_concepts = len(files)

    def sample(
        self, concept: int, n: int, rng: np.random.Generator
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Draw ``n`` rows of ``concept``; see :meth:`Generator.sample`."""
        _check_draw(self, concept, n)
        x_all, y_all = self._data[concept]
        idx = rng.integers(0, len(y_all), size=n)
        return x_all[idx], y_all[idx]

    def __repr__(self) -> str:
        return f"SeaCsvGenerator(source={str(self.source)!r})"


class DigitsSwapGenerator:
    """scikit-learn's bundled 8x8 digits with a label swap per concept.

    Concept 0 keeps the labels; concept ``k`` in 1..3 swaps the pair
    ``DIGITS_SWAPS[k - 1]`` ((1, 2), (3, 4), (5, 6)). Rows are drawn uniformly with
    replacement from all 1,797 images; pixel values are divided by 16.
    """

    name = "digits-swap"
    n_features = 64
    n_classes = 10
    n_concepts = 1 + len(DIGITS_SWAPS)

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        self._x = (np.asarray(bunch.data, dtype=np.float64) / 16.0).astype(np.float32)
        self._y = np.asarray(bunch.target, dtype=np.int64)

    def sample(
        self, concept: int, n: int, rng: np.random.Generator
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Draw ``n`` samples of ``concept``; see :meth:`Generator.sample`."""
        _check_draw(self, concept, n)
        idx = rng.integers(0, len(self._y), size=n)
        pair = DIGITS_SWAPS[concept - 1] if concept > 0 else None
        return self._x[idx], swap_labels(self._y[idx], pair)

    def __repr__(self) -> str:
        return "DigitsSwapGenerator()"


def _build_sea4(params: dict[str, Any]) -> Generator:
    if "source" in params:
        if "noise" in params:
            raise ValueError(
                "generator 'sea4': 'noise' cannot be combined with 'source' "
                "(the csv labels carry their own noise)"
            )
        return SeaCsvGenerator(params["source"])
    return Sea4Generator(**params)


_RIVER_PARAMS = {"sea": ("noise",), "stagger": (), "agrawal": ("perturbation",), "hyperplane": ("n_features", "noise")}


def _river(kind: str) -> Callable[[dict[str, Any]], Generator]:
    def build(params: dict[str, Any]) -> Generator:
        from fedge.scenarios.river_synth import RiverSynthGenerator

        params = dict(params)
        concepts = params.pop("concepts", (0, 1))
        if isinstance(concepts, str):  # "0,2" from a command line or a flat table
            concepts = tuple(int(c) for c in concepts.strip("[]() ").split(",") if c.strip())
        return RiverSynthGenerator(kind, concepts, **params)  # type: ignore[return-value]

    return build


_REAL_DATA_PARAMS = ("partitioner", "alpha", "seed", "n_clients")


def _build_real(name: str, params: dict[str, Any]) -> Generator:
    # Imported here: the partitioners pull in Hugging Face datasets, which only
    # the real-data scenarios need.
    from fedge.scenarios.real_data import REAL_DATA_GENERATORS

    return REAL_DATA_GENERATORS[name](**params)  # type: ignore[return-value]


_FACTORIES: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any]], Generator]]] = {
    "sine2": ((), lambda p: Sine2Generator()),
    "circle2": ((), lambda p: Circle2Generator()),
    "sea4": (("noise", "source"), _build_sea4),
    "digits-swap": ((), lambda p: DigitsSwapGenerator()),
    "digits-shift": (_REAL_DATA_PARAMS, lambda p: _build_real("digits-shift", p)),
    "segment-gain": (_REAL_DATA_PARAMS, lambda p: _build_real("segment-gain", p)),
}
# river's synthetic streams (fedge.scenarios.river_synth): river-sea, -stagger, -agrawal, -hyperplane.
_FACTORIES.update({f"river-{kind}": (("concepts", *extra), _river(kind)) for kind, extra in _RIVER_PARAMS.items()})


def make_generator(name: str, **params: Any) -> Generator:
    """Build the generator registered as ``name``.

    Parameters
    ----------
    name : str
        One of :data:`GENERATOR_NAMES`.
    **params
        Generator options. ``sea4`` takes ``noise`` (float, default 0.1) or
        ``source`` (directory of FedDrift ``concept{k}.csv`` files); ``digits-shift``
        and ``segment-gain`` take ``partitioner`` ("iid" or "dirichlet"), ``alpha``
        (Dirichlet concentration), ``seed`` and ``n_clients`` (set from the scenario
        by :func:`fedge.scenarios.build_scenario`); the others take none.

    Returns
    -------
    Generator
        A fresh generator.

    Raises
    ------
    ValueError
        On an unknown name, an unknown parameter or a bad parameter value.

    Examples
    --------
    >>> make_generator("sea4", noise=0.0)
    Sea4Generator(noise=0.0)
    """
    if name not in _FACTORIES:
        raise ValueError(f"generator: unknown name {name!r}; allowed: {', '.join(GENERATOR_NAMES)}")
    allowed, factory = _FACTORIES[name]
    for key in params:
        if key not in allowed:
            raise ValueError(
                f"generator {name!r}: unknown parameter {key!r}; "
                f"allowed: {', '.join(allowed) if allowed else '(none)'}"
            )
    return factory(params)
