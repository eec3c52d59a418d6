"""MLflow tracking and model registry for fedge runs.

This is the only module in fedge that imports MLflow. A :class:`Tracker` owns one
MLflow run of a scenario (parameters, metrics, drift events, artifacts) and the
registered model the run feeds: every global model a campaign produces becomes a
model version, and the deployed one carries the ``champion`` alias.

Every call goes through an :class:`mlflow.MlflowClient` bound to the tracker's own
tracking URI, so trackers on different stores can live in one process. Failures of
the store surface as :class:`TrackingError` with a one-line message naming the URI.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import sqlite3
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import torch

from fedge import __version__

# MLflow reads these when it is imported; a user's own settings win.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

import mlflow
import mlflow.pytorch
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

__all__ = [
    "Tracker",
    "TrackingError",
    "default_tracking_uri",
    "list_model_versions",
    "ui_command",
]

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
CHAMPION = "champion"
LOGGED_MODEL_NAME = "model"
LAST_EVENT_TAG = "fedge.last_event"

_END_STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})
_EVENT_KIND = re.compile(r"^[A-Za-z0-9_.-]+$")
_NOT_FOUND = frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"})
_ALREADY_EXISTS = frozenset({"RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"})
_PROBE_TIMEOUT_S = 5.0

# Logging and loading a PyTorch model and registering a version of it resolve the store
# through MLflow's process-wide tracking URI; the lock keeps two trackers on different
# stores from swapping it under each other.
_GLOBAL_URI_LOCK = threading.Lock()


class TrackingError(RuntimeError):
    """The MLflow tracking store could not be opened or refused an operation.

    The message is a single line that names the tracking URI (without credentials),
    ready to be printed to a user as is.
    """


def default_tracking_uri(output_dir: Path) -> str:
    """SQLite tracking URI of the MLflow store kept in a run's output folder.

    Parameters
    ----------
    output_dir : Path
        The output folder; made absolute. It must exist before a :class:`Tracker`
        opens the store.

    Returns
    -------
    str
        ``"sqlite:///<absolute output_dir>/mlflow.db"``.

    Examples
    --------
    >>> default_tracking_uri(Path("/srv/fedge/out"))
    'sqlite:////srv/fedge/out/mlflow.db'
    """
    return f"sqlite:///{(Path(output_dir).absolute() / DB_FILE).as_posix()}"


def ui_command(tracking_uri: str) -> str:
    """Shell command that opens the MLflow UI on a tracking store.

    Parameters
    ----------
    tracking_uri : str
        The store the UI should read.

    Returns
    -------
    str
        For example ``"mlflow ui --backend-store-uri sqlite:////srv/out/mlflow.db"``,
        with the URI quoted for the shell where needed.
    """
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}"


def list_model_versions(tracking_uri: str, model_name: str | None = None) -> list[dict[str, Any]]:
    """Every version of one registered model, or of all registered models.

    Parameters
    ----------
    tracking_uri : str
        The tracking store to read. A SQLite store must already exist; it is never
        created by listing.
    model_name : str or None, default=None
        Restrict the listing to this registered model; ``None`` lists all of them.

    Returns
    -------
    list of dict
        One dict per version, ordered by model name then version, with the keys
        ``name``, ``version`` (int), ``aliases`` (sorted list of str), ``tags``
        (dict), ``run_id`` (str) and ``created`` (milliseconds since the Unix
        epoch). An unknown ``model_name`` gives an empty list.

    Raises
    ------
    TrackingError
        If the store cannot be opened or read.
    """
    _check_uri(tracking_uri)
    db_path = _sqlite_path(tracking_uri)
    if db_path is not None and not db_path.is_file():
        raise TrackingError(f"no MLflow tracking store at {_display(tracking_uri)}")
    client = _connect(tracking_uri)
    with _translate(tracking_uri, "listing model versions"):
        if model_name is not None:
            return _model_versions(client, model_name)
        names = sorted(m.name for m in _all_pages(client.search_registered_models))
        return [row for name in names for row in _model_versions(client, name)]


def attach_artifact(
    tracking_uri: str, run_id: str, path: Path, artifact_path: str | None = None
) -> None:
    """Add a file to an existing (possibly finished) run, e.g. a report made afterwards.

    Raises
    ------
    TrackingError
        If the store or the run cannot be reached.
    """
    _check_uri(tracking_uri)
    client = _connect(tracking_uri)
    with _translate(tracking_uri, f"attaching {path.name} to run {run_id}"):
        client.log_artifact(run_id, str(path), artifact_path)


class Tracker:
    """One MLflow run of a fedge scenario plus the registered model it feeds.

    Opening a tracker connects to the store and makes sure the experiment exists;
    :meth:`start` then creates the run. Model registry calls (:meth:`set_champion`,
    :meth:`champion`, :meth:`versions`) work without a run, so a restarted server
    can find the deployed champion before it starts logging.

    Parameters
    ----------
    tracking_uri : str
        MLflow tracking URI, e.g. from :func:`default_tracking_uri`. The registry
        lives in the same store.
    experiment : str
        Experiment name; created when it does not exist yet.
    model_name : str
        Registered model name under which :meth:`register_model` adds versions.
    run_name : str or None, default=None
        Display name of the run; MLflow picks one when ``None``.
    artifact_location : str or None, default=None
        Artifact root for a newly created experiment. ``None`` means a folder
        ``mlartifacts`` beside the database file for SQLite stores and MLflow's own
        default otherwise. Ignored when the experiment already exists.

    Attributes
    ----------
    run_id : str or None
        ID of the run once :meth:`start` has been called.
    experiment_id : str
        ID of the experiment the run belongs to.
    events : list of dict
        Every event logged by :meth:`log_event`, oldest first.

    Raises
    ------
    TrackingError
        If the tracking URI is malformed, the store is unreachable, or the
        experiment cannot be found or created.

    Examples
    --------
    >>> tracker = Tracker(default_tracking_uri(out), "sine2", "fedge-sine2")  # doctest: +SKIP
    >>> tracker.start({"rounds": 3})  # doctest: +SKIP
    >>> tracker.log_metrics({"accuracy": 0.91}, step=0)  # doctest: +SKIP
    >>> tracker.set_champion(tracker.register_model(net, x[:5], {"round": "3"}))  # doctest: +SKIP
    >>> tracker.end()  # doctest: +SKIP
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        model_name: str,
        run_name: str | None = None,
        artifact_location: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.model_name = model_name
        self.run_name = run_name
        self.artifact_location = artifact_location
        self.run_id: str | None = None
        self.events: list[dict[str, Any]] = []
        self._ended = False
        self._event_counts: dict[str, int] = {}
        self._event_files: set[str] = set()
        self._pending: list[Any] = []

        if not experiment:
            raise ValueError("experiment must be a non-empty name")
        if not model_name:
            raise ValueError("model_name must be a non-empty name")
        _check_uri(tracking_uri)
        _seed_sqlite_store(tracking_uri)
        self._client = _connect(tracking_uri)
        self.experiment_id = self._ensure_experiment()

    def __repr__(self) -> str:
        return (
            f"Tracker(tracking_uri={_display(self.tracking_uri)!r}, "
            f"experiment={self.experiment!r}, model_name={self.model_name!r}, "
            f"run_name={self.run_name!r}, artifact_location={self.artifact_location!r})"
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED")

    # -- run -------------------------------------------------------------------------

    def start(self, params: Mapping[str, object], tags: Mapping[str, str] | None = None) -> str:
        """Create the run and log its parameters.

        Parameters
        ----------
        params : Mapping[str, object]
            Run parameters. Values are stringified; values longer than MLflow's
            limit (6000 characters) are truncated and end in ``"..."``.
        tags : Mapping[str, str] or None, default=None
            Extra run tags; ``fedge.version`` is always set.

        Returns
        -------
        str
            The new run's ID, also kept in :attr:`run_id`.

        Raises
        ------
        RuntimeError
            If this tracker already started a run.
        TrackingError
            If the store refuses the run or its parameters.
        """
        if self.run_id is not None:
            raise RuntimeError(f"run {self.run_id} already started; use one Tracker per run")
        run_tags = {"fedge.version": __version__}
        run_tags.update(
            {str(k): _clip(str(v), MAX_TAG_VAL_LENGTH) for k, v in (tags or {}).items()}
        )
        with self._translate("creating a run"):
            run = self._client.create_run(self.experiment_id, tags=run_tags, run_name=self.run_name)
        run_id = run.info.run_id
        entries = [Param(str(k), _clip(str(v), MAX_PARAM_VAL_LENGTH)) for k, v in params.items()]
        with self._translate("logging parameters"):
            for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
                self._client.log_batch(run_id, params=chunk)
        self.run_id = run_id
        return run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at one step in as few requests as MLflow allows.

        The metrics are written by MLflow's background logging thread, so a
        round never waits for the store; :meth:`flush` and :meth:`end` wait
        for every pending write.

        Parameters
        ----------
        metrics : Mapping[str, float]
            Metric name to value; values are converted with ``float``.
        step : int
            The step (fedge tick) the values belong to.

        Raises
        ------
        RuntimeError
            If the run is not active.
        TrackingError
            If the store refuses the metrics.
        """
        run_id = self._active_run()
        now = _now_ms()
        entries = [Metric(str(k), float(v), now, int(step)) for k, v in metrics.items()]
        with self._translate("logging metrics"):
            for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
                self._pending.append(
                    self._client.log_batch(run_id, metrics=chunk, synchronous=False)
                )

    def flush(self) -> None:
        """Wait until every metric logged so far is in the store.

        Raises
        ------
        TrackingError
            If the store refused a pending write.
        """
        pending, self._pending = self._pending, []
        with self._translate("logging metrics"):
            for operation in pending:
                operation.wait()

    def log_event(self, kind: str, tick: int, payload: Mapping[str, object]) -> None:
        """Record an event, such as a drift trigger, with the evidence behind it.

        The event is written as the JSON artifact
        ``events/tick-{tick:04d}-{kind}.json`` (``-2``, ``-3``, ... is appended when
        the same kind repeats within a tick), appended to :attr:`events`, named by
        the run tag ``fedge.last_event``, and counted by the metric
        ``events/<kind>`` at step ``tick``.

        Parameters
        ----------
        kind : str
            Event type made of letters, digits, ``_``, ``.`` and ``-``, e.g.
            ``"drift_trigger"``.
        tick : int
            Non-negative tick at which the event happened.
        payload : Mapping[str, object]
            JSON-compatible evidence; NumPy scalars and arrays, paths and sets are
            converted.

        Raises
        ------
        ValueError
            If ``kind`` or ``tick`` is malformed.
        RuntimeError
            If the run is not active.
        TrackingError
            If the store refuses the artifact, tag or metric.
        """
        if not _EVENT_KIND.fullmatch(kind):
            raise ValueError(f"event kind {kind!r}: use letters, digits, '_', '.' or '-'")
        if int(tick) != tick or tick < 0:
            raise ValueError(f"event tick {tick!r}: must be a non-negative integer")
        run_id = self._active_run()
        tick = int(tick)
        record = {"kind": kind, "tick": tick, "time": time.time(), "payload": payload}
        text = json.dumps(record, indent=2, sort_keys=True, default=_jsonable)
        artifact_file = self._event_file(kind, tick)
        count = self._event_counts.get(kind, 0) + 1
        with self._translate(f"logging event {artifact_file}"):
            self._client.log_text(run_id, text, artifact_file)
            self._client.log_batch(
                run_id,
                metrics=[Metric(f"events/{kind}", float(count), _now_ms(), tick)],
                tags=[RunTag(LAST_EVENT_TAG, artifact_file)],
            )
        self._event_counts[kind] = count
        self._event_files.add(artifact_file)
        self.events.append(json.loads(text))

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """Log a mapping as a JSON (or, by extension, YAML) artifact of the run.

        Parameters
        ----------
        data : Mapping[str, Any]
            JSON-compatible data; NumPy scalars and arrays, paths and sets are
            converted.
        artifact_file : str
            Run-relative artifact path, e.g. ``"summary.json"``.

        Raises
        ------
        RuntimeError
            If the run is not active.
        TrackingError
            If the store refuses the artifact.
        """
        run_id = self._active_run()
        plain = json.loads(json.dumps(data, default=_jsonable))
        with self._translate(f"logging {artifact_file}"):
            self._client.log_dict(run_id, plain, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a local file, or a directory's contents, into the run's artifacts.

        Parameters
        ----------
        path : Path
            Local file or directory.
        artifact_path : str or None, default=None
            Run-relative folder to put it in; the artifact root when ``None``.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        RuntimeError
            If the run is not active.
        TrackingError
            If the store refuses the artifact.
        """
        run_id = self._active_run()
        local = Path(path)
        if not local.exists():
            raise FileNotFoundError(f"cannot log artifact {local}: no such file or directory")
        with self._translate(f"logging artifact {local.name}"):
            if local.is_dir():
                self._client.log_artifacts(run_id, str(local), artifact_path)
            else:
                self._client.log_artifact(run_id, str(local), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the run; later calls do nothing.

        Parameters
        ----------
        status : {"FINISHED", "FAILED", "KILLED"}, default="FINISHED"
            Final status of the run.

        Raises
        ------
        ValueError
            If ``status`` is not one of the allowed values.
        TrackingError
            If the store refuses the update; the run stays open so ``end`` can be
            retried.
        """
        if status not in _END_STATUSES:
            raise ValueError(f"status {status!r}: must be one of {sorted(_END_STATUSES)}")
        if self.run_id is None or self._ended:
            return
        self.flush()
        with self._translate("ending the run"):
            self._client.set_terminated(self.run_id, status)
        self._ended = True

    # -- model registry ----------------------------------------------------------------

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
            Run metrics logged at this step are linked to the logged model.

        Returns
        -------
        int
            The new version number.

        Raises
        ------
        RuntimeError
            If the run is not active.
        TrackingError
            If logging or registering the model fails in the store.
        """
        run_id = self._active_run()
        version_tags = {str(k): str(v) for k, v in tags.items()}
        example = _example_for(model, input_example)
        was_training = model.training
        model.eval()
        try:
            output = _predict(model, example)
            signature = infer_signature(example, output)
            with self._translate("logging the model"):
                logged = self._client.create_logged_model(
                    self.experiment_id,
                    name=LOGGED_MODEL_NAME,
                    source_run_id=run_id,
                    tags=version_tags,
                )
                with self._global_uri():
                    info = mlflow.pytorch.log_model(
                        model,
                        name=LOGGED_MODEL_NAME,
                        model_id=logged.model_id,
                        run_id=run_id,
                        input_example=example,
                        signature=signature,
                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                        serialization_format="pt2",
                        step=step,
                    )
        finally:
            model.train(was_training)
        with self._translate(f"registering a version of {self.model_name!r}"):
            self._ensure_registered_model()
            with self._global_uri():
                created = self._client.create_model_version(
                    self.model_name,
                    info.model_uri,
                    run_id=run_id,
                    tags=version_tags,
                    model_id=info.model_id,
                )
        return int(created.version)

    def set_champion(self, version: int, alias: str = CHAMPION) -> None:
        """Point ``alias`` at ``version``; whichever version held it loses it.

        Parameters
        ----------
        version : int
            An existing version of the registered model.
        alias : str, default="champion"
            The alias to move.

        Raises
        ------
        TrackingError
            If the version does not exist or the store refuses the update.
        """
        with self._translate(f"setting alias {alias!r} on version {version}"):
            self._client.set_registered_model_alias(self.model_name, alias, str(int(version)))

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
            If the store cannot be read or the model cannot be loaded.
        """
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
            If the store cannot be read.
        """
        with self._translate(f"listing versions of {self.model_name!r}"):
            return _model_versions(self._client, self.model_name)

    # -- internals ---------------------------------------------------------------------

    def _active_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("no run: call Tracker.start() first")
        if self._ended:
            raise RuntimeError(f"run {self.run_id} has ended")
        return self.run_id

    def _translate(self, action: str) -> AbstractContextManager[None]:
        return _translate(self.tracking_uri, action)

    def _ensure_experiment(self) -> str:
        with self._translate(f"opening experiment {self.experiment!r}"):
            found = self._client.get_experiment_by_name(self.experiment)
            if found is None:
                location = self.artifact_location or _default_artifact_location(self.tracking_uri)
                try:
                    return self._client.create_experiment(
                        self.experiment, artifact_location=location
                    )
                except MlflowException as exc:
                    if exc.error_code not in _ALREADY_EXISTS:
                        raise
                    found = self._client.get_experiment_by_name(self.experiment)
                    if found is None:
                        raise
        if found.lifecycle_stage != "active":
            raise TrackingError(
                f"experiment {self.experiment!r} in {_display(self.tracking_uri)} is deleted; "
                "restore it in the MLflow UI or choose another experiment name"
            )
        return str(found.experiment_id)

    def _ensure_registered_model(self) -> None:
        try:
            self._client.create_registered_model(self.model_name)
        except MlflowException as exc:
            if exc.error_code not in _ALREADY_EXISTS:
                raise

    def _event_file(self, kind: str, tick: int) -> str:
        stem = f"events/tick-{tick:04d}-{kind}"
        name, n = f"{stem}.json", 1
        while name in self._event_files:
            n += 1
            name = f"{stem}-{n}.json"
        return name

    @contextmanager
    def _global_uri(self) -> Iterator[None]:
        """Point MLflow's process-wide tracking URI at this store, then put it back."""
        with _GLOBAL_URI_LOCK:
            previous = os.environ.get("MLFLOW_TRACKING_URI")
            mlflow.set_tracking_uri(self.tracking_uri)
            try:
                yield
            finally:
                mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]


# -- helpers -----------------------------------------------------------------------------


def _display(uri: str) -> str:
    """The URI with any password replaced, fit for messages."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The gist of an error message: its first line, cut after a sentence when long."""
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    if len(line) > limit and ". " in line[:limit]:
        line = line[: line.index(". ", 0, limit) + 1]
    return line


@contextmanager
def _translate(uri: str, action: str) -> Iterator[None]:
    """Turn store failures during ``action`` into a one-line :class:`TrackingError`."""
    try:
        yield
    except TrackingError:
        raise
    except (MlflowException, OSError) as exc:
        message = f"MLflow tracking store {_display(uri)}: {action} failed: {_first_line(exc)}"
        raise TrackingError(message) from None


def _check_uri(uri: str) -> None:
    """Reject URIs that MLflow would accept but fedge cannot use."""
    if not uri or not uri.strip():
        raise TrackingError("tracking URI is empty; pass e.g. sqlite:///<output dir>/mlflow.db")
    if uri.startswith("sqlite:"):
        path = _sqlite_path(uri)
        if path is None:
            raise TrackingError(
                f"tracking URI {uri}: an in-memory SQLite store would lose every run; "
                "use sqlite:///<path to a file>"
            )
        if not path.parent.is_dir():
            raise TrackingError(
                f"tracking URI {uri}: directory {path.parent} does not exist; create it first"
            )
    elif uri.startswith(("http://", "https://")):
        _probe_http(uri)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; ``None`` for other URIs or in-memory."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(urllib.parse.unquote(path)).absolute()


def _default_artifact_location(uri: str) -> str | None:
    db_path = _sqlite_path(uri)
    if db_path is None:
        return None
    return (db_path.parent / ARTIFACTS_DIR).as_uri()


def _probe_http(uri: str) -> None:
    """Fail fast on a server nobody listens at, instead of MLflow's minutes of retries."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname
    if not host:
        raise TrackingError(f"tracking URI {_display(uri)}: no host name")
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(host):
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
            pass
    except (OSError, ValueError) as exc:
        raise TrackingError(
            f"MLflow tracking server {_display(uri)} is unreachable: {_first_line(exc)}"
        ) from None


def _template_store() -> Path:
    """Where a pristine store of this MLflow version is cached (see :func:`_seed_sqlite_store`)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fedge" / f"mlflow-{mlflow.__version__}-empty.db"


def _seed_sqlite_store(uri: str) -> None:
    """Start a new SQLite store from a cached empty one instead of migrating a blank file.

    MLflow builds a new SQLite store by replaying its schema migrations, which takes
    seconds; a copy of an empty store made once by the same MLflow version takes
    milliseconds. The copy's default experiment gets the artifact folder beside the
    new file. Any failure leaves the file absent, and MLflow then creates it as usual.
    """
    path = _sqlite_path(uri)
    if path is None or path.exists() or not path.parent.is_dir():
        return
    template = _template_store()
    staging = path.with_name(f".{path.name}.{os.getpid()}.seed")
    try:
        if not template.is_file():
            template.parent.mkdir(parents=True, exist_ok=True)
            fresh = template.with_name(f"{template.name}.{os.getpid()}.tmp")
            fresh.unlink(missing_ok=True)
            mlflow.MlflowClient(tracking_uri=f"sqlite:///{fresh.as_posix()}").search_experiments(
                max_results=1
            )
            os.replace(fresh, template)
        shutil.copyfile(template, staging)
        conn = sqlite3.connect(staging)
        try:
            with conn:
                conn.execute(
                    "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                    (_default_artifact_location(uri),),
                )
        finally:
            conn.close()
        os.link(staging, path)  # fails, harmlessly, if another process created the store first
    except (OSError, sqlite3.Error, MlflowException):
        pass
    finally:
        staging.unlink(missing_ok=True)


def _connect(uri: str) -> mlflow.MlflowClient:
    """A client bound to ``uri`` for both tracking and the model registry."""
    try:
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - every way of failing to open a store is the URI's
        raise TrackingError(
            f"cannot open MLflow tracking store {_display(uri)}: {_first_line(exc)}"
        ) from None
    return client


def _registered_model(client: mlflow.MlflowClient, name: str) -> Any:
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code in _NOT_FOUND:
            return None
        raise


def _all_pages(search: Any, **kwargs: Any) -> Iterator[Any]:
    token = None
    while True:
        page = search(page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


def _model_versions(client: mlflow.MlflowClient, name: str) -> list[dict[str, Any]]:
    registered = _registered_model(client, name)
    if registered is None:
        return []
    aliases: dict[int, list[str]] = {}
    for alias, version in registered.aliases.items():
        aliases.setdefault(int(version), []).append(alias)
    quote = '"' if "'" in name else "'"
    rows = [
        {
            "name": mv.name,
            "version": int(mv.version),
            "aliases": sorted(aliases.get(int(mv.version), [])),
            "tags": dict(mv.tags),
            "run_id": mv.run_id,
            "created": int(mv.creation_timestamp),
        }
        for mv in _all_pages(
            client.search_model_versions, filter_string=f"name={quote}{name}{quote}"
        )
    ]
    return sorted(rows, key=lambda row: row["version"])


def _example_for(model: torch.nn.Module, input_example: np.ndarray) -> np.ndarray:
    example = np.asarray(input_example)
    param = next(iter(model.parameters()), None)
    if param is not None and param.is_floating_point() and example.dtype.kind == "f":
        example = example.astype(torch.empty(0, dtype=param.dtype).numpy().dtype, copy=False)
    if example.ndim >= 1 and example.shape[0] == 1:
        example = np.repeat(example, 2, axis=0)
    return np.ascontiguousarray(example)


def _predict(model: torch.nn.Module, example: np.ndarray) -> np.ndarray:
    param = next(iter(model.parameters()), None)
    inputs = torch.from_numpy(example)
    if param is not None:
        inputs = inputs.to(param.device)
    with torch.no_grad():
        return model(inputs).detach().cpu().numpy()


def _jsonable(value: Any) -> Any:
    """``json.dumps`` fallback for the values fedge payloads carry."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _now_ms() -> int:
    return int(time.time() * 1000)
