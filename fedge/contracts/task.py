"""The task interface: which model the devices train, on what input, with which loss.

A *task* is a Python module found by import path (``[model] task =
"mypkg.task"``), in the spirit of Flower's ``task.py`` convention. fedge's own
feed-forward classifier (:mod:`fedge.contracts.model`) is the default task,
used when ``model.task`` is empty.

What a task module provides
---------------------------
``build_model(n_features, n_outputs)`` or ``Net``
    The model factory (required). ``build_model`` gets the flat row width and
    the number of outputs (classes; 1 for a regression); a ``Net`` class is
    called without arguments, as in Flower's templates.
``INPUT_SHAPE`` : tuple of int, optional
    The shape of one sample as the model takes it, e.g. ``(1, 8, 8)``. Devices
    hold flat rows (the ingest inbox stores ``n_features`` floats per row) and
    reshape each row to ``INPUT_SHAPE`` before calling the model, so its
    product must be the row width. Default ``(n_features,)``.
``INPUT_DTYPE`` : str, optional
    A ``torch`` floating dtype name, default ``"float32"``.
``N_OUTPUTS`` : int, optional
    Number of classes (or regression outputs); default: the scenario's classes
    (1 for a regression).
``LABEL_KIND`` : {"class", "regression"}, optional
    Default ``"class"``: labels are class indices, the model returns one logit
    per class. ``"regression"``: labels are numbers, the model returns one
    value per sample (shape ``(n,)`` or ``(n, 1)``), or with ``N_OUTPUTS = k``
    above 1 a vector of ``k`` values (shape ``(n, k)``, vector targets). The
    devices' own data holds targets of that kind: float targets for one
    output, vector targets of ``k`` values (see :mod:`clients.targets`);
    integer-valued class labels also train a one-output regression.
``TOLERANCE`` : float, optional
    Regression only. A prediction is *correct* when ``|y - y_hat| <=
    TOLERANCE`` (for a vector: every value within it); default half the
    standard deviation of the labels the device holds (its window; per
    output for a vector). The drift monitor's error stream is
    ``|y - y_hat| > tolerance`` (still 0/1), and every "accuracy" fedge
    reports for a regression task (tick accuracy, ``eval_acc``, the champion's
    accuracy) is the fraction of samples within the tolerance.
``loss(output, target)``, optional
    The training and evaluation loss on tensors; default cross-entropy
    (class) or mean squared error (regression).
``train(model, x, y, *, epochs, lr, batch_size, seed, proximal_mu)``, optional
    Own training loop on NumPy arrays (``x`` already of ``INPUT_SHAPE``);
    returns the last epoch's mean loss.
``evaluate(model, x, y)``, optional
    Returns ``(accuracy, loss)``.
``predict(model, x)``, optional
    Returns one prediction per sample (class index, or value).

Every process imports the task itself
-------------------------------------
The task is named in the run configuration, never shipped as code: the
in-process engine, every Flower simulation worker and every deployed device
imports ``model.task`` on its own. The module must therefore be importable on
the devices (installed in their environment or on their ``PYTHONPATH``).

A task that cannot be imported, has no model factory, or whose model does not
accept its input shape is refused when the configuration is loaded, with one
line (:class:`TaskError`, turned into a ``ConfigError``).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from fedge.contracts import model as nets

LABEL_KINDS = ("class", "regression")


class TaskError(ValueError):
    """A task module that cannot be used; the message is one line naming the module."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:200] if first else type(exc).__name__


