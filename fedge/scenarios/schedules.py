"""Concept schedules: which concept each client draws from at each time step.

A schedule is an integer matrix ``matrix[step, client] = concept id``, the same
shape as the FedDrift ``.cp`` change-point files. Drift happens only at step
boundaries: client ``c`` drifts at step ``s`` when its concept differs from the
one it had at step ``s - 1``.

Examples
--------
>>> from fedge.scenarios.schedules import ConceptSchedule
>>> sched = ConceptSchedule.staggered(n_clients=3, n_steps=5, start=2, every=1)
>>> sched.drift_points()
[(0, 2), (1, 3), (2, 4)]
>>> sched.drift_steps()
[2, 3, 4]
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["SCHEDULE_KINDS", "ConceptSchedule", "build_schedule"]

SCHEDULE_KINDS: tuple[str, ...] = ("stationary", "sudden", "staggered", "matrix")

_INT_TOKEN = re.compile(r"-?[0-9]+")


def _as_int(key: str, value: Any, lo: int, hi: int | None = None) -> int:
    """Return ``value`` as an int in ``lo..hi``; else a one-line ``ValueError`` naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        # Values arrive untyped from TOML and the config layer reports ValueErrors.
        message = f"schedule.{key}: must be an int, got {value!r}"
        raise ValueError(message)  # noqa: TRY004
    number = int(value)
    if hi is None and number < lo:
        raise ValueError(f"schedule.{key}: must be >= {lo}, got {number}")
    if hi is not None and not lo <= number <= hi:
        raise ValueError(f"schedule.{key}: {number} is outside {lo}..{hi}")
    return number


def _check_switch(n_steps: int, from_concept: Any, to_concept: Any) -> tuple[int, int]:
    if n_steps < 2:
        raise ValueError(f"schedule.n_steps: a drift needs at least 2 steps, got {n_steps}")
    old = _as_int("from_concept", from_concept, 0)
    new = _as_int("to_concept", to_concept, 0)
    if old == new:
        raise ValueError(f"schedule.to_concept: {new} equals from_concept, so nothing drifts")
    return old, new


