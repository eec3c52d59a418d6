"""Real datasets that ship inside installed packages, partitioned across devices.

Each generator here wraps a dataset that installs with a package and loads
without a network: scikit-learn's 8x8 digits and river's Image Segments
(``river.datasets.ImageSegments``, a zipped CSV inside the river wheel). The
rows are split across the scenario's devices with Flower's own partitioners
(``flwr_datasets.partitioner.IidPartitioner`` or ``DirichletPartitioner`` over
the labels), run on a local ``datasets.Dataset`` built from the arrays, so no
hub is ever contacted.

A device streams its own partition: tick ``t`` takes the next
``samples_per_tick`` rows of a seeded shuffle of the partition, reshuffled
after every full pass, so a device sees each of its rows once before any
repeats and a model's prequential accuracy is measured on rows it has not yet
trained on (until the first pass ends).

Drift is induced on the features, the way a sensor changes in the field, while
the labels stay true:

``digits-shift``
    concept 0 upright images; 1 rotated by 90 degrees (a camera mounted on its
    side); 2 inverted, ``1 - pixel`` (a sensor whose polarity flipped).
``segment-gain``
    concept 0 as recorded; 1 the camera's gain halves, 2 it rises by half. The
    brightness and edge columns scale with the gain, hue and saturation are
    unchanged (they are ratios), so the shift is physically consistent.

Examples
--------
>>> from fedge.scenarios.real_data import DigitsShiftGenerator
>>> gen = DigitsShiftGenerator(n_clients=3, partitioner="iid", seed=0)
>>> [len(p) for p in gen.partitions]
[599, 599, 599]
>>> x, y = gen.sample_partition(client=1, step=0, concept=1, n=4)
>>> x.shape, y.shape
((4, 64), (4,))
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "PARTITIONERS",
    "REAL_DATA_GENERATORS",
    "SEGMENT_GAINS",
    "SEGMENT_GAIN_COLUMNS",
    "DigitsShiftGenerator",
    "PartitionedDataset",
    "SegmentGainGenerator",
    "load_digits_arrays",
    "load_segment_arrays",
    "partition_rows",
    "shift_digits",
]

PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet")

SEGMENT_GAINS: tuple[float, ...] = (1.0, 0.5, 1.5)
"""Camera gain of each ``segment-gain`` concept."""

SEGMENT_GAIN_COLUMNS: tuple[str, ...] = (
    "vedge-mean",
    "vegde-sd",  # sic: river's column name
    "hedge-mean",
    "hedge-sd",
    "intensity-mean",
    "rawred-mean",
    "rawblue-mean",
    "rawgreen-mean",
    "exred-mean",
    "exblue-mean",
    "exgreen-mean",
    "value-mean",
)
"""Image Segments columns that are linear in the pixel values, so scale with the gain."""


@cache
def load_digits_arrays() -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """scikit-learn's bundled digits: 1,797 rows of 64 pixels in [0, 1], labels 0..9.

    Returns
    -------
    tuple of numpy.ndarray
        Read-only ``x`` float32 ``(1797, 64)`` and ``y`` int64 ``(1797,)``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float64) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


