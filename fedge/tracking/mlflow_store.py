"""The MLflow store as fedge uses it: URIs, connections, errors, versions, saved models.

This is where MLflow is imported (and configured through its environment
variables first: a user's own settings win). The tracker, the outbox link, the
store writer and the sync all reach MLflow through these helpers.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedge.tracking.outbox import (
    Entry,
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
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature

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


def check_tracking_uri(uri: str) -> None:
    """Refuse, in one line (:class:`TrackingError`), a tracking URI fedge cannot use.

    A remote server that does not answer now is no error (the run buffers its
    writes in its outbox); an empty URI, an in-memory SQLite store or a SQLite
    file in a folder that does not exist is.
    """
    if uri.startswith(("http://", "https://")):
        return
    _check_uri(uri)


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
