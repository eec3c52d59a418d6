"""Drift without labels: the device's input test and its prediction (confidence) monitor.

Two signals that need no label, beside the prequential one of :mod:`clients.monitor`:

- **input drift**: each tick's inputs against a reference window (the most recent
  rows when a model was installed), per feature with KS and a multiple-testing
  correction, or one multivariate MMD test for wide inputs
  (:mod:`clients.two_sample`);
- **prediction drift**: the deployed model's per-sample confidence (max-probability,
  or normalised entropy) fed to a river detector, and an estimated accuracy in the
  spirit of NannyML's CBPE: the mean confidence, calibrated on the labelled holdout
  when the model is installed.

A report carries only what these give (flags, a statistic, a p-value, the estimated
accuracy), never a sample. The monitor's state (:meth:`LabelFreeMonitor.to_bytes`) is
JSON data, checked field by field when read back; the reference window holds samples,
so it is written apart (:meth:`LabelFreeMonitor.reference_bytes`) for the device to seal
with its store key, and bound to the state by its digest.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> monitor = LabelFreeMonitor(input_test="ks", prediction="none", reference_size=100)
>>> monitor.install(rng.normal(size=(300, 2)).astype(np.float32))
>>> monitor.observe(rng.normal(size=(100, 2)).astype(np.float32)).input_drift
False
>>> monitor.observe((rng.normal(size=(100, 2)) + [0, 2]).astype(np.float32)).input_drift
True
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from clients.crypto import RecordAuthenticationError, RecordCipher, read_key_file
from clients.detector_codecs import MonitorStateError
from clients.detector_state import dump_detector, load_detector
from clients.monitor import MAX_STATE_BYTES, _feed, _unique_keys, detector_parameters, make_detector
from clients.two_sample import CORRECTIONS, ks_test, mmd_test

INPUT_TESTS: tuple[str, ...] = ("none", "auto", "ks", "mmd")
"""``monitor.input_test``: ``auto`` is KS per feature up to :data:`KS_MAX_FEATURES`, MMD above."""
PREDICTION_SIGNALS: tuple[str, ...] = ("none", "confidence", "entropy")
"""``monitor.prediction``: the per-sample stream the river detector watches."""
PREDICTION_DETECTORS: tuple[str, ...] = ("ADWIN", "KSWIN", "PageHinkley")
"""River detectors that take real values (the binary ones read 0/1 only)."""
KS_MAX_FEATURES = 32
"""Widest input ``auto`` tests per feature; wider inputs get the one multivariate test."""
MIN_TEST_ROWS = 20
"""Fewest rows in a tick for the input test to run on it."""
MAX_TEST_ROWS = 500
"""Most rows of one tick the input test reads (a seeded subsample beyond)."""
CALIBRATION_BINS = 10
#: Pseudo-count pulling a bin's calibrated accuracy toward its mean confidence, so a
#: bin that a handful of holdout samples fell in does not swing the estimate.
_PRIOR = 10.0

_FORMAT = "fedge.label_free_monitor"
_VERSION = 1
_KEYS = (
    "format", "version", "settings", "seed", "tests", "input_alarms", "prediction_alarms",
    "reference_rows", "reference_width", "reference_digest", "calibration", "detector",
)
_SETTINGS = (
    "input_test", "input_alpha", "input_correction", "reference_size", "permutations",
    "prediction", "prediction_detector", "calibrate",
)
_REFERENCE_HEADER = struct.Struct("<II")

STATE_KEY = "label-free"
"""Store state key of the monitor's JSON state."""
REFERENCE_KEY = "label-free-reference"
"""Store state key of the reference window, sealed: it holds samples."""
_REFERENCE_AAD = b"fedge.label-free-reference"


