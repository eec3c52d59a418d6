"""Weighted averaging of client updates, one pass over each update.

Flower's :func:`flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`
deserialises every array (a copy), multiplies it into a temporary and adds the
temporary to the running sum, then serialises the result (more copies): about
four passes over memory per update. The functions here read each update once:
arrays are viewed in place inside the records' serialised bytes and folded
into one accumulator with a BLAS ``axpy`` (``acc += w * x``, no temporary; the
first update is a multiply into the accumulator, so it is never zeroed first).
The accumulator is the result's own serialised buffer, so the averaged
``ArrayRecord`` is built without copying it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from functools import cache, lru_cache
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from scipy.linalg import blas
from threadpoolctl import ThreadpoolController

__all__ = ["aggregate_arrayrecords", "array_view", "weighted_average"]

_AXPY_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: Accumulator bytes updated by one ``axpy`` call. Large enough that the per-call cost
#: vanishes, small enough to stay in the last-level cache while an update streams past.
BLOCK_BYTES = 4 * 1024 * 1024
#: Arrays at least this large are averaged on one BLAS thread (see ``_accumulate``).
SINGLE_THREAD_FROM = 1 << 16
_NPY_MAGIC = b"\x93NUMPY"


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
    if data[:6] != _NPY_MAGIC or len(data) < 12:
        return array.numpy()  # not NumPy's format: let NumPy say what is wrong
    if data[6] == 1:
        end = 10 + int.from_bytes(data[8:10], "little")
    else:
        end = 12 + int.from_bytes(data[8:12], "little")
    shape, fortran, dtype = _npy_header(bytes(data[:end]))
    if fortran or dtype.hasobject:
        return array.numpy()
    return np.frombuffer(data, dtype=dtype, count=_size(shape), offset=end).reshape(shape)


@lru_cache(maxsize=1024)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of a ``.npy`` header (NumPy's own safe parser, cached)."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


def _size(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


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
    factors = _factors(updates, weights)
    out: dict[str, np.ndarray] = {}
    for key, flats, shape, dtype in _columns(updates):
        out[key] = _accumulate(flats, factors, np.empty(_size(shape), dtype)).reshape(shape)
    return out


def _factors(updates: Sequence[object], weights: Sequence[float]) -> list[float]:
    if not updates:
        raise ValueError("weighted_average: no updates")
    if len(weights) != len(updates):
        raise ValueError(f"weighted_average: {len(updates)} updates but {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weighted_average: the weights sum to {total}; need a positive sum")
    return [float(w) / total for w in weights]


def _columns(
    updates: Sequence[Mapping[str, np.ndarray]],
) -> list[tuple[str, list[np.ndarray], tuple[int, ...], np.dtype]]:
    """Per key: every update's array flattened, the shape, and the result's dtype."""
    columns = []
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
        columns.append((key, flats, first.shape, dtype))
    return columns


def _accumulate(flats: Sequence[np.ndarray], factors: Sequence[float], acc: np.ndarray) -> np.ndarray:
    """``acc = sum_i factors[i] * flats[i]``, written into ``acc`` (1-D, any content).

    Memory traffic is one read of each update and one write of the result: the
    accumulator's block stays in cache while the updates stream past it. The
    per-element order of additions is the updates' order.
    """
    dtype = acc.dtype
    size = acc.size
    axpy = blas.get_blas_funcs("axpy", dtype=dtype) if dtype in _AXPY_DTYPES else None
    step = max(1, BLOCK_BYTES // dtype.itemsize)
    # One thread: a memory-bound axpy gains nothing from a second one, and BLAS
    # threads that wait for each other on a busy machine cost more than they give.
    single = (
        _blas_threads().limit(limits=1, user_api="blas")
        if axpy is not None and size >= SINGLE_THREAD_FROM
        else nullcontext()
    )
    with single:
        for start in range(0, size, step):
            block = acc[start : start + step]
            pairs = zip(flats, factors, strict=True)
            first, factor = next(pairs)
            np.multiply(first[start : start + step], dtype.type(factor), out=block, casting="unsafe")
            for flat, factor in pairs:
                part = flat[start : start + step]
                if axpy is not None and part.dtype == dtype:
                    axpy(part, block, a=factor)
                else:
                    block += part.astype(dtype, copy=False) * dtype.type(factor)
    return acc


@cache
def _blas_threads() -> ThreadpoolController:
    return ThreadpoolController()


@lru_cache(maxsize=256)
def _npy_prefix(descr: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header NumPy writes for a C-ordered array (padded to 64 bytes)."""
    stream = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(stream, header)
    return stream.getvalue()


def _averaged_array(
    flats: Sequence[np.ndarray], factors: Sequence[float], shape: tuple[int, ...], dtype: np.dtype
) -> Array:
    """The weighted sum as a Flower ``Array``, accumulated inside its serialised bytes."""
    prefix = _npy_prefix(dtype.str, shape)  # a floating dtype: its descr is its str
    nbytes = _size(shape) * dtype.itemsize
    buffer = io.BytesIO()
    buffer.write(prefix)
    if nbytes:
        buffer.seek(len(prefix) + nbytes - 1)
        buffer.write(b"\0")
        with buffer.getbuffer() as raw:
            acc = np.frombuffer(raw, dtype=dtype, count=_size(shape), offset=len(prefix))
            _accumulate(flats, factors, acc)
            del acc  # the view must be gone before getvalue() may share the buffer
    # With no view left, BytesIO hands over its buffer as the bytes object (no copy).
    return Array(dtype=str(dtype), shape=tuple(shape), stype="numpy.ndarray", data=buffer.getvalue())


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
    factors = _factors(updates, weights)
    return ArrayRecord(
        {key: _averaged_array(flats, factors, shape, dtype) for key, flats, shape, dtype in _columns(updates)}
    )


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"aggregation weight must be a number, got {value!r}")
    return float(value)
