"""Drift monitor: a river detector watching the deployed model's prequential error stream.

The monitor turns a batch of 0/1 errors into counts and a drift flag, which is all a
device reports; the errors themselves stay on the device.
"""

from __future__ import annotations

import inspect
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from river import drift
from river.base import BinaryDriftDetector, DriftDetector
from river.drift import binary

_DETECTOR_CLASSES: dict[str, type[DriftDetector | BinaryDriftDetector]] = {
    "ADWIN": drift.ADWIN,
    "KSWIN": drift.KSWIN,
    "PageHinkley": drift.PageHinkley,
    "DDM": binary.DDM,
    "EDDM": binary.EDDM,
    "HDDM_A": binary.HDDMA,
    "HDDM_W": binary.HDDMW,
}

DETECTOR_NAMES: tuple[str, ...] = tuple(_DETECTOR_CLASSES)
"""Canonical names of the supported detectors."""

_BY_FOLDED_NAME = {re.sub(r"[^a-z0-9]", "", name.lower()): name for name in DETECTOR_NAMES}

_STATE_FORMAT = "fedge.drift_monitor"
_STATE_VERSION = 1
_UNPICKLING_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
    TypeError,
    ValueError,
)


def resolve_detector_name(name: str) -> str:
    """Return the canonical spelling of a detector name.

    Case, spaces, hyphens and underscores are ignored, so ``"hddm-a"``, ``"HDDMA"`` and
    ``"HDDM_A"`` all resolve to ``"HDDM_A"``, and ``"page_hinkley"`` to ``"PageHinkley"``.

    Parameters
    ----------
    name
        Detector name as written in a configuration.

    Returns
    -------
    str
        One of :data:`DETECTOR_NAMES`.

    Raises
    ------
    ValueError
        If the name matches no supported detector.
    """
    folded = re.sub(r"[^a-z0-9]", "", name.lower()) if isinstance(name, str) else None
    canonical = _BY_FOLDED_NAME.get(folded) if folded else None
    if canonical is None:
        raise ValueError(
            f"monitor.detector: unknown detector {name!r}; allowed: {', '.join(DETECTOR_NAMES)}"
        )
    return canonical


def detector_parameters(name: str) -> tuple[str, ...]:
    """Return the constructor parameters a detector accepts, in signature order.

    Parameters
    ----------
    name
        Detector name, resolved with :func:`resolve_detector_name`.

    Returns
    -------
    tuple of str
        Parameter names.
    """
    cls = _DETECTOR_CLASSES[resolve_detector_name(name)]
    return tuple(
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )


def make_detector(
    name: str, params: Mapping[str, object] | None = None, seed: int | None = None
) -> DriftDetector | BinaryDriftDetector:
    """Build a river drift detector by name.

    Parameters
    ----------
    name
        Detector name, resolved with :func:`resolve_detector_name`.
    params, default=None
        Constructor arguments for the detector; ``None`` uses river's defaults.
    seed, default=None
        Random seed, passed to detectors that draw random numbers (KSWIN) so that a run
        can be repeated exactly. A ``seed`` given in ``params`` takes precedence.

    Returns
    -------
    river.base.DriftDetector or river.base.BinaryDriftDetector
        A fresh detector.

    Raises
    ------
    ValueError
        If the name is unknown, a parameter is not accepted by the detector, or the
        detector rejects a parameter's value.

    Examples
    --------
    >>> make_detector("page-hinkley", {"threshold": 20.0})
    PageHinkley (
      min_instances=30
      delta=0.005
      threshold=20.
      alpha=0.9999
      mode="both"
    )
    """
    canonical = resolve_detector_name(name)
    allowed = detector_parameters(canonical)
    kwargs = dict(params or {})
    for key in kwargs:
        if key not in allowed:
            raise ValueError(
                f"monitor.params: unknown parameter {key!r} for {canonical}; "
                f"allowed: {', '.join(allowed)}"
            )
    if seed is not None and "seed" in allowed:
        kwargs.setdefault("seed", seed)
    try:
        return _DETECTOR_CLASSES[canonical](**kwargs)
    except (TypeError, ValueError) as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ValueError(f"monitor.params: {canonical}({given}) rejected: {exc}") from None


@dataclass(frozen=True)
class MonitorUpdate:
    """What one batch of errors did to the monitor.

    Parameters
    ----------
    n_samples
        Errors fed in this batch.
    n_errors
        How many of them were 1.
    drift
        Whether the detector signalled drift at least once in this batch.
    n_drifts
        How many times it signalled drift in this batch.
    first_drift_index
        Position in the batch of the first drift signal, or ``None``.
    """

    n_samples: int
    n_errors: int
    drift: bool
    n_drifts: int
    first_drift_index: int | None