class ConceptSchedule:
    """The concept of every client at every time step.

    Parameters
    ----------
    matrix : array_like of int
        Shape ``(n_steps, n_clients)``; ``matrix[step, client]`` is a concept id >= 0.
        The schedule keeps a read-only copy.

    Attributes
    ----------
    n_steps : int
        Number of time steps (rows).
    n_clients : int
        Number of clients (columns).
    n_concepts : int
        Largest concept id plus one.
    """

    def __init__(self, matrix: ArrayLike) -> None:
        arr = np.asarray(matrix)
        if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError(
                "concept matrix: expected shape (n_steps, n_clients) with both >= 1, "
                f"got {arr.shape}"
            )
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"concept matrix: expected integer concept ids, got dtype {arr.dtype}")
        if arr.min() < 0:
            step, client = (int(i) for i in np.argwhere(arr < 0)[0])
            raise ValueError(
                f"concept matrix: concept ids must be >= 0, got {int(arr[step, client])} "
                f"at step {step}, client {client}"
            )
        self._matrix: NDArray[np.int64] = arr.astype(np.int64, copy=True)
        self._matrix.flags.writeable = False

    @property
    def matrix(self) -> NDArray[np.int64]:
        """Read-only ``(n_steps, n_clients)`` int64 matrix of concept ids."""
        return self._matrix

    @property
    def n_steps(self) -> int:
        """Number of time steps."""
        return int(self._matrix.shape[0])

    @property
    def n_clients(self) -> int:
        """Number of clients."""
        return int(self._matrix.shape[1])

    @property
    def n_concepts(self) -> int:
        """Largest concept id in the matrix plus one."""
        return int(self._matrix.max()) + 1

    def concept(self, step: int, client: int) -> int:
        """Concept id of ``client`` at ``step``.

        Parameters
        ----------
        step : int
            Time step in ``0 .. n_steps - 1``.
        client : int
            Client index in ``0 .. n_clients - 1``.

        Returns
        -------
        int
            The concept id.
        """
        if not 0 <= step < self.n_steps:
            raise ValueError(f"step {step} is outside 0..{self.n_steps - 1}")
        if not 0 <= client < self.n_clients:
            raise ValueError(f"client {client} is outside 0..{self.n_clients - 1}")
        return int(self._matrix[step, client])

    def drift_points(self) -> list[tuple[int, int]]:
        """Every client-level drift as ``(client, step)``, ordered by step then client.

        Returns
        -------
        list of tuple of int
            ``(client, step)`` pairs with ``step >= 1`` where the client's concept
            differs from its concept at ``step - 1``.
        """
        changed = self._matrix[1:] != self._matrix[:-1]
        return [(int(client), int(step) + 1) for step, client in np.argwhere(changed)]

    def drift_steps(self) -> list[int]:
        """Sorted unique steps at which at least one client drifts."""
        return sorted({step for _, step in self.drift_points()})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConceptSchedule):
            return NotImplemented
        return bool(np.array_equal(self._matrix, other._matrix))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"ConceptSchedule(n_steps={self.n_steps}, n_clients={self.n_clients}, "
            f"n_concepts={self.n_concepts}, drifts={len(self.drift_points())})"
        )

    @classmethod
    def from_cp_file(cls, path: str | os.PathLike[str]) -> ConceptSchedule:
        """Read a FedDrift ``.cp`` file: one row per step, whitespace-separated concept ids.

        Blank lines are ignored.

        Parameters
        ----------
        path : str or os.PathLike
            The file to read.

        Returns
        -------
        ConceptSchedule
            The schedule the file describes.

        Raises
        ------
        FileNotFoundError
            If the file does not exist.
        ValueError
            If a line holds something other than non-negative integers, rows differ
            in length, or the file has no rows; the message names the file and line.
        """
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"concept schedule file not found: {p}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{p}: not a text file") from None
        rows: list[list[int]] = []
        first_line = 0
        for lineno, line in enumerate(text.splitlines(), start=1):
            tokens = line.split()
            if not tokens:
                continue
            for token in tokens:
                if not _INT_TOKEN.fullmatch(token):
                    raise ValueError(f"{p} line {lineno}: {token!r} is not an integer concept id")
                if token.startswith("-"):
                    raise ValueError(f"{p} line {lineno}: concept id {token} is negative")
            if rows and len(tokens) != len(rows[0]):
                raise ValueError(
                    f"{p} line {lineno}: {len(tokens)} columns, but line {first_line} "
                    f"has {len(rows[0])}"
                )
            if not rows:
                first_line = lineno
            rows.append([int(t) for t in tokens])
        if not rows:
            raise ValueError(f"{p}: no rows")
        return cls(np.asarray(rows, dtype=np.int64))

    @classmethod
    def stationary(cls, n_clients: int, n_steps: int, concept: int = 0) -> ConceptSchedule:
        """Every client stays on ``concept`` at every step.

        Parameters
        ----------
        n_clients : int
            Number of clients, at least 1.
        n_steps : int
            Number of steps, at least 1.
        concept : int, default=0
            The concept id.

        Returns
        -------
        ConceptSchedule
        """
        n_clients = _as_int("n_clients", n_clients, 1)
        n_steps = _as_int("n_steps", n_steps, 1)
        concept = _as_int("concept", concept, 0)
        return cls(np.full((n_steps, n_clients), concept, dtype=np.int64))

    @classmethod
    def sudden(
        cls,
        n_clients: int,
        n_steps: int,
        at: int,
        from_concept: int = 0,
        to_concept: int = 1,
        fraction: float = 1.0,
    ) -> ConceptSchedule:
        """The first ``round(fraction * n_clients)`` clients switch concept at step ``at``.

        Switched clients stay on ``to_concept``; the others stay on ``from_concept``.

        Parameters
        ----------
        n_clients : int
            Number of clients, at least 1.
        n_steps : int
            Number of steps, at least 2.
        at : int
            First step on the new concept, in ``1 .. n_steps - 1``.
        from_concept : int, default=0
            Concept before the switch.
        to_concept : int, default=1
            Concept from step ``at`` on; must differ from ``from_concept``.
        fraction : float, default=1.0
            Share of clients, in [0, 1], that switch (Python's ``round`` of
            ``fraction * n_clients``, taken from client 0 upward).

        Returns
        -------
        ConceptSchedule
        """
        n_clients = _as_int("n_clients", n_clients, 1)
        n_steps = _as_int("n_steps", n_steps, 1)
        old, new = _check_switch(n_steps, from_concept, to_concept)
        at = _as_int("at", at, 1, n_steps - 1)
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, int | float)
            or not 0.0 <= fraction <= 1.0
        ):
            raise ValueError(f"schedule.fraction: {fraction!r} is outside [0, 1]")
        matrix = np.full((n_steps, n_clients), old, dtype=np.int64)
        matrix[at:, : round(fraction * n_clients)] = new
        return cls(matrix)

    @classmethod
    def staggered(
        cls,
        n_clients: int,
        n_steps: int,
        start: int,
        every: int = 1,
        from_concept: int = 0,
        to_concept: int = 1,
    ) -> ConceptSchedule:
        """Client ``c`` switches concept at step ``start + c * every`` and stays.

        Clients whose switching step would be ``>= n_steps`` never drift.

        Parameters
        ----------
        n_clients : int
            Number of clients, at least 1.
        n_steps : int
            Number of steps, at least 2.
        start : int
            Switching step of client 0, in ``1 .. n_steps - 1``.
        every : int, default=1
            Steps between consecutive clients' switches, at least 0.
        from_concept : int, default=0
            Concept before the switch.
        to_concept : int, default=1
            Concept after the switch; must differ from ``from_concept``.

        Returns
        -------
        ConceptSchedule
        """
        n_clients = _as_int("n_clients", n_clients, 1)
        n_steps = _as_int("n_steps", n_steps, 1)
        old, new = _check_switch(n_steps, from_concept, to_concept)
        start = _as_int("start", start, 1, n_steps - 1)
        every = _as_int("every", every, 0)
        matrix = np.full((n_steps, n_clients), old, dtype=np.int64)
        for client in range(n_clients):
            step = start + client * every
            if step >= n_steps:
                break
            matrix[step:, client] = new
        return cls(matrix)


