"""Data-only state of river's drift detectors: plain JSON values out, validated values in.

A detector's internal state is written as numbers, booleans, lists and small dicts, one
entry per attribute its ``update`` reads, and read back onto a detector freshly built
from the same constructor arguments. Nothing in the data names a class, a module or a
function: what each attribute is comes from the allow-list below, per detector, so
reading a state can only ever set numbers on objects this module built itself.

Two helpers of river 0.26 live in Rust and expose their state only as a bincode blob
(ADWIN's bucketed window, the exponentially weighted mean inside HDDM_W): their fields
are decoded into named numbers on save, and on load the blob is re-encoded from the
validated numbers and checked byte for byte against what river writes back, so a river
release that changes the layout fails loudly instead of restoring a different window.
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from river.base import BinaryDriftDetector, DriftDetector

from clients.detector_codecs import (
    ADWIN_DYNAMIC,
    MonitorStateError,
    decode_adwin,
    decode_ewmean,
    encode_adwin,
    encode_ewmean,
    set_rust_state,
)

if TYPE_CHECKING:
    from river import stats

Detector = DriftDetector | BinaryDriftDetector


def _stats() -> Any:
    """``river.stats``, imported only for the detectors that hold its statistics.

    It brings SciPy; ADWIN, the default detector, holds none of them.
    """
    from river import stats as river_stats

    return river_stats

#: Largest magnitude of a sample in a KSWIN window (the errors a device feeds are 0 and 1).
_MAX_SAMPLE = 1e12
#: Longest KSWIN window (and the bound on any list in a state), so a state stays small.
MAX_WINDOW = 100_000
#: Most ADWIN buckets of one size; river allocates ``max_buckets + 1`` slots per row.
MAX_ADWIN_BUCKETS = 1_000
#: ADWIN's row ``i`` holds buckets of ``2**i`` samples: 48 rows are more than any device
#: can fill, and stay clear of the 64-bit shift river computes a row's size with.
_MAX_ADWIN_ROWS = 48
_I32 = (-(2**31), 2**31 - 1)
_U63 = 2**63 - 1
_MT_WORDS = 624


# -- attribute kinds -----------------------------------------------------------------------
# Each kind turns one detector attribute into JSON values (``dump``) and applies validated
# JSON values back onto the fresh detector's attribute (``load``). ``load`` receives the
# fresh value so that helper objects are filled in place, never created from the data.


def _fail(where: str, message: str) -> MonitorStateError:
    return MonitorStateError(f"monitor.from_bytes: {where}: {message}")


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _real(value: object, where: str) -> int | float:
    if not _is_real(value):
        raise _fail(where, f"expected a number, got {type(value).__name__}")
    return value  # type: ignore[return-value]


def _nonneg_real(value: object, where: str) -> int | float:
    number = _real(value, where)
    if not number >= 0:  # also refuses NaN
        raise _fail(where, f"expected a number >= 0, got {number!r}")
    return number


def _int(value: object, where: str, low: int = 0, high: int = _U63) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"expected an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise _fail(where, f"{value} is outside [{low}, {high}]")
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, f"expected true or false, got {type(value).__name__}")
    return value


def _dict(value: object, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, f"expected an object, got {type(value).__name__}")
    if set(value) != set(keys):
        raise _fail(where, f"expected the keys {', '.join(keys)}, got {', '.join(map(str, value))}")
    return value


def _list(value: object, where: str, max_len: int) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(where, f"expected a list, got {type(value).__name__}")
    if len(value) > max_len:
        raise _fail(where, f"{len(value)} items, at most {max_len} allowed")
    return value


def _plain_real(value: object) -> int | float:
    """A number as JSON writes it back exactly (NumPy scalars become Python ones)."""
    if isinstance(value, bool) or not isinstance(value, int | float) and not hasattr(
        value, "item"
    ):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    plain = value.item() if hasattr(value, "item") else value
    if isinstance(plain, bool) or not isinstance(plain, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return plain


def _unexpected(what: str, found: object) -> RuntimeError:
    """The error for a river object that is not the one the state format was written for."""
    return RuntimeError(
        f"monitor.to_bytes: expected {what}, got {type(found).__name__}; the installed river "
        "is not the one the state format was written for"
    )


def _expect_attrs(obj: object, names: set[str], what: str) -> None:
    """Refuse to save an object whose attributes are not exactly the ones we know."""
    found = set(vars(obj))
    if found != names:
        raise RuntimeError(
            f"monitor.to_bytes: river's {what} holds {sorted(found)}, this version of fedge "
            f"knows {sorted(names)}; the installed river is not the one the state format was "
            "written for"
        )


def _dump_bool(value: Any, _detector: Detector) -> bool:
    return bool(value)


def _load_bool(data: Any, _fresh: Any, _detector: Detector, where: str) -> bool:
    return _bool(data, where)


def _dump_real(value: Any, _detector: Detector) -> int | float:
    return _plain_real(value)


def _load_real(data: Any, _fresh: Any, _detector: Detector, where: str) -> int | float:
    return _real(data, where)


def _dump_optional_real(value: Any, _detector: Detector) -> int | float | None:
    return None if value is None else _plain_real(value)


def _load_optional_real(data: Any, _fresh: Any, _detector: Detector, where: str) -> Any:
    return None if data is None else _real(data, where)


def _dump_count(value: Any, _detector: Detector) -> int:
    return int(value)


def _load_count(data: Any, _fresh: Any, _detector: Detector, where: str) -> int:
    return _int(data, where)


def _dump_mean(value: Any, _detector: Detector) -> dict[str, Any]:
    if type(value) is not _stats().Mean:
        raise _unexpected("river's Mean", value)
    _expect_attrs(value, {"n", "_mean"}, "stats.Mean")
    return {"n": _plain_real(value.n), "mean": _plain_real(value._mean)}


def _load_mean(data: Any, fresh: Any, _detector: Detector, where: str) -> stats.Mean:
    data = _dict(data, where, ("n", "mean"))
    n = _nonneg_real(data["n"], f"{where}.n")
    mean = _real(data["mean"], f"{where}.mean")
    fresh.n, fresh._mean = n, mean
    return fresh


def _dump_var(value: Any, detector: Detector) -> dict[str, Any]:
    if type(value) is not _stats().Var:
        raise _unexpected("river's Var", value)
    _expect_attrs(value, {"ddof", "mean", "_S"}, "stats.Var")
    # ``ddof`` is fixed by the detector's constructor; the fresh detector has it.
    return {"mean": _dump_mean(value.mean, detector), "S": _plain_real(value._S)}


def _load_var(data: Any, fresh: Any, detector: Detector, where: str) -> stats.Var:
    data = _dict(data, where, ("mean", "S"))
    _load_mean(data["mean"], fresh.mean, detector, f"{where}.mean")
    # A sum of squared deviations is never negative; a negative one would make EDDM take
    # the square root of a negative variance on the next error.
    fresh._S = _nonneg_real(data["S"], f"{where}.S")
    return fresh


def _dump_sample_info(value: Any, detector: Detector) -> dict[str, Any]:
    # HDDM_W's own small helper (river.drift.binary.hddm_w.SampleInfo); the squared
    # lambdas are derived from the constructor's ``lambda_val`` and not stored.
    _expect_attrs(value, {"_ewma", "_is_init", "_ibc", "_lambd_sq", "_c_lambd_sq"}, "SampleInfo")
    ewma = value._ewma
    if type(ewma) is not _stats().EWMean:
        raise _unexpected("river's EWMean", ewma)
    _expect_attrs(ewma, {"fading_factor", "_ewmean"}, "stats.EWMean")
    fields = decode_ewmean(ewma._ewmean.__getstate__())
    return {
        "ewma": {"mean": fields["mean"], "initialized": fields["initialized"]},
        "is_init": bool(value._is_init),
        "ibc": _plain_real(value._ibc),
    }


def _load_sample_info(data: Any, fresh: Any, _detector: Detector, where: str) -> Any:
    data = _dict(data, where, ("ewma", "is_init", "ibc"))
    ewma = _dict(data["ewma"], f"{where}.ewma", ("mean", "initialized"))
    fields = decode_ewmean(fresh._ewma._ewmean.__getstate__())
    fields["mean"] = float(_real(ewma["mean"], f"{where}.ewma.mean"))
    fields["initialized"] = _bool(ewma["initialized"], f"{where}.ewma.initialized")
    set_rust_state(fresh._ewma._ewmean, encode_ewmean(fields), f"{where}.ewma")
    fresh._is_init = _bool(data["is_init"], f"{where}.is_init")
    fresh._ibc = _real(data["ibc"], f"{where}.ibc")
    return fresh


def _dump_window(value: Any, detector: Detector) -> list[int | float]:
    if not isinstance(value, collections.deque):
        raise _unexpected("a deque", value)
    return [_plain_real(v) for v in value]


def _load_window(data: Any, fresh: Any, detector: Detector, where: str) -> collections.deque:
    maxlen = fresh.maxlen
    items = _list(data, where, maxlen if maxlen is not None else MAX_WINDOW)
    return collections.deque((_real(v, f"{where}[{i}]") for i, v in enumerate(items)), maxlen)


def _dump_rng(value: Any, _detector: Detector) -> dict[str, Any]:
    if type(value) is not random.Random:
        raise _unexpected("random.Random", value)
    version, internal, gauss_next = value.getstate()
    return {"version": version, "internal": list(internal), "gauss_next": gauss_next}


def _load_rng(data: Any, fresh: Any, _detector: Detector, where: str) -> random.Random:
    data = _dict(data, where, ("version", "internal", "gauss_next"))
    version = _int(data["version"], f"{where}.version", 3, 3)
    internal = _list(data["internal"], f"{where}.internal", _MT_WORDS + 1)
    if len(internal) != _MT_WORDS + 1:
        raise _fail(f"{where}.internal", f"expected {_MT_WORDS + 1} integers, got {len(internal)}")
    words = [_int(w, f"{where}.internal[{i}]", 0, 2**32 - 1) for i, w in enumerate(internal[:-1])]
    position = _int(internal[-1], f"{where}.internal[{_MT_WORDS}]", 0, _MT_WORDS)
    gauss = data["gauss_next"]
    gauss = None if gauss is None else float(_real(gauss, f"{where}.gauss_next"))
    fresh.setstate((version, (*words, position), gauss))
    return fresh


def _dump_adwin(value: Any, detector: Detector) -> dict[str, Any]:
    fields = decode_adwin(value.__getstate__(), MAX_ADWIN_BUCKETS, _MAX_ADWIN_ROWS)
    return {
        **{key: fields[key] for key in ADWIN_DYNAMIC},
        "buckets": [
            {"used": b["current_idx"], "totals": b["totals"], "variances": b["variances"]}
            for b in fields["bucket_list"]
        ],
    }


def _load_adwin(data: Any, fresh: Any, detector: Detector, where: str) -> Any:
    data = _dict(data, where, (*ADWIN_DYNAMIC, "buckets"))
    # The configuration half of the blob (delta, clock, ...) is taken from the fresh
    # helper, i.e. from the validated constructor arguments, never from the data.
    fields = decode_adwin(fresh.__getstate__(), MAX_ADWIN_BUCKETS, _MAX_ADWIN_ROWS)
    slots = fields["max_buckets"] + 1
    for key in ("total", "variance", "width", "total_width"):
        fields[key] = float(_real(data[key], f"{where}.{key}"))
    for key in ("n_buckets", "max_n_buckets", "tick", "n_detections"):
        fields[key] = _int(data[key], f"{where}.{key}", *_I32)
    rows = _list(data["buckets"], f"{where}.buckets", _MAX_ADWIN_ROWS)
    if not rows:
        raise _fail(f"{where}.buckets", "ADWIN always keeps at least one row of buckets")
    bucket_list = []
    for i, row in enumerate(rows):
        at = f"{where}.buckets[{i}]"
        row = _dict(row, at, ("used", "totals", "variances"))
        # River indexes ``used`` into the fixed ``max_buckets + 1`` slots: anything else
        # would make the next update panic inside Rust.
        used = _int(row["used"], f"{at}.used", 0, fields["max_buckets"])
        columns = {}
        for key in ("totals", "variances"):
            values = _list(row[key], f"{at}.{key}", slots)
            if len(values) != slots:
                raise _fail(f"{at}.{key}", f"expected {slots} numbers, got {len(values)}")
            if not all(type(v) is float for v in values):  # the common case checked fast
                values = [float(_real(v, f"{at}.{key}[{j}]")) for j, v in enumerate(values)]
            columns[key] = values
        bucket_list.append(
            {"max_size": fields["max_buckets"], "current_idx": used, **columns}
        )
    # River deletes from the oldest row and drops it once empty; merging leaves at least
    # one bucket behind when a row holds two or more, so the oldest row is never empty.
    # An empty one would make river's next cut panic inside Rust (as it would in river
    # itself with max_buckets=1): refused here, a fresh detector is the better outcome.
    if len(bucket_list) > 1 and bucket_list[-1]["current_idx"] == 0:
        raise _fail(f"{where}.buckets", "the oldest row of buckets is empty")
    fields["bucket_list"] = bucket_list
    set_rust_state(fresh, encode_adwin(fields), where)
    return fresh


_Dump = Callable[[Any, Detector], Any]
_Load = Callable[[Any, Any, Detector, str], Any]
_KINDS: dict[str, tuple[_Dump, _Load]] = {
    "bool": (_dump_bool, _load_bool),
    "real": (_dump_real, _load_real),
    "real?": (_dump_optional_real, _load_optional_real),
    "count": (_dump_count, _load_count),
    "mean": (_dump_mean, _load_mean),
    "var": (_dump_var, _load_var),
    "sample_info": (_dump_sample_info, _load_sample_info),
    "window": (_dump_window, _load_window),
    "rng": (_dump_rng, _load_rng),
    "adwin": (_dump_adwin, _load_adwin),
}

_FLAGS = {"_drift_detected": "bool"}
_WARNING_FLAGS = {"_drift_detected": "bool", "_warning_detected": "bool"}

#: Per detector, every attribute that changes as samples arrive and how to write it.
#: The constructor arguments are the other attributes; they are rebuilt, not stored.
STATE_ATTRIBUTES: dict[str, dict[str, str]] = {
    "ADWIN": {**_FLAGS, "_helper": "adwin"},
    "KSWIN": {**_FLAGS, "p_value": "real", "n": "count", "window": "window", "_rng": "rng"},
    "PageHinkley": {
        **_FLAGS,
        "_x_mean": "mean",
        "_sum_increase": "real",
        "_sum_decrease": "real",
        "_min_increase": "real",
        "_max_decrease": "real",
    },
    "DDM": {**_WARNING_FLAGS, "_p": "mean", "_p_min": "real?", "_s_min": "real?", "_ps_min": "real"},
    "EDDM": {
        **_WARNING_FLAGS,
        "_error_distances": "var",
        "_n": "count",
        "_last_error": "count",
        "_n_errors": "count",
        "_p2s_prime_max": "real",
    },
    "HDDM_A": {**_WARNING_FLAGS, "_x_min": "mean", "_x_max": "mean", "_z": "mean"},
    "HDDM_W": {
        **_WARNING_FLAGS,
        "_total": "sample_info",
        "_s1_decr": "sample_info",
        "_s1_incr": "sample_info",
        "_s2_decr": "sample_info",
        "_s2_incr": "sample_info",
        "_incr_cutpoint": "real",
        "_decr_cutpoint": "real",
    },
}

#: Attributes the constructor derives from its arguments (PageHinkley's bound test for
#: its ``mode``); the fresh detector already has the right one.
_DERIVED: dict[str, frozenset[str]] = {"PageHinkley": frozenset({"_test_drift"})}


def dump_detector(name: str, detector: Detector, parameters: tuple[str, ...]) -> dict[str, Any]:
    """Return a detector's internal state as JSON values.

    Parameters
    ----------
    name
        Canonical detector name, a key of :data:`STATE_ATTRIBUTES`.
    detector
        The detector.
    parameters
        Its constructor's parameter names; attributes of those names are configuration
        and are not part of the state.

    Returns
    -------
    dict
        One entry per attribute of :data:`STATE_ATTRIBUTES` ``[name]``.

    Raises
    ------
    RuntimeError
        If the detector holds attributes this module does not know (a river release with
        a different layout), so that no state is ever silently left out.
    """
    spec = STATE_ATTRIBUTES[name]
    known = set(spec) | set(parameters) | _DERIVED.get(name, frozenset())
    _expect_attrs_subset(detector, known, set(spec), name)
    return {attr: _KINDS[kind][0](getattr(detector, attr), detector) for attr, kind in spec.items()}


def load_detector(name: str, fresh: Detector, data: object) -> None:
    """Apply a state written by :func:`dump_detector` onto a freshly built detector.

    Parameters
    ----------
    name
        Canonical detector name.
    fresh
        A detector just built from the saved constructor arguments; it is updated in
        place and, if the data is refused, may be left half-updated (discard it).
    data
        The decoded JSON value.

    Raises
    ------
    MonitorStateError
        If an entry is missing, unknown, of the wrong type or out of range.
    """
    spec = STATE_ATTRIBUTES[name]
    data = _dict(data, "state", tuple(spec))
    for attr, kind in spec.items():
        value = _KINDS[kind][1](data[attr], getattr(fresh, attr), fresh, f"state.{attr}")
        setattr(fresh, attr, value)
    check = _CONSISTENCY.get(name)
    if check is not None:
        check(fresh)


# -- relations between entries --------------------------------------------------------------
# Each entry may be fine alone and the whole still be a state river never reaches, one
# whose next update raises (a square root of a negative number, a missing minimum). These
# are the relations river's own updates keep.


def _check_ddm(detector: Any) -> None:
    if not 0 <= detector._p._mean <= 1:
        raise _fail("state._p.mean", "an error rate must be within [0, 1]")
    minimum = (detector._p_min, detector._s_min, detector._ps_min)
    if minimum[0] is None or minimum[1] is None:
        if minimum != (None, None, float("inf")):
            raise _fail("state._p_min", "_p_min and _s_min are null only before a minimum")
    elif detector._ps_min != minimum[0] + minimum[1]:
        raise _fail("state._ps_min", "must be _p_min + _s_min")


def _check_eddm(detector: Any) -> None:
    highest = detector._p2s_prime_max
    if highest != -1 and not highest > 0:
        raise _fail("state._p2s_prime_max", "must be -1 (none yet) or > 0")
    if detector._last_error > detector._n or detector._n_errors > detector._n:
        raise _fail("state._n", "fewer samples than errors")


def _check_hddm_a(detector: Any) -> None:
    for attr in ("_x_min", "_x_max"):
        if getattr(detector, attr).n > detector._z.n:
            raise _fail(f"state.{attr}.n", "a cut point cannot have seen more than the total")


def _check_hddm_w(detector: Any) -> None:
    for attr in ("_total", "_s1_decr", "_s1_incr", "_s2_decr", "_s2_incr"):
        if not getattr(detector, attr)._ibc >= 0:
            raise _fail(f"state.{attr}.ibc", "a bound condition is never negative")


def _check_kswin(detector: Any) -> None:
    # A huge integer is finite but not a float64 value: SciPy's test cannot take it.
    if not all(math.isfinite(v) and abs(v) <= _MAX_SAMPLE for v in detector.window):
        raise _fail("state.window", f"samples must be finite numbers within +-{_MAX_SAMPLE:g}")


_CONSISTENCY: dict[str, Callable[[Any], None]] = {
    "DDM": _check_ddm,
    "EDDM": _check_eddm,
    "HDDM_A": _check_hddm_a,
    "HDDM_W": _check_hddm_w,
    "KSWIN": _check_kswin,
}


def _expect_attrs_subset(detector: Detector, known: set[str], required: set[str], name: str) -> None:
    found = set(vars(detector))
    if not required <= found or not found <= known:
        raise RuntimeError(
            f"monitor.to_bytes: river's {name} holds {sorted(found)}, this version of fedge "
            f"knows {sorted(known)}; the installed river is not the one the state format was "
            "written for"
        )
