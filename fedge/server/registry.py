"""The orchestrator's registry port over MLflow's model registry."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedge.contracts import model as nets
from fedge.contracts.config import FedgeConfig
from fedge.scenarios import Scenario
from fedge.tracking import Tracker

log = logging.getLogger("fedge.server")


class MlflowRegistry:
    """Model versions and aliases of one registered model, through :class:`fedge.tracking.Tracker`.

    Parameters
    ----------
    tracker : Tracker
        The run's tracker (it owns the MLflow client and the outbox).
    scenario : Scenario
        Gives the model's input shape and an input example for the signature.
    cfg : FedgeConfig
        The run configuration (model section).
    """

    def __init__(self, tracker: Tracker, scenario: Scenario, cfg: FedgeConfig) -> None:
        self.tracker = tracker
        self.cfg = cfg
        self.scenario = scenario
        x, _ = scenario.batch(0, 0)
        self.input_example = np.nan_to_num(x[:5]).astype(np.float32)

    def _model(self, weights: nets.Weights | None = None) -> Any:
        m = nets.build_model(
            self.scenario.n_features,
            self.scenario.n_classes,
            self.cfg.model.hidden,
            self.cfg.model.layers,
        )
        return nets.set_weights(m, weights) if weights is not None else m

    def register(self, weights: nets.Weights, tags: Mapping[str, str]) -> int:
        """Register ``weights`` as a new version with its lineage ``tags``."""
        return self.tracker.register_model(self._model(weights), self.input_example, tags)

    def set_alias(self, version: int, alias: str) -> None:
        """Point ``alias`` (``champion``, ``cluster-2``) at ``version``."""
        self.tracker.set_champion(version, alias)

    def versions(self) -> list[dict[str, Any]]:
        """Every registered version with its tags (a resumed run looks for its own)."""
        return self.tracker.versions()

    def load(self, alias: str) -> tuple[int, nets.Weights] | None:
        """The version under ``alias`` and its weights; None when missing or of another shape."""
        found = self.tracker.champion(alias)
        if found is None:
            return None
        version, weights = found
        try:
            self._model(weights)
        except ValueError as exc:
            log.warning("%s v%d does not fit this model (%s); starting fresh", alias, version, exc)
            return None
        return version, {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