@dataclass(frozen=True)
class Task:
    """A loaded task: model factory, input shape, label kind and the learning functions.

    Parameters
    ----------
    name : str
        The import path (``""`` for fedge's default MLP).
    module : ModuleType or None
        The user's module (None for the default).
    hidden, layers : int
        The default MLP's size (``model.hidden``, ``model.layers``).
    """

    name: str
    module: ModuleType | None
    hidden: int = 32
    layers: int = 2

    # -- what the module declares ----------------------------------------------------------
    def _attr(self, key: str, default: Any = None) -> Any:
        return getattr(self.module, key, default) if self.module is not None else default

    @property
    def label_kind(self) -> str:
        """``"class"`` or ``"regression"``."""
        return str(self._attr("LABEL_KIND", "class"))

    @property
    def regression(self) -> bool:
        """True for a regression task."""
        return self.label_kind == "regression"

    @property
    def dtype(self) -> torch.dtype:
        """The input dtype."""
        return getattr(torch, str(self._attr("INPUT_DTYPE", "float32")))

    def input_shape(self, n_features: int) -> tuple[int, ...]:
        """One sample's shape as the model takes it (default: the flat row)."""
        shape = self._attr("INPUT_SHAPE")
        return (int(n_features),) if shape is None else tuple(int(s) for s in shape)

    def n_features(self, default: int) -> int:
        """The flat row width: the product of ``INPUT_SHAPE`` when declared."""
        shape = self._attr("INPUT_SHAPE")
        return int(math.prod(shape)) if shape is not None else int(default)

    def n_outputs(self, default: int) -> int:
        """Classes (or regression outputs): ``N_OUTPUTS`` when declared."""
        return int(self._attr("N_OUTPUTS", 1 if self.regression else default))

    # -- the model --------------------------------------------------------------------------
    def build(self, n_features: int, n_outputs: int) -> nn.Module:
        """A new model of this task."""
        if self.module is None:
            return nets.build_model(n_features, n_outputs, self.hidden, self.layers)
        factory = getattr(self.module, "build_model", None)
        if callable(factory):
            return factory(n_features, n_outputs)
        return self.module.Net()

    def initial_weights(self, n_features: int, n_outputs: int, seed: int) -> nets.Weights:
        """Seeded initial weights, the same on every machine, for every layer type.

        The model is built (its own initialisation runs) under ``torch.manual_seed``
        inside a fork of the RNG state, so the caller's random stream is untouched.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.build(n_features, n_outputs)
        return nets.get_weights(model)

    def shaped(self, x: np.ndarray, n_features: int) -> np.ndarray:
        """Flat rows ``(n, n_features)`` reshaped to ``(n, *INPUT_SHAPE)``."""
        shape = self.input_shape(n_features)
        arr = np.asarray(x)
        return arr.reshape((len(arr), *shape))

    def targets(self, y: np.ndarray) -> np.ndarray:
        """Labels as the loss wants them: int64 classes or float32 values."""
        return np.asarray(y, dtype=np.float32 if self.regression else np.int64)

    # -- learning ---------------------------------------------------------------------------
    def _loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        own = self._attr("loss")
        if callable(own):
            return own
        if self.regression:
            return lambda out, target: nn.functional.mse_loss(out.reshape(target.shape), target)
        return nn.functional.cross_entropy

    def _tensors(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        target_dtype = torch.float32 if self.regression else torch.long
        return torch.as_tensor(x, dtype=self.dtype), torch.as_tensor(y, dtype=target_dtype)

    def train(
        self,
        model: nn.Module,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        lr: float,
        batch_size: int,
        seed: int,
        proximal_mu: float = 0.0,
    ) -> float:
        """Train ``model`` in place (the task's own ``train`` when it has one)."""
        own = self._attr("train")
        kwargs = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                  "proximal_mu": proximal_mu}
        if callable(own):
            return float(own(model, x, self.targets(y), **kwargs))
        if self.module is None:
            return nets.train(model, x, y, **kwargs)
        if len(x) == 0:
            return float("nan")
        loss_fn = self._loss()
        gen = torch.Generator().manual_seed(seed)
        xt, yt = self._tensors(x, y)
        anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        last = float("nan")
        for _ in range(epochs):
            order = torch.randperm(len(xt), generator=gen)
            total, count = 0.0, 0
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                opt.zero_grad()
                loss = loss_fn(model(xt[idx]), yt[idx])
                if anchor is not None:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
                    loss = loss + proximal_mu / 2 * prox
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                count += len(idx)
            last = total / count
        model.eval()
        return last

    def predict(self, model: nn.Module, x: np.ndarray) -> np.ndarray:
        """One prediction per sample: a class index, or a value for a regression."""
        own = self._attr("predict")
        if callable(own):
            return np.asarray(own(model, x))
        if self.module is None:
            return nets.predict(model, x)
        if len(x) == 0:
            return np.zeros(0, dtype=np.float32 if self.regression else np.int64)
        model.eval()
        with torch.no_grad():
            out = model(torch.as_tensor(x, dtype=self.dtype))
        if self.regression:
            values = out.reshape(len(x), -1).numpy().astype(np.float32)
            return values[:, 0] if values.shape[1] == 1 else values
        return out.argmax(dim=1).numpy().astype(np.int64)

    @property
    def declares_tolerance(self) -> bool:
        """True when the task module sets ``TOLERANCE``."""
        return self._attr("TOLERANCE") is not None

    def tolerance(self, labels: np.ndarray) -> Any:
        """Regression: how far off a prediction may be and still count as correct (0 for a classifier).

        ``TOLERANCE`` when the task declares it, else half the standard deviation
        of ``labels`` (the device's window); never below a tiny positive floor.
        For vector targets ``(n, k)`` the default is one tolerance per output
        (an array of ``k``).
        """
        if not self.regression:
            return 0.0
        declared = self._attr("TOLERANCE")
        if declared is not None:
            return float(declared)
        labels = np.asarray(labels, dtype=np.float64)
        if labels.ndim == 2:
            std = np.std(labels, axis=0) if len(labels) else np.zeros(labels.shape[1])
            return np.maximum(0.5 * std, 1e-6)
        std = float(np.std(labels)) if len(labels) else 0.0
        return max(0.5 * std, 1e-6)

    def errors(self, model: nn.Module, x: np.ndarray, y: np.ndarray, tolerance: Any) -> np.ndarray:
        """The 0/1 error stream the drift monitor reads (1 = wrong)."""
        pred = self.predict(model, x)
        if self.regression:
            return regression_errors(y, pred, tolerance)
        return (pred != y).astype(np.int8)

    def evaluate(
        self, model: nn.Module, x: np.ndarray, y: np.ndarray, tolerance: Any = 0.0
    ) -> tuple[float, float]:
        """Accuracy (regression: fraction within ``tolerance``) and mean loss."""
        own = self._attr("evaluate")
        if callable(own):
            acc, loss = own(model, x, self.targets(y))
            return float(acc), float(loss)
        if self.module is None:
            return nets.evaluate(model, x, y)
        if len(x) == 0:
            return float("nan"), float("nan")
        xt, yt = self._tensors(x, y)
        model.eval()
        with torch.no_grad():
            out = model(xt)
            loss = float(self._loss()(out, yt).item())
        acc = 1.0 - float(self.errors(model, x, y, tolerance).mean())
        return acc, loss


