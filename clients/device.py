"""A device: its store, its drift monitor, its local data and the deployed model.

:class:`Device` is what the Flower ClientApp's handlers call. Every piece of
state that must outlive a restart (window, detector, deployed model, counters)
is written to the :class:`~clients.store.DeviceStore` before a reply leaves.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.monitor import DriftMonitor
from clients.store import DeviceStore
from clients.validation import validate_rows
from fedge import model as nets
from fedge.config import FedgeConfig
from fedge.protocol import DriftReport
from fedge.scenarios import Scenario, build_scenario

log = logging.getLogger("fedge.device")

MONITOR_KEY = "monitor"
COUNTERS_KEY = "counters"
GENERATION_KEY = "generation"

torch.set_num_threads(1)


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
    scenario : Scenario, optional
        The device's data source; built from ``cfg`` when omitted.
    """

    def __init__(
        self,
        cfg: FedgeConfig,
        device_id: int,
        store_path: Path,
        scenario: Scenario | None = None,
    ) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.scenario = scenario if scenario is not None else build_scenario(cfg.scenario)
        self.store = DeviceStore(store_path, capacity=cfg.monitor.window)
        self._model = nets.build_model(
            self.scenario.n_features, self.scenario.n_classes, cfg.model.hidden, cfg.model.layers
        )
        self._generation: bytes | None = None
        self._load()

    def _load(self) -> None:
        """Read detector, counters and deployed model from the store."""
        cfg, device_id = self.cfg, self.device_id
        self._generation = self.store.get_state(GENERATION_KEY)
        state = self.store.get_state(MONITOR_KEY)
        if state is not None:
            self.monitor = DriftMonitor.from_bytes(state)
        else:
            self.monitor = DriftMonitor(
                cfg.monitor.detector, cfg.monitor.params, seed=cfg.scenario.seed + device_id
            )
        raw = self.store.get_state(COUNTERS_KEY)
        self.counters: dict[str, int] = json.loads(raw) if raw else {"rejected_total": 0}
        deployed = self.store.get_model()
        self.version = 0
        if deployed is not None:
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
    def deploy(self, version: int, weights: dict[str, np.ndarray]) -> None:
        """Install the champion; its errors form a new stream, so the detector restarts."""
        nets.set_weights(self._model, weights)
        with self.store.transaction():
            self.store.put_model(version, weights)
            if self.version != version:
                self.monitor.reset()
            self._persist()
        self.version = version

    # -- monitoring --------------------------------------------------------------------------
    def read_sensor(self, tick: int) -> tuple[np.ndarray, np.ndarray]:
        """This tick's raw rows from the device's own data source."""
        return self.scenario.batch(self.device_id, tick)

    def monitor_tick(
        self,
        tick: int,
        x_raw: np.ndarray | Sequence[Any] | None = None,
        y_raw: np.ndarray | Sequence[Any] | None = None,
    ) -> DriftReport:
        """Validate, test-then-store this tick's rows and update the detector."""
        if x_raw is None or y_raw is None:
            x_raw, y_raw = self.read_sensor(tick)
        rows = validate_rows(x_raw, y_raw, self.scenario.n_features, self.scenario.n_classes)
        n_errors, drift, n_drifts = 0, False, 0
        if self.version > 0 and len(rows.y):
            errors = (nets.predict(self._model, rows.x) != rows.y).astype(np.int8)
            n_errors = int(errors.sum())
            update = self.monitor.update(errors)
            drift, n_drifts = update.drift, update.n_drifts
        self.counters["rejected_total"] += rows.rejected["total"]
        # Window, detector and counters move together or not at all.
        with self.store.transaction():
            if drift and self.cfg.monitor.reset_window_on_drift:
                # The window is the training data of the next campaign: keep only
                # samples of the new concept.
                self.store.drop_before(tick)
            self.store.append(rows.x, rows.y, tick)
            self._persist()
        if rows.rejected["total"]:
            log.info("device %d tick %d: rejected %s", self.device_id, tick, rows.rejected)
        return DriftReport(
            device=self.device_id,
            tick=tick,
            model_version=self.version,
            n_samples=len(rows.y),
            n_errors=n_errors,
            drift=drift,
            n_drifts=n_drifts,
            drifts_total=self.monitor.drifts_total,
            window_size=len(self.store),
            rejected_non_finite=rows.rejected["non_finite"],
            rejected_wrong_width=rows.rejected["wrong_width"],
            rejected_unknown_label=rows.rejected["unknown_label"],
        )

    def _persist(self) -> None:
        self.store.put_state(MONITOR_KEY, self.monitor.to_bytes())
        self.store.put_state(COUNTERS_KEY, json.dumps(self.counters).encode())
        self._generation = os.urandom(8)
        self.store.put_state(GENERATION_KEY, self._generation)

    # -- learning ----------------------------------------------------------------------------
    def _split(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Window split: every ``holdout_every``-th sample is held out for evaluation."""
        x, y, _ = self.store.window()
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
        """Train the given global model on the window; returns weights, examples, loss."""
        x, y, _, _ = self._split()
        model = nets.build_model(
            self.scenario.n_features,
            self.scenario.n_classes,
            self.cfg.model.hidden,
            self.cfg.model.layers,
        )
        nets.set_weights(model, weights)
        loss = nets.train(
            model, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
            proximal_mu=proximal_mu,
        )
        return nets.get_weights(model), len(y), loss

    def evaluate(self, weights: dict[str, np.ndarray]) -> dict[str, int | float]:
        """Candidate and deployed champion on the held-out part of the window."""
        _, _, xh, yh = self._split()
        model = nets.build_model(
            self.scenario.n_features,
            self.scenario.n_classes,
            self.cfg.model.hidden,
            self.cfg.model.layers,
        )
        nets.set_weights(model, weights)
        acc, loss = nets.evaluate(model, xh, yh)
        champ = nets.evaluate(self._model, xh, yh)[0] if self.version > 0 else 0.0
        return {"num-examples": len(yh), "eval_acc": acc, "eval_loss": loss, "champion_acc": champ}

    def close(self) -> None:
        """Flush and close the store."""
        self.store.close()