@dataclass(frozen=True)
class LabelFreeUpdate:
    """What one tick did to the label-free monitor (the report fields, see :meth:`fields`)."""

    input_tested: bool = False
    input_drift: bool = False
    input_statistic: float = 0.0
    input_p_value: float = 1.0
    prediction_drift: bool = False
    confidence: float = 0.0
    estimated_accuracy: float = -1.0

    @property
    def drift(self) -> bool:
        """Whether either label-free signal fired."""
        return self.input_drift or self.prediction_drift

    def fields(self) -> dict[str, bool | float]:
        """The :class:`~fedge.contracts.protocol.DriftReport` fields: summaries, never samples."""
        return {
            "input_tested": self.input_tested,
            "drift_input": self.input_drift,
            "input_statistic": round(self.input_statistic, 6),
            "input_p_value": self.input_p_value,
            "drift_prediction": self.prediction_drift,
            "confidence": round(self.confidence, 6),
            "estimated_accuracy": round(self.estimated_accuracy, 6),
        }


class LabelFreeMonitor:
    """Input and prediction drift of one device, without labels.

    Parameters
    ----------
    input_test, default="auto"
        One of :data:`INPUT_TESTS`.
    input_alpha, default=0.01
        Level of the input test (after the correction over features).
    input_correction, default="holm"
        One of :data:`clients.two_sample.CORRECTIONS`.
    reference_size, default=200
        Rows of the reference window.
    permutations, default=200
        Permutations of the MMD test.
    prediction, default="confidence"
        One of :data:`PREDICTION_SIGNALS`.
    prediction_detector, default="ADWIN"
        One of :data:`PREDICTION_DETECTORS`, with river's defaults.
    calibrate, default=True
        Calibrate the estimated accuracy on the labelled holdout at install.
    seed, default=0
        Seeds the MMD permutations and the subsampling (with the test count, so a
        restored monitor draws what the original would have).
    """

    def __init__(
        self,
        input_test: str = "auto",
        input_alpha: float = 0.01,
        input_correction: str = "holm",
        reference_size: int = 200,
        permutations: int = 200,
        prediction: str = "confidence",
        prediction_detector: str = "ADWIN",
        calibrate: bool = True,
        seed: int = 0,
    ) -> None:
        self.settings: dict[str, Any] = {
            "input_test": input_test, "input_alpha": float(input_alpha),
            "input_correction": input_correction, "reference_size": int(reference_size),
            "permutations": int(permutations), "prediction": prediction,
            "prediction_detector": prediction_detector, "calibrate": bool(calibrate),
        }
        _check_settings(self.settings)
        self.seed = int(seed)
        self.tests = 0
        self.input_alarms = 0
        self.prediction_alarms = 0
        self.calibration: list[float] | None = None
        self._reference = np.zeros((0, 0), dtype=np.float32)
        self.reference_changed = False
        self._detector = self._new_detector()

    # -- configuration -------------------------------------------------------------------
    @classmethod
    def from_config(cls, monitor: Any, seed: int) -> LabelFreeMonitor:
        """The monitor ``[monitor]`` asks for (a :class:`~fedge.contracts.config.MonitorConfig`)."""
        return cls(
            monitor.input_test, monitor.input_alpha, monitor.input_correction,
            monitor.reference_size, monitor.mmd_permutations, monitor.prediction,
            monitor.prediction_detector, monitor.calibrate, seed,
        )

    @property
    def enabled(self) -> bool:
        """Whether any label-free signal is on."""
        return self.settings["input_test"] != "none" or self.settings["prediction"] != "none"

    @property
    def needs_confidence(self) -> bool:
        """Whether :meth:`observe` wants the model's class probabilities."""
        return self.settings["prediction"] != "none"

    def _new_detector(self) -> Any:
        if self.settings["prediction"] == "none":
            return None
        return make_detector(self.settings["prediction_detector"], None, self.seed)

    # -- lifecycle -----------------------------------------------------------------------
    def install(
        self,
        window: np.ndarray,
        holdout_probabilities: np.ndarray | None = None,
        holdout_correct: np.ndarray | None = None,
    ) -> None:
        """A new model is installed: re-take the reference, restart the detector, calibrate.

        Parameters
        ----------
        window
            The device's most recent rows, oldest first; the last ``reference_size``
            become the reference (fewer: the next ticks complete it).
        holdout_probabilities, holdout_correct, optional
            The new model's class probabilities on the labelled holdout and whether
            it got each right; given (and ``calibrate``), they calibrate the estimate.
        """
        size = self.settings["reference_size"]
        self._reference = np.array(np.asarray(window, dtype=np.float32)[-size:], copy=True)
        self.reference_changed = True
        self._detector = self._new_detector()
        self.calibration = None
        if self.settings["calibrate"] and holdout_probabilities is not None and holdout_correct is not None:
            conf = np.asarray(holdout_probabilities, dtype=np.float64).max(axis=1)
            self.calibration = calibration_table(conf, np.asarray(holdout_correct, dtype=bool))

    def observe(self, x: np.ndarray, probabilities: np.ndarray | None = None) -> LabelFreeUpdate:
        """Test this tick's rows; feed the model's confidence to the detector.

        Parameters
        ----------
        x
            The tick's valid rows, shape ``(n, d)``, labelled or not.
        probabilities, optional
            The deployed model's class probabilities on ``x``, shape ``(n, k)``
            (None: no model yet, or a regression task).
        """
        x = np.asarray(x, dtype=np.float32)
        out: dict[str, Any] = {}
        if self.settings["input_test"] != "none" and len(x):
            out.update(self._input(x))
        if self._detector is not None and probabilities is not None and len(probabilities):
            out.update(self._prediction(np.asarray(probabilities, dtype=np.float64)))
        return LabelFreeUpdate(**out)

    def _input(self, x: np.ndarray) -> dict[str, Any]:
        size = self.settings["reference_size"]
        if self._reference.shape[1:] != x.shape[1:]:
            self._reference = np.zeros((0, x.shape[1]), dtype=np.float32)
        if len(self._reference) < size:
            # Still taking the reference: this tick's rows complete it and are not tested.
            self._reference = np.concatenate([self._reference, x[: size - len(self._reference)]])
            self.reference_changed = True
            return {}
        if len(x) < MIN_TEST_ROWS:
            return {}
        rng = np.random.default_rng([self.seed, self.tests])
        self.tests += 1
        rows = x
        if len(x) > MAX_TEST_ROWS:
            x = x[np.sort(rng.choice(len(x), MAX_TEST_ROWS, replace=False))]
        test = self.settings["input_test"]
        if test == "auto":
            test = "ks" if x.shape[1] <= KS_MAX_FEATURES else "mmd"
        alpha = self.settings["input_alpha"]
        if test == "ks":
            result = ks_test(self._reference, x, alpha, self.settings["input_correction"])
        else:
            result = mmd_test(self._reference, x, rng, self.settings["permutations"], alpha)
        fired = result.p_value <= alpha
        self.input_alarms += int(fired)
        if fired:
            # A change point: the next change is judged against the new inputs, so a shift
            # that persists is one alarm, not one per tick (each would empty the window
            # again and refuse every label still on its way).
            self._reference = np.array(rows[:size], copy=True)
            self.reference_changed = True
        return {
            "input_tested": True, "input_drift": fired,
            "input_statistic": result.statistic, "input_p_value": result.p_value,
        }

    def _prediction(self, probabilities: np.ndarray) -> dict[str, Any]:
        conf = probabilities.max(axis=1)
        if self.settings["prediction"] == "entropy":
            k = probabilities.shape[1]
            p = np.clip(probabilities, 1e-12, 1.0)
            stream = -(p * np.log(p)).sum(axis=1) / math.log(k) if k > 1 else np.zeros(len(p))
        else:
            stream = conf
        hits = _feed(self._detector, stream.tolist())
        self.prediction_alarms += int(bool(hits))
        return {
            "prediction_drift": bool(hits),
            "confidence": float(conf.mean()),
            "estimated_accuracy": estimated_accuracy(conf, self.calibration),
        }

    # -- state ---------------------------------------------------------------------------
    def reference_bytes(self) -> bytes:
        """The reference window as bytes (samples: the caller seals them before storing)."""
        rows, width = self._reference.shape if self._reference.ndim == 2 else (0, 0)
        return _REFERENCE_HEADER.pack(rows, width) + self._reference.astype("<f4").tobytes()

    def to_bytes(self) -> bytes:
        """The monitor's state as JSON data, without the reference rows (bound by digest)."""
        rows, width = self._reference.shape if self._reference.ndim == 2 else (0, 0)
        detector = self._detector
        state = {
            "format": _FORMAT, "version": _VERSION, "settings": self.settings, "seed": self.seed,
            "tests": self.tests, "input_alarms": self.input_alarms,
            "prediction_alarms": self.prediction_alarms, "reference_rows": rows,
            "reference_width": width,
            "reference_digest": hashlib.sha256(self.reference_bytes()).hexdigest(),
            "calibration": self.calibration,
            "detector": None if detector is None else dump_detector(
                self.settings["prediction_detector"], detector,
                detector_parameters(self.settings["prediction_detector"]),
            ),
        }
        return json.dumps(state, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, reference: bytes | None) -> LabelFreeMonitor:
        """Restore a monitor from :meth:`to_bytes` and its (opened) :meth:`reference_bytes`.

        Raises
        ------
        MonitorStateError
            If the state is not one this version wrote, a value is out of range, or
            the reference is not the one the state was saved with.
        """
        try:
            return cls._from_bytes(data, reference)
        except MonitorStateError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MonitorStateError(f"label-free monitor: unreadable state ({first})") from None

    @classmethod
    def _from_bytes(cls, data: bytes, reference: bytes | None) -> LabelFreeMonitor:
        if not isinstance(data, bytes) or len(data) > MAX_STATE_BYTES:
            raise MonitorStateError("label-free monitor: state is not bytes of a bounded size")
        state = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise MonitorStateError("label-free monitor: not a saved label-free monitor")
        if state.get("version") != _VERSION or set(state) != set(_KEYS):
            raise MonitorStateError(
                f"label-free monitor: expected version {_VERSION} with keys {', '.join(_KEYS)}"
            )
        settings = state["settings"]
        if not isinstance(settings, dict) or set(settings) != set(_SETTINGS):
            raise MonitorStateError("label-free monitor: settings are not the known ones")
        seed = _count(state, "seed", low=-(2**63))
        monitor = cls(**settings, seed=seed)
        monitor.tests = _count(state, "tests")
        monitor.input_alarms = _count(state, "input_alarms")
        monitor.prediction_alarms = _count(state, "prediction_alarms")
        rows, width = _count(state, "reference_rows"), _count(state, "reference_width")
        blob = reference if reference is not None else _REFERENCE_HEADER.pack(0, 0)
        if hashlib.sha256(blob).hexdigest() != state["reference_digest"]:
            raise MonitorStateError("label-free monitor: the reference is not the one saved")
        got = _REFERENCE_HEADER.unpack_from(blob)
        if got != (rows, width) or len(blob) != _REFERENCE_HEADER.size + 4 * rows * width:
            raise MonitorStateError("label-free monitor: the reference has the wrong shape")
        monitor._reference = np.frombuffer(blob, "<f4", offset=_REFERENCE_HEADER.size).reshape(
            rows, width
        ).astype(np.float32)
        if not np.isfinite(monitor._reference).all():
            raise MonitorStateError("label-free monitor: the reference holds non-finite values")
        table = state["calibration"]
        if table is not None:
            ok = isinstance(table, list) and len(table) == CALIBRATION_BINS and all(
                isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1 for v in table
            )
            if not ok:
                raise MonitorStateError(
                    f"label-free monitor: calibration must be {CALIBRATION_BINS} numbers in [0, 1]"
                )
            monitor.calibration = [float(v) for v in table]
        if (state["detector"] is None) != (monitor._detector is None):
            raise MonitorStateError("label-free monitor: detector state does not match the settings")
        if monitor._detector is not None:
            load_detector(settings["prediction_detector"], monitor._detector, state["detector"])
        monitor.reference_changed = False
        return monitor

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"LabelFreeMonitor({shown}, seed={self.seed})"


