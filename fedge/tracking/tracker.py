"""The :class:`Tracker`: one MLflow run of a scenario and the registered model it feeds.

Every global model a campaign produces becomes a model version, and the
deployed one carries the ``champion`` alias. Given an outbox folder, a tracker
keeps a run going while the tracking server is unreachable (:mod:`fedge.tracking.link`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_TAG_VAL_LENGTH,
)

from fedge import __version__
from fedge.tracking.link import (
    _OutboxLink,
)
from fedge.tracking.mlflow_store import (
    _ALREADY_EXISTS,
    _END_STATUSES,
    _EVENT_KIND,
    LAST_EVENT_TAG,
    TrackingError,
    _check_uri,
    _chunks,
    _clip,
    _connect,
    _default_artifact_location,
    _display,
    _highest_version,
    _jsonable,
    _now_ms,
    _seed_sqlite_store,
    _translate,
    _use_tracking_uri,
)
from fedge.tracking.outbox import (
    PENDING,
    Outbox,
    OutboxError,
    find_outboxes,
)
from fedge.tracking.registry import ModelRegistry
from fedge.tracking.sync import (
    sync_outbox,
)
from fedge.tracking.writer import (
    _drain,
    _StoreWriter,
)

log = logging.getLogger("fedge.tracking")

class Tracker(ModelRegistry):
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

    def end_earlier_run(self, run_id: str, status: str = "KILLED") -> None:
        """Close a run of the same run folder that a killed process left open.

        Written like any other write (through the outbox while the server is away).
        """
        if status not in _END_STATUSES or run_id == self.run_id:
            return
        self._write("end", {"run_id": run_id, "status": status}, f"closing the earlier run {run_id}")

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
