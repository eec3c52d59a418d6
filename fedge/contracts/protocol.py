"""The wire contract between the fedge server and its devices.

This is the one place that says what crosses the wire. Messages use Flower's
three message types; each carries named records:

========== ======================================= ==========================================
type       server -> device                        device -> server
========== ======================================= ==========================================
query      ``config`` (tick, champion version),    ``report``: a :class:`DriftReport`
           ``arrays`` when the device's model is   (flags, counts, summary statistics,
           stale, with its seal in ``config``      models refused); ``health``: a
                                                   :class:`DeviceHealth` (scalars only)
train      ``arrays`` (global model), ``config``   ``arrays`` (local model), ``metrics``
           (round, epochs, lr, batch size, mu)     (num-examples, train_loss)
evaluate   ``arrays`` (candidate), ``config``      ``metrics`` (num-examples, eval_acc,
                                                   eval_loss, champion_acc)
evaluate.  ``model-0`` .. ``model-7`` (the models  ``metrics`` (num-examples, ``correct-0`` ..
scores     in service), ``config`` (tick)          ``correct-7``: how many of the device's
                                                   latest samples each model gets right)
========== ======================================= ==========================================

Store and forward: every report waits in the device's outbox until the server
acknowledges it. A ``query`` reply carries, beside the current ``report``, up to
:data:`MAX_LATE_REPORTS` older reports still waiting (``late-0``, ``late-1``, ...;
each a :class:`DriftReport` of the tick it belongs to: ticks the device monitored
while it was unreachable, or whose reply was lost). The next ``query`` carries
``reports-received``, the ticks of the reports the server got from that device,
and the device drops them from its outbox; what was not acknowledged is sent again.

With several models in service (one per cluster of devices), ``query`` also
carries ``model-family``: the cluster the sent model belongs to. A device
restarts its drift detector only when the family changes, so a model that is
retrained on the same cluster's data keeps one continuous error stream.

Nothing per sample ever leaves a device: a report holds counts and rates, a
train reply holds model weights and a loss, an evaluate reply holds accuracies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

ARRAYS = "arrays"
CONFIG = "config"
REPORT = "report"
#: Query reply record: the device's :class:`DeviceHealth` at this tick.
HEALTH = "health"
#: Late labels by the tick of their samples, so each folds into its own tick's accuracy.
LATE_LABELS = "late-labels"
#: Query reply record, only when the query asked for it (:data:`DIAGNOSE`): the
#: device's :class:`DeviceDiagnostics` (counts and codes, no sample).
DIAGNOSTICS = "diagnostics"
#: Sample ticks one reply may amend; labels of more ticks count at their arrival only.
MAX_AMENDED_TICKS = 16
LATE_LABEL_FIELDS: tuple[str, ...] = tuple(
    f"{key}_{slot}" for slot in range(MAX_AMENDED_TICKS) for key in ("tick", "labels", "errors")
)
METRICS = "metrics"

NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train_loss"
EVAL_ACC = "eval_acc"
EVAL_LOSS = "eval_loss"
CHAMPION_ACC = "champion_acc"
#: Fraction of held-out samples exactly one of candidate and champion gets right.
DISCORDANT = "discordant"

TICK = "tick"
CHAMPION_VERSION = "champion-version"
ROUND = "server-round"
LOCAL_EPOCHS = "local-epochs"
LR = "lr"
BATCH_SIZE = "batch-size"
PROXIMAL_MU = "proximal-mu"
#: Codec of the train reply's arrays (see :mod:`fedge.contracts.compression`); absent means "none".
COMPRESSION = "compression"
SEED = "seed"
#: Train config flag: report a weight of 1 instead of the example count (central DP
#: campaigns average unweighted, the average the noise is calibrated to).
EQUAL_WEIGHTS = "equal-weights"
MODEL_FAMILY = "model-family"
#: Query config, beside a sent model: its seal (see :mod:`fedge.contracts.signing`), hex
#: strings. A device installs the model only when the seal verifies for the weights
#: and ``champion-version``; a model without them is refused.
MODEL_SHA256 = "model-sha256"
MODEL_SIGNATURE = "model-signature"
MODEL_SIGNING_KEY = "model-signing-key"
#: Query config: ticks of the reports the server received from this device in its
#: previous reply; the device drops them from its outbox (a list of ints).
REPORTS_RECEIVED = "reports-received"
#: Query config flag: an operator asked this device for a diagnostic summary
#: (``fedge diagnose``); the reply carries a :data:`DIAGNOSTICS` record.
DIAGNOSE = "diagnose"

#: Most outbox reports one ``query`` reply carries beside the current one.
MAX_LATE_REPORTS = 16


def late_label_record(by_tick: Mapping[int, Sequence[int]]) -> dict[str, int]:
    """``{tick: (labels, errors)}`` as the scalars of a ``late-labels`` record (newest ticks kept)."""
    out: dict[str, int] = {}
    for slot, tick in enumerate(sorted(by_tick)[-MAX_AMENDED_TICKS:]):
        labels, errors = by_tick[tick]
        out.update({f"tick_{slot}": int(tick), f"labels_{slot}": int(labels), f"errors_{slot}": int(errors)})
    return out


def read_late_labels(record: Mapping[str, Any]) -> dict[int, tuple[int, int]]:
    """The ``{tick: (labels, errors)}`` of a ``late-labels`` record; ill-formed slots raise ValueError."""
    out: dict[int, tuple[int, int]] = {}
    for slot in range(MAX_AMENDED_TICKS):
        if f"tick_{slot}" not in record:
            continue
        values = [record.get(f"{key}_{slot}") for key in ("tick", "labels", "errors")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ValueError(f"late labels: slot {slot} is not three non-negative ints: {values!r}")
        tick, labels, errors = values
        if errors > labels:
            raise ValueError(f"late labels: tick {tick} has {errors} errors in {labels} labels")
        out[tick] = (labels, errors)  # type: ignore[assignment]
    return out


def late_report(slot: int) -> str:
    """Config record name of the outbox report in ``slot`` of a ``query`` reply."""
    return f"late-{slot}"


LATE_REPORTS: tuple[str, ...] = tuple(late_report(i) for i in range(MAX_LATE_REPORTS))

#: Action of the ``evaluate`` message that scores several models on a device's latest samples.
SCORES = "scores"
#: Most models one ``evaluate.scores`` message may carry.
MAX_SCORED_MODELS = 8


def scored_model(slot: int) -> str:
    """Array record name of the model in ``slot`` of an ``evaluate.scores`` message."""
    return f"model-{slot}"


def scored_correct(slot: int) -> str:
    """Metric name of the samples the model in ``slot`` got right."""
    return f"correct-{slot}"


SCORE_KEYS: tuple[str, ...] = tuple(scored_correct(i) for i in range(MAX_SCORED_MODELS))

#: Drift signals a report may carry: the prequential (label-based) detector, the
#: label-free input test and the label-free prediction (confidence) detector.
DRIFT_SIGNALS: tuple[str, ...] = ("label", "input", "prediction")
LABEL_FREE_SIGNALS: tuple[str, ...] = ("input", "prediction")

#: Metric names a device may send, per reply type.
DEVICE_METRICS: dict[str, tuple[str, ...]] = {
    "train": (NUM_EXAMPLES, TRAIN_LOSS),
    "evaluate": (NUM_EXAMPLES, EVAL_ACC, EVAL_LOSS, CHAMPION_ACC, DISCORDANT, *SCORE_KEYS),
}


@dataclass(frozen=True)
class DriftReport:
    """What a device says about itself at one monitoring tick.

    Parameters
    ----------
    device : int
        The device's stable partition id (pseudonymous; not the Flower node id).
    tick : int
        Monitoring tick the report belongs to.
    model_version : int
        Version of the model the device predicted with (0: none yet).
    n_samples : int
        Valid samples received this tick.
    n_errors : int
        Of those, samples the deployed model got wrong (prequential test).
    drift : bool
        True when the detector fired on this tick's error stream.
    n_drifts : int
        Detections within this tick.
    drifts_total : int
        Detections over the device's lifetime (survives restarts).
    window_size : int
        Samples held in the device's bounded window after this tick.
    rejected_non_finite, rejected_wrong_width, rejected_unknown_label : int
        Rows refused at the source this tick, by reason.
    audit_entries : int, default 0
        Entries in the device's audit log when the report was made (0: none, or
        a device that does not say); the server keeps them as anchors
        (:class:`fedge.privacy.anchors.AuditAnchors`) to catch a log cut short,
        emptied, deleted or rewritten afterwards.
    audit_head_hi, audit_head_lo : int, default 0
        The first 128 bits of the hash of the log's last entry, as two signed
        64-bit ints (see :func:`fedge.privacy.audit.anchor_fields`).
    models_refused : int, default 0
        Models the device refused to install over its lifetime (seal missing,
        not matching the weights, or not from the server's key).
    model_refusal : int, default 0
        Why the last one was refused, as a code of
        :data:`fedge.contracts.signing.REFUSAL_CODES` (0: none refused).
    input_tested : bool, default False
        Whether the label-free input test ran on this tick's rows
        (:mod:`clients.label_free`).
    drift_input : bool, default False
        The input test flagged this tick's inputs against the reference window.
    input_statistic : float, default 0.0
        The test's statistic (largest per-feature KS distance, or squared MMD).
    input_p_value : float, default 1.0
        Its p-value, corrected over the features for KS (1.0: not tested).
    drift_prediction : bool, default False
        The river detector on the model's confidence (or entropy) stream fired.
    confidence : float, default 0.0
        Mean max-probability of the deployed model on this tick's rows (0: none).
    estimated_accuracy : float, default -1.0
        Accuracy estimated from confidence, calibrated at install (-1: none).
    n_labelled : int, default -1
        Of ``n_samples``, rows that came with a label (-1: a device that predates
        unlabelled rows, where every row is labelled).
    n_scored : int, default -1
        Labels scored this tick against the model's predictions (the tick's own
        labelled rows and late labels of the current model's stream); ``n_errors``
        counts the wrong ones (-1: as ``n_samples``).
    late_labels : int, default 0
        Labels of earlier samples that arrived this tick, each scored with the
        prediction of the model deployed when its sample arrived.
    late_errors : int, default 0
        Of those, the ones that model got wrong.
    label_delay : float, default 0.0
        Mean ticks between a late label's sample and its arrival (0: none arrived).
    labels_outstanding : int, default 0
        Samples in the window still waiting for a label.
    labels_rejected : int, default 0
        Late labels refused this tick (sample unknown, dropped from the window, or
        labelled already); each is also logged on the device.
    window_labelled : int, default -1
        Labelled samples in the window (what a campaign could train on; -1: unknown).

    ``drift`` stays the label-based detector's flag; :attr:`signals` names every
    signal that fired.
    """

    device: int
    tick: int
    model_version: int
    n_samples: int
    n_errors: int
    drift: bool
    n_drifts: int
    drifts_total: int
    window_size: int
    rejected_non_finite: int = 0
    rejected_wrong_width: int = 0
    rejected_unknown_label: int = 0
    audit_entries: int = 0
    audit_head_hi: int = 0
    audit_head_lo: int = 0
    models_refused: int = 0
    model_refusal: int = 0
    input_tested: bool = False
    drift_input: bool = False
    input_statistic: float = 0.0
    input_p_value: float = 1.0
    drift_prediction: bool = False
    confidence: float = 0.0
    estimated_accuracy: float = -1.0
    n_labelled: int = -1
    n_scored: int = -1
    late_labels: int = 0
    late_errors: int = 0
    label_delay: float = 0.0
    labels_outstanding: int = 0
    labels_rejected: int = 0
    window_labelled: int = -1

    @property
    def signals(self) -> tuple[str, ...]:
        """The drift signals that fired this tick, of :data:`DRIFT_SIGNALS`."""
        fired = (self.drift, self.drift_input, self.drift_prediction)
        return tuple(name for name, on in zip(DRIFT_SIGNALS, fired, strict=True) if on)

    @property
    def estimate(self) -> float | None:
        """The confidence-based accuracy estimate, None when the device made none."""
        return self.estimated_accuracy if self.estimated_accuracy >= 0 else None

    @property
    def rejected(self) -> int:
        """All rows refused this tick."""
        return self.rejected_non_finite + self.rejected_wrong_width + self.rejected_unknown_label

    @property
    def scored(self) -> int:
        """Labels the tick's accuracy rests on (``n_samples`` for a device that predates labels)."""
        return self.n_samples if self.n_scored < 0 else self.n_scored

    @property
    def accuracy(self) -> float | None:
        """Prequential accuracy over this tick's scored labels; None without a model or labels."""
        if self.model_version == 0 or self.scored == 0:
            return None
        return 1.0 - self.n_errors / self.scored

    def to_dict(self) -> dict[str, Any]:
        """Plain scalars, ready for a Flower ``ConfigRecord``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> DriftReport:
        """Read a report, refusing missing or ill-typed fields with one line."""
        values = {}
        for f in fields(cls):
            if f.name not in data:
                if f.default is not MISSING:
                    continue
                raise ValueError(f"drift report: missing field {f.name!r}")
            value = data[f.name]
            want = {"bool": bool, bool: bool, "float": float, float: float}.get(f.type, int)
            if want is bool and not isinstance(value, bool):
                raise ValueError(f"drift report: field {f.name!r} must be a bool, got {value!r}")
            if want is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"drift report: field {f.name!r} must be an int, got {value!r}")
            if want is float:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"drift report: field {f.name!r} must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise ValueError(f"drift report: field {f.name!r} must be finite, got {value!r}")
                value = float(value)
            values[f.name] = value
        return cls(**values)


REPORT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(DriftReport))


#: Error types a device names in its health (``last_error``); anything else is "other".
#: A code, never the class name: a user's exception class is the user's text.
ERROR_KINDS: tuple[str, ...] = (
    "none",
    "other",
    "ValueError",
    "TypeError",
    "KeyError",
    "IndexError",
    "OSError",
    "MemoryError",
    "RuntimeError",
    "TimeoutError",
    "ArithmeticError",
    "AssertionError",
    "ImportError",
    "NotImplementedError",
)
ERROR_CODES: dict[str, int] = {name: code for code, name in enumerate(ERROR_KINDS)}


def error_code(exc: BaseException) -> int:
    """The :data:`ERROR_KINDS` code of an exception: its nearest listed base class, else "other".

    >>> error_code(FileNotFoundError("x")), ERROR_KINDS[error_code(FileNotFoundError("x"))]
    (6, 'OSError')
    """
    for klass in type(exc).__mro__:
        code = ERROR_CODES.get(klass.__name__)
        if code is not None and klass.__module__ == "builtins":
            return code
    return ERROR_CODES["other"]


@dataclass(frozen=True)
class DeviceHealth:
    """How a device is doing, beside its drift report: counts and scalars only.

    Parameters
    ----------
    device : int
        The device's stable partition id.
    tick : int
        The tick of the query this health answers.
    model_version : int
        Version of the model the device runs (0: none).
    model_verified : bool
        The model it runs was installed with a seal that verified under the
        server's key (False with no model, or no key to check with).
    models_refused : int
        Models refused over the device's lifetime.
    ticks_since_report : int
        Ticks between this query and the device's previous monitored tick
        (1 when it is polled every tick; -1 on its first tick).
    live_accuracy : float
        This tick's prequential accuracy, the confidence estimate where no
        label arrived (-1: neither).
    accuracy_estimated : bool
        ``live_accuracy`` is the estimate, not measured on labels.
    drifting : bool
        A drift signal fired on this tick.
    drifts_total : int
        Detections over the device's lifetime.
    rejected_non_finite, rejected_wrong_width, rejected_unknown_label : int
        Rows refused this tick, by reason.
    rejected_total : int
        Rows refused over the device's lifetime.
    labels_outstanding : int
        Rows still waiting for their label (0 where labels come with the rows).
    store_rows : int
        Samples in the device's bounded window.
    outbox_reports : int
        Reports waiting for the server's acknowledgement.
    handler_seconds : float
        Seconds this query took on the device up to the reply.
    resident_bytes : int
        Resident memory of the device process.
    uptime_seconds : float
        Seconds since the device process opened this device.
    errors_total : int
        Handler failures since the device process opened it.
    last_error : int
        Type of the latest handler failure, a code of :data:`ERROR_KINDS` (0: none).
    """

    device: int
    tick: int
    model_version: int = 0
    model_verified: bool = False
    models_refused: int = 0
    ticks_since_report: int = -1
    live_accuracy: float = -1.0
    accuracy_estimated: bool = False
    drifting: bool = False
    drifts_total: int = 0
    rejected_non_finite: int = 0
    rejected_wrong_width: int = 0
    rejected_unknown_label: int = 0
    rejected_total: int = 0
    labels_outstanding: int = 0
    store_rows: int = 0
    outbox_reports: int = 0
    handler_seconds: float = 0.0
    resident_bytes: int = 0
    uptime_seconds: float = 0.0
    errors_total: int = 0
    last_error: int = 0

    @property
    def accuracy(self) -> float | None:
        """The live accuracy, None when the device had none this tick."""
        return self.live_accuracy if self.live_accuracy >= 0 else None

    @property
    def error_kind(self) -> str:
        """The name of :attr:`last_error` ("none" when the device has not failed)."""
        return ERROR_KINDS[self.last_error] if 0 <= self.last_error < len(ERROR_KINDS) else "other"

    def to_dict(self) -> dict[str, Any]:
        """Plain scalars, ready for a Flower ``ConfigRecord``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> DeviceHealth:
        """Read a health record, refusing missing or ill-typed fields with one line."""
        return cls(**_typed_fields(cls, data, "device health"))


def _typed_fields(cls: Any, data: Any, what: str) -> dict[str, Any]:
    """The dataclass fields of ``cls`` found in ``data``, type-checked (one-line ``ValueError``)."""
    values = {}
    for f in fields(cls):
        if f.name not in data:
            if f.default is not MISSING:
                continue
            raise ValueError(f"{what}: missing field {f.name!r}")
        value = data[f.name]
        want = {"bool": bool, "float": float}.get(str(f.type), int)
        if want is bool and not isinstance(value, bool):
            raise ValueError(f"{what}: field {f.name!r} must be a bool, got {value!r}")
        if want is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{what}: field {f.name!r} must be an int, got {value!r}")
        if want is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{what}: field {f.name!r} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{what}: field {f.name!r} must be finite, got {value!r}")
            value = float(value)
        values[f.name] = value
    return values


HEALTH_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(DeviceHealth))