_KIND_PARAMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "stationary": ((), ("concept",)),
    "sudden": (("at",), ("from_concept", "to_concept", "fraction")),
    "staggered": (("start",), ("every", "from_concept", "to_concept")),
    "matrix": (("file",), ()),
}


def _schedule_from_file(file: Any, n_clients: int | None, n_steps: int | None) -> ConceptSchedule:
    if not isinstance(file, str | os.PathLike):
        # Values arrive untyped from TOML and the config layer reports ValueErrors.
        raise ValueError(f"schedule.file: must be a path, got {file!r}")  # noqa: TRY004
    path = Path(file)
    if not path.is_file():
        raise ValueError(f"schedule.file: {str(file)!r} is not a file")
    schedule = ConceptSchedule.from_cp_file(path)
    if n_clients is not None and schedule.n_clients != n_clients:
        raise ValueError(
            f"schedule.file: {str(file)!r} has {schedule.n_clients} clients, "
            f"the run has n_clients={n_clients}"
        )
    if n_steps is not None and schedule.n_steps != n_steps:
        raise ValueError(
            f"schedule.file: {str(file)!r} has {schedule.n_steps} steps, "
            f"the run has n_steps={n_steps}"
        )
    return schedule


def build_schedule(
    kind: str, n_clients: int | None, n_steps: int | None, **params: Any
) -> ConceptSchedule:
    """Build a schedule from configuration values.

    Parameters
    ----------
    kind : str
        One of :data:`SCHEDULE_KINDS`: ``stationary`` (``concept``), ``sudden``
        (``at``, ``from_concept``, ``to_concept``, ``fraction``), ``staggered``
        (``start``, ``every``, ``from_concept``, ``to_concept``) or ``matrix``
        (``file``, a FedDrift ``.cp`` path).
    n_clients : int or None
        Number of clients. ``None`` is allowed only for ``matrix``, which then takes
        it from the file; otherwise the file must match it.
    n_steps : int or None
        Number of steps, with the same rules as ``n_clients``.
    **params
        The options of ``kind`` listed above; ``at``, ``start`` and ``file`` are
        required, the rest default as in :class:`ConceptSchedule`.

    Returns
    -------
    ConceptSchedule

    Raises
    ------
    ValueError
        One line naming the offending ``schedule.<key>``, its value and what is allowed.

    Examples
    --------
    >>> build_schedule("sudden", n_clients=4, n_steps=6, at=3, fraction=0.5).drift_points()
    [(0, 3), (1, 3)]
    """
    if kind not in _KIND_PARAMS:
        raise ValueError(f"schedule.kind: unknown {kind!r}; allowed: {', '.join(SCHEDULE_KINDS)}")
    required, optional = _KIND_PARAMS[kind]
    allowed = required + optional
    for key in params:
        if key not in allowed:
            raise ValueError(
                f"schedule.{key}: unknown parameter for kind {kind!r}; "
                f"allowed: {', '.join(allowed) if allowed else '(none)'}"
            )
    for key in required:
        if key not in params:
            raise ValueError(f"schedule.{key}: required for kind {kind!r}")
    if n_clients is not None:
        n_clients = _as_int("n_clients", n_clients, 1)
    if n_steps is not None:
        n_steps = _as_int("n_steps", n_steps, 1)
    if kind == "matrix":
        return _schedule_from_file(params["file"], n_clients, n_steps)
    if n_clients is None:
        raise ValueError(f"schedule.n_clients: required for kind {kind!r}")
    if n_steps is None:
        raise ValueError(f"schedule.n_steps: required for kind {kind!r}")
    if kind == "stationary":
        return ConceptSchedule.stationary(n_clients, n_steps, **params)
    if kind == "sudden":
        return ConceptSchedule.sudden(n_clients, n_steps, **params)
    return ConceptSchedule.staggered(n_clients, n_steps, **params)
