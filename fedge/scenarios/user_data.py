"""The devices' own data (``[data] source = "folder"`` or ``"python"``): no generator, no schedule.

:class:`UserData` gives the runner and the server what they need of a data set that
is not generated: how many devices, ticks, features and classes, a few rows for the
registered model's input example, and each device's :class:`clients.sources.DataSource`
to feed its inbox from. It has no concept schedule (``schedule`` is None): the drifts
in the run summary are the ones the devices detected.

A folder holds one entry per device, ``device-0``, ``device-1``, ... with no gap: a
folder of files or one file (see :mod:`clients.sources` for the formats).

The rows' targets are of the task's kind (``data.target = "auto"``): class labels
for a classifier, float targets for a one-output regression, vector targets of
``k`` values for a regression with ``N_OUTPUTS = k`` (:mod:`clients.targets`). A
folder whose files hold targets the task cannot learn from is refused in one line.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from clients.sources import SUFFIXES, Batch, DataSource, FolderSource
from clients.targets import CLASS, FLOAT, Targets, for_task

if TYPE_CHECKING:
    from fedge.contracts.config import FedgeConfig

_DEVICE_RE = re.compile(r"device-(0|[1-9][0-9]*)")
_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class DataError(ValueError):
    """The configured data cannot be used; one line naming the key or file."""


def device_entries(root: Path) -> list[Path]:
    """``root``'s ``device-<i>`` entries in device order.

    Raises
    ------
    DataError
        ``root`` is not a folder, has no ``device-<i>`` entry, or skips a number.
    """
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder (one entry per device: device-0, device-1, ...)")
    found: dict[int, Path] = {}
    for entry in root.iterdir():
        stem = entry.name if entry.is_dir() else entry.stem
        match = _DEVICE_RE.fullmatch(stem)
        if match and (entry.is_dir() or entry.suffix in SUFFIXES):
            found[int(match.group(1))] = entry
    if not found:
        raise DataError(
            f"data.path: {root} has no device-<i> folder or file (device-0, device-1, ...; "
            f"files: {', '.join(SUFFIXES)})"
        )
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise DataError(f"data.path: {root} has device-{max(found)} but no device-{missing[0]}")
    return [found[i] for i in range(len(found))]


class _Stream:
    """A Python source's result as a :class:`DataSource`."""

    def __init__(self, made: Any, name: str) -> None:
        self._made = made
        self._name = name

    def batches(self) -> Iterable[Batch]:
        made = self._made
        return made.batches() if hasattr(made, "batches") else made

    def __repr__(self) -> str:
        return self._name


def _module(name: str) -> ModuleType:
    if not _MODULE_RE.fullmatch(name):
        raise DataError(f"data.module: {name!r} is not a module path (like mypkg.data)")
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001  # any error of the user's module is one line
        raise DataError(f"data.module: {name!r} cannot be imported ({type(exc).__name__}: {exc})") from None


def data_targets(cfg: FedgeConfig) -> Targets:
    """The kind of target the devices' own rows hold, as :func:`shaped_config` resolved it."""
    data = cfg.data
    if data.target == "vector":
        return Targets("vector", max(int(data.n_classes), 1))
    return FLOAT if data.target == "float" else CLASS


def _wanted_targets(cfg: FedgeConfig) -> Targets:
    """The targets the task learns from, and ``data.target`` if given; one line if they disagree."""
    from fedge.contracts.task import TaskError, task_for

    try:
        task = task_for(cfg)
    except TaskError as exc:
        raise DataError(str(exc)) from None
    learns = for_task(task.regression, task.n_outputs(1))
    given, name = cfg.data.target, repr(task.name) if task.name else "fedge's MLP"
    if given == "auto" or given == learns.kind:
        return learns
    if given == "class" and learns.kind == "float":
        return CLASS  # whole-number labels, read as numbers by a one-output regression
    if not task.regression:
        raise DataError(f'data.target: "{given}" targets need a regression task; the task {name} is a classifier '
                        '(LABEL_KIND = "class")')
    raise DataError(f'data.target: "{given}" targets do not fit the task {name}, which learns '
                    f"{learns.describe()} (N_OUTPUTS = {task.n_outputs(1)})")


def _fits(found: Targets, wanted: Targets, cfg: FedgeConfig) -> None:
    """Refuse, in one line, files whose targets the task cannot learn from."""
    # Whole numbers are classes, or the values of a one-output regression.
    if found == wanted or (found.is_class and wanted.kind != "vector"):
        return
    name = repr(cfg.model.task) if cfg.model.task else "fedge's MLP"
    if wanted.is_class:
        fix = 'a task with LABEL_KIND = "regression"'
        what = f"the task {name} is a classifier (LABEL_KIND = \"class\")"
    else:
        fix = f"N_OUTPUTS = {found.size} in the task" if found.kind == "vector" else "targets of the task's kind"
        what = f"the task {name} learns {wanted.describe()}"
    raise DataError(f"data.path: the devices' files hold {found.describe()}, but {what}; use {fix}")


