"""The orchestrator's registry port over MLflow's model registry."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedge.contracts import model as nets
from fedge.contracts.config import FedgeConfig
from fedge.contracts.signing import (
    SHA256_TAG,
    SIGNATURE_TAG,
    SIGNED_VERSION_TAG,
    SIGNING_KEY_TAG,
    ModelSigner,
    server_signer,
    signing_state_dir,
)
from fedge.contracts.task import task_for
from fedge.scenarios import Scenario
from fedge.tracking import Tracker, TrackingError

log = logging.getLogger("fedge.server")


class MlflowRegistry:
    """Model versions and aliases of one registered model, through :class:`fedge.tracking.Tracker`.

    Parameters
    ----------
    tracker : Tracker
        The run's tracker (it owns the MLflow client and the outbox).
    scenario : Scenario
        Gives the row width and classes the task does not declare, and the rows of
        the input example.
    cfg : FedgeConfig
        The run configuration (model section: the task).

    Notes
    -----
    The registered model is the task's own module (the user's class, saved in
    MLflow's PyTorch flavour); its signature and input example have the task's
    input shape and dtype, ``(5, *INPUT_SHAPE)``: scenario rows reshaped when
    their width matches, zeros otherwise.
    """

    def __init__(self, tracker: Tracker, scenario: Scenario, cfg: FedgeConfig) -> None:
        self.tracker = tracker
        self.cfg = cfg
        self.scenario = scenario
        self.task = task_for(cfg)
        self.n_features = self.task.n_features(scenario.n_features)
        self.n_outputs = self.task.n_outputs(scenario.n_classes)
        shape = self.task.input_shape(self.n_features)
        dtype = torch.empty(0, dtype=self.task.dtype).numpy().dtype
        x = scenario.example_rows(5)
        if x.shape[1] == self.n_features and len(x):
            example = np.nan_to_num(x).reshape((-1, *shape))
        else:
            example = np.zeros((5, *shape))
        self.input_example = example.astype(dtype)
        self._last = 0

    def _model(self, weights: nets.Weights | None = None) -> Any:
        m = self.task.build(self.n_features, self.n_outputs)
        return nets.set_weights(m, weights) if weights is not None else m

    def register(self, weights: nets.Weights, tags: Mapping[str, str]) -> int:
        """Register ``weights`` as a new version with its lineage ``tags`` and its seal.

        The version is also tagged with the task (``fedge.task``, empty for fedge's
        MLP) and the model's class (``fedge.model_class``), so whoever loads it knows
        which class its state dict belongs to. The seal (tags ``fedge.model_sha256``, ``fedge.signature``,
        ``fedge.signing_key``) covers the weights and the version number, which
        the store hands out only when the version is created: it is signed for
        the number expected next (tag ``fedge.signed_version``), the one the
        store gives unless another writer registers in between. Devices never
        depend on it: every poll seals the model it sends for the version it
        names (:meth:`fedge.server.federation.FlowerFederation.poll`).
        """
        expected = self._next_version()
        seal = self.signer.seal(expected, weights)
        model = self._model(weights)
        cls = type(model)
        sealed = {
            **tags,
            "fedge.task": self.task.name,
            "fedge.model_class": f"{cls.__module__}.{cls.__qualname__}",
            # What rebuilds the class around the weights (fedge.models.load_model).
            "fedge.n_features": str(self.n_features),
            "fedge.n_outputs": str(self.n_outputs),
            "fedge.model_hidden": str(self.cfg.model.hidden),
            "fedge.model_layers": str(self.cfg.model.layers),
            SHA256_TAG: seal.sha256,
            SIGNATURE_TAG: seal.signature,
            SIGNING_KEY_TAG: seal.key,
            SIGNED_VERSION_TAG: str(expected),
        }
        version = self.tracker.register_model(model, self.input_example, sealed)
        self._last = max(self._last, version)
        if version != expected:
            log.warning(
                "version %d was signed as v%d in its registry tags (another writer registered "
                "in between); devices still get a seal for v%d",
                version,
                expected,
                version,
            )
        return version

    @property
    def signer(self) -> ModelSigner:
        """The server's model-signing key (``<output>/state/model-signing.key``)."""
        return server_signer(signing_state_dir(self.cfg.output_dir))

    def _next_version(self) -> int:
        """The number the next registration is expected to get: one above the highest known."""
        highest = self._last
        try:
            highest = max([highest, *(int(v["version"]) for v in self.tracker.versions())])
        except TrackingError:
            pass  # the store is away: the tracker hands out the number after its own last
        return highest + 1

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
