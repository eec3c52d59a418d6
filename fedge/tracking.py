"""MLflow tracking and model registry for fedge runs.

This is the only module in fedge that imports MLflow. A :class:`Tracker` owns one
MLflow run of a scenario (parameters, metrics, drift events, artifacts) and the
registered model the run feeds: every global model a campaign produces becomes a
model version, and the deployed one carries the ``champion`` alias.

Every call goes through an :class:`mlflow.MlflowClient` bound to the tracker's own
tracking URI, so trackers on different stores can live in one process. Failures of
the store surface as :class:`TrackingError` with a one-line message naming the URI.

Given an outbox folder (:mod:`fedge.outbox`), a tracker keeps a run going while a
remote tracking server is unreachable: every write is journalled on disk and
replayed, in order and once, when the server answers again, or later with
:func:`sync_outboxes` (``fedge sync``).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shlex
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import torch

from fedge import __version__
from fedge.outbox import (
    DONE,
    FAILED,
    FILES_DIR,
    OUTBOX_DIR,
    PENDING,
    Entry,
    Outbox,
    OutboxBusy,
    OutboxError,
    find_outboxes,
)

# MLflow reads these when it is imported; a user's own settings win.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
# A tracking server that does not answer costs seconds, not MLflow's minutes of
# retries (7 with a doubling back-off): a tracker with an outbox buffers meanwhile.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

import mlflow
import mlflow.pytorch
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

__all__ = [
    "OUTBOX_DIR",
    "SyncResult",
    "Tracker",
    "TrackingError",
    "default_tracking_uri",
    "list_model_versions",
    "sync_outboxes",
    "ui_command",
]

log = logging.getLogger("fedge.tracking")
# One line says when the tracking server goes away; urllib3's note on every retry is noise.
if logging.getLogger("urllib3.connectionpool").level == logging.NOTSET:
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
CHAMPION = "champion"
LOGGED_MODEL_NAME = "model"
LAST_EVENT_TAG = "fedge.last_event"
#: Version and logged-model tag naming the outbox entry that made them: how a
#: replayed registration finds out that it already happened.
ENTRY_TAG = "fedge.entry"
#: Set on a version whose number differs from the one the run used while it was pending.
PROVISIONAL_TAG = "fedge.provisional_version"
#: Lineage tag whose value is a version number, rewritten when that number was provisional.
PARENT_TAG = "fedge.parent_version"

_END_STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})
_EVENT_KIND = re.compile(r"^[A-Za-z0-9_.-]+$")
_NOT_FOUND = frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"})
_ALREADY_EXISTS = frozenset({"RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"})
_PROBE_TIMEOUT_S = 5.0
_HEALTH_TIMEOUT_S = 2.0
_RETRY_MIN_S = 0.5
_RETRY_MAX_S = 5.0

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

    With an ``outbox`` folder the run survives a tracking server that stops
    answering (connection refused, timeouts, 5xx): from the first failed write on,
    every write is journalled in the outbox and the run goes on; a background
    thread replays the journal in order as soon as the server answers again.
    Registrations are journalled before they are attempted at all and carry their
    journal entry as the version tag ``fedge.entry``, so a replay that finds the
    version already made does not make it twice. A version registered while the
    server is away gets a provisional number, the one MLflow will give it when
    nothing else registers in between (tag ``fedge.provisional_version`` marks
    the version otherwise); alias moves and ``fedge.parent_version`` tags that
    name a provisional number are resolved to the real one on replay. Starting
    still needs the server: the run and the champion are read from it.

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
    outbox : Path or None, default=None
        Folder of this run's outbox (usually ``<run folder>/tracking-outbox``);
        ``None`` writes straight to the store and raises when it fails. The
        folder is removed by :meth:`end` once everything in it has landed.
    sync_root : Path or None, default=None
        A folder whose runs may hold outboxes left by earlier runs against the
        same store (see :func:`fedge.outbox.find_outboxes`); they are replayed,
        oldest first, before this tracker does anything else.

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
        *,
        outbox: Path | None = None,
        sync_root: Path | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.model_name = model_name
        self.run_name = run_name
        self.artifact_location = artifact_location
        self.outbox = None if outbox is None else Path(outbox)
        self.sync_root = None if sync_root is None else Path(sync_root)
        self.run_id: str | None = None
        self.events: list[dict[str, Any]] = []
        self._ended = False
        self._event_counts: dict[str, int] = {}
        self._event_files: set[str] = set()
        self._pending: list[Any] = []
        self._link: _OutboxLink | None = None

        if not experiment:
            raise ValueError("experiment must be a non-empty name")
        if not model_name:
            raise ValueError("model_name must be a non-empty name")
        _check_uri(tracking_uri)
        _seed_sqlite_store(tracking_uri)
        self._client = _connect(tracking_uri)
        self._writer = _StoreWriter(tracking_uri, self._client)
        self.experiment_id = self._ensure_experiment()
        if self.outbox is not None and self.sync_root is not None:
            self._sync_earlier_runs(self.sync_root)

    def __repr__(self) -> str:
        return (
            f"Tracker(tracking_uri={_display(self.tracking_uri)!r}, "
            f"experiment={self.experiment!r}, model_name={self.model_name!r}, "
            f"run_name={self.run_name!r}, artifact_location={self.artifact_location!r}, "
            f"outbox={None if self.outbox is None else str(self.outbox)!r})"
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
            If the store refuses the run or its parameters, or the outbox folder
            is held by another process or holds writes for another store.
        """
        if self.run_id is not None:
            raise RuntimeError(f"run {self.run_id} already started; use one Tracker per run")
        if self.outbox is not None:
            self._link = _OutboxLink(self, self._open_own_outbox())
        run_tags = {"fedge.version": __version__}
        run_tags.update(
            {str(k): _clip(str(v), MAX_TAG_VAL_LENGTH) for k, v in (tags or {}).items()}
        )
        try:
            with self._translate("creating a run"):
                run = self._client.create_run(
                    self.experiment_id, tags=run_tags, run_name=self.run_name
                )
            if self._link is not None:
                with self._translate(f"listing versions of {self.model_name!r}"):
                    self._link.highest = _highest_version(self._client, self.model_name)
        except BaseException:
            if self._link is not None:
                self._link.close()  # nothing was written: the outbox goes again
                self._link = None
            raise
        run_id = run.info.run_id
        params_payload = {
            "run_id": run_id,
            "params": [[str(k), _clip(str(v), MAX_PARAM_VAL_LENGTH)] for k, v in params.items()],
        }
        self._write("params", params_payload, "logging parameters")
        self.run_id = run_id
        return run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at one step in as few requests as MLflow allows.

        The metrics are written by a background thread, so a round never waits
        for the store; :meth:`flush` and :meth:`end` wait for every pending
        write.

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
        if self._link is not None:
            rows = [[str(k), float(v), now, int(step)] for k, v in metrics.items()]
            self._link.submit_metrics({"run_id": run_id, "metrics": rows})
            return
        entries = [Metric(str(k), float(v), now, int(step)) for k, v in metrics.items()]
        with self._translate("logging metrics"):
            for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
                self._pending.append(
                    self._client.log_batch(run_id, metrics=chunk, synchronous=False)
                )

    def flush(self) -> None:
        """Wait until every metric logged so far is in the store or in the outbox.

        With an outbox, a run that lost its tracking server also tries once to
        send what the outbox holds.

        Raises
        ------
        TrackingError
            If the store refused a pending write (without an outbox).
        """
        if self._link is not None:
            self._link.flush()
            return
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
        event = {
            "run_id": run_id,
            "artifact_file": artifact_file,
            "text": text,
            "metric": [f"events/{kind}", float(count), _now_ms(), tick],
            "tag": [LAST_EVENT_TAG, artifact_file],
        }
        self._write("event", event, f"logging event {artifact_file}")
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
        payload = {"run_id": run_id, "data": plain, "artifact_file": artifact_file}
        self._write("dict", payload, f"logging {artifact_file}")

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a local file, or a directory's contents, into the run's artifacts.

        Parameters
        ----------
        path : Path
            Local file or directory. While the server is unreachable a copy is
            kept in the outbox, so the original may change or go afterwards.
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
        payload = {
            "run_id": run_id,
            "path": str(local.absolute()),
            "artifact_path": artifact_path,
            "is_dir": local.is_dir(),
        }
        self._write("artifact", payload, f"logging artifact {local.name}")

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the run; later calls do nothing.

        With an outbox, whatever is still buffered is sent now if the server
        answers; otherwise it stays in the outbox folder, one warning says so,
        and the next run against the same store (or ``fedge sync``) sends it.

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
        self._write("end", {"run_id": self.run_id, "status": status}, "ending the run")
        self._ended = True
        if self._link is not None:
            self._link.close()

    def sync_state(self) -> dict[str, Any]:
        """Where this run's tracking writes are: in the store, or waiting in the outbox.

        Tries once to send what is buffered first.

        Returns
        -------
        dict
            ``outbox`` (folder or ``None``), ``server_reachable`` (bool),
            ``pending`` and ``failed`` (numbers of buffered writes not yet in the
            store, and refused by it), and ``versions``: one dict per version this
            run registered with ``version`` (the number the run used), ``landed_as``
            (MLflow's number, ``None`` while pending) and ``state`` (``landed``,
            ``pending`` or ``failed``).
        """
        if self._link is None:
            return {
                "outbox": None,
                "server_reachable": True,
                "pending": 0,
                "failed": 0,
                "versions": [],
            }
        return self._link.state(refresh=True)

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

    def _active_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("no run: call Tracker.start() first")
        if self._ended:
            raise RuntimeError(f"run {self.run_id} has ended")
        return self.run_id

    def _translate(self, action: str) -> AbstractContextManager[None]:
        return _translate(self.tracking_uri, action)

    def _write(self, kind: str, payload: dict[str, Any], action: str) -> None:
        """Perform a write now, or journal it when the run has an outbox and no server."""
        if self._link is not None:
            self._link.write(kind, payload, action)
            return
        with self._translate(action):
            self._writer.apply(kind, payload)

    def _require_store(self, action: str) -> None:
        if self._link is not None:
            self._link.require_store(action)

    def _open_own_outbox(self) -> Outbox:
        assert self.outbox is not None
        try:
            box = Outbox(self.outbox)
        except OutboxError as exc:
            raise TrackingError(str(exc)) from None
        try:
            known = box.meta("tracking_uri")
            left = box.counts()[PENDING]
            if known is not None and known != self.tracking_uri and left:
                raise TrackingError(
                    f"{self.outbox} holds {left} writes for MLflow tracking store "
                    f"{_display(known)}; run `fedge sync {self.outbox.parent}` first"
                )
            box.set_meta("tracking_uri", self.tracking_uri)
            box.set_meta("model_name", self.model_name)
            if left:
                # An earlier process in this run folder left writes behind: they go first.
                drained = _drain(self._writer, box)
                if drained.stopped:
                    raise TrackingError(drained.stopped)
        except (TrackingError, OutboxError) as exc:
            box.close()
            raise TrackingError(str(exc)) from None
        return box

    def _sync_earlier_runs(self, root: Path) -> None:
        """Replay outboxes that earlier runs against this store left under ``root``."""
        own = self.outbox.absolute() if self.outbox is not None else None
        for folder in find_outboxes(root):
            if folder.absolute() == own:
                continue
            result = sync_outbox(folder, writer=self._writer, only_uri=self.tracking_uri)
            if result is not None and (result.landed or result.pending or result.failed):
                level = logging.WARNING if result.pending or result.failed else logging.INFO
                log.log(level, "%s", result.line())

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

    def _event_file(self, kind: str, tick: int) -> str:
        stem = f"events/tick-{tick:04d}-{kind}"
        name, n = f"{stem}.json", 1
        while name in self._event_files:
            n += 1
            name = f"{stem}-{n}.json"
        return name

    def _global_uri(self) -> AbstractContextManager[None]:
        """Point MLflow's process-wide tracking URI at this store, then put it back."""
        return _use_tracking_uri(self.tracking_uri)


