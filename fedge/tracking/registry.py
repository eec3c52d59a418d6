"""The registered model of a tracker: versions, aliases (``champion``, ``cluster-<k>``), loading one back.

:class:`ModelRegistry` holds the methods; :class:`fedge.tracking.tracker.Tracker` owns the
state they use (the MLflow client, the outbox link, the model name).
"""


from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import numpy as np
import torch

from fedge.tracking.mlflow_store import (
    CHAMPION,
    _model_versions,
    _registered_model,
    _save_model,
)

log = logging.getLogger("fedge.tracking")


class ModelRegistry:
    """Model versions and aliases of the tracker's registered model (mixed into ``Tracker``)."""

    model_name: str
    tracking_uri: str
    _client: Any
    _link: Any

    # The tracker's own plumbing these methods use.
    def _require_store(self, action: str) -> None:  # pragma: no cover - Tracker defines it
        raise NotImplementedError

    def _translate(self, action: str) -> AbstractContextManager[None]:  # pragma: no cover
        raise NotImplementedError

    def _global_uri(self) -> AbstractContextManager[None]:  # pragma: no cover
        raise NotImplementedError

    def _write(self, kind: str, payload: dict[str, Any], action: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def _active_run(self) -> str:  # pragma: no cover
        raise NotImplementedError

    def register_model(
        self,
        model: torch.nn.Module,
        input_example: np.ndarray,
        tags: Mapping[str, str],
        *,
        step: int = 0,
    ) -> int:
        """Log ``model`` to the run and register it as a new version of the model.

        The model is saved in MLflow's PyTorch flavour (``pt2``, pickle-free) with
        the input example and a signature inferred from the example and the
        model's output on it. The model is evaluated in eval mode; its training
        mode is restored afterwards.

        Parameters
        ----------
        model : torch.nn.Module
            The global model to register.
        input_example : numpy.ndarray
            A small batch of inputs. Floating-point examples are cast to the model's
            parameter dtype; a one-row example is repeated so the exported batch
            dimension stays dynamic.
        tags : Mapping[str, str]
            Lineage of this version (round, parent version, privacy budget, ...);
            each becomes a model version tag and a tag of the logged model.
        step : int, default=0
            The run step the model belongs to (recorded as the run's model output).

        Returns
        -------
        int
            The new version number; with an outbox and the server unreachable, the
            provisional number (see the class notes).

        Raises
        ------
        RuntimeError
            If the run is not active.
        TrackingError
            If logging or registering the model fails in the store.
        """
        run_id = self._active_run()
        payload: dict[str, Any] = {
            "run_id": run_id,
            "experiment_id": self.experiment_id,
            "model_name": self.model_name,
            "tags": {str(k): str(v) for k, v in tags.items()},
            "step": int(step),
            "model_dir": "model",
        }
        if self._link is not None:
            return self._link.register(model, input_example, payload)
        with tempfile.TemporaryDirectory(prefix="fedge-model-") as tmp:
            _save_model(model, input_example, Path(tmp) / "model")
            with self._translate(f"registering a version of {self.model_name!r}"):
                result = self._writer.apply("register", payload, files=Path(tmp))
        return int(result["version"])

    def set_champion(self, version: int, alias: str = CHAMPION) -> None:
        """Point ``alias`` at ``version``; whichever version held it loses it.

        Parameters
        ----------
        version : int
            An existing version of the registered model (or a provisional number
            this tracker handed out).
        alias : str, default="champion"
            The alias to move.

        Raises
        ------
        TrackingError
            If the version does not exist or the store refuses the update.
        """
        payload: dict[str, Any] = {
            "model_name": self.model_name,
            "alias": alias,
            "version": int(version),
            "ref": None,
        }
        if self._link is not None:
            payload["version"], payload["ref"] = self._link.resolve_version(int(version))
        self._write("alias", payload, f"setting alias {alias!r} on version {version}")

    def champion(self, alias: str = CHAMPION) -> tuple[int, dict[str, np.ndarray]] | None:
        """Load the version that holds ``alias``.

        Parameters
        ----------
        alias : str, default="champion"
            The alias to resolve.

        Returns
        -------
        tuple of (int, dict of str to numpy.ndarray) or None
            The version number and the loaded model's state dict as NumPy arrays,
            or ``None`` when the registered model or the alias does not exist.

        Raises
        ------
        TrackingError
            If the store cannot be read (also while an outbox waits for the
            server) or the model cannot be loaded.
        """
        self._require_store(f"resolving alias {alias!r}")
        with self._translate(f"resolving alias {alias!r}"):
            registered = _registered_model(self._client, self.model_name)
        if registered is None or alias not in registered.aliases:
            return None
        version = int(registered.aliases[alias])
        action = f"loading version {version} of {self.model_name!r}"
        with self._translate(action), self._global_uri():
            uri = self._client.get_model_version_download_uri(self.model_name, str(version))
            loaded = mlflow.pytorch.load_model(uri, map_location="cpu")
        state = {name: t.detach().cpu().numpy().copy() for name, t in loaded.state_dict().items()}
        return version, state

    def versions(self) -> list[dict[str, Any]]:
        """Every version of the registered model, ascending by version.

        Returns
        -------
        list of dict
            One dict per version with the keys ``name``, ``version`` (int),
            ``aliases`` (sorted list of str), ``tags`` (dict), ``run_id`` (str) and
            ``created`` (milliseconds since the Unix epoch); empty when nothing has
            been registered.

        Raises
        ------
        TrackingError
            If the store cannot be read (also while an outbox waits for the server).
        """
        self._require_store(f"listing versions of {self.model_name!r}")
        with self._translate(f"listing versions of {self.model_name!r}"):
            return _model_versions(self._client, self.model_name)

    # -- internals ---------------------------------------------------------------------
