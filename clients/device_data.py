"""A device's data path: what it takes from its inbox each tick, and the labels that come late.

:class:`clients.device.Device` monitors a tick; this module reads what the device
application put in the inbox for it (rows, labelled or not, and late labels for rows
of earlier ticks), keeps the cursors in the store so each batch is taken once, and
scores late labels: each one against the prediction the model deployed when its
sample arrived made then (kept, sealed, with the sample in the store), never against
today's model. A late label feeds the label-based detector only if that model belongs
to the detector's current error stream (the detector restarts with a new model
lineage, and an old model's mistakes are not the new one's).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from clients.inbox import Batch, Inbox, InboxSchema, LateLabels, inbox_path
from fedge.contracts.task import regression_errors

if TYPE_CHECKING:
    from clients.device import Device

log = logging.getLogger("fedge.device")

INBOX_CURSOR_KEY = "inbox-cursor"
LABEL_CURSOR_KEY = "inbox-label-cursor"
#: Model versions whose predictions feed the detector's current error stream (JSON list).
STREAM_KEY = "label-stream"
_STREAM_MEMORY = 64


def check_schema(task: Any, schema: InboxSchema, device_id: int) -> None:
    """Refuse, in one line, rows the task cannot learn from: another width or target kind.

    Class labels train a classifier, and (integer-valued) a one-output regression;
    float targets a one-output regression; vector targets of ``k`` values a
    regression with ``N_OUTPUTS = k``.

    Raises
    ------
    ValueError
        The task's input shape or label kind does not fit the inbox's rows.
    """
    width = task.n_features(schema.n_features)
    where = f"device {device_id}: the task {task.name or 'model'!r}"
    if width != schema.n_features:
        raise ValueError(
            f"{where}'s input shape {task.input_shape(width)} needs rows of {width} features; "
            f"the inbox holds rows of {schema.n_features}"
        )
    targets, outputs = schema.targets, task.n_outputs(schema.n_classes)
    if not task.regression and not targets.is_class:
        raise ValueError(f"{where} is a classifier (LABEL_KIND = \"class\"); the inbox holds "
                         f"{targets.describe()}: set LABEL_KIND = \"regression\" in the task")
    if task.regression and outputs != (targets.size if targets.kind == "vector" else 1):
        raise ValueError(f"{where} has {outputs} outputs (N_OUTPUTS); the inbox holds {targets.describe()}")


def _open_inbox(device: Device) -> Inbox | None:
    path = inbox_path(device.store.path)
    if not path.exists():
        return None
    schema = device.schema
    return Inbox(path, n_features=schema.n_features, n_classes=schema.n_classes, targets=schema.targets,
                 key_file=device.store.key_path)


def read_inbox(device: Device, tick: int) -> tuple[Batch | None, LateLabels | None]:
    """Rows and late labels the device application put in the inbox up to ``tick``.

    ``(None, None)`` when the device has no inbox (it has no data then). The cursors
    live in the store, so a batch is taken exactly once even across restarts.
    """
    inbox = _open_inbox(device)
    if inbox is None:
        return None, None
    with inbox:
        raw = device.store.get_state(INBOX_CURSOR_KEY)
        batch = inbox.take(after=int(raw) if raw else 0, through_tick=tick)
        raw = device.store.get_state(LABEL_CURSOR_KEY)
        labels = inbox.take_labels(after=int(raw) if raw else 0, through_tick=tick)
    bad = batch.unauthenticated + labels.unauthenticated
    if bad:
        # Changed on disk since it was sealed: never read as data, counted for the operator.
        device.counters["inbox_unauthenticated"] = device.counters.get("inbox_unauthenticated", 0) + bad
    return batch, labels


def keep_cursors(device: Device, batch: Batch | None, labels: LateLabels | None) -> None:
    """Record what was taken (inside the tick's store transaction)."""
    if batch is not None and not batch.empty:
        device.store.put_state(INBOX_CURSOR_KEY, str(batch.last_batch_id).encode())
    if labels is not None and not labels.empty:
        device.store.put_state(LABEL_CURSOR_KEY, str(labels.last_id).encode())


def prune_inbox(device: Device, batch: Batch | None, labels: LateLabels | None) -> None:
    """Drop what the store holds now from the inbox, so it stays small."""
    if (batch is None or batch.empty) and (labels is None or labels.empty):
        return
    with Inbox(inbox_path(device.store.path), key_file=device.store.key_path) as inbox:
        if batch is not None and not batch.empty:
            inbox.prune(batch.last_batch_id)
        if labels is not None and not labels.empty:
            inbox.prune_labels(labels.last_id)


def mistakes(task: Any, predicted: np.ndarray, y: np.ndarray, tolerance: Any) -> np.ndarray:
    """The 0/1 errors of predictions against labels, as :meth:`Task.errors` counts them."""
    if task.regression:
        return regression_errors(y, predicted, tolerance)
    return (np.asarray(predicted) != y).astype(np.int8)


def stream_versions(device: Device) -> list[int]:
    """Versions whose predictions belong to the detector's current error stream."""
    raw = device.store.get_state(STREAM_KEY)
    try:
        versions = json.loads(raw) if raw else []
    except ValueError:
        versions = []
    return [int(v) for v in versions if isinstance(v, int)] or ([device.version] if device.version else [])


def note_install(device: Device, version: int, restarted: bool) -> None:
    """A model was installed: it joins the detector's stream, or starts a new one."""
    versions = [] if restarted else stream_versions(device)
    device.store.put_state(STREAM_KEY, json.dumps([*versions, int(version)][-_STREAM_MEMORY:]).encode())


@dataclass
class LabelTally:
    """What the late labels of one tick did (the report's label fields)."""

    late: int = 0
    late_errors: int = 0
    delay: float = 0.0
    rejected: int = 0
    #: Errors of the late labels that feed the detector, in arrival order.
    stream_errors: np.ndarray | None = None
    #: Scored late labels by the tick of their samples: tick -> [labels, errors].
    by_tick: dict[int, list[int]] = field(default_factory=dict)

    def fields(self) -> dict[str, int | float]:
        return {
            "late_labels": self.late,
            "late_errors": self.late_errors,
            "label_delay": self.delay,
            "labels_rejected": self.rejected,
        }


def apply_late_labels(device: Device, labels: LateLabels | None, tick: int) -> LabelTally:
    """Label the stored samples, score each with its arrival model; refusals are logged.

    Runs inside the tick's store transaction. A label for a sample the window does not
    hold (never stored, dropped by a reset or by the window's capacity) or that has a
    label already is refused and counted, never an error.
    """
    tally = LabelTally(stream_errors=np.zeros(0, dtype=np.int8))
    if labels is None or not len(labels.ids):
        return tally
    outcomes = device.store.label(labels.ids.tolist(), list(labels.labels))
    stream = set(stream_versions(device))
    tolerance = device._tolerance()
    refused: Counter[str] = Counter()
    delays: list[int] = []
    fed: list[int] = []
    for (status, sample_tick, predicted, version), label, arrived, sample in zip(
        outcomes, labels.labels, labels.ticks, labels.ids, strict=True
    ):
        if status != "ok":
            refused[status] += 1
            if refused[status] <= 3:
                why = "is not in the window" if status == "unknown" else "has a label already"
                log.info("device %d tick %d: late label for sample %d refused: it %s",
                         device.device_id, tick, sample, why)
            continue
        tally.late += 1
        delays.append(max(0, int(arrived) - sample_tick))
        if version <= 0:
            continue  # no model when it arrived: a training label, nothing to score
        wrong = int(mistakes(device.task, np.asarray([predicted]), np.asarray([label]), tolerance)[0])
        tally.late_errors += wrong
        own_tick = tally.by_tick.setdefault(int(sample_tick), [0, 0])
        own_tick[0] += 1
        own_tick[1] += wrong
        if version in stream:
            fed.append(wrong)
    tally.rejected = sum(refused.values())
    tally.delay = float(np.mean(delays)) if delays else 0.0
    tally.stream_errors = np.asarray(fed, dtype=np.int8)
    if tally.rejected:
        log.warning("device %d tick %d: refused %d late labels (%s)", device.device_id, tick,
                    tally.rejected, ", ".join(f"{k} {v}" for k, v in sorted(refused.items())))
    return tally


def note_amendments(device: Device, tally: LabelTally) -> None:
    """Keep the tick's late labels by sample tick until a reply carries them (see take_amendments)."""
    pending = device.late_by_tick
    for tick, (labels, errors) in tally.by_tick.items():
        have = pending.setdefault(tick, [0, 0])
        have[0] += labels
        have[1] += errors


def take_amendments(device: Device) -> dict[int, list[int]]:
    """The late labels by sample tick gathered since the last reply, and forget them.

    They live in the device process's memory: a reply lost with its process loses
    them (the arrival tick's report still counts them in ``late_labels``).
    """
    pending, device.late_by_tick = device.late_by_tick, {}
    return pending