class DriftMonitor:
    """Feed a prequential 0/1 error stream to a river drift detector and count drifts.

    Parameters
    ----------
    detector, default="ADWIN"
        Detector name, one of :data:`DETECTOR_NAMES` (spelling is forgiving, see
        :func:`resolve_detector_name`).
    params, default=None
        Constructor arguments for the detector; ``None`` uses river's defaults.
    seed, default=None
        Random seed for detectors that draw random numbers (KSWIN).

    Attributes
    ----------
    samples_seen
        Errors fed over the monitor's lifetime, across :meth:`reset` calls.
    drifts_total
        Drift signals over the monitor's lifetime, across :meth:`reset` calls.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(7)
    >>> errors = np.r_[rng.random(2000) < 0.05, rng.random(2000) < 0.6]
    >>> monitor = DriftMonitor("ADWIN")
    >>> update = monitor.update(errors)
    >>> update.drift, update.first_drift_index >= 2000
    (True, True)
    """

    def __init__(
        self,
        detector: str = "ADWIN",
        params: Mapping[str, object] | None = None,
        seed: int | None = None,
    ) -> None:
        self._name = resolve_detector_name(detector)
        self._params: dict[str, object] = dict(params or {})
        self._seed = seed
        self._detector = make_detector(self._name, self._params, seed)
        self._binary = isinstance(self._detector, BinaryDriftDetector)
        self.samples_seen = 0
        self.drifts_total = 0

    @property
    def detector(self) -> str:
        """Canonical name of the detector."""
        return self._name

    @property
    def params(self) -> dict[str, object]:
        """Detector arguments as given (a copy)."""
        return dict(self._params)

    @property
    def seed(self) -> int | None:
        """Random seed given at construction."""
        return self._seed

    def update(self, errors: np.ndarray | Sequence[int]) -> MonitorUpdate:
        """Feed a batch of prequential errors, oldest first, one by one to the detector.

        Parameters
        ----------
        errors
            1-D array or sequence of 0/1 (or bool) values, 1 meaning the deployed model
            got the sample wrong.

        Returns
        -------
        MonitorUpdate
            Counts and drift signals for this batch.

        Raises
        ------
        ValueError
            If ``errors`` is not one-dimensional or holds values other than 0 and 1.
        """
        arr = np.asarray(errors)
        if arr.ndim != 1:
            raise ValueError(f"monitor.update: errors must be 1-D, got shape {arr.shape}")
        n = int(arr.shape[0])
        if n == 0:
            return MonitorUpdate(0, 0, False, 0, None)
        if arr.dtype != np.bool_:
            if arr.dtype.kind not in "biuf" or not ((arr == 0) | (arr == 1)).all():
                raise ValueError("monitor.update: errors must be 0/1 values")
            arr = arr != 0
        values = arr.tolist() if self._binary else arr.view(np.uint8).tolist()

        hits = _feed(self._detector, values)
        self.samples_seen += n
        self.drifts_total += len(hits)
        return MonitorUpdate(
            n_samples=n,
            n_errors=int(np.count_nonzero(arr)),
            drift=bool(hits),
            n_drifts=len(hits),
            first_drift_index=hits[0] if hits else None,
        )

    def reset(self) -> None:
        """Start a fresh detector, e.g. when a new model is deployed; keep lifetime counters."""
        self._detector = make_detector(self._name, self._params, self._seed)

    def to_bytes(self) -> bytes:
        """Serialise the monitor, including the detector's internal state.

        The payload is a pickle and must only be read back on the device that wrote it.

        Returns
        -------
        bytes
            State for :meth:`from_bytes`.
        """
        state = {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "detector": self._name,
            "params": self._params,
            "seed": self._seed,
            "samples_seen": self.samples_seen,
            "drifts_total": self.drifts_total,
            "state": self._detector,
        }
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def from_bytes(cls, data: bytes) -> DriftMonitor:
        """Restore a monitor written by :meth:`to_bytes`; it continues exactly where it was.

        Parameters
        ----------
        data
            Output of :meth:`to_bytes`.

        Returns
        -------
        DriftMonitor
            The restored monitor.

        Raises
        ------
        ValueError
            If ``data`` is not a saved drift monitor.
        """
        try:
            state = pickle.loads(data)
        except _UNPICKLING_ERRORS as exc:
            raise ValueError(f"monitor.from_bytes: unreadable monitor state ({exc})") from None
        if (
            not isinstance(state, dict)
            or state.get("format") != _STATE_FORMAT
            or state.get("version") != _STATE_VERSION
        ):
            raise ValueError("monitor.from_bytes: not a saved drift monitor")
        monitor = cls.__new__(cls)
        try:
            monitor._name = resolve_detector_name(state["detector"])
            monitor._params = dict(state["params"])
            monitor._seed = state["seed"]
            monitor._detector = state["state"]
            monitor.samples_seen = int(state["samples_seen"])
            monitor.drifts_total = int(state["drifts_total"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"monitor.from_bytes: incomplete monitor state ({exc})") from None
        if type(monitor._detector) is not _DETECTOR_CLASSES[monitor._name]:
            raise ValueError("monitor.from_bytes: saved detector does not match its name")
        monitor._binary = isinstance(monitor._detector, BinaryDriftDetector)
        return monitor

    def __repr__(self) -> str:
        args = [f"detector={self._name!r}", f"params={self._params!r}"]
        if self._seed is not None:
            args.append(f"seed={self._seed!r}")
        return f"DriftMonitor({', '.join(args)})"


def _feed(detector: DriftDetector | BinaryDriftDetector, values: list[Any]) -> list[int]:
    """Update ``detector`` with each value; return the positions where it signalled drift."""
    update: Callable[[Any], None] = detector.update
    hits = []
    for i, value in enumerate(values):
        update(value)
        if detector.drift_detected:
            hits.append(i)
    return hits
