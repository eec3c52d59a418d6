"""river's synthetic drift streams as fedge generators: one concept per generator setting.

river (``river.datasets.synth``) ships the classic concept-drift generators;
each of its settings (SEA's variant, STAGGER's and Agrawal's classification
function, a Hyperplane's seed) is one concept here, so a FedDrift concept
matrix can schedule them per client and step. Every draw seeds a fresh river
stream from the caller's generator, so runs are reproducible and two clients
never see the same rows. Features are scaled to about [0, 1] with the ranges
river documents, so the same small network fits every generator.

Examples
--------
>>> import numpy as np
>>> gen = RiverSynthGenerator("stagger", concepts=(0, 1, 2))
>>> x, y = gen.sample(1, 5, np.random.default_rng(0))
>>> x.shape, gen.n_concepts, gen.n_features, gen.n_classes
((5, 3), 3, 3, 2)
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

# Feature order and scale (divide by) of each stream; from river's documented ranges.
_AGRAWAL_SCALE = {
    "salary": 150_000.0,
    "commission": 75_000.0,
    "age": 80.0,
    "elevel": 4.0,
    "car": 20.0,
    "zipcode": 8.0,
    "hvalue": 900_000.0,
    "hyears": 30.0,
    "loan": 500_000.0,
}
_STAGGER_SCALE = {"size": 2.0, "color": 2.0, "shape": 2.0}


def _stream(kind: str, concept: int, seed: int, params: dict[str, Any]) -> Iterator[tuple[dict[Any, Any], Any]]:
    from river.datasets import synth

    if kind == "sea":
        return iter(synth.SEA(variant=concept, noise=float(params.get("noise", 0.1)), seed=seed))
    if kind == "stagger":
        return iter(synth.STAGGER(classification_function=concept, seed=seed))
    if kind == "agrawal":
        return iter(
            synth.Agrawal(
                classification_function=concept, seed=seed, perturbation=float(params.get("perturbation", 0.0))
            )
        )
    # Hyperplane: river draws the plane's weights from its seed, then the rows from
    # the same random stream. The concept's seed fixes the plane; the first row is
    # discarded and the stream's random source swapped for the draw's own, so the
    # plane stays and the rows are fresh.
    gen = synth.Hyperplane(
        seed=concept,
        n_features=int(params.get("n_features", 10)),
        n_drift_features=0,
        noise_percentage=float(params.get("noise", 0.05)),
    )
    it = iter(gen)
    next(it)
    gen._rng = random.Random(seed)
    return it


_SCALES: dict[str, Callable[[dict[Any, Any]], list[float]]] = {
    "sea": lambda x: [x[0] / 10.0, x[1] / 10.0, x[2] / 10.0],
    "stagger": lambda x: [x[k] / s for k, s in _STAGGER_SCALE.items()],
    "agrawal": lambda x: [x[k] / s for k, s in _AGRAWAL_SCALE.items()],
}

#: Settings each stream accepts as a concept, and its input width.
_CONCEPTS: dict[str, tuple[range, int | None]] = {
    "sea": (range(4), 3),
    "stagger": (range(3), 3),
    "agrawal": (range(10), 9),
    "hyperplane": (range(2**31), None),
}
_PARAMS: dict[str, tuple[str, ...]] = {
    "sea": ("noise",),
    "stagger": (),
    "agrawal": ("perturbation",),
    "hyperplane": ("n_features", "noise"),
}


class RiverSynthGenerator:
    """One of river's synthetic streams, one concept per setting.

    Parameters
    ----------
    kind : {"sea", "stagger", "agrawal", "hyperplane"}
        The river generator (``SEA``, ``STAGGER``, ``Agrawal``, ``Hyperplane``).
    concepts : sequence of int
        Concept ``k`` of a matrix is river's setting ``concepts[k]``: SEA's
        ``variant`` (0..3), STAGGER's or Agrawal's ``classification_function``
        (0..2, 0..9), a Hyperplane's seed (any int).
    **params
        ``noise`` (SEA, default 0.1; Hyperplane, default 0.05),
        ``perturbation`` (Agrawal, default 0.0), ``n_features`` (Hyperplane,
        default 10).

    Raises
    ------
    ValueError
        On an unknown kind, concept setting or parameter.
    """

    def __init__(self, kind: str, concepts: Sequence[int] = (0, 1), **params: Any) -> None:
        if kind not in _CONCEPTS:
            raise ValueError(f"generator 'river': unknown kind {kind!r}; allowed: {', '.join(_CONCEPTS)}")
        allowed, _ = _CONCEPTS[kind]
        concepts = tuple(int(c) for c in concepts)
        if not concepts or any(c not in allowed for c in concepts):
            raise ValueError(
                f"generator 'river-{kind}': concepts {list(concepts)} outside {allowed.start}..{allowed.stop - 1}"
            )
        for key in params:
            if key not in _PARAMS[kind]:
                raise ValueError(
                    f"generator 'river-{kind}': unknown parameter {key!r}; "
                    f"allowed: concepts{''.join(', ' + p for p in _PARAMS[kind])}"
                )
        self.kind = kind
        self.concepts = concepts
        self.params = dict(params)
        self.name = f"river-{kind}"
        self.n_concepts = len(concepts)
        width = _CONCEPTS[kind][1]
        self.n_features = width if width is not None else int(params.get("n_features", 10))
        self.n_classes = 2

    def sample(
        self, concept: int, n: int, rng: np.random.Generator
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """``n`` rows of concept ``concept`` from a river stream seeded by ``rng``."""
        if not 0 <= int(concept) < self.n_concepts:
            raise ValueError(f"generator '{self.name}': concept {concept} outside 0..{self.n_concepts - 1}")
        seed = int(rng.integers(0, 2**31 - 1))
        rows = list(itertools.islice(_stream(self.kind, self.concepts[int(concept)], seed, self.params), n))
        scale = _SCALES.get(self.kind, lambda x: [float(v) for v in x.values()])
        x = np.asarray([scale(r[0]) for r in rows], dtype=np.float32).reshape(n, -1)
        y = np.asarray([int(r[1]) for r in rows], dtype=np.int64)
        return x, y

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"RiverSynthGenerator({self.kind!r}, concepts={self.concepts!r}{extra})"