@cache
def load_segment_arrays() -> tuple[NDArray[np.float64], NDArray[np.int64], tuple[str, ...]]:
    """river's bundled Image Segments, read from the file inside the package.

    Returns
    -------
    tuple
        Read-only raw features float64 ``(2310, 18)``, labels int64 ``(2310,)``
        (the 7 class names in sorted order: brickface, cement, foliage, grass,
        path, sky, window) and the column names.

    Raises
    ------
    OSError
        If river's data file is missing from the installation.
    """
    from river.datasets import ImageSegments

    dataset = ImageSegments()
    if not os.path.isfile(dataset.path):
        raise OSError(f"generator 'segment-gain': river's data file {dataset.path} is missing")
    rows = list(dataset)
    columns = tuple(rows[0][0])
    names = sorted({label for _, label in rows})
    x = np.array([[row[c] for c in columns] for row, _ in rows], dtype=np.float64)
    y = np.array([names.index(label) for _, label in rows], dtype=np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y, columns


def shift_digits(x: NDArray[np.float32], concept: int) -> NDArray[np.float32]:
    """Apply the ``digits-shift`` concept to flattened 8x8 images.

    Parameters
    ----------
    x : numpy.ndarray
        Rows of 64 pixels in [0, 1].
    concept : int
        0 leaves them, 1 rotates each image by 90 degrees counter-clockwise,
        2 inverts it (``1 - pixel``).

    Returns
    -------
    numpy.ndarray
        A new float32 array of the same shape.
    """
    if concept == 1:
        images = np.asarray(x, dtype=np.float32).reshape(-1, 8, 8)
        return np.ascontiguousarray(np.rot90(images, k=1, axes=(1, 2))).reshape(-1, 64)
    if concept == 2:
        return (1.0 - np.asarray(x, dtype=np.float32)).astype(np.float32)
    return np.array(x, dtype=np.float32, copy=True)


@cache
def _partition_cached(
    labels: bytes, n_partitions: int, partitioner: str, alpha: float, seed: int
) -> tuple[NDArray[np.int64], ...]:
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    y = np.frombuffer(labels, dtype=np.int64)
    # Only the labels and the row numbers go into the Dataset: the partitioner
    # needs nothing else, and the features stay in NumPy.
    table = Dataset.from_dict({"label": y, "row": np.arange(len(y), dtype=np.int64)})
    part: Any
    if partitioner == "iid":
        part = IidPartitioner(num_partitions=n_partitions)
    else:
        part = DirichletPartitioner(
            num_partitions=n_partitions,
            partition_by="label",
            alpha=alpha,
            # Every device must be able to fill a tick; tiny shards only add noise.
            min_partition_size=min(10, len(y) // n_partitions),
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    part.dataset = table
    out = []
    for i in range(n_partitions):
        rows = np.asarray(part.load_partition(i)["row"], dtype=np.int64)
        rows.flags.writeable = False
        out.append(rows)
    return tuple(out)


def partition_rows(
    labels: NDArray[np.int64],
    n_partitions: int,
    partitioner: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> tuple[NDArray[np.int64], ...]:
    """Split row indices across devices with a Flower Datasets partitioner.

    Parameters
    ----------
    labels : numpy.ndarray
        int64 label of every row.
    n_partitions : int
        Number of devices, at least 1 and at most ``len(labels)``.
    partitioner : {"iid", "dirichlet"}, default="iid"
        ``IidPartitioner`` (equal random shares) or ``DirichletPartitioner``
        over the labels (each device's class mix drawn from Dirichlet(alpha)).
    alpha : float, default=0.5
        Concentration of the Dirichlet partitioner, > 0; smaller is more skewed.
        Unused by ``iid``.
    seed : int, default=0
        Seed of the Dirichlet draw (the IID partitioner is deterministic).

    Returns
    -------
    tuple of numpy.ndarray
        Disjoint read-only index arrays, one per device, covering every row.

    Raises
    ------
    ValueError
        One line naming the ``generator_params`` key at fault.
    """
    if partitioner not in PARTITIONERS:
        raise ValueError(
            f"generator_params.partitioner: unknown {partitioner!r}; allowed: {', '.join(PARTITIONERS)}"
        )
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise ValueError(f"generator_params.alpha: must be a number > 0, got {alpha!r}")
    y = np.ascontiguousarray(labels, dtype=np.int64)
    if not 1 <= n_partitions <= len(y):
        raise ValueError(
            f"scenario.clients: {n_partitions} devices cannot share {len(y)} rows"
        )
    try:
        return _partition_cached(y.tobytes(), int(n_partitions), partitioner, float(alpha), int(seed))
    except ValueError as exc:
        # DirichletPartitioner gives up when no draw leaves every device enough rows.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"generator_params.alpha: the Dirichlet partitioner failed for {n_partitions} "
            f"devices at alpha={alpha}: {first}"
        ) from None


class PartitionedDataset:
    """A fixed labelled dataset split across devices, with feature-shift concepts.

    Subclasses set ``name``, ``n_features``, ``n_classes``, ``n_concepts`` and
    implement :meth:`transform`.

    Parameters
    ----------
    x : numpy.ndarray
        Features of every row, before any concept is applied.
    y : numpy.ndarray
        int64 labels of every row.
    n_clients : int, default=1
        Number of devices to split the rows across.
    partitioner : {"iid", "dirichlet"}, default="iid"
        See :func:`partition_rows`.
    alpha : float, default=0.5
        Dirichlet concentration; see :func:`partition_rows`.
    seed : int, default=0
        Seeds the partition and each device's row order.
    """

    name = ""
    n_features = 0
    n_classes = 0
    n_concepts = 1

    def __init__(
        self,
        x: NDArray[Any],
        y: NDArray[np.int64],
        n_clients: int = 1,
        partitioner: str = "iid",
        alpha: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.n_clients = n_clients
        self.partitioner = partitioner
        self.alpha = alpha
        self.seed = seed
        self._x = x
        self._y = y
        self.partitions = partition_rows(y, n_clients, partitioner, alpha, seed)

    def transform(self, x: NDArray[Any], concept: int) -> NDArray[np.float32]:
        """Features of rows ``x`` under ``concept``, as float32."""
        raise NotImplementedError

    def _check(self, concept: int, n: int) -> None:
        if isinstance(concept, bool) or not isinstance(concept, int | np.integer):
            raise TypeError(f"generator '{self.name}': concept must be an int, got {concept!r}")
        if not 0 <= concept < self.n_concepts:
            raise ValueError(
                f"generator '{self.name}': concept {concept} is outside 0..{self.n_concepts - 1}"
            )
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ValueError(f"generator '{self.name}': n must be an int >= 0, got {n!r}")

    def sample(
        self, concept: int, n: int, rng: np.random.Generator
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Draw ``n`` rows of the whole dataset, with replacement; see ``Generator.sample``."""
        self._check(concept, n)
        idx = rng.integers(0, len(self._y), size=n)
        return self.transform(self._x[idx], int(concept)), self._y[idx].copy()

    def stream_rows(self, client: int, step: int, n: int) -> NDArray[np.int64]:
        """Row numbers device ``client`` reads at ``step``: the next ``n`` of its stream.

        The stream is the device's partition in a seeded order, reshuffled after
        each full pass; it depends only on ``(seed, client)``.
        """
        if not 0 <= client < self.n_clients:
            raise ValueError(
                f"generator '{self.name}': client {client} is outside 0..{self.n_clients - 1}"
            )
        part = self.partitions[client]
        size = len(part)
        positions = step * n + np.arange(n, dtype=np.int64)
        epochs = positions // size
        out = np.empty(n, dtype=np.int64)
        for epoch in np.unique(epochs):
            order = np.random.default_rng([self.seed, client, int(epoch)]).permutation(size)
            mask = epochs == epoch
            out[mask] = part[order[positions[mask] % size]]
        return out

    def sample_partition(
        self, client: int, step: int, concept: int, n: int
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """The ``n`` rows device ``client`` sees at ``step``, under ``concept``.

        Parameters
        ----------
        client : int
            Device index in ``0 .. n_clients - 1``.
        step : int
            Tick, at least 0.
        concept : int
            Concept id in ``0 .. n_concepts - 1``.
        n : int
            Rows per tick.

        Returns
        -------
        tuple of numpy.ndarray
            ``x`` float32 ``(n, n_features)`` and ``y`` int64 ``(n,)``, fresh arrays.
        """
        self._check(concept, n)
        idx = self.stream_rows(client, step, n)
        return self.transform(self._x[idx], int(concept)), self._y[idx].copy()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_clients={self.n_clients!r}, "
            f"partitioner={self.partitioner!r}, alpha={self.alpha!r}, seed={self.seed!r})"
        )


class DigitsShiftGenerator(PartitionedDataset):
    """scikit-learn's 8x8 digits across devices; concepts rotate or invert the images.

    Concept 0 upright, 1 rotated by 90 degrees, 2 inverted (see :func:`shift_digits`).
    Rows are the 64 pixels divided by 16; labels stay the true digit.

    Parameters
    ----------
    n_clients, partitioner, alpha, seed
        See :class:`PartitionedDataset`.
    """

    name = "digits-shift"
    n_features = 64
    n_classes = 10
    n_concepts = 3

    def __init__(
        self, n_clients: int = 1, partitioner: str = "iid", alpha: float = 0.5, seed: int = 0
    ) -> None:
        x, y = load_digits_arrays()
        super().__init__(x, y, n_clients, partitioner, alpha, seed)

    def transform(self, x: NDArray[Any], concept: int) -> NDArray[np.float32]:
        """See :func:`shift_digits`."""
        return shift_digits(x, concept)


class SegmentGainGenerator(PartitionedDataset):
    """river's Image Segments (7 outdoor-image classes) across devices; concepts change the gain.

    Concept ``k`` multiplies the :data:`SEGMENT_GAIN_COLUMNS` by
    ``SEGMENT_GAINS[k]`` (1, 0.5, 1.5); then every column is standardised with
    the mean and standard deviation of the recorded data (fixed preprocessing,
    as a deployed pipeline would hold), so the shift stays visible to the model.

    Parameters
    ----------
    n_clients, partitioner, alpha, seed
        See :class:`PartitionedDataset`.
    """

    name = "segment-gain"
    n_features = 18
    n_classes = 7
    n_concepts = len(SEGMENT_GAINS)

    def __init__(
        self, n_clients: int = 1, partitioner: str = "iid", alpha: float = 0.5, seed: int = 0
    ) -> None:
        x, y, columns = load_segment_arrays()
        self._gain_mask = np.array([c in SEGMENT_GAIN_COLUMNS for c in columns])
        self._mean = x.mean(axis=0)
        std = x.std(axis=0)
        # A constant column (region-pixel-count is dropped by river; guard anyway) stays 0.
        self._std = np.where(std > 0, std, 1.0)
        super().__init__(x, y, n_clients, partitioner, alpha, seed)

    def transform(self, x: NDArray[Any], concept: int) -> NDArray[np.float32]:
        """Apply the concept's gain, then the fixed standardisation."""
        raw = np.array(x, dtype=np.float64, copy=True)
        raw[:, self._gain_mask] *= SEGMENT_GAINS[concept]
        return ((raw - self._mean) / self._std).astype(np.float32)


REAL_DATA_GENERATORS: dict[str, Callable[..., PartitionedDataset]] = {
    "digits-shift": DigitsShiftGenerator,
    "segment-gain": SegmentGainGenerator,
}
"""Generators that split a real dataset across devices; they take the run's
``n_clients`` and ``seed`` besides their ``partitioner`` and ``alpha`` params."""
