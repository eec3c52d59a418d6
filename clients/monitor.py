"""Drift monitor: a river detector watching the deployed model's prequential error stream.

The monitor turns a batch of 0/1 errors into counts and a drift flag, which is all a
device reports; the errors themselves stay on the device. Its saved state is JSON data
(:meth:`DriftMonitor.to_bytes`), never a pickle: reading it back cannot run code.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from river.base import BinaryDriftDetector, DriftDetector

from clients.detector_state import (
    MAX_ADWIN_BUCKETS,
    MAX_WINDOW,
    MonitorStateError,
    dump_detector,
    load_detector,
)
from clients.detectors import DETECTOR_NAMES, detector_class

__all__ = [
    "DETECTOR_NAMES",
    "MAX_STATE_BYTES",
    "DriftMonitor",
    "MonitorStateError",
    "MonitorUpdate",
    "detector_parameters",
    "make_detector",
    "resolve_detector_name",
]


_BY_FOLDED_NAME = {re.sub(r"[^a-z0-9]", "", name.lower()): name for name in DETECTOR_NAMES}

_STATE_FORMAT = "fedge.drift_monitor"
# Version 1 was a pickle; such states are refused unread (see DriftMonitor.from_bytes).
_STATE_VERSION = 2
_STATE_KEYS = (
    "format",
    "version",
    "detector",
    "params",
    "seed",
    "samples_seen",
    "drifts_total",
    "state",
)
MAX_STATE_BYTES = 8 * 1024 * 1024
"""Largest saved monitor state read back; a bigger blob is refused before parsing."""

_I32_MAX = 2**31 - 1

# What each constructor argument may be: its JSON type and the range where river neither
# crashes nor allocates without bound (ADWIN's clock is a divisor and its Rust helper
# takes 32-bit ints; a confidence of 0 is a log of infinity on the first update).
_Check = tuple[str, float | None, float | None]
_PARAMETER_TYPES: dict[str, dict[str, _Check]] = {
    "ADWIN": {
        "delta": ("real", 0.0, 1.0),
        "clock": ("int", 1, _I32_MAX),
        "max_buckets": ("int", 1, MAX_ADWIN_BUCKETS),
        "min_window_length": ("int", 1, _I32_MAX),
        "grace_period": ("int", 0, _I32_MAX),
    },
    "KSWIN": {
        "alpha": ("real", 0.0, 1.0),
        "window_size": ("int", 2, MAX_WINDOW),
        "stat_size": ("int", 1, MAX_WINDOW - 1),
        "seed": ("int?", -(2**63), 2**63 - 1),
        "window": ("reals?", 0, MAX_WINDOW),
    },
    "PageHinkley": {
        "min_instances": ("int", 0, 2**63 - 1),
        "delta": ("real", None, None),
        "threshold": ("real", None, None),
        "alpha": ("real", None, None),
        "mode": ("str", None, None),
    },
    "DDM": {
        "warm_start": ("int", 0, 2**63 - 1),
        "warning_threshold": ("real", None, None),
        "drift_threshold": ("real", None, None),
    },
    "EDDM": {
        "warm_start": ("int", 0, 2**63 - 1),
        "alpha": ("real", None, None),
        "beta": ("real", None, None),
    },
    "HDDM_A": {
        "drift_confidence": ("real", 0.0, 1.0),
        "warning_confidence": ("real", 0.0, 1.0),
        "two_sided_test": ("bool", None, None),
    },
    "HDDM_W": {
        "drift_confidence": ("real", 0.0, 1.0),
        "warning_confidence": ("real", 0.0, 1.0),
        "lambda_val": ("real", 0.0, 1.0),
        "two_sided_test": ("bool", None, None),
    },
}
# Where 0 itself is refused although it bounds the range (a divisor or a log argument).
_EXCLUSIVE_LOW = {"delta", "drift_confidence", "warning_confidence"}


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
    return _parameters_of(resolve_detector_name(name))


@functools.lru_cache(maxsize=len(DETECTOR_NAMES))
def _parameters_of(canonical: str) -> tuple[str, ...]:
    # Cached: every save and restore asks, and reading a signature costs a millisecond.
    return tuple(
        p.name
        for p in inspect.signature(detector_class(canonical)).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )


def check_parameters(name: str, params: Mapping[str, object] | None) -> dict[str, object]:
    """Validate a detector's constructor arguments and return them as plain values.

    Numbers must be numbers (an ``int`` is accepted where a float is expected, a bool is
    not), integers stay within the range the detector can run with, and sizes are
    bounded so that a detector's state stays small enough to save on every tick.

    Parameters
    ----------
    name
        Detector name, resolved with :func:`resolve_detector_name`.
    params
        Constructor arguments; ``None`` means none.

    Returns
    -------
    dict
        The same arguments with NumPy scalars turned into Python ones and sequences
        into lists, ready to be written as JSON.

    Raises
    ------
    ValueError
        If an argument is unknown, of the wrong type or out of range.
    """
    canonical = resolve_detector_name(name)
    if params is not None and not isinstance(params, Mapping):
        raise ValueError(f"monitor.params: expected a table of arguments, got {params!r}")
    allowed = detector_parameters(canonical)
    checked: dict[str, object] = {}
    for key, value in (params or {}).items():
        if key not in allowed:
            raise ValueError(
                f"monitor.params: unknown parameter {key!r} for {canonical}; "
                f"allowed: {', '.join(allowed)}"
            )
        checked[key] = _parameter_value(canonical, key, value)
    if canonical == "KSWIN":
        window_size = checked.get("window_size", 100)
        stat_size = checked.get("stat_size", 30)
        sizes_known = isinstance(window_size, int) and isinstance(stat_size, int)
        if sizes_known and stat_size >= window_size:  # type: ignore[operator]
            raise ValueError(
                f"monitor.params: KSWIN(window_size={window_size}, stat_size={stat_size})"
                " rejected: stat_size must be smaller than window_size"
            )
    return checked


def _parameter_value(canonical: str, key: str, value: object) -> object:
    """Check one constructor argument against :data:`_PARAMETER_TYPES`; return it plain."""
    kind, low, high = _PARAMETER_TYPES[canonical][key]
    if kind.endswith("?") and value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()

    def refuse(why: str) -> ValueError:
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        return ValueError(f"monitor.params: {canonical}({key}={shown}) rejected: {key} {why}")

    if kind == "bool":
        if not isinstance(value, bool):
            raise refuse("must be true or false")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise refuse("must be a string")
        return value
    if kind == "reals?":
        if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
            raise refuse("must be a list of numbers")
        items = [v.item() if isinstance(v, np.generic) else v for v in value]
        if len(items) > MAX_WINDOW:
            raise refuse(f"holds {len(items)} values, at most {MAX_WINDOW} are allowed")
        if not all(_is_number(v) and math.isfinite(v) for v in items):
            raise refuse("must hold finite numbers only")
        return items
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise refuse("must be an integer")
    elif not _is_number(value) or not math.isfinite(value):  # type: ignore[arg-type]
        raise refuse("must be a finite number")
    number: float = value  # type: ignore[assignment]
    exclusive = key in _EXCLUSIVE_LOW
    too_low = low is not None and (number < low or (exclusive and number == low))
    if too_low or (high is not None and number > high):
        raise refuse(f"must be within {'(' if exclusive else '['}{low}, {high}]")
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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
        If the name is unknown, a parameter is not accepted by the detector, is of the
        wrong type or out of range (see :func:`check_parameters`), or the detector
        rejects a parameter's value.

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
    kwargs = check_parameters(canonical, params)
    if seed is not None and "seed" in _PARAMETER_TYPES[canonical]:
        kwargs.setdefault("seed", _parameter_value(canonical, "seed", seed))
    try:
        return detector_class(canonical)(**kwargs)  # type: ignore[no-any-return]
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
        self._params: dict[str, object] = check_parameters(self._name, params)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int | np.integer)):
            raise ValueError(f"monitor.seed: expected an integer or None, got {seed!r}")
        self._seed = None if seed is None else int(seed)
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
        """Serialise the monitor, including the detector's internal state, as JSON.

        The payload holds only numbers, strings, booleans, lists and objects: the
        detector's name and constructor arguments, the lifetime counters and the values
        the detector's next update reads (see :mod:`clients.detector_state`).

        Returns
        -------
        bytes
            UTF-8 JSON for :meth:`from_bytes`.

        Raises
        ------
        RuntimeError
            If the installed river keeps state this version does not know how to write,
            rather than saving a detector that would come back different.
        """
        state = {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "detector": self._name,
            "params": self._params,
            "seed": self._seed,
            "samples_seen": self.samples_seen,
            "drifts_total": self.drifts_total,
            "state": dump_detector(self._name, self._detector, detector_parameters(self._name)),
        }
        # Python writes floats with repr, which reads back to the same bits; inf and NaN
        # (a detector's "no minimum yet") are written as Infinity / NaN.
        data = json.dumps(state, separators=(",", ":")).encode("utf-8")
        if len(data) > MAX_STATE_BYTES:
            raise RuntimeError(
                f"monitor.to_bytes: the {self._name} state is {len(data)} bytes, more than "
                f"the {MAX_STATE_BYTES} that would be read back"
            )
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> DriftMonitor:
        """Restore a monitor written by :meth:`to_bytes`; it continues exactly where it was.

        The data is parsed as JSON and checked before anything is built: the format tag
        and version, the detector name against :data:`DETECTOR_NAMES`, each constructor
        argument's name, type and range (:func:`check_parameters`), and every state entry
        against the detector's allow-list, with sizes bounded. A state written by an older
        version as a pickle is refused without being read.

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
        MonitorStateError
            If ``data`` is not a saved drift monitor this version can read (a subclass
            of ``ValueError``; the only error bad data raises).
        """
        try:
            return cls._from_bytes(data)
        except MonitorStateError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError) as exc:
            # Anything the checks above let through is still bad data, reported as such.
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MonitorStateError(f"monitor.from_bytes: unreadable monitor state ({first})") from None

    @classmethod
    def _from_bytes(cls, data: bytes) -> DriftMonitor:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MonitorStateError(
                f"monitor.from_bytes: expected bytes, got {type(data).__name__}"
            )
        raw = bytes(data)
        if len(raw) > MAX_STATE_BYTES:
            raise MonitorStateError(
                f"monitor.from_bytes: state of {len(raw)} bytes is larger than {MAX_STATE_BYTES}"
            )
        if raw[:1] == b"\x80":
            # Every pickle since protocol 2 starts with PROTO (0x80); JSON never does.
            raise MonitorStateError(
                "monitor.from_bytes: pickle-format state from an older version; not read"
            )
        try:
            state = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MonitorStateError(f"monitor.from_bytes: not a saved drift monitor ({exc})") from None
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise MonitorStateError("monitor.from_bytes: not a saved drift monitor")
        version = state.get("version")
        if version != _STATE_VERSION or isinstance(version, bool):
            raise MonitorStateError(
                f"monitor.from_bytes: state version {version!r}, expected {_STATE_VERSION}"
            )
        if set(state) != set(_STATE_KEYS):
            raise MonitorStateError(
                f"monitor.from_bytes: expected the keys {', '.join(_STATE_KEYS)}, "
                f"got {', '.join(state)}"
            )
        name = state["detector"]
        if not isinstance(name, str) or name not in DETECTOR_NAMES:
            # Only canonical names are ever written, so no forgiving spelling here.
            raise MonitorStateError(
                f"monitor.from_bytes: detector {str(name)[:40]!r} is not one of "
                f"{', '.join(DETECTOR_NAMES)}"
            )
        params, seed = state["params"], state["seed"]
        if not isinstance(params, dict):
            raise MonitorStateError("monitor.from_bytes: params must be an object")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise MonitorStateError("monitor.from_bytes: seed must be an integer or null")
        counters = {}
        for key in ("samples_seen", "drifts_total"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                raise MonitorStateError(f"monitor.from_bytes: {key} must be an integer >= 0")
            counters[key] = value
        try:
            monitor = cls(name, params, seed)
        except ValueError as exc:
            raise MonitorStateError(f"monitor.from_bytes: {exc}") from None
        load_detector(name, monitor._detector, state["state"])
        monitor.samples_seen = counters["samples_seen"]
        monitor.drifts_total = counters["drifts_total"]
        return monitor

    def __repr__(self) -> str:
        args = [f"detector={self._name!r}", f"params={self._params!r}"]
        if self._seed is not None:
            args.append(f"seed={self._seed!r}")
        return f"DriftMonitor({', '.join(args)})"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build a JSON object, refusing a repeated key (which JSON readers resolve differently)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise MonitorStateError(f"monitor.from_bytes: key {key[:40]!r} appears twice")
        result[key] = value
    return result


def _feed(detector: DriftDetector | BinaryDriftDetector, values: list[Any]) -> list[int]:
    """Update ``detector`` with each value; return the positions where it signalled drift."""
    update: Callable[[Any], None] = detector.update
    hits = []
    for i, value in enumerate(values):
        update(value)
        if detector.drift_detected:
            hits.append(i)
    return hits
