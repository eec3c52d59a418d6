"""Codecs of the two river helpers that live in Rust and show their state only as a blob.

ADWIN's bucketed window and the exponentially weighted mean inside HDDM_W are written by
river 0.26 as bincode; this module reads such a blob into named numbers and writes the
numbers back, byte for byte, and hands a blob to a helper checking that it took. Which
numbers are allowed is decided by :mod:`clients.detector_state`; a blob that does not
have the layout known here is a :class:`MonitorStateError`, never a different window.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping
from typing import Any


class MonitorStateError(ValueError):
    """A saved monitor or detector state is not one this version can read.

    It is the only error :meth:`clients.monitor.DriftMonitor.from_bytes` raises for bad
    data; the message is one line, naming what was wrong.
    """


# Users meet it as clients.detector_state.MonitorStateError (and clients.monitor's); it is
# defined here only because a blob of the wrong layout is one.
MonitorStateError.__module__ = "clients.detector_state"


# -- river's Rust helpers ------------------------------------------------------------------
# bincode 1 (river's choice): little-endian fixed-width integers, a u64 length before each
# sequence, one byte per bool, fields in declaration order (river's rust_src/adwin.rs and
# pyo3_bindings.rs).

_ADWIN_HEAD = (
    ("delta", "d"),
    ("clock", "i"),
    ("max_buckets", "Q"),
    ("min_window_length", "d"),
    ("grace_period", "d"),
    ("total", "d"),
    ("variance", "d"),
    ("width", "d"),
    ("total_width", "d"),
    ("n_buckets", "i"),
    ("max_n_buckets", "i"),
    ("tick", "i"),
    ("n_detections", "i"),
)
_ADWIN_TAIL = (
    ("py_delta", "d"),
    ("py_clock", "i"),
    ("py_max_buckets", "Q"),
    ("py_min_window_length", "i"),
    ("py_grace_period", "i"),
)
ADWIN_DYNAMIC = (
    "total",
    "variance",
    "width",
    "total_width",
    "n_buckets",
    "max_n_buckets",
    "tick",
    "n_detections",
)
_EWMEAN_FIELDS = (
    ("mean", "d"),
    ("alpha", "d"),
    ("one_minus_alpha", "d"),
    ("initialized", "?"),
    ("py_alpha", "d"),
)


class _Reader:
    """Sequential reader over a bincode blob that refuses to run past its end."""

    def __init__(self, blob: bytes, what: str) -> None:
        self._blob, self._at, self._what = blob, 0, what

    def read(self, code: str) -> Any:
        (value,) = self.many(code)
        return value

    def many(self, code: str) -> tuple[Any, ...]:
        layout = _struct("<" + code)
        if self._at + layout.size > len(self._blob):
            raise _LayoutError(self._what)
        values = layout.unpack_from(self._blob, self._at)
        self._at += layout.size
        return values

    def floats(self, limit: int) -> list[float]:
        n = self.read("Q")
        if n > limit:
            raise _LayoutError(self._what)
        return list(self.many(f"{n}d"))

    def done(self) -> None:
        if self._at != len(self._blob):
            raise _LayoutError(self._what)


class _LayoutError(MonitorStateError):
    def __init__(self, what: str) -> None:
        super().__init__(
            f"monitor: river's {what} state does not have the layout this version of fedge "
            "knows (river 0.26)"
        )


@functools.lru_cache(maxsize=64)
def _struct(layout: str) -> struct.Struct:
    return struct.Struct(layout)


def _read_fields(reader: _Reader, fields: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    codes = "".join(code for _, code in fields)
    return dict(zip((name for name, _ in fields), reader.many(codes), strict=True))


def _write_fields(values: Mapping[str, Any], fields: tuple[tuple[str, str], ...]) -> bytes:
    codes = "".join(code for _, code in fields)
    return _struct("<" + codes).pack(*(values[name] for name, _ in fields))


def decode_adwin(blob: bytes, max_buckets: int, max_rows: int) -> dict[str, Any]:
    """ADWIN's blob as named fields, refusing more than ``max_buckets`` or ``max_rows``."""
    reader = _Reader(blob, "ADWIN")
    fields = _read_fields(reader, _ADWIN_HEAD)
    slots = min(fields["max_buckets"], max_buckets) + 1
    rows = reader.read("Q")
    if rows > max_rows:
        raise _LayoutError("ADWIN")
    fields["bucket_list"] = []
    for _ in range(rows):
        max_size, current_idx = reader.read("Q"), reader.read("Q")
        totals, variances = reader.floats(slots), reader.floats(slots)
        fields["bucket_list"].append(
            {"max_size": max_size, "current_idx": current_idx, "totals": totals,
             "variances": variances}
        )
    fields.update(_read_fields(reader, _ADWIN_TAIL))
    reader.done()
    return fields


def encode_adwin(fields: Mapping[str, Any]) -> bytes:
    parts = [_write_fields(fields, _ADWIN_HEAD), struct.pack("<Q", len(fields["bucket_list"]))]
    for bucket in fields["bucket_list"]:
        parts.append(struct.pack("<QQ", bucket["max_size"], bucket["current_idx"]))
        for key in ("totals", "variances"):
            column = bucket[key]
            parts.append(struct.pack(f"<Q{len(column)}d", len(column), *column))
    parts.append(_write_fields(fields, _ADWIN_TAIL))
    return b"".join(parts)


def decode_ewmean(blob: bytes) -> dict[str, Any]:
    reader = _Reader(blob, "EWMean")
    fields = _read_fields(reader, _EWMEAN_FIELDS)
    reader.done()
    return fields


def encode_ewmean(fields: Mapping[str, Any]) -> bytes:
    return _write_fields(fields, _EWMEAN_FIELDS)


def set_rust_state(helper: Any, blob: bytes, where: str) -> None:
    """Hand a blob we encoded from validated numbers to a Rust helper, and check it took.

    River unwraps its bincode decoding (a bad blob is a Rust panic, which Python code
    cannot catch as an ``Exception``); the blob here always has the layout just read back
    from a fresh helper of the same river, so decoding cannot fail.
    """
    helper.__setstate__(blob)
    if helper.__getstate__() != blob:
        raise _LayoutError(where)
