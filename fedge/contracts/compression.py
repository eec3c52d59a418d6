"""Compression of model updates on the way up, with error feedback on the device.

A device does not upload its trained weights but their difference from the
global model it was sent (the *delta*), encoded by a codec:

``none``
    No encoding; the weights go up as they are.
``float16``
    The delta in half precision (2 bytes per parameter).
``int8``
    The delta quantised to 8-bit integers with one float32 scale per block of
    :data:`BLOCK` parameters (about 1 byte per parameter).

What the codec loses is kept on the device as a *residual* and added to the
next delta it encodes (error feedback), so the rounding errors do not
accumulate over rounds. The server knows the global model it sent and adds the
decoded delta to it. All arrays travel flattened into one vector per record,
so a small model does not pay a per-tensor header for every layer.

Pure NumPy; no Flower imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BLOCK",
    "CODECS",
    "EncodedUpdate",
    "decode_update",
    "encode_update",
    "encoded_shapes",
]

CODECS: tuple[str, ...] = ("none", "float16", "int8")
"""Names of the codecs, as given in ``campaign.compression``."""

BLOCK = 256
"""Parameters sharing one int8 scale."""

DELTA_KEY = "delta"
SCALE_KEY = "scale"

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class EncodedUpdate:
    """An encoded upload and the residual the device keeps.

    Attributes
    ----------
    arrays : dict of str to numpy.ndarray
        What goes on the wire.
    residual : numpy.ndarray
        float32 vector of what the encoding lost (empty for ``"none"``).
    """

    arrays: Weights
    residual: np.ndarray


def encoded_shapes(shapes: Mapping[str, tuple[int, ...]], codec: str) -> dict[str, tuple[int, ...]]:
    """Array shapes of an upload encoded with ``codec`` for a model of the given shapes.

    Parameters
    ----------
    shapes : mapping of str to tuple of int
        The model's array shapes, in order.
    codec : {"none", "float16", "int8"}
        The codec.

    Returns
    -------
    dict of str to tuple of int
        What a device may send: the model's own shapes for ``"none"``, else one
        vector of all parameters (and the int8 block scales).

    Examples
    --------
    >>> encoded_shapes({"w": (2, 300), "b": (2,)}, "int8")
    {'delta': (602,), 'scale': (3,)}
    """
    _check(codec)
    if codec == "none":
        return dict(shapes)
    size = sum(int(np.prod(shape)) for shape in shapes.values())
    out: dict[str, tuple[int, ...]] = {DELTA_KEY: (size,)}
    if codec == "int8":
        out[SCALE_KEY] = (-(-size // BLOCK),)
    return out


def _check(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"campaign.compression: {codec!r} is not allowed; allowed: {', '.join(CODECS)}")


def _flat(weights: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray]) -> np.ndarray:
    if list(weights) != list(like):
        raise ValueError(f"update keys {list(weights)} differ from the model's {list(like)}")
    parts = []
    for key, ref in like.items():
        value = np.asarray(weights[key])
        if value.shape != np.shape(ref):
            raise ValueError(f"update {key!r} has shape {value.shape}, expected {np.shape(ref)}")
        parts.append(value.astype(np.float32, copy=False).reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def _unflat(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> Weights:
    out: Weights = {}
    start = 0
    for key, ref in like.items():
        ref = np.asarray(ref)
        out[key] = vector[start : start + ref.size].reshape(ref.shape).astype(ref.dtype, copy=False)
        start += ref.size
    return out


def _quantise(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes and one scale per :data:`BLOCK` values."""
    n_blocks = -(-delta.size // BLOCK)
    padded = np.zeros(n_blocks * BLOCK, dtype=np.float32)
    padded[: delta.size] = delta
    blocks = padded.reshape(n_blocks, BLOCK)
    scale = np.abs(blocks).max(axis=1) / 127.0
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    codes = np.clip(np.rint(blocks / safe[:, None]), -127, 127).astype(np.int8)
    return codes.reshape(-1)[: delta.size], scale.astype(np.float32)


def _dequantise(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    per_value = np.repeat(scale.astype(np.float32), BLOCK)[: codes.size]
    return codes.astype(np.float32) * per_value


def encode_update(
    weights: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    codec: str,
    residual: np.ndarray | None = None,
) -> EncodedUpdate:
    """Encode trained ``weights`` relative to the ``reference`` (global) model.

    Parameters
    ----------
    weights : mapping of str to numpy.ndarray
        The device's trained model.
    reference : mapping of str to numpy.ndarray
        The global model the device started from (the server holds it too).
    codec : {"none", "float16", "int8"}
        The codec.
    residual : numpy.ndarray, optional
        What earlier encodings lost; added to this delta. Ignored when its size
        does not match the model.

    Returns
    -------
    EncodedUpdate
        Arrays to upload and the new residual.

    Raises
    ------
    ValueError
        If the codec is unknown or the weights do not match the reference.

    Examples
    --------
    >>> ref = {"w": np.zeros(4, dtype=np.float32)}
    >>> new = {"w": np.array([0.1, -0.2, 0.3, 0.0], dtype=np.float32)}
    >>> sent = encode_update(new, ref, "int8")
    >>> sent.arrays["delta"].dtype.name
    'int8'
    >>> np.allclose(decode_update(sent.arrays, ref, "int8")["w"], new["w"], atol=0.002)
    True
    """
    _check(codec)
    if codec == "none":
        _flat(weights, reference)
        return EncodedUpdate({k: np.asarray(v) for k, v in weights.items()}, np.zeros(0, np.float32))
    delta = _flat(weights, reference) - _flat(reference, reference)
    if residual is not None and residual.size == delta.size:
        delta = delta + residual
    if codec == "float16":
        half = delta.astype(np.float16)
        return EncodedUpdate({DELTA_KEY: half}, delta - half.astype(np.float32))
    codes, scale = _quantise(delta)
    return EncodedUpdate(
        {DELTA_KEY: codes, SCALE_KEY: scale}, delta - _dequantise(codes, scale)
    )


def decode_update(
    arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], codec: str
) -> Weights:
    """The weights an encoded upload stands for, given the global model it is relative to.

    Parameters
    ----------
    arrays : mapping of str to numpy.ndarray
        An upload made by :func:`encode_update` with the same codec.
    reference : mapping of str to numpy.ndarray
        The global model sent to the device for this round.
    codec : {"none", "float16", "int8"}
        The codec the device used.

    Returns
    -------
    dict of str to numpy.ndarray
        Weights with the reference's keys, shapes and dtypes.

    Raises
    ------
    ValueError
        If the codec is unknown or the upload does not fit the reference.
    """
    _check(codec)
    if codec == "none":
        _flat(arrays, reference)
        return {k: np.asarray(v) for k, v in arrays.items()}
    if DELTA_KEY not in arrays:
        raise ValueError(f"{codec} upload has no {DELTA_KEY!r} array")
    base = _flat(reference, reference)
    packed = np.asarray(arrays[DELTA_KEY]).reshape(-1)
    if packed.size != base.size:
        raise ValueError(f"{codec} upload has {packed.size} values, the model {base.size}")
    if codec == "float16":
        delta = packed.astype(np.float32)
    else:
        if SCALE_KEY not in arrays:
            raise ValueError(f"int8 upload has no {SCALE_KEY!r} array")
        scale = np.asarray(arrays[SCALE_KEY], dtype=np.float32).reshape(-1)
        if scale.size != -(-base.size // BLOCK):
            raise ValueError(f"int8 upload has {scale.size} scales for {base.size} values")
        delta = _dequantise(packed.astype(np.int8, copy=False), scale)
    return _unflat(base + delta, reference)
