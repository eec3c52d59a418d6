"""A device's diagnostic summary: the ``diagnostics`` record of a ``query`` reply.

An operator asks one device for it (``fedge diagnose RUN_DIR DEVICE``); the
server sets :data:`~fedge.contracts.protocol.DIAGNOSE` in that device's next
query and the device answers with :class:`DeviceDiagnostics`. Everything in it
is a count, a size, a code or a digest: no sample value, no error text, no path.
The egress policy (:data:`~fedge.contracts.protocol.EGRESS`) lets the record leave
only with the keys of :data:`~fedge.contracts.protocol.DIAGNOSTICS_FIELDS`, and
only scalars: the config digest crosses as eight 32-bit words, not as a string.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from fedge.contracts.protocol import (
    DETECTOR_KINDS,
    DIAGNOSTIC_SCALARS,
    DIGEST_WORDS,
    ERROR_CODES,
    ERROR_KINDS,
    _typed_fields,
    digest_key,
    error_count_key,
)


def config_digest(cfg: Any) -> str:
    """Hex SHA-256 of a run configuration (a dataclass), the same on server and device.

    Paths and other non-JSON values hash as their text; keys are sorted, so two
    processes that loaded the same configuration agree.
    """
    text = json.dumps(asdict(cfg), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def digest_words(digest: str) -> list[int]:
    """A hex SHA-256 as :data:`DIGEST_WORDS` unsigned 32-bit ints (how it crosses the wire)."""
    try:
        raw = bytes.fromhex(digest)
    except ValueError:
        raw = b""
    if len(raw) != 4 * DIGEST_WORDS:
        raise ValueError(f"config digest: expected {8 * DIGEST_WORDS} hex digits, got {digest!r}")
    return [int.from_bytes(raw[i : i + 4], "big") for i in range(0, len(raw), 4)]


def digest_hex(words: Sequence[int]) -> str:
    """The hex string of :func:`digest_words`' ints (one-line ``ValueError`` when malformed)."""
    if len(words) != DIGEST_WORDS or not all(0 <= w < 2**32 for w in words):
        raise ValueError(f"config digest: expected {DIGEST_WORDS} unsigned 32-bit words")
    return b"".join(int(w).to_bytes(4, "big") for w in words).hex()


def detector_code(name: str) -> int:
    """The :data:`DETECTOR_KINDS` code of a detector name (0 for one it does not list)."""
    return DETECTOR_KINDS.index(name) if name in DETECTOR_KINDS[1:] else 0


@dataclass(frozen=True)
class DeviceDiagnostics:
    """A device's diagnostic summary for an operator: counts, sizes, codes; never a sample.

    Parameters
    ----------
    device, tick : int
        The device and the tick of the query it answers.
    store_rows, store_labelled, labels_outstanding, outbox_reports : int
        Samples in the window, those with a label, those still waiting for one,
        and reports waiting for the server's acknowledgement.
    store_bytes, audit_bytes, inbox_bytes : int
        Sizes on disk of the store, the audit log and the ingest inbox (-1: absent).
    detector : int
        The drift detector, a code of :data:`DETECTOR_KINDS`.
    samples_seen, drifts_total : int
        Errors fed to the detector and drifts it signalled, over the device's lifetime.
    detector_estimate : float
        The detector's current estimate of the error rate (-1: it keeps none).
    model_version, previous_version : int
        The model installed now and the one before it in the same stream (0: none).
    uptime_seconds : float
        Seconds since the device process opened this device.
    errors_total : int
        Handler failures since then; by type in :attr:`errors` (codes, never text).
    errors : tuple of (str, int)
        ``(kind, count)`` for the :data:`ERROR_KINDS` that occurred.
    config_digest : str
        Hex SHA-256 of the device's run configuration (:func:`config_digest`).
    """

    device: int
    tick: int
    store_rows: int = 0
    store_labelled: int = 0
    labels_outstanding: int = 0
    outbox_reports: int = 0
    store_bytes: int = -1
    audit_bytes: int = -1
    inbox_bytes: int = -1
    detector: int = 0
    samples_seen: int = 0
    drifts_total: int = 0
    detector_estimate: float = -1.0
    model_version: int = 0
    previous_version: int = 0
    uptime_seconds: float = 0.0
    errors_total: int = 0
    errors: tuple[tuple[str, int], ...] = ()
    config_digest: str = "0" * 64

    @property
    def detector_name(self) -> str:
        """The name of :attr:`detector`."""
        return DETECTOR_KINDS[self.detector] if 0 <= self.detector < len(DETECTOR_KINDS) else "other"

    def to_dict(self) -> dict[str, Any]:
        """Scalars only, ready for a Flower ``ConfigRecord`` (the digest as 32-bit words)."""
        out: dict[str, Any] = {name: getattr(self, name) for name in DIAGNOSTIC_SCALARS}
        for kind, count in self.errors:
            if kind in ERROR_CODES and kind != "none" and count:
                out[error_count_key(kind)] = int(count)
        for i, word in enumerate(digest_words(self.config_digest)):
            out[digest_key(i)] = word
        return out

    @classmethod
    def from_dict(cls, data: Any) -> DeviceDiagnostics:
        """Read a diagnostics record, refusing missing or ill-typed fields with one line."""
        # ``errors`` and ``config_digest`` are not keys of the record: skipped here, read below.
        scalars = _typed_fields(cls, data, "device diagnostics")
        errors = []
        for kind in ERROR_KINDS[1:]:
            value = data.get(error_count_key(kind), 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"device diagnostics: {error_count_key(kind)} must be a count")
            if value:
                errors.append((kind, value))
        words = [data.get(digest_key(i)) for i in range(DIGEST_WORDS)]
        if not all(isinstance(w, int) and not isinstance(w, bool) for w in words):
            raise ValueError("device diagnostics: the config digest words are missing or not ints")
        return cls(**scalars, errors=tuple(errors), config_digest=digest_hex(words))  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        """A readable dict: names for codes, the digest as hex (what the run folder keeps)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["errors"] = dict(self.errors)
        out["detector"] = self.detector_name
        return out


# The contract's key list and this dataclass must say the same.
assert DIAGNOSTIC_SCALARS == tuple(
    f.name for f in fields(DeviceDiagnostics) if f.name not in ("errors", "config_digest")
)
