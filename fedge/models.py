"""Load a registered version back as the task's own model class, its weights checked.

MLflow keeps each version in its PyTorch flavour as a ``torch.export`` program
(``pt2``: no pickle), which loads as a generic ``GraphModule`` good for inference
but not the class the team wrote. :func:`load_model` gives the team's class back:
it rebuilds the model from the version's task (tags ``fedge.task``,
``fedge.n_features``, ``fedge.n_outputs``), loads the registered weights into it,
and refuses weights whose digest is not the one the server sealed
(``fedge.model_sha256``); with the server's public key it checks the signature too.

Examples
--------
::

    from fedge.models import load_model

    net = load_model("fedge-digits", tracking_uri="sqlite:///fedge-runs/mlflow.db")
    net.eval()
    print(type(net))          # the task's class, e.g. mypkg.task.Net
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedge.contracts.model import set_weights
from fedge.contracts.signing import ModelSeal, ModelVerifier, SigningKeyError, weights_digest
from fedge.contracts.task import TaskError, load_task


class ModelLoadError(ValueError):
    """A registered version that cannot be given back as its class; one line."""


def load_model(
    model_name: str,
    *,
    tracking_uri: str,
    alias: str = "champion",
    version: int | None = None,
    public_key: str | Path | None = None,
) -> torch.nn.Module:
    """The registered ``version`` (default: the one under ``alias``) as its task's class.

    Parameters
    ----------
    model_name : str
        The registered model (``tracking.model_name``, default ``fedge-<scenario>``).
    tracking_uri : str
        The MLflow tracking and registry URI (the run summary's ``tracking_uri``).
    alias : str, default "champion"
        Used when ``version`` is None.
    version : int, optional
        A version number.
    public_key : path, optional
        The server's model-signing public key (``<output>/state/model-signing.pub``):
        the signature is checked as a device checks it.

    Raises
    ------
    ModelLoadError
        No such version or alias, a version not registered by fedge, a task that
        cannot be imported here, weights that do not match their digest or
        signature.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        found = (
            client.get_model_version(model_name, str(version))
            if version is not None
            else client.get_model_version_by_alias(model_name, alias)
        )
        uri = client.get_model_version_download_uri(model_name, found.version)
    except MlflowException as exc:
        which = f"version {version}" if version is not None else f"alias {alias!r}"
        raise ModelLoadError(f"{model_name}: no {which} ({str(exc).splitlines()[0][:160]})") from None
    tags = dict(found.tags)
    where = f"{model_name} v{found.version}"
    if "fedge.model_sha256" not in tags:
        raise ModelLoadError(f"{where}: not registered by fedge (no fedge.model_sha256 tag)")
    try:
        task = load_task(
            tags.get("fedge.task", ""),
            int(tags.get("fedge.model_hidden", 32)),
            int(tags.get("fedge.model_layers", 2)),
        )
    except TaskError as exc:
        raise ModelLoadError(f"{where}: {exc}") from None
    with _uri(tracking_uri):
        exported = mlflow.pytorch.load_model(uri, map_location="cpu")
    weights = {k: t.detach().cpu().numpy().copy() for k, t in exported.state_dict().items()}
    if weights_digest(weights).hex() != tags["fedge.model_sha256"]:
        raise ModelLoadError(f"{where}: the weights do not match their registered digest; refusing them")
    if public_key is not None:
        try:
            verifier = ModelVerifier.from_file(Path(public_key))
        except SigningKeyError as exc:
            raise ModelLoadError(str(exc)) from None
        seal = ModelSeal(tags["fedge.model_sha256"], tags.get("fedge.signature", ""), tags.get("fedge.signing_key", ""))
        signed = int(tags.get("fedge.signed_version", found.version))
        refusal = verifier.check(signed, weights, seal)
        if refusal is not None:
            raise ModelLoadError(f"{where}: the signature does not verify ({refusal}); refusing it")
    try:
        n_features = int(tags.get("fedge.n_features", 0))
        n_outputs = int(tags.get("fedge.n_outputs", 0))
        if n_features < 1 or n_outputs < 1:
            raise ModelLoadError(f"{where}: no fedge.n_features / fedge.n_outputs tags (registered by an older fedge)")
        model = task.build(n_features, n_outputs)
        set_weights(model, {k: np.asarray(v) for k, v in weights.items()})
    except ModelLoadError:
        raise
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"{where}: the task's model does not take these weights ({str(exc)[:160]})") from None
    return model.eval()


class _uri:
    """Point MLflow's global URIs at ``uri`` while a model loads, then restore them."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def __enter__(self) -> None:
        import mlflow

        self._saved = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)

    def __exit__(self, *exc: object) -> None:
        import mlflow

        mlflow.set_tracking_uri(self._saved[0])
        mlflow.set_registry_uri(self._saved[1])
