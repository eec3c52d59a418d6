"""The store writer: one journalled write (metrics, event, artifact, version, alias) applied to MLflow."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Param, RunTag
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from fedge.tracking.mlflow_store import (
    ENTRY_TAG,
    LOGGED_MODEL_NAME,
    PROVISIONAL_TAG,
    _chunks,
    _display,
    _ensure_registered_model,
    _first_line,
    _is_unreachable,
    _outage,
    _ready_logged_model,
    _stamp_model,
    _use_tracking_uri,
    _versions_tagged,
)
from fedge.tracking.outbox import (
    DONE,
    FILES_DIR,
    Entry,
    Outbox,
    OutboxError,
)

log = logging.getLogger("fedge.tracking")

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