def regression_errors(y: np.ndarray, predicted: np.ndarray, tolerance: Any) -> np.ndarray:
    """1 where a regression's prediction is off by more than ``tolerance`` (a vector: any value).

    ``tolerance`` is a number, or one per output for vector targets ``(n, k)``.
    """
    y = np.asarray(y, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64).reshape(y.shape)
    wrong = np.abs(y - predicted) > tolerance
    return (wrong.any(axis=1) if wrong.ndim == 2 else wrong).astype(np.int8)


_CACHE: dict[tuple[str, int, int], Task] = {}
_MODULE_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def load_task(name: str, hidden: int = 32, layers: int = 2) -> Task:
    """The task named ``name`` (``""``: fedge's MLP), imported once per process.

    Raises
    ------
    TaskError
        The module cannot be imported, has no model factory, or declares values
        fedge cannot use.
    """
    key = (name, hidden, layers)
    found = _CACHE.get(key)
    if found is not None:
        return found
    module = None
    if name and not _MODULE_PATH.fullmatch(name):
        raise TaskError(f"model.task: {name!r} is not a module path such as 'mypkg.task'")
    if name:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure importing user code is the user's to fix
            raise TaskError(
                f"model.task: {name!r} cannot be imported ({_one_line(exc)}); the module must be "
                "importable on the server and on every device"
            ) from None
        if not callable(getattr(module, "build_model", None)) and not callable(
            getattr(module, "Net", None)
        ):
            raise TaskError(
                f"model.task: {name!r} has no model factory; define build_model(n_features, "
                "n_outputs) or a Net class"
            )
    task = Task(name, module, hidden, layers)
    _check_declared(task)
    _CACHE[key] = task
    return task