_STOP = object()
_KICK = object()


@dataclass
class _Registration:
    """A version this run registered: the number it handed out and where it is."""

    version: int
    uid: str
    landed_as: int | None = None
    state: str = PENDING


class _OutboxLink:
    """A tracker's way to its store through its outbox.

    While the server answers, writes go straight to it (metrics through a
    background thread) and only registrations touch the journal, written ahead.
    From the first write that cannot reach the server, every write is
    journalled; the background thread probes the server and replays the journal
    in order, then writes go straight again. One lock orders "journal an entry"
    against "the journal is empty, go back to direct writes", so nothing is left
    behind in the journal.
    """

    def __init__(self, tracker: Tracker, box: Outbox) -> None:
        self.tracker = tracker
        self.box = box
        self.writer = tracker._writer
        self.uri = tracker.tracking_uri
        self.highest = 0
        self.offline = False
        self.outage_said = False
        self.registrations: list[_Registration] = []
        self.issued: dict[int, str] = {}
        self._state = threading.Lock()
        self._drain_lock = threading.Lock()
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._final: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._work, name="fedge-tracking", daemon=True)
        self._thread.start()

    # -- writes ------------------------------------------------------------------------

    def write(self, kind: str, payload: dict[str, Any], action: str) -> None:
        if not self.offline:
            try:
                self.writer.apply(kind, payload, resolve=self._resolve_uid)
                return
            except Exception as exc:  # noqa: BLE001 - sorted into unreachable or refused
                if not self.writer.unreachable(exc):
                    raise _refused(self.uri, action, exc) from None
                self._went_offline(action, exc)
        self._journal(kind, payload)

    def submit_metrics(self, payload: dict[str, Any]) -> None:
        if self.offline:
            self._journal("metrics", payload)
        else:
            self._jobs.put(payload)

    def register(
        self, model: torch.nn.Module, input_example: np.ndarray, payload: dict[str, Any]
    ) -> int:
        uid = self.box.new_uid()
        _save_model(model, input_example, self.box.files_for(uid) / payload["model_dir"])
        if self.offline:
            self.box.sync_files(uid)  # it may wait long: on disk before the entry names it
        with self._state:
            provisional = max([self.highest, *self.issued]) + 1
            parent = payload["tags"].get(PARENT_TAG, "")
            refs = {}
            if parent.isdigit() and int(parent) in self.issued:
                refs[PARENT_TAG] = self.issued[int(parent)]
            offline = self.offline
            body = {**payload, "refs": refs}
            if offline:
                body["provisional"] = provisional
            entry = self.box.append("register", body, uid=uid)
            record = _Registration(provisional, uid)
            self.registrations.append(record)
        if not offline:
            self._drain(probe=False, first_try=uid)
            if record.landed_as is not None:
                return record.landed_as
            if record.state == FAILED:
                found = self.box.entry(uid)
                raise TrackingError(
                    f"MLflow tracking store {_display(self.uri)}: registering a version of "
                    f"{payload['model_name']!r} failed: {found.error if found else '?'}"
                )
        # The number goes out to the devices: the journal must know it was handed out,
        # and no replay may be under way while it learns that.
        if not offline:
            self.box.sync_files(uid)
        with self._drain_lock, self._state:
            if record.landed_as is not None:
                return record.landed_as
            if not offline:
                self.box.amend(entry.seq, {"provisional": provisional})
            self.issued[provisional] = uid
            self.offline = True
        self._jobs.put(_KICK)
        return provisional

    def resolve_version(self, version: int) -> tuple[int, str | None]:
        """A version number as the store knows it, or the pending registration behind it."""
        with self._state:
            uid = self.issued.get(version)
            if uid is None:
                return version, None
            for record in self.registrations:
                if record.uid == uid and record.landed_as is not None:
                    return record.landed_as, None
            return version, uid

    def require_store(self, action: str) -> None:
        if self.offline:
            self.flush()
        if self.offline:
            n = self.box.counts()[PENDING] if self._final is None else self._final["pending"]
            raise TrackingError(
                f"MLflow tracking server {_display(self.uri)} is unreachable ({action}); "
                f"{n} writes of this run wait in {self.box.folder}"
            )

    # -- flushing and closing ----------------------------------------------------------

    def flush(self) -> None:
        if self._final is not None:
            return
        self._jobs.join()
        if self.offline:
            self._drain(probe=True)

    def state(self, *, refresh: bool) -> dict[str, Any]:
        if self._final is not None:
            return dict(self._final)
        if refresh:
            self.flush()
        counts = self.box.counts()
        with self._state:
            versions = [
                {"version": r.version, "landed_as": r.landed_as, "state": r.state}
                for r in self.registrations
            ]
        return {
            "outbox": str(self.box.folder),
            "server_reachable": not self.offline,
            "pending": counts[PENDING],
            "failed": counts[FAILED],
            "versions": versions,
        }

    def close(self) -> None:
        """Last chance to send the journal; then stop the thread and release the folder."""
        self.flush()
        self._jobs.put(_STOP)
        self._thread.join()
        final = self.state(refresh=False)
        self._final = final
        left = final["pending"] + final["failed"]
        if not left:
            self.box.remove()
            return
        what = _describe(self.box.entries(PENDING if final["pending"] else FAILED))
        self.box.close()
        folder = self.box.folder.parent
        if final["pending"]:
            log.warning(
                "MLflow tracking server %s is unreachable: %s kept in %s; they are sent by the "
                "next run against this server, or now with `fedge sync %s`",
                _display(self.uri),
                what,
                self.box.folder,
                folder,
            )
        else:
            log.warning(
                "MLflow tracking store %s refused %s, kept in %s; `fedge sync %s` retries them",
                _display(self.uri),
                what,
                self.box.folder,
                folder,
            )

    # -- internals ---------------------------------------------------------------------

    def _journal(self, kind: str, payload: dict[str, Any]) -> None:
        uid = self.box.new_uid()
        if kind == "artifact":
            # Keep a copy: the file may change or go before the server is back.
            source = Path(payload["path"])
            staged = self.box.files_for(uid) / source.name
            if payload["is_dir"]:
                shutil.copytree(source, staged)
            else:
                shutil.copy2(source, staged)
            self.box.sync_files(uid)
            payload = {**payload, "staged": source.name}
        with self._state:
            self.box.append(kind, payload, uid=uid)
            # A journalled write means the thread must drain, even if it just emptied it.
            was_offline, self.offline = self.offline, True
        if not was_offline:
            self._jobs.put(_KICK)

    def _went_offline(self, action: str, exc: BaseException) -> None:
        with self._state:
            self.offline = True
            said, self.outage_said = self.outage_said, True
        if not said:
            log.warning(
                "MLflow tracking server %s is unreachable (%s: %s); the run goes on and "
                "buffers its tracking writes in %s",
                _display(self.uri),
                action,
                _outage(exc),
                self.box.folder,
            )
        self._jobs.put(_KICK)

    def _drain(self, *, probe: bool, first_try: str | None = None) -> bool:
        """Send the journal in order; True once it is empty and writes go direct again."""
        with self._drain_lock:
            if probe and not _reachable(self.uri):
                return False
            result = _drain(
                self.writer,
                self.box,
                on_landed=self._landed,
                state=self._state,
                first_try=first_try,
            )
            if result.stopped:
                if not self.offline:
                    self._went_offline("sending buffered writes", RuntimeError(result.stopped))
                return False
            with self._state:
                if self.box.next_pending() is not None:
                    return False
                was_offline, self.offline = self.offline, False
                said, self.outage_said = self.outage_said, False
            if was_offline and said:
                log.warning(
                    "MLflow tracking server %s answers again; buffered tracking writes sent",
                    _display(self.uri),
                )
            return True

    def _resolve_uid(self, uid: str) -> int:
        entry = self.box.entry(uid)
        if entry is None or entry.state != DONE or not entry.result:
            raise _Unresolvable(f"the registration it names ({uid}) has not landed")
        return int(entry.result["version"])

    def _landed(self, entry: Entry, result: Mapping[str, Any] | None) -> None:
        if entry.kind != "register":
            return
        with self._state:
            for record in self.registrations:
                if record.uid == entry.uid:
                    if result is None:
                        record.state = FAILED
                    else:
                        record.landed_as = int(result["version"])
                        record.state = "landed"
                        self.highest = max(self.highest, record.landed_as)

    def _work(self) -> None:
        delay = _RETRY_MIN_S
        while True:
            try:
                job = self._jobs.get(timeout=delay if self.offline else None)
            except queue.Empty:
                job, got = _KICK, False
            else:
                got = True
            try:
                if job is _STOP:
                    return
                if job is _KICK:
                    if self.offline:
                        delay = (
                            _RETRY_MIN_S
                            if self._drain(probe=True)
                            else min(2 * delay, _RETRY_MAX_S)
                        )
                    continue
                self._send_metrics(job)
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one failure
                log.warning("tracking thread: %s", _first_line(exc))
            finally:
                if got:
                    self._jobs.task_done()

    def _send_metrics(self, payload: dict[str, Any]) -> None:
        if not self.offline:
            try:
                self.writer.apply("metrics", payload)
                return
            except Exception as exc:  # noqa: BLE001 - sorted into unreachable or refused
                if not self.writer.unreachable(exc):
                    entry = self.box.append("metrics", payload)
                    self.box.mark_failed(entry.seq, _first_line(exc))
                    log.warning(
                        "MLflow tracking store %s refused metrics at step %s (%s); kept in %s",
                        _display(self.uri),
                        payload["metrics"][0][3] if payload["metrics"] else "?",
                        _first_line(exc),
                        self.box.folder,
                    )
                    return
                self._went_offline("logging metrics", exc)
        self._journal("metrics", payload)