def shaped_config(cfg: FedgeConfig) -> FedgeConfig:
    """``cfg`` with what its data determines filled in: device count, ticks, width, classes.

    A folder is read only when ``data.n_features`` or ``data.n_classes`` is 0; the
    result carries an absolute ``data.path`` and every count, so loading it again
    (a device does) reads no file.

    Raises
    ------
    DataError
        The data section names nothing usable.
    """
    data = cfg.data
    if data.source == "scenario":
        if data.path or data.module:
            raise DataError('data.path / data.module: only read with data.source = "folder" / "python"')
        return cfg
    wanted = _wanted_targets(cfg)
    if data.source == "inbox":
        if not wanted.is_class and data.n_classes < 1:
            data = dataclasses.replace(data, n_classes=wanted.size)
        if data.n_features < 1 or data.n_classes < 1:
            raise DataError(
                'data.n_features / data.n_classes: required with data.source = "inbox" '
                "(the width and classes of the rows the device applications ingest)"
            )
        return dataclasses.replace(cfg, data=data)
    if data.source == "python":
        if not data.module:
            raise DataError('data.module: required with data.source = "python"')
        module = _module(data.module)
        if not callable(getattr(module, "source", None)):
            raise DataError(f"data.module: {data.module!r} has no source(device_id) function")
        width = data.n_features or int(getattr(module, "N_FEATURES", 0) or 0)
        classes = data.n_classes or int(getattr(module, "N_CLASSES", 0) or 0)
        classes = classes if wanted.is_class else wanted.size
        if width < 1 or classes < 1:
            raise DataError(
                f"data.module: {data.module!r} declares no N_FEATURES / N_CLASSES; "
                "set them there or in data.n_features / data.n_classes"
            )
        return dataclasses.replace(
            cfg, data=dataclasses.replace(data, n_features=width, n_classes=classes, target=wanted.kind)
        )
    if not data.path:
        raise DataError('data.path: required with data.source = "folder"')
    root = Path(data.path).expanduser().resolve()
    if data.n_features and (data.n_classes or not wanted.is_class):
        classes = data.n_classes if wanted.is_class else wanted.size
        return dataclasses.replace(
            cfg, data=dataclasses.replace(data, path=str(root), n_classes=classes, target=wanted.kind)
        )
    entries = device_entries(root)
    from clients.inbox import IngestError

    try:
        shapes = [FolderSource(entry).scan() for entry in entries]
    except IngestError as exc:
        raise DataError(str(exc).removeprefix("ingest: ")) from None
    widths = {s.n_features for s in shapes}
    if len(widths) > 1:
        raise DataError(f"data.path: the devices' rows have different widths {sorted(widths)}")
    found = {s.targets for s in shapes}
    vectors = {t.size for t in found if t.kind == "vector"}
    if len(vectors) > 1 or (vectors and len(found) > 1):
        raise DataError(f"data.path: the devices' files hold targets of different kinds: "
                        f"{', '.join(sorted(t.describe() for t in found))}")
    _fits(found.pop() if len(found) == 1 else FLOAT, wanted, cfg)
    width = data.n_features or widths.pop()
    classes = (data.n_classes or max(s.n_classes for s in shapes)) if wanted.is_class else wanted.size
    ticks = max(s.n_ticks for s in shapes)
    return dataclasses.replace(
        cfg,
        scenario=dataclasses.replace(cfg.scenario, clients=len(entries), ticks=ticks),
        data=dataclasses.replace(
            data, path=str(root), n_features=width, n_classes=max(classes, 1), target=wanted.kind
        ),
    )


class UserData:
    """The Scenario interface over the devices' own data (see the module docstring).

    Parameters
    ----------
    cfg : FedgeConfig
        A configuration :func:`shaped_config` has filled in.
    """

    schedule = None
    """User data has no known concept schedule."""

    def __init__(self, cfg: FedgeConfig) -> None:
        self.cfg = cfg
        self.n_clients = cfg.scenario.clients
        self.n_steps = cfg.scenario.ticks
        self.n_features = cfg.data.n_features
        self.n_classes = cfg.data.n_classes
        self.targets = data_targets(cfg)

    def source(self, device: int) -> DataSource:
        """Device ``device``'s stream (none with ``data.source = "inbox"``: it feeds itself)."""
        data = self.cfg.data
        if data.source == "inbox":
            return _Stream((), "inbox")
        if data.source == "folder":
            entries = device_entries(Path(data.path))
            if device >= len(entries):
                raise DataError(f"data.path: {data.path} has no device-{device}")
            return FolderSource(entries[device], self.targets)
        module = _module(data.module)
        return _Stream(module.source(device), f"{data.module}.source({device})")

    def example_rows(self, k: int = 5) -> np.ndarray:
        """The first ``k`` rows of device 0 (the registered model's input example)."""
        rows: list[np.ndarray] = []
        for _, x, _ in _first(self.source(0).batches(), k):
            rows.append(np.asarray(x, dtype=np.float32).reshape(len(x), -1))
        got = np.concatenate(rows)[:k] if rows else np.zeros((0, self.n_features), np.float32)
        return got if got.shape[1:] == (self.n_features,) else np.zeros((0, self.n_features), np.float32)

    def __repr__(self) -> str:
        where = self.cfg.data.path or self.cfg.data.module
        return f"UserData({self.cfg.data.source}={where!r}, devices={self.n_clients}, ticks={self.n_steps})"


def _first(batches: Iterable[Batch], k: int) -> Iterator[Batch]:
    n = 0
    for batch in batches:
        if n >= k:
            return
        n += len(batch[2])
        yield batch