def _count(state: Mapping[str, Any], key: str, low: int = 0) -> int:
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**63:
        raise MonitorStateError(f"label-free monitor: {key} must be an integer >= {low}")
    return value


def _check_settings(s: Mapping[str, Any]) -> None:
    """Refuse settings outside what :class:`~fedge.contracts.config.MonitorConfig` allows."""
    allowed = {
        "input_test": INPUT_TESTS, "input_correction": CORRECTIONS,
        "prediction": PREDICTION_SIGNALS, "prediction_detector": PREDICTION_DETECTORS,
    }
    for key, choices in allowed.items():
        if s[key] not in choices:
            raise ValueError(f"monitor.{key}: {s[key]!r} is not allowed; allowed: {', '.join(choices)}")
    if not 0 < s["input_alpha"] <= 0.5:
        raise ValueError(f"monitor.input_alpha: {s['input_alpha']!r} must be within (0, 0.5]")
    if not 10 <= s["reference_size"] <= 10_000:
        raise ValueError(f"monitor.reference_size: {s['reference_size']!r} must be within [10, 10000]")
    if not 10 <= s["permutations"] <= 10_000:
        raise ValueError(f"monitor.mmd_permutations: {s['permutations']!r} must be within [10, 10000]")


def calibration_table(confidence: np.ndarray, correct: np.ndarray) -> list[float]:
    """Per confidence bin, the holdout's accuracy shrunk toward the bin's mean confidence.

    Equal-width bins over [0, 1]; an empty bin keeps its centre (the identity).
    """
    bins = np.minimum((confidence * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    centres = (np.arange(CALIBRATION_BINS) + 0.5) / CALIBRATION_BINS
    counts = np.bincount(bins, minlength=CALIBRATION_BINS).astype(np.float64)
    hits = np.bincount(bins, weights=correct.astype(np.float64), minlength=CALIBRATION_BINS)
    conf_sum = np.bincount(bins, weights=confidence, minlength=CALIBRATION_BINS)
    mean_conf = np.where(counts > 0, conf_sum / np.maximum(counts, 1), centres)
    table = (hits + _PRIOR * mean_conf) / (counts + _PRIOR)
    return [float(v) for v in np.clip(table, 0.0, 1.0)]


def estimated_accuracy(confidence: np.ndarray, table: list[float] | None) -> float:
    """CBPE-style accuracy estimate: mean (calibrated) max-probability of a tick."""
    if table is None:
        return float(confidence.mean())
    bins = np.minimum((confidence * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    return float(np.asarray(table)[bins].mean())


def class_probabilities(task: Any, model: Any, x: np.ndarray) -> np.ndarray | None:
    """Softmax of a classifier's outputs on ``x`` (already shaped); None for a regression."""
    if task.regression or len(x) == 0:
        return None
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(x, dtype=task.dtype))
        return torch.softmax(logits.reshape(len(x), -1), dim=1).double().numpy()  # type: ignore[no-any-return]


def restore_label_free(store: Any, fresh: LabelFreeMonitor) -> LabelFreeMonitor:
    """The monitor saved in a device store, or ``fresh``.

    A state that is refused (tampered, another version, a reference that fails
    authentication or does not match its digest) is quarantined by the store and
    ``fresh`` is used; so is a state saved under other ``[monitor]`` settings,
    whose reference and detector answer another question.
    """
    state = store.get_state(STATE_KEY)
    if state is None:
        return fresh
    try:
        sealed = store.get_state(REFERENCE_KEY)
        cipher = RecordCipher(read_key_file(store.key_path))
        reference = None if sealed is None else cipher.open(sealed, _REFERENCE_AAD)
        restored = LabelFreeMonitor.from_bytes(state, reference)
    except (MonitorStateError, RecordAuthenticationError) as exc:
        store.quarantine_state(STATE_KEY, str(exc), expected=state)
        return fresh
    return restored if restored.settings == fresh.settings else fresh


def persist_label_free(store: Any, monitor: LabelFreeMonitor) -> None:
    """Write the monitor's state; the reference, sealed, only when it changed."""
    if monitor.reference_changed:
        cipher = RecordCipher(read_key_file(store.key_path))
        store.put_state(REFERENCE_KEY, cipher.seal(monitor.reference_bytes(), _REFERENCE_AAD))
        monitor.reference_changed = False
    store.put_state(STATE_KEY, monitor.to_bytes())