class _StoreWriter:
    """Performs fedge's tracking writes on one store; the same code writes now and replays.

    Every write is idempotent on replay: metrics keep the timestamps they were
    logged with (MLflow keeps one row per key, step, timestamp and value),
    artifacts and tags overwrite themselves, and a registration looks for the
    version tagged with its journal entry before making one.
    """

    def __init__(self, uri: str, client: mlflow.MlflowClient) -> None:
        self.uri = uri
        self.client = client
        self.remote = uri.startswith(("http://", "https://"))

    def unreachable(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the server did not answer (worth buffering), not a refusal."""
        return self.remote and _is_unreachable(exc)

    def apply(
        self,
        kind: str,
        payload: Mapping[str, Any],
        *,
        uid: str | None = None,
        files: Path | None = None,
        resolve: Callable[[str], int] | None = None,
        first_try: bool = False,
    ) -> dict[str, Any]:
        """Perform one write; ``uid``, ``files`` and ``resolve`` come from the outbox entry."""
        c, run_id = self.client, payload.get("run_id", "")
        if kind == "metrics":
            rows = [
                Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in payload["metrics"]
            ]
            for chunk in _chunks(rows, MAX_METRICS_PER_BATCH):
                c.log_batch(run_id, metrics=chunk)
        elif kind == "params":
            params = [Param(k, v) for k, v in payload["params"]]
            for chunk in _chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
                c.log_batch(run_id, params=chunk)
        elif kind == "event":
            key, value, ts, step = payload["metric"]
            c.log_text(run_id, payload["text"], payload["artifact_file"])
            c.log_batch(
                run_id,
                metrics=[Metric(key, float(value), int(ts), int(step))],
                tags=[RunTag(*payload["tag"])],
            )
        elif kind == "dict":
            c.log_dict(run_id, payload["data"], payload["artifact_file"])
        elif kind == "artifact":
            staged = payload.get("staged")
            source = (files / staged) if (staged and files is not None) else Path(payload["path"])
            if payload["is_dir"]:
                c.log_artifacts(run_id, str(source), payload["artifact_path"])
            else:
                c.log_artifact(run_id, str(source), payload["artifact_path"])
        elif kind == "register":
            return {"version": self._register(payload, uid, files, resolve, first_try)}
        elif kind == "alias":
            version = int(payload["version"])
            if payload.get("ref"):
                if resolve is None:
                    raise _Unresolvable(f"alias {payload['alias']!r}: no journal to resolve it")
                version = resolve(payload["ref"])
            c.set_registered_model_alias(payload["model_name"], payload["alias"], str(version))
            return {"version": version}
        elif kind == "end":
            c.set_terminated(run_id, payload["status"])
        else:
            raise _Unresolvable(f"unknown outbox entry kind {kind!r}")
        return {}

    def _register(
        self,
        payload: Mapping[str, Any],
        uid: str | None,
        files: Path | None,
        resolve: Callable[[str], int] | None,
        first_try: bool,
    ) -> int:
        c, name, run_id = self.client, payload["model_name"], payload["run_id"]
        tags = dict(payload["tags"])
        for key, ref in (payload.get("refs") or {}).items():
            if resolve is None:
                raise _Unresolvable(f"tag {key}: no journal to resolve it")
            tags[key] = str(resolve(ref))
        logged = None
        if uid is not None:
            tags[ENTRY_TAG] = uid
        if uid is not None and not first_try:
            done = _versions_tagged(c, name, uid)
            if done:
                return min(done)
            logged = _ready_logged_model(c, payload["experiment_id"], uid)
        if logged is None:
            if files is None:
                raise _Unresolvable(f"registration of {name!r}: the saved model is missing")
            local = files / payload["model_dir"]
            if not (local / "MLmodel").is_file():
                raise _Unresolvable(f"registration of {name!r}: no saved model in {local}")
            logged = c.create_logged_model(
                payload["experiment_id"], name=LOGGED_MODEL_NAME, source_run_id=run_id, tags=tags
            )
            _stamp_model(local, logged, run_id)
            with _use_tracking_uri(self.uri):
                c.log_model_artifacts(logged.model_id, str(local))
            c.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=int(payload["step"]))])
            c.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        _ensure_registered_model(c, name)
        with _use_tracking_uri(self.uri):
            created = c.create_model_version(
                name,
                f"models:/{logged.model_id}",
                run_id=run_id,
                tags=tags,
                model_id=logged.model_id,
            )
        version = int(created.version)
        provisional = payload.get("provisional")
        if uid is not None and provisional and version != int(provisional):
            c.set_model_version_tag(name, str(version), PROVISIONAL_TAG, str(provisional))
        return version


class _Unresolvable(RuntimeError):
    """An outbox entry that can never be written as it stands (the store is not to blame)."""


@dataclass(frozen=True)
class _Drained:
    landed: int
    stopped: str = ""


def _drain(
    writer: _StoreWriter,
    box: Outbox,
    *,
    on_landed: Callable[[Entry, Mapping[str, Any] | None], None] | None = None,
    state: threading.Lock | None = None,
    first_try: str | None = None,
) -> _Drained:
    """Replay ``box`` on ``writer``'s store in journal order until it is empty or unreachable.

    An entry the store refuses (not a connection problem) is parked as failed and
    the replay goes on; it stays in the journal for a later ``fedge sync``.
    ``first_try`` names an entry never attempted before: a registration need not
    look for what it cannot have made yet.
    """

    def resolve(uid: str) -> int:
        entry = box.entry(uid)
        if entry is None or entry.state != DONE or not entry.result:
            raise _Unresolvable(f"the registration it names ({uid}) has not landed")
        return int(entry.result["version"])

    landed = 0
    while True:
        entry = box.next_pending()
        if entry is None:
            return _Drained(landed)
        try:
            result = writer.apply(
                entry.kind,
                entry.payload,
                uid=entry.uid,
                files=box.folder / FILES_DIR / entry.uid,
                resolve=resolve,
                first_try=entry.uid == first_try,
            )
        except OutboxError:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted into unreachable or refused
            if writer.unreachable(exc):
                return _Drained(
                    landed,
                    f"MLflow tracking server {_display(writer.uri)} is unreachable: {_outage(exc)}",
                )
            box.mark_failed(entry.seq, _first_line(exc))
            log.warning(
                "MLflow tracking store %s refused a buffered %s write (%s); kept in %s",
                _display(writer.uri),
                entry.kind,
                _first_line(exc),
                box.folder,
            )
            if on_landed is not None:
                on_landed(entry, None)
            continue
        if state is not None:
            with state:
                box.mark_done(entry.seq, result)
        else:
            box.mark_done(entry.seq, result)
        landed += 1
        if on_landed is not None:
            on_landed(entry, result)


@dataclass(frozen=True)
class SyncResult:
    """What :func:`sync_outboxes` did with one outbox.

    Attributes
    ----------
    outbox : Path
        The outbox folder.
    tracking_uri : str
        The store its writes are for.
    landed : int
        Writes sent now.
    pending : int
        Writes still waiting (the server did not answer).
    failed : int
        Writes the store refused; they stay for another try.
    versions : list of (int, int)
        Each registration sent now: the number the run used, MLflow's number.
    reason : str
        Why something is left, in one line; empty when the outbox was emptied
        (and removed).
    """

    outbox: Path
    tracking_uri: str
    landed: int = 0
    pending: int = 0
    failed: int = 0
    versions: list[tuple[int, int]] = field(default_factory=list)
    reason: str = ""

    def line(self) -> str:
        """One line for a person."""
        if self.reason and not (self.landed or self.pending or self.failed):
            return f"{self.outbox}: {self.reason}"
        where = _display(self.tracking_uri) if self.tracking_uri else "its store"
        sent = f"{self.landed} buffered tracking writes sent to {where}"
        if self.versions:
            sent += "; versions " + ", ".join(
                f"{p}" if p == v else f"{p} (now {v})" for p, v in self.versions
            )
        if not self.pending and not self.failed:
            return f"{self.outbox}: {sent}; outbox emptied"
        left = []
        if self.pending:
            left.append(f"{self.pending} still pending")
        if self.failed:
            left.append(f"{self.failed} refused by the store")
        return f"{self.outbox}: {sent}; {', '.join(left)}: {self.reason}"


def sync_outboxes(path: Path) -> list[SyncResult]:
    """Send what runs buffered while their tracking server was unreachable.

    Parameters
    ----------
    path : Path
        A run folder, its ``tracking-outbox`` folder, or a folder of runs (an
        output folder or one scenario's folder): every outbox found is sent,
        oldest first, each to the store it was written for. Writes the store
        refused earlier are tried again. An outbox emptied is removed.

    Returns
    -------
    list of SyncResult
        One per outbox found; empty when nothing waits.

    Raises
    ------
    TrackingError
        If ``path`` is not a folder.
    """
    if not Path(path).is_dir():
        raise TrackingError(f"{path}: no such folder")
    folders = find_outboxes(Path(path))
    results = []
    for folder in folders:
        result = sync_outbox(folder, retry_failed=True)
        assert result is not None
        results.append(result)
    return results


def sync_outbox(
    folder: Path,
    *,
    writer: _StoreWriter | None = None,
    only_uri: str | None = None,
    retry_failed: bool = False,
) -> SyncResult | None:
    """Send one outbox; ``None`` when it is for another store than ``only_uri``."""
    try:
        box = Outbox(folder, create=False)
    except OutboxBusy as exc:
        return SyncResult(folder, "", reason=str(exc)) if only_uri is None else None
    except OutboxError as exc:
        if only_uri is not None:
            log.warning("%s", exc)
            return None
        return SyncResult(folder, "", reason=str(exc))
    emptied = False
    try:
        uri = box.meta("tracking_uri") or ""
        if only_uri is not None and uri != only_uri:
            return None
        if retry_failed:
            box.retry_failed()
        counts = box.counts()
        result = SyncResult(folder, uri, pending=counts[PENDING], failed=counts[FAILED])
        if not counts[PENDING] and not counts[FAILED]:
            emptied = True
            return result
        if not uri:
            return replace(result, reason="the outbox does not name its tracking store")
        if writer is None:
            if not _reachable(uri):
                return replace(
                    result, reason=f"MLflow tracking server {_display(uri)} is unreachable"
                )
            try:
                writer = _StoreWriter(uri, _connect(uri))
            except TrackingError as exc:
                return replace(result, reason=str(exc))
        versions: list[tuple[int, int]] = []

        def landed(entry: Entry, res: Mapping[str, Any] | None) -> None:
            if entry.kind == "register" and res is not None:
                used = entry.payload.get("provisional") or res["version"]
                versions.append((int(used), int(res["version"])))

        drained = _drain(writer, box, on_landed=landed)
        counts = box.counts()
        reason = drained.stopped
        if not reason and counts[FAILED]:
            failed = box.entries(FAILED)
            reason = f"first refusal: {failed[0].error}"
        emptied = not counts[PENDING] and not counts[FAILED]
        return SyncResult(
            folder, uri, drained.landed, counts[PENDING], counts[FAILED], versions, reason
        )
    finally:
        if emptied:
            box.remove()
        else:
            box.close()


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


@contextmanager
def _use_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at ``uri``, then put it back."""
    with _GLOBAL_URI_LOCK:
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]


def _refused(uri: str, action: str, exc: BaseException) -> TrackingError:
    return TrackingError(
        f"MLflow tracking store {_display(uri)}: {action} failed: {_first_line(exc)}"
    )


def _is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a connection failure, a timeout or a 5xx answer."""
    import requests

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(
            current,
            requests.exceptions.ConnectionError
            | requests.exceptions.Timeout
            | requests.exceptions.RetryError
            | ConnectionError
            | TimeoutError,
        ):
            return True
        if isinstance(current, MlflowException) and current.get_http_status_code() >= 500:
            return True
        current = current.__cause__ or current.__context__
    return False


_OUTAGE_WORDS = (
    ("connection refused", "connection refused"),
    ("name or service not known", "unknown host"),
    ("temporary failure in name resolution", "unknown host"),
    ("timed out", "timed out"),
    ("timeout", "timed out"),
    ("connection reset", "connection reset"),
    ("remotedisconnected", "connection closed by the server"),
)


def _outage(exc: BaseException) -> str:
    """A few words on why the server did not answer, instead of MLflow's paragraph."""
    text = str(exc)
    found = re.search(r"too many (\d{3}) error responses", text)
    if found:
        return f"it answers HTTP {found.group(1)}"
    low = text.lower()
    for needle, words in _OUTAGE_WORDS:
        if needle in low:
            return words
    if isinstance(exc, MlflowException) and exc.get_http_status_code() >= 500:
        return f"server error ({exc.error_code})"
    line = _first_line(exc, limit=120)
    return line if len(line) <= 120 else line[:117] + "..."


def _reachable(uri: str) -> bool:
    """Whether a remote tracking server answers its health check now (local stores: always)."""
    if not uri.startswith(("http://", "https://")):
        return True
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]  # credentials stay out of the probe
    url = urllib.parse.urlunsplit(
        (parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", "")
    )
    try:
        with urllib.request.urlopen(url, timeout=_HEALTH_TIMEOUT_S) as resp:
            return int(resp.status) < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False


def _highest_version(client: mlflow.MlflowClient, name: str) -> int:
    """The highest version number of a registered model; 0 when it has none."""
    if _registered_model(client, name) is None:
        return 0
    quote = '"' if "'" in name else "'"
    found = client.search_model_versions(
        f"name={quote}{name}{quote}", max_results=1, order_by=["version_number DESC"]
    )
    return max((int(mv.version) for mv in found), default=0)


def _versions_tagged(client: mlflow.MlflowClient, name: str, uid: str) -> list[int]:
    """Versions of ``name`` made by outbox entry ``uid``."""
    quote = '"' if "'" in name else "'"
    found = client.search_model_versions(
        f"name={quote}{name}{quote} and tags.`{ENTRY_TAG}` = '{uid}'"
    )
    return sorted(int(mv.version) for mv in found)


def _ready_logged_model(client: mlflow.MlflowClient, experiment_id: str, uid: str) -> Any:
    """A complete logged model made by outbox entry ``uid``, if an earlier attempt got that far."""
    found = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"tags.`{ENTRY_TAG}` = '{uid}'"
    )
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return ready[0] if ready else None


