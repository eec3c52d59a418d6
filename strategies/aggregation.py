"""Weighted averaging of client updates, one pass over each update.

Flower's :func:`flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`
deserialises every array (a copy), multiplies it into a temporary and adds the
temporary to the running sum: four passes over memory per update. The functions
here read each update once: arrays are viewed in place inside the records'
serialised bytes, and folded block by block into one accumulator with a BLAS
``axpy`` (``acc += w * x``), which needs no temporary; the accumulator's block
stays in cache while all updates are added to it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from functools import cache
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from scipy.linalg import blas
from threadpoolctl import ThreadpoolController

__all__ = ["aggregate_arrayrecords", "array_view", "weighted_average"]

_AXPY_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: Accumulator bytes kept in cache while every update is added (half a core's L2 here).
BLOCK_BYTES = 512 * 1024


def array_view(array: Array) -> np.ndarray:
    """A read-only NumPy view of a Flower ``Array``'s data, without copying it.

    Parameters
    ----------
    array : flwr.app.Array
        An array serialised by NumPy (``stype == "numpy.ndarray"``).

    Returns
    -------
    numpy.ndarray
        Read-only array sharing memory with ``array.data``; falls back to
        ``array.numpy()`` (a copy) for Fortran-ordered or object data.

    Examples
    --------
    >>> from flwr.app import Array
    >>> array_view(Array(np.arange(3, dtype=np.float32))).tolist()
    [0.0, 1.0, 2.0]
    """
    data = array.data
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    if fortran or dtype.hasobject:
        return array.numpy()
    return np.frombuffer(data, dtype=dtype, offset=stream.tell()).reshape(shape)


def weighted_average(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Weighted mean of several updates, key by key.

    Parameters
    ----------
    updates : sequence of mapping of str to numpy.ndarray
        One mapping per client, all with the keys (and shapes) of the first.
    weights : sequence of float
        Non-negative weight of each update (e.g. its number of examples); they
        need not sum to one.

    Returns
    -------
    dict of str to numpy.ndarray
        ``sum_i weights[i] * updates[i][k] / sum(weights)`` for every key ``k``,
        in the dtype of the first update's array (floating arrays) or float64.

    Raises
    ------
    ValueError
        If there are no updates, the counts differ, the weights do not sum to a
        positive number, or an update misses a key or has another shape.

    Examples
    --------
    >>> a = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    >>> b = {"w": np.array([3.0, 6.0], dtype=np.float32)}
    >>> weighted_average([a, b], [1, 3])["w"].tolist()
    [2.5, 5.0]
    """
    if not updates:
        raise ValueError("weighted_average: no updates")
    if len(weights) != len(updates):
        raise ValueError(f"weighted_average: {len(updates)} updates but {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weighted_average: the weights sum to {total}; need a positive sum")
    factors = [float(w) / total for w in weights]
    out: dict[str, np.ndarray] = {}
    for key, first in updates[0].items():
        first = np.asarray(first)
        dtype = first.dtype if first.dtype.kind == "f" else np.dtype(np.float64)
        flats = []
        for i, update in enumerate(updates):
            if key not in update:
                raise ValueError(f"weighted_average: update {i} has no array {key!r}")
            value = np.asarray(update[key])
            if value.shape != first.shape:
                raise ValueError(
                    f"weighted_average: update {i} has {key!r} of shape {value.shape}, "
                    f"expected {first.shape}"
                )
            flats.append(value.reshape(-1))
        out[key] = _accumulate(flats, factors, dtype).reshape(first.shape)
    return out


def _accumulate(flats: Sequence[np.ndarray], factors: Sequence[float], dtype: np.dtype) -> np.ndarray:
    """``sum_i factors[i] * flats[i]``, one cache-sized block of the result at a time.

    Each block of the accumulator stays in cache while every update's slice is
    added to it, so memory traffic is one read of each update and one write of
    the result; the per-element order of additions is the updates' order.
    """
    size = flats[0].size
    acc = np.zeros(size, dtype=dtype)
    axpy = blas.get_blas_funcs("axpy", dtype=dtype) if dtype in _AXPY_DTYPES else None
    step = max(1, BLOCK_BYTES // dtype.itemsize)
    # One thread: a memory-bound axpy gains nothing from a second one, and BLAS
    # threads that wait for each other on a busy machine cost more than they give.
    single = _blas_threads().limit(limits=1, user_api="blas") if size >= step else nullcontext()
    with single:
        for start in range(0, size, step):
            block = acc[start : start + step]
            for flat, factor in zip(flats, factors, strict=True):
                part = flat[start : start + step]
                if axpy is not None and part.dtype == dtype:
                    axpy(part, block, a=factor)
                else:
                    block += part.astype(dtype, copy=False) * factor
    return acc


@cache
def _blas_threads() -> ThreadpoolController:
    return ThreadpoolController()


def aggregate_arrayrecords(records: Sequence[RecordDict], weighting_metric_name: str) -> ArrayRecord:
    """Drop-in for Flower's ``aggregate_arrayrecords``: same inputs, same result.

    Parameters
    ----------
    records : sequence of flwr.app.RecordDict
        Reply contents, each with one ``ArrayRecord`` and one ``MetricRecord``
        holding ``weighting_metric_name``.
    weighting_metric_name : str
        The metric that weights each reply (e.g. ``"num-examples"``).

    Returns
    -------
    flwr.app.ArrayRecord
        The weighted average of the replies' arrays.
    """
    weights: list[float] = []
    updates: list[dict[str, np.ndarray]] = []
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        weights.append(float(_number(metrics[weighting_metric_name])))
        update: dict[str, np.ndarray] = {}
        for arrays in record.array_records.values():
            update.update({k: array_view(v) for k, v in arrays.items()})
        updates.append(update)
    averaged = weighted_average(updates, weights)
    return ArrayRecord({k: Array(v) for k, v in averaged.items()})


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"aggregation weight must be a number, got {value!r}")
    return float(value)