#: Drift detectors a diagnostic summary names, by code (0: one this list does not know).
DETECTOR_KINDS: tuple[str, ...] = (
    "other", "ADWIN", "KSWIN", "PageHinkley", "DDM", "EDDM", "HDDM_A", "HDDM_W",
)
#: 32-bit words of a config digest (a SHA-256): the egress policy lets only scalars leave.
DIGEST_WORDS = 8
#: Scalars of a :data:`DIAGNOSTICS` record (see :class:`fedge.contracts.diagnostics.DeviceDiagnostics`).
DIAGNOSTIC_SCALARS: tuple[str, ...] = (
    "device", "tick", "store_rows", "store_labelled", "labels_outstanding", "outbox_reports",
    "store_bytes", "audit_bytes", "inbox_bytes", "detector", "samples_seen", "drifts_total",
    "detector_estimate", "model_version", "previous_version", "uptime_seconds", "errors_total",
)


def error_count_key(kind: str) -> str:
    """The diagnostics key counting handler failures of one :data:`ERROR_KINDS` kind."""
    return f"errors_{kind}"


def digest_key(word: int) -> str:
    """The diagnostics key of one 32-bit word of the config digest."""
    return f"config_digest_{word}"


DIAGNOSTICS_FIELDS: tuple[str, ...] = (
    *DIAGNOSTIC_SCALARS,
    *(error_count_key(kind) for kind in ERROR_KINDS[1:]),
    *(digest_key(i) for i in range(DIGEST_WORDS)),
)


#: The egress policy: what a device may send, per reply type. Each entry maps a
#: record name to its kind and, for config and metric records, the keys allowed
#: (scalars only). Array records must mirror the names and shapes of the model
#: the server sent in the same exchange; nothing else may leave.
EGRESS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "query": {
        REPORT: ("config", REPORT_FIELDS),
        HEALTH: ("config", HEALTH_FIELDS),
        LATE_LABELS: ("config", LATE_LABEL_FIELDS),
        DIAGNOSTICS: ("config", DIAGNOSTICS_FIELDS),
        **{name: ("config", REPORT_FIELDS) for name in LATE_REPORTS},
    },
    "train": {ARRAYS: ("arrays", ()), METRICS: ("metrics", DEVICE_METRICS["train"])},
    "evaluate": {METRICS: ("metrics", DEVICE_METRICS["evaluate"])},
}