def task_for(cfg: Any) -> Task:
    """The task of a run configuration (its ``[model]`` section)."""
    m = cfg.model
    return load_task(getattr(m, "task", ""), m.hidden, m.layers)


def _check_declared(task: Task) -> None:
    where = f"model.task {task.name!r}"
    if task.label_kind not in LABEL_KINDS:
        raise TaskError(
            f"{where}: LABEL_KIND {task.label_kind!r} is not allowed; allowed: {', '.join(LABEL_KINDS)}"
        )
    dtype = getattr(torch, str(task._attr("INPUT_DTYPE", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TaskError(f"{where}: INPUT_DTYPE {task._attr('INPUT_DTYPE')!r} is not a torch float dtype")
    shape = task._attr("INPUT_SHAPE")
    if shape is not None:
        try:
            dims = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise TaskError(f"{where}: INPUT_SHAPE {shape!r} is not a tuple of integers") from None
        if not dims or any(d < 1 for d in dims):
            raise TaskError(f"{where}: INPUT_SHAPE {shape!r} must hold positive sizes")
    tol = task._attr("TOLERANCE")
    if tol is not None and (not isinstance(tol, int | float) or not tol > 0 or not math.isfinite(tol)):
        raise TaskError(f"{where}: TOLERANCE {tol!r} must be a positive number")


def check_task(task: Task, n_features: int, n_classes: int) -> None:
    """Build the task's model and run it on a batch of its input shape.

    Raises
    ------
    TaskError
        The model cannot be built, does not accept ``(2, *INPUT_SHAPE)``, or its
        output does not have one column per class (one value for a regression).
    """
    where = f"model.task {task.name!r}" if task.name else "model"
    features, outputs = task.n_features(n_features), task.n_outputs(n_classes)
    shape = task.input_shape(features)
    try:
        model = task.build(features, outputs)
    except Exception as exc:  # noqa: BLE001 - the user's model code may raise anything
        raise TaskError(f"{where}: building the model failed ({_one_line(exc)})") from None
    if not isinstance(model, nn.Module):
        raise TaskError(f"{where}: the model factory returned {type(model).__name__}, not a torch.nn.Module")
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *shape), dtype=task.dtype))
    except Exception as exc:  # noqa: BLE001 - the user's model code may raise anything
        raise TaskError(
            f"{where}: the model does not accept input of shape (n, {', '.join(map(str, shape))}) "
            f"({_one_line(exc)})"
        ) from None
    got = tuple(getattr(out, "shape", ()))
    if task.regression:
        wanted = ((2,), (2, 1)) if outputs == 1 else ((2, outputs),)
    else:
        wanted = ((2, outputs),)
    if got not in wanted:
        what = f"{outputs} logits per sample" if not task.regression else (
            "one value per sample" if outputs == 1 else f"{outputs} values per sample (N_OUTPUTS)")
        raise TaskError(f"{where}: the model returns shape {got} for 2 samples; expected {what}")
