"""The secure-aggregation wire contract both sides share.

fedge runs Flower's SecAgg+ protocol as extra message exchanges around a
Message-API strategy's ``train`` round. This module names the messages and
record keys, and holds the arithmetic both sides must agree on bit for bit:
how a device's update becomes a vector of integers modulo ``modulus_range``
and how a mask is expanded from a shared secret.

========================= ==================================== ==========================================
message type              server -> device (record ``secagg``)  device -> server (record ``secagg``)
========================= ==================================== ==========================================
``query.secagg_setup``    round token, quantisation settings   ``pk1``, ``pk2`` (public keys)
``query.secagg_share_keys`` neighbours' public keys, threshold  ``dsts``, ``ctxts`` (encrypted key shares)
``train``                 model, config, forwarded ``srcs`` /  the train reply's own records, masked
                          ``ctxts``
``query.secagg_unmask``   ``active`` and ``dead`` neighbours   ``owners``, ``shares``
========================= ==================================== ==========================================

The masked ``train`` reply keeps the shape of a plain one (an ``arrays`` record
mirroring the model's names and shapes, a ``metrics`` record with the same
keys) so the device's egress policy for ``train`` still applies; every value
in it is an integer in ``[0, modulus_range)`` that looks uniformly random to
the server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from numpy.typing import NDArray

SETUP = "query.secagg_setup"
SHARE_KEYS = "query.secagg_share_keys"
TRAIN = "train"
UNMASK = "query.secagg_unmask"

#: Query actions a device must have registered (the part after ``query.``).
QUERY_ACTIONS: tuple[str, ...] = ("secagg_setup", "secagg_share_keys", "secagg_unmask")

RECORD = "secagg"

ROUND = "round"
SERVER_ROUND = "server-round"
CLIPPING_RANGE = "clipping-range"
METRIC_CLIPPING_RANGE = "metric-clipping-range"
QUANTIZATION_RANGE = "quantization-range"
MODULUS_RANGE = "modulus-range"
MAX_WEIGHT = "max-weight"
WEIGHT_KEY = "weight-key"
PK1 = "pk1"
PK2 = "pk2"
NODES = "nodes"
PK1_LIST = "pk1s"
PK2_LIST = "pk2s"
THRESHOLD = "threshold"
DSTS = "dsts"
CTXTS = "ctxts"
SRCS = "srcs"
ACTIVE = "active"
DEAD = "dead"
OWNERS = "owners"
SHARES = "shares"

#: What a device may send back, per secure-aggregation query: config keys and value kinds.
DEVICE_REPLIES: dict[str, dict[str, str]] = {
    SETUP: {PK1: "bytes", PK2: "bytes"},
    SHARE_KEYS: {DSTS: "list[int]", CTXTS: "list[bytes]"},
    UNMASK: {OWNERS: "list[int]", SHARES: "list[bytes]"},
}

_MASK_INFO = b"fedge secagg mask v1"


def private_scalar(private_key_pem: bytes) -> bytes:
    """The secret scalar of a PEM-encoded EC private key, as fixed-width bytes.

    Devices Shamir-share this instead of the PEM text: a third of the bytes,
    so a third of the sharing work.
    """
    key = cast(ec.EllipticCurvePrivateKey, load_pem_private_key(private_key_pem, password=None))
    width = (key.curve.key_size + 7) // 8
    return key.private_numbers().private_value.to_bytes(width, "big")


def key_from_scalar(scalar: bytes, public_key_pem: bytes) -> ec.EllipticCurvePrivateKey | None:
    """The private key with secret ``scalar`` on the curve of ``public_key_pem``.

    None when the scalar is not a valid key or does not belong to that public key.
    """
    public = cast(ec.EllipticCurvePublicKey, load_pem_public_key(public_key_pem))
    try:
        private = ec.derive_private_key(int.from_bytes(scalar, "big"), public.curve)
    except ValueError:
        return None
    mine = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return private if mine == public_key_pem else None


def without_empty_lists(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` minus its empty lists: Flower cannot size or encode an empty list
    (its type is unknown), so an absent key stands for an empty list on this wire."""
    return {k: v for k, v in values.items() if not (isinstance(v, list) and not v)}


