"""A device: its store, its drift monitor, its local data and the deployed model.

:class:`Device` is what the Flower ClientApp's handlers call. Every piece of
state that must outlive a restart (window, detector, deployed model, counters,
the reports the server has not acknowledged) is written to the
:class:`~clients.store.DeviceStore` before a reply leaves.

Store and forward: each monitored tick's report waits in the store's outbox
until the server acknowledges it. A device that was unreachable for some ticks
monitors them when it is polled again (:meth:`Device.catch_up`: each missed
tick's rows from its inbox, with the model it had then), and its reply carries
those reports, each marked with its own tick.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients import device_data
from clients.inbox import Batch, InboxSchema, inbox_path, read_schema
from clients.label_free import (
    LabelFreeMonitor,
    LabelFreeUpdate,
    class_probabilities,
    persist_label_free,
    restore_label_free,
)
from clients.monitor import DriftMonitor, MonitorStateError
from clients.store import DeviceStore
from clients.validation import validate_rows
from fedge.contracts import model as nets
from fedge.contracts.compression import encode_update
from fedge.contracts.config import FedgeConfig
from fedge.contracts.protocol import MAX_LATE_REPORTS, DriftReport
from fedge.contracts.signing import (
    REFUSAL_CODES,
    ModelSeal,
    ModelVerifier,
    SigningKeyError,
    public_key_path,
    verify_model,
    weights_digest,
)
from fedge.contracts.task import task_for
from fedge.privacy.audit import anchor_fields, chain_head

log = logging.getLogger("fedge.device")

MONITOR_KEY = "monitor"
COUNTERS_KEY = "counters"
GENERATION_KEY = "generation"
RESIDUAL_KEY = "upload-residual"
FAMILY_KEY = "model-family"
INBOX_CURSOR_KEY = device_data.INBOX_CURSOR_KEY
LAST_TICK_KEY = "last-tick"
LAST_REPORT_KEY = "last-report"
MODEL_SEAL_KEY = "model-seal"
MODEL_REFUSED_KEY = "model-refused"

torch.set_num_threads(1)


class TooFewLabels(ValueError):
    """A device asked to train holds fewer labelled samples than ``campaign.min_labels``."""


class Device:
    """One edge device.

    Parameters
    ----------
    cfg : FedgeConfig
        The run configuration (monitor, model and scenario sections are used).
    device_id : int
        Stable partition id of this device.
    store_path : Path
        SQLite file of the on-device store.
    schema : InboxSchema, optional
        Row width and number of classes. Omitted, they are read from the
        device's ingest inbox (``inbox_path(store_path)``), the device's one data
        source; a device with neither has no data and says so.
    audit_path : Path, optional
        The device's audit log, whose entry count and chain head each report
        carries; by default ``device-<id>.audit.jsonl`` beside the store (where
        :func:`clients.client_app.audit_path` puts it).
    """

    def __init__(
        self,
        cfg: FedgeConfig,
        device_id: int,
        store_path: Path,
        schema: InboxSchema | None = None,
        audit_path: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.schema = schema if schema is not None else read_schema(inbox_path(Path(store_path)))
        self.audit_path = (
            audit_path if audit_path is not None else Path(store_path).with_suffix(".audit.jsonl")
        )
        # The task (``model.task``) is imported here, in the device's own process.
        self.task = task_for(cfg)
        device_data.check_schema(self.task, self.schema, device_id)  # width and target kind
        self.store = DeviceStore(store_path, capacity=cfg.monitor.window, targets=self.schema.targets)
        self._model = self._build()
        self._generation: bytes | None = None
        self._said_no_data = False
        self.late_by_tick: dict[int, list[int]] = {}  # late labels by sample tick, until a reply carries them
        self._load()

    def _load(self) -> None:
        """Read detector, counters and deployed model from the store."""
        cfg, device_id = self.cfg, self.device_id
        self._generation = self.store.get_state(GENERATION_KEY)
        state = self.store.get_state(MONITOR_KEY)
        if state is not None:
            try:
                self.monitor = DriftMonitor.from_bytes(state)
            except MonitorStateError as exc:  # kept aside for inspection, never read again
                self.store.quarantine_state(MONITOR_KEY, str(exc), expected=state)
                state = None
        if state is None:
            self.monitor = DriftMonitor(
                cfg.monitor.detector, cfg.monitor.params, seed=cfg.scenario.seed + device_id
            )
        self.label_free = restore_label_free(
            self.store,
            LabelFreeMonitor.from_config(cfg.monitor, cfg.scenario.seed + device_id),
        )
        raw = self.store.get_state(COUNTERS_KEY)
        self.counters: dict[str, int] = json.loads(raw) if raw else {"rejected_total": 0}
        deployed = self.store.get_model()
        self.version = 0
        # The stored model is checked like one from the wire: a store edited behind the
        # device's back must not decide what it predicts with.
        if deployed is not None and self._stored_model_verifies(deployed[0], deployed[1]):
            self.version = deployed[0]
            nets.set_weights(self._model, deployed[1])

    def sync(self) -> None:
        """Reload if another process wrote this device's store since we last looked.

        Flower's simulation may hand one device's messages to different worker
        processes; the store, not any process's memory, is the device's state.
        """
        if self.store.get_state(GENERATION_KEY) != self._generation:
            self._load()

    # -- deployment --------------------------------------------------------------------------
    #: The server's model-signing public key, once read (see :meth:`_model_verifier`).
    _verifier: ModelVerifier | None = None
    _said_no_key = False

    def deploy(
        self,
        version: int,
        weights: dict[str, np.ndarray],
        family: int | None = None,
        seal: ModelSeal | None = None,
    ) -> bool:
        """Install a model whose seal verifies; a model of another lineage starts a new error stream.

        A model without a seal, or whose seal does not verify for these weights
        and this version under the server's public key, is refused: the device
        keeps its model and version, counts the refusal (its reports carry the
        count and the last reason) and logs a warning.

        Parameters
        ----------
        version : int
            Registry version of the model.
        weights : dict of ndarray
            The model's weights.
        family : int, optional
            The cluster the model serves. Given, the detector restarts only when the
            family changes (a retrained model of the same cluster continues the
            stream); omitted, it restarts whenever the version changes.
        seal : ModelSeal, optional
            The server's seal of the model (:mod:`fedge.contracts.signing`).

        Returns
        -------
        bool
            Whether the model was installed.
        """
        reason = verify_model(self._model_verifier(), version, weights, seal)
        if reason is not None:
            self._refuse_model(version, reason, "the server")
            with self.store.transaction():
                self._persist()
            return False
        assert seal is not None  # verified
        nets.set_weights(self._model, weights)
        previous = self.store.get_state(FAMILY_KEY)
        new_family = str(family).encode() if family is not None else None
        with self.store.transaction():
            self.store.put_model(version, weights)
            self.store.put_state(MODEL_SEAL_KEY, json.dumps(seal.to_dict()).encode())
            restart = previous != new_family if new_family is not None else self.version != version
            if restart:
                self.monitor.reset()
            if new_family is not None:
                self.store.put_state(FAMILY_KEY, new_family)
            device_data.note_install(self, version, restart)
            self._install_label_free()
            self._persist()
        self.version = version
        return True

    def _install_label_free(self) -> None:
        """Re-take the input reference; calibrate the confidence on the labelled holdout."""
        if not self.label_free.enabled:
            return
        x, _, _ = self.store.window()
        _, _, xh, yh = self._split()
        probs = class_probabilities(self.task, self._model, self._shaped(xh)) if len(yh) else None
        correct = None if probs is None else probs.argmax(axis=1) == yh
        self.label_free.install(x, probs, correct)

    def _model_verifier(self) -> ModelVerifier | None:
        """The server's public key this device checks models with (None: it has none).

        Read from ``run.model_public_key``, else ``<output>/state/model-signing.pub``;
        a missing key is looked for again next time (the server may write it later).
        """
        if self._verifier is not None:
            return self._verifier
        path = public_key_path(self.cfg.output_dir, self.cfg.run.model_public_key)
        try:
            self._verifier = ModelVerifier.from_file(path)
        except SigningKeyError as exc:
            if not self._said_no_key:
                log.warning("device %d cannot check models: %s", self.device_id, exc)
                self._said_no_key = True
            return None
        return self._verifier

    def _refuse_model(self, version: int, reason: str, source: str) -> None:
        """Count a refused model and say why (the caller persists the counters)."""
        self.counters["models_refused"] = self.counters.get("models_refused", 0) + 1
        self.counters["last_model_refusal"] = REFUSAL_CODES[reason]
        log.warning(
            "device %d refused model v%d from %s (%s); it keeps v%d",
            self.device_id,
            version,
            source,
            reason,
            self.version,
        )

    def _stored_model_verifies(self, version: int, weights: dict[str, np.ndarray]) -> bool:
        """Whether the model in the store still matches its seal; a refusal is counted once."""
        raw = self.store.get_state(MODEL_SEAL_KEY)
        try:
            seal = ModelSeal.from_dict(json.loads(raw)) if raw else None
        except (ValueError, TypeError, AttributeError):
            seal = ModelSeal("", "", "")  # unreadable: refused as malformed
        reason = verify_model(self._model_verifier(), version, weights, seal)
        if reason is None:
            return True
        # Another process (or a restart) reloads the same store: count this refusal once.
        marker = f"{version}:{weights_digest(weights).hex()}:{reason}".encode()
        if self.store.get_state(MODEL_REFUSED_KEY) != marker:
            self._refuse_model(version, reason, "its store")
            with self.store.transaction():
                self.store.put_state(MODEL_REFUSED_KEY, marker)
                self._persist()
        return False

    def _refusal_fields(self) -> dict[str, int]:
        """The report fields saying how many models were refused and why the last one was."""
        return {
            "models_refused": self.counters.get("models_refused", 0),
            "model_refusal": self.counters.get("last_model_refusal", 0),
        }

    # -- monitoring --------------------------------------------------------------------------
    def read_inbox(self, tick: int) -> Batch | None:
        """Rows the device application put in the ingest inbox up to ``tick`` (None: no inbox)."""
        return device_data.read_inbox(self, tick)[0]

    def monitor_tick(
        self,
        tick: int,
        x_raw: np.ndarray | Sequence[Any] | None = None,
        y_raw: np.ndarray | Sequence[Any] | None = None,
    ) -> DriftReport:
        """Validate, test-then-store this tick's rows and update the detector.

        Without explicit rows the device reads its ingest inbox; a device
        without an inbox has no data, reports no samples and says so once.
        """
        ingested, late = None, None
        if x_raw is None or y_raw is None:
            ingested, late = device_data.read_inbox(self, tick)
            if ingested is not None:
                x_raw, y_raw = ingested.x, self.schema.targets.as_input(ingested.y)
            else:
                if not self._said_no_data:
                    log.warning(
                        "device %d has no data: no ingest inbox at %s",
                        self.device_id,
                        inbox_path(self.store.path),
                    )
                    self._said_no_data = True
                x_raw = np.empty((0, self.schema.n_features), dtype=np.float32)
                y_raw = self.schema.targets.empty()
        rows = validate_rows(x_raw, y_raw, self.schema.n_features, self.schema.n_classes, self.schema.targets)
        rejected = dict(rows.rejected)
        if ingested is not None:
            # Rows the device application's ingest dropped count as rejected here too.
            rejected = {k: v + ingested.rejected.get(k, 0) for k, v in rejected.items()}
        labelled = rows.labelled
        # Every row is predicted on arrival (kept, sealed, for a label that comes later);
        # the labelled ones are scored now.
        predicted = self.task.predict(self._model, self._shaped(rows.x)) if self.version > 0 and len(rows.y) else None
        own = (
            device_data.mistakes(self.task, predicted[labelled], rows.y[labelled], self._tolerance(rows.y[labelled]))
            if predicted is not None
            else np.zeros(0, dtype=np.int8)
        )
        free = self._label_free_tick(rows.x)
        self.counters["rejected_total"] += rejected["total"]
        # Window, detector, counters and the outbox move together or not at all.
        with self.store.transaction():
            ids = ingested.ids[rows.index] if ingested is not None and len(ingested.ids) else None
            self.store.append(rows.x, rows.y, tick, samples=ids, predictions=predicted, predicted_by=self.version)
            labels = device_data.apply_late_labels(self, late, tick)
            device_data.note_amendments(self, labels)
            errors = np.concatenate([labels.stream_errors, own])
            drift, n_drifts = False, 0
            if len(errors):
                update = self.monitor.update(errors)
                drift, n_drifts = update.drift, update.n_drifts
            if (drift or free.drift) and self.cfg.monitor.reset_window_on_drift:
                # The window is the training data of the next campaign: keep only
                # samples of the new concept.
                self.store.drop_before(tick)
            device_data.keep_cursors(self, ingested, late)
            window, window_labelled = len(self.store), self.store.labelled_count()
            report = DriftReport(
                device=self.device_id,
                tick=tick,
                model_version=self.version,
                n_samples=len(rows.y),
                n_errors=int(own.sum()),  # late labels count at their own tick (amendments)
                drift=drift,
                n_drifts=n_drifts,
                drifts_total=self.monitor.drifts_total,
                window_size=window,
                rejected_non_finite=rejected["non_finite"],
                rejected_wrong_width=rejected["wrong_width"],
                rejected_unknown_label=rejected["unknown_label"],
                n_labelled=int(labelled.sum()),
                n_scored=len(own),
                labels_outstanding=window - window_labelled,
                window_labelled=window_labelled,
                **labels.fields(),
                **self._audit_anchor(),
                **self._refusal_fields(),
                **free.fields(),
            )
            self._record(report)
            self._persist()
        device_data.prune_inbox(self, ingested, late)
        if rejected["total"]:
            log.info("device %d tick %d: rejected %s", self.device_id, tick, rejected)
        return report

    def _label_free_tick(self, x: np.ndarray) -> LabelFreeUpdate:
        """Input test on every valid row; the deployed model's confidence on them."""
        if not self.label_free.enabled or not len(x):
            return LabelFreeUpdate()
        deployed = self.version > 0 and self.label_free.needs_confidence
        probs = class_probabilities(self.task, self._model, self._shaped(x)) if deployed else None
        return self.label_free.observe(x, probs)

    # -- store and forward -------------------------------------------------------------------
    @property
    def last_tick(self) -> int | None:
        """The latest tick this device monitored (None before the first)."""
        raw = self.store.get_state(LAST_TICK_KEY)
        return int(raw) if raw else None

    def _record(self, report: DriftReport) -> None:
        """Keep the report in the outbox until the server acknowledges it."""
        data = report.to_dict()
        dropped = self.store.put_report(report.tick, data)
        if dropped:
            self.counters["reports_dropped"] = self.counters.get("reports_dropped", 0) + dropped
        last = self.last_tick
        if last is None or report.tick >= last:
            self.store.put_state(LAST_TICK_KEY, str(report.tick).encode())
            self.store.put_state(LAST_REPORT_KEY, json.dumps(data).encode())

    def catch_up(self, tick: int) -> list[DriftReport]:
        """Monitor the ticks missed since the last one, oldest first, before ``tick``.

        A device that was unreachable still has its rows (in its inbox, or from its
        sensor); each missed tick is tested with the model the device had then,
        exactly as if it had been polled, and its report waits in the outbox.
        A device that never monitored anything has nothing to catch up.
        """
        last = self.last_tick
        if last is None or tick <= last + 1:
            return []
        missed = [self.monitor_tick(t) for t in range(last + 1, tick)]
        log.info(
            "device %d: monitored ticks %d-%d missed while unreachable",
            self.device_id,
            last + 1,
            tick - 1,
        )
        return missed

    def report_for(self, tick: int) -> DriftReport:
        """This tick's report: monitored once; a repeated poll gets the same report.

        A server that restarts polls the tick it had not finished again; the device
        answers with what it reported then instead of monitoring the tick twice.
        """
        last = self.last_tick
        if last is None or tick > last:
            return self.monitor_tick(tick)
        stored = self.store.get_report(tick)
        if stored is None and tick == last:
            raw = self.store.get_state(LAST_REPORT_KEY)
            stored = json.loads(raw) if raw else None
        if stored is not None:
            return DriftReport.from_dict(stored)
        log.warning(
            "device %d: tick %d was monitored before (latest %d) and its report was "
            "acknowledged; reporting no new samples",
            self.device_id,
            tick,
            last,
        )
        return DriftReport(
            device=self.device_id,
            tick=tick,
            model_version=self.version,
            n_samples=0,
            n_errors=0,
            drift=False,
            n_drifts=0,
            drifts_total=self.monitor.drifts_total,
            window_size=len(self.store),
            **self._audit_anchor(),
            **self._refusal_fields(),
        )

    def _audit_anchor(self) -> dict[str, int]:
        """The audit log's entry count and chain head, for the report (what the server anchors).

        An unreadable log is the egress mod's to refuse; the report then says nothing of it.
        """
        try:
            entries, head = chain_head(self.audit_path)
        except (OSError, ValueError) as exc:
            log.warning("device %d: audit log not anchored in this report: %s", self.device_id, exc)
            return {}
        if entries == 0:
            return {}
        hi, lo = anchor_fields(head)
        return {"audit_entries": entries, "audit_head_hi": hi, "audit_head_lo": lo}

    def backlog(self, current: int, limit: int = MAX_LATE_REPORTS) -> list[DriftReport]:
        """Reports still waiting for an acknowledgement, oldest first, except ``current``'s."""
        out = []
        for data in self.store.pending_reports(limit + 1):
            try:
                report = DriftReport.from_dict(data)
            except ValueError as exc:  # a store written by another version: skip, keep going
                log.warning("device %d: unreadable report in the outbox: %s", self.device_id, exc)
                continue
            if report.tick != current:
                out.append(report)
        return out[:limit]

    def acknowledge(self, ticks: Iterable[int]) -> int:
        """Drop the reports the server says it received; returns how many were waiting."""
        return self.store.ack_reports(ticks)

    def _persist(self) -> None:
        self.store.put_state(MONITOR_KEY, self.monitor.to_bytes())
        persist_label_free(self.store, self.label_free)
        self.store.put_state(COUNTERS_KEY, json.dumps(self.counters).encode())
        self._generation = os.urandom(8)
        self.store.put_state(GENERATION_KEY, self._generation)

    # -- learning ----------------------------------------------------------------------------
    def _split(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Window split: every ``holdout_every``-th sample is held out for evaluation."""
        x, y, _ = self.store.window()
        known = self.schema.targets.labelled(y)
        x, y = x[known], y[known]  # learning and the gate need labels
        hold = np.zeros(len(y), dtype=bool)
        hold[self.cfg.campaign.holdout_every - 1 :: self.cfg.campaign.holdout_every] = True
        return x[~hold], y[~hold], x[hold], y[hold]

    def train(
        self,
        weights: dict[str, np.ndarray],
        *,
        epochs: int,
        lr: float,
        batch_size: int,
        seed: int,
        proximal_mu: float = 0.0,
    ) -> tuple[dict[str, np.ndarray], int, float]:
        """Train the given global model on the window's labelled samples; returns weights, examples, loss.

        Raises
        ------
        TooFewLabels
            The window holds fewer labelled samples than ``campaign.min_labels``.
        """
        x, y, xh, _ = self._split()
        if len(y) + len(xh) < self.cfg.campaign.min_labels:
            raise TooFewLabels(
                f"device {self.device_id} holds {len(y) + len(xh)} labelled samples, fewer than "
                f"campaign.min_labels={self.cfg.campaign.min_labels}; it stays out of this round"
            )
        model = self._model_with(weights)
        loss = self.task.train(
            model, self._shaped(x), y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
            proximal_mu=proximal_mu,
        )
        return nets.get_weights(model), len(y), loss

    def _build(self) -> torch.nn.Module:
        """A fresh model of this run's task, sized for this device's rows."""
        return self.task.build(
            self.schema.n_features, self.task.n_outputs(self.schema.n_classes)
        )

    def _shaped(self, x: np.ndarray) -> np.ndarray:
        """Flat inbox rows reshaped to the task's input shape (e.g. ``(n, 1, 8, 8)``)."""
        return self.task.shaped(x, self.schema.n_features)

    def _tolerance(self, fallback: np.ndarray | None = None) -> Any:
        """Regression: the task's tolerance, by default half the std of the window's labels.

        A classifier has none (0). An empty window falls back to ``fallback``'s labels.
        """
        if not self.task.regression:
            return 0.0
        if self.task.declares_tolerance:
            return self.task.tolerance(np.zeros(0))
        _, y, _ = self.store.window()
        y = y[self.schema.targets.labelled(y)]
        if not len(y) and fallback is not None:
            y = fallback
        return self.task.tolerance(y)

    def _model_with(self, weights: dict[str, np.ndarray]) -> torch.nn.Module:
        """A fresh network of this run's task holding ``weights``."""
        return nets.set_weights(self._build(), weights)

    def evaluate(self, weights: dict[str, np.ndarray]) -> dict[str, int | float]:
        """Candidate and deployed champion on the held-out part of the window."""
        _, _, xh, yh = self._split()
        if len(yh) == 0:
            # Nothing held out yet: weight 0, so the federated average leaves this device out.
            return {"num-examples": 0, "eval_acc": 0.0, "eval_loss": 0.0, "champion_acc": 0.0}
        model, xs, tol = self._model_with(weights), self._shaped(xh), self._tolerance()
        acc, loss = self.task.evaluate(model, xs, yh, tol)
        out = {"num-examples": len(yh), "eval_acc": acc, "eval_loss": loss, "champion_acc": 0.0}
        if self.version > 0:  # the champion on the same samples, and where exactly one of the two is right
            wrong, theirs = self.task.errors(model, xs, yh, tol), self.task.errors(self._model, xs, yh, tol)
            out.update(champion_acc=1.0 - float(np.mean(theirs)), discordant=float(np.mean(wrong != theirs)))
        return out

    def score(self, models: Sequence[dict[str, np.ndarray]]) -> tuple[int, list[int]]:
        """How many of the latest tick's samples each of ``models`` gets right (regression: within tolerance).

        Returns
        -------
        tuple
            The number of samples scored and, per model, the correct predictions.
        """
        x, y, ticks = self.store.window()
        if len(y):
            latest = (ticks == ticks.max()) & self.schema.targets.labelled(y)
            x, y = x[latest], y[latest]
        model, xs, tol, correct = self._build(), self._shaped(x), self._tolerance(), []
        for weights in models:
            nets.set_weights(model, weights)
            correct.append(int(len(y) - self.task.errors(model, xs, y, tol).sum()))
        return len(y), correct

    def encode_upload(
        self,
        weights: dict[str, np.ndarray],
        reference: dict[str, np.ndarray],
        codec: str,
        tick: int,
    ) -> dict[str, np.ndarray]:
        """Encode trained weights for the upload, keeping what the codec loses.

        The residual (error feedback) lives in the store, so it survives a restart and
        is seen by whichever process handles this device's next round; a residual of
        an earlier campaign (another ``tick``) is dropped.

        Parameters
        ----------
        weights : dict of ndarray
            The locally trained model.
        reference : dict of ndarray
            The global model this round started from.
        codec : {"none", "float16", "int8"}
            The codec the server asked for (see :mod:`fedge.contracts.compression`).
        tick : int
            The campaign's tick.

        Returns
        -------
        dict of ndarray
            The arrays to upload.
        """
        if codec == "none":
            return weights
        saved = self.store.get_state(RESIDUAL_KEY)
        residual = None
        if saved is not None and saved[:8] == int(tick).to_bytes(8, "little", signed=True):
            residual = np.frombuffer(saved[8:], dtype=np.float32)
        encoded = encode_update(weights, reference, codec, residual)
        blob = int(tick).to_bytes(8, "little", signed=True) + encoded.residual.tobytes()
        self.store.put_state(RESIDUAL_KEY, blob)
        return encoded.arrays

    def close(self) -> None:
        """Flush and close the store."""
        self.store.close()
