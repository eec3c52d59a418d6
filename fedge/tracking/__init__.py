"""MLflow tracking and model registry for fedge runs (the one package that imports MLflow).

A :class:`Tracker` owns one MLflow run of a scenario (parameters, metrics, drift
events, artifacts) and the registered model the run feeds: every global model a
campaign produces becomes a model version, and the deployed one carries the
``champion`` alias (one ``cluster-<k>`` alias per cluster with several models).

Every call goes through an :class:`mlflow.MlflowClient` bound to the tracker's own
tracking URI, so trackers on different stores can live in one process. Failures
of the store surface as :class:`TrackingError` with a one-line message naming
the URI. Given an outbox folder, a tracker keeps a run going while a remote
tracking server is unreachable: every write is journalled on disk
(:mod:`fedge.tracking.outbox`) and replayed, in order and once, when the server
answers again (:mod:`fedge.tracking.link`), or later with :func:`sync_outboxes`
(``fedge sync``).

Modules: :mod:`~fedge.tracking.tracker` (the run), :mod:`~fedge.tracking.registry`
(versions and aliases), :mod:`~fedge.tracking.link` (the outbox link),
:mod:`~fedge.tracking.writer` (one journalled write applied to MLflow),
:mod:`~fedge.tracking.sync` (``fedge sync``), :mod:`~fedge.tracking.mlflow_store`
(URIs, connections, errors, saved models), :mod:`~fedge.tracking.outbox` (the journal).
"""

from fedge.tracking.mlflow_store import (
    ARTIFACTS_DIR,
    CHAMPION,
    DB_FILE,
    ENTRY_TAG,
    PROVISIONAL_TAG,
    TrackingError,
    attach_artifact,
    check_tracking_uri,
    default_tracking_uri,
    list_model_versions,
    ui_command,
)
from fedge.tracking.outbox import OUTBOX_DIR
from fedge.tracking.sync import SyncResult, sync_outbox, sync_outboxes
from fedge.tracking.tracker import Tracker

__all__ = [
    "ARTIFACTS_DIR",
    "CHAMPION",
    "DB_FILE",
    "ENTRY_TAG",
    "OUTBOX_DIR",
    "PROVISIONAL_TAG",
    "SyncResult",
    "Tracker",
    "TrackingError",
    "attach_artifact",
    "check_tracking_uri",
    "default_tracking_uri",
    "list_model_versions",
    "sync_outbox",
    "sync_outboxes",
    "ui_command",
]