def _ensure_registered_model(client: mlflow.MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in _ALREADY_EXISTS:
            raise


def _save_model(model: torch.nn.Module, input_example: np.ndarray, path: Path) -> None:
    """Save ``model`` in MLflow's PyTorch flavour (pt2) with its example and signature."""
    example = _example_for(model, input_example)
    was_training = model.training
    model.eval()
    try:
        output = _predict(model, example)
        signature = infer_signature(example, output)
        mlflow.pytorch.save_model(
            model,
            str(path),
            input_example=example,
            signature=signature,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            serialization_format="pt2",
        )
    finally:
        model.train(was_training)


def _stamp_model(local: Path, logged: Any, run_id: str) -> None:
    """Write the logged model's identity into a model saved before it existed."""
    meta = Model.load(str(local / "MLmodel"))
    meta.artifact_path = logged.artifact_location
    meta.model_uuid = logged.model_id
    meta.model_id = logged.model_id
    meta.run_id = run_id
    meta.save(str(local / "MLmodel"))


_KIND_WORDS = {
    "metrics": ("metrics batch", "metrics batches"),
    "params": ("parameter batch", "parameter batches"),
    "event": ("event", "events"),
    "dict": ("JSON artifact", "JSON artifacts"),
    "artifact": ("artifact", "artifacts"),
    "register": ("model version", "model versions"),
    "alias": ("alias move", "alias moves"),
    "end": ("run end", "run ends"),
}


def _describe(entries: list[Entry]) -> str:
    """``"12 writes (8 metrics batches, 2 events, 1 model version, 1 alias move)"``."""
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.kind] = counts.get(entry.kind, 0) + 1
    parts = [f"{n} {_KIND_WORDS.get(kind, (kind, kind))[n != 1]}" for kind, n in counts.items()]
    total = len(entries)
    return f"{total} write{'s' if total != 1 else ''} ({', '.join(parts)})"