def check_ranges(quantization_range: int, modulus_range: int, n_devices: int) -> None:
    """Refuse quantisation settings under which the masked sum could wrap around.

    Raises
    ------
    ValueError
        When ``modulus_range`` is not a power of two up to 2**62, when the
        quantisation range does not fit Flower's 32-bit quantiser, or when
        ``n_devices`` quantised values could overflow the modulus.
    """
    if modulus_range < 2 or modulus_range & (modulus_range - 1) or modulus_range > 2**62:
        raise ValueError(f"modulus_range {modulus_range} must be a power of two <= 2**62")
    if not 2 <= quantization_range < 2**31:
        raise ValueError(f"quantization_range {quantization_range} must be in [2, 2**31)")
    if n_devices * quantization_range >= modulus_range:
        raise ValueError(
            f"{n_devices} devices x quantization_range {quantization_range} does not fit "
            f"modulus_range {modulus_range}; raise modulus_range or lower quantization_range"
        )


def expand_mask(
    seed: bytes, modulus_range: int, shapes: Sequence[tuple[int, ...]]
) -> list[NDArray[np.int64]]:
    """Uniform integers in ``[0, modulus_range)`` expanded from ``seed``, one array per shape.

    The seed is stretched with HKDF-SHA256 into an AES-256 key whose CTR
    keystream gives the mask, so two parties holding the same seed derive the
    same mask and nobody else can tell it from random. (Flower's own
    ``pseudo_rand_gen`` folds the seed into 32 bits for NumPy's Mersenne
    Twister, which a server could search exhaustively.)

    Parameters
    ----------
    seed : bytes
        A shared secret (ECDH-derived key) or a device's private mask seed.
    modulus_range : int
        A power of two; mask entries are uniform below it.
    shapes : sequence of tuple of int
        Shapes of the arrays to mask.
    """
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_MASK_INFO).derive(seed)
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    total = sum(sizes)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()
    stream = encryptor.update(b"\x00" * (8 * total)) + encryptor.finalize()
    words = np.frombuffer(stream, dtype=np.uint64) & np.uint64(modulus_range - 1)
    flat = words.astype(np.int64)
    out = []
    start = 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(flat[start : start + size].reshape(shape))
        start += size
    return out


def rounding_seed(server_round: int, node_id: int) -> int:
    """Seed for a device's stochastic rounding: the same for a round and node in every run.

    Rounding noise is at most one quantisation step and hidden under the
    masks; drawing it reproducibly keeps seeded runs bit-identical.
    """
    digest = hashlib.sha256(f"{server_round}:{node_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def quantize_seeded(
    arrays: Sequence[NDArray[Any]], clipping_range: float, quantization_range: int, seed: int
) -> list[NDArray[np.int64]]:
    """Flower's stochastic quantiser, with its rounding drawn from ``seed``.

    Flower's quantiser draws from NumPy's global generator; the global state
    is saved and restored so secure aggregation never disturbs anyone else's
    random stream.
    """
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        values = quantize(
            [np.asarray(a, dtype=np.float64) for a in arrays], clipping_range, quantization_range
        )
    finally:
        np.random.set_state(saved)
    return [np.asarray(v, dtype=np.int64) for v in values]


def dequantize_sum(
    summed: Sequence[NDArray[np.int64]],
    clipping_range: float,
    quantization_range: int,
    n_contributors: int,
) -> list[NDArray[np.float64]]:
    """The float sum of ``n_contributors`` quantised vectors, from the sum of their integers.

    Each quantised value carries an offset of ``clipping_range``; Flower's
    dequantiser removes one, the rest are removed here.
    """
    values = dequantize([np.asarray(s) for s in summed], clipping_range, quantization_range)
    offset = (n_contributors - 1) * clipping_range
    return [np.asarray(v, dtype=np.float64) - offset for v in values]
