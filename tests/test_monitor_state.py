"""A saved drift monitor is JSON data: restoring it continues every detector exactly, and a
planted pickle, garbage or a forged state is refused without running anything, the device
moving it aside and starting a fresh detector."""

from __future__ import annotations

import json
import logging
import os
import pickle
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inprocess_helpers import fed_device
from signing_helpers import deploy_signed, trusting

from clients.device import MONITOR_KEY
from clients.monitor import (
    DETECTOR_NAMES,
    MAX_STATE_BYTES,
    DriftMonitor,
    MonitorStateError,
)
from clients.store import DeviceStore
from fedge.contracts import model as nets
from fedge.contracts.config_load import load_config

# Non-default arguments that reach more of each detector's state: ADWIN checking every
# sample with two buckets per row grows many rows; KSWIN starts from a given window; the
# two-sided HDDM tests use their "decrease" statistics too.
PARAMS: dict[str, dict[str, Any]] = {
    "ADWIN": {"clock": 1, "max_buckets": 2, "delta": 0.01},
    "KSWIN": {"window_size": 60, "stat_size": 20, "window": [0, 1, 0, 0, 1, 0.5]},
    "PageHinkley": {"threshold": 15.0, "min_instances": 20},
    "DDM": {"warm_start": 20},
    "EDDM": {"warm_start": 10},
    "HDDM_A": {"two_sided_test": True},
    "HDDM_W": {"two_sided_test": True, "lambda_val": 0.1},
}


def regime_stream(seed: int, n: int = 3000) -> np.ndarray:
    """0/1 errors whose rate jumps between regimes, so every detector fires several times."""
    rng = np.random.default_rng(seed)
    rates = np.repeat(rng.choice([0.05, 0.5, 0.15, 0.8], size=n // 300 + 1), 300)[:n]
    return (rng.random(n) < rates).astype(np.int8)


def flags(monitor: DriftMonitor, errors: np.ndarray) -> list[tuple[bool, bool]]:
    """Feed one error at a time; the detector's drift (and warning) flag after each."""
    out = []
    for value in errors:
        monitor.update([int(value)])
        detector = monitor._detector
        out.append((detector.drift_detected, getattr(detector, "warning_detected", False)))
    return out


def leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str)
            yield from leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from leaves(item)
    else:
        yield value


@pytest.mark.parametrize("params", [False, True], ids=["defaults", "tuned"])
@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_restored_detector_gives_the_same_drift_flags_as_the_original(
    name: str, params: bool
) -> None:
    # KSWIN runs a two-sample test per sample: a shorter stream keeps this test quick.
    errors = regime_stream(seed=DETECTOR_NAMES.index(name), n=900 if name == "KSWIN" else 3000)
    arguments = PARAMS[name] if params else None
    expected = flags(DriftMonitor(name, arguments, seed=5), errors)
    drift_at = [i for i, (drift, _) in enumerate(expected) if drift]
    assert drift_at, "the stream must make the detector fire, or it proves little"
    middle = len(errors) // 2 + 17
    # At the very start, mid-stream, on a drift sample (its reset is still pending) and
    # right after one.
    cuts = sorted({0, middle, drift_at[0], drift_at[0] + 1, drift_at[-1]})

    original = DriftMonitor(name, arguments, seed=5)
    saved, fed = {}, 0
    for cut in cuts:
        flags(original, errors[fed:cut])
        fed = cut
        saved[cut] = (original.to_bytes(), original.samples_seen, original.drifts_total)
    assert flags(original, errors[fed:]) == expected[fed:], "saving does not disturb it"

    for cut, (data, samples_seen, drifts_total) in saved.items():
        restored = DriftMonitor.from_bytes(data)

        assert restored.to_bytes() == data, "a restored monitor saves the same state"
        assert repr(restored) == repr(original)
        assert (restored.samples_seen, restored.drifts_total) == (samples_seen, drifts_total)
        assert flags(restored, errors[cut:]) == expected[cut:]
        assert restored.samples_seen == original.samples_seen
        assert restored.drifts_total == original.drifts_total

    assert any(
        flags(DriftMonitor(name, arguments, seed=5), errors[cut:]) != expected[cut:]
        for cut in cuts[1:]
    ), "a fresh detector must differ somewhere, or the comparison proves nothing"


def test_adwin_state_keeps_every_row_of_buckets() -> None:
    monitor = DriftMonitor("ADWIN", {"max_buckets": 2, "clock": 1})
    monitor.update(regime_stream(seed=1, n=5000))

    restored = DriftMonitor.from_bytes(monitor.to_bytes())

    helper, again = monitor._detector._helper, restored._detector._helper
    assert helper.__getstate__() == again.__getstate__()
    rows = json.loads(monitor.to_bytes())["state"]["_helper"]["buckets"]
    assert len(rows) >= 6
    assert (again.get_width(), again.get_total()) == (helper.get_width(), helper.get_total())


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_saved_state_is_json_data_only(name: str) -> None:
    monitor = DriftMonitor(name, PARAMS[name], seed=3)
    monitor.update(regime_stream(seed=2, n=800))

    data = monitor.to_bytes()
    state = json.loads(data)

    assert state["format"] == "fedge.drift_monitor" and state["version"] == 2
    assert state["detector"] == name and state["params"] == PARAMS[name]
    assert all(v is None or isinstance(v, bool | int | float | str) for v in leaves(state))
    assert b"river" not in data and b"__" not in data, "no class or module is named"


# -- refused data ---------------------------------------------------------------------------


class _Plant:
    """Unpickling this creates ``marker``: the shape of the attack on the old format."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _live_payload(tmp_path: Path, marker: Path, protocol: int) -> bytes:
    """A pickle that does create a file when loaded (checked on a separate marker)."""
    control = tmp_path / f"control-{protocol}"
    pickle.loads(pickle.dumps(_Plant(control), protocol=protocol)).close()
    assert control.exists(), "the payload must really run code, or the test proves nothing"
    return pickle.dumps({"state": _Plant(marker)}, protocol=protocol)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_planted_pickle_is_refused_without_running(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload = _live_payload(tmp_path, marker, protocol)

    with pytest.raises(MonitorStateError, match=r"^monitor\.from_bytes: ") as info:
        DriftMonitor.from_bytes(payload)

    assert not marker.exists()
    assert "\n" not in str(info.value)


def test_state_saved_by_the_pickle_format_is_refused_unread() -> None:
    # What version 1 wrote: a pickled dict holding the detector object itself.
    monitor = DriftMonitor("ADWIN")
    monitor.update(regime_stream(seed=0, n=200))
    old = pickle.dumps(
        {
            "format": "fedge.drift_monitor",
            "version": 1,
            "detector": "ADWIN",
            "params": {},
            "seed": None,
            "samples_seen": 200,
            "drifts_total": 0,
            "state": monitor._detector,
        },
        protocol=pickle.HIGHEST_PROTOCOL,
    )

    with pytest.raises(MonitorStateError, match="pickle-format state from an older version"):
        DriftMonitor.from_bytes(old)


def _saved(name: str = "ADWIN", **params: Any) -> dict[str, Any]:
    monitor = DriftMonitor(name, params or None, seed=1)
    monitor.update(regime_stream(seed=4, n=600))
    return json.loads(monitor.to_bytes())


def _forge(state: dict[str, Any], path: tuple[Any, ...], value: Any) -> bytes:
    target = state
    for key in path[:-1]:
        target = target[key]
    if value is _DROP:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(state).encode()


_DROP = object()


@pytest.mark.parametrize(
    ("name", "path", "value", "why"),
    [
        ("ADWIN", ("format",), "pickle", "not a saved drift monitor"),
        ("ADWIN", ("version",), 1, "state version 1, expected 2"),
        ("ADWIN", ("version",), True, "state version True"),
        ("ADWIN", ("detector",), "os.system", "detector 'os.system' is not one of ADWIN"),
        ("ADWIN", ("detector",), "adwin", "detector 'adwin' is not one of"),
        ("ADWIN", ("detector",), ["ADWIN"], "is not one of"),
        ("ADWIN", ("extra",), 1, "expected the keys"),
        ("ADWIN", ("seed",), "1", "seed must be an integer"),
        ("ADWIN", ("samples_seen",), -1, "samples_seen must be an integer >= 0"),
        ("ADWIN", ("params", "clock"), "32", "clock must be an integer"),
        ("ADWIN", ("params", "clock"), 0, "clock must be within [1, "),
        ("ADWIN", ("params", "max_buckets"), 10**9, "max_buckets must be within [1, 1000]"),
        ("ADWIN", ("params", "__class__"), 1, "unknown parameter '__class__'"),
        ("ADWIN", ("state", "_helper", "buckets", 0, "used"), 99, "used: 99 is outside"),
        ("ADWIN", ("state", "_helper", "buckets", 0, "totals"), [0.0], "expected 6 numbers"),
        ("ADWIN", ("state", "_helper", "buckets"), [], "at least one row"),
        ("ADWIN", ("state", "_helper", "tick"), 2**40, "tick: 1099511627776 is outside"),
        ("ADWIN", ("state", "_drift_detected"), 0, "expected true or false"),
        ("ADWIN", ("state", "_helper"), _DROP, "expected the keys _drift_detected, _helper"),
        ("KSWIN", ("state", "window"), [0] * 101, "101 items, at most 100"),
        ("KSWIN", ("state", "window"), ["0"], "expected a number, got str"),
        ("KSWIN", ("state", "_rng", "internal"), [0] * 10, "expected 625 integers"),
        ("KSWIN", ("state", "_rng", "internal", 3), 2**32, "outside"),
        ("PageHinkley", ("state", "_x_mean", "n"), -3.0, "expected a number >= 0"),
        ("PageHinkley", ("params", "mode"), "sideways", "Invalid 'mode'"),
        ("EDDM", ("state", "_error_distances", "S"), -1.0, "S: expected a number >= 0"),
        ("HDDM_W", ("state", "_total", "ewma", "mean"), None, "expected a number, got NoneType"),
        # Entries fine alone whose combination would make the next update raise.
        ("DDM", ("state", "_p_min"), None, "null only before a minimum"),
        ("DDM", ("state", "_p", "mean"), 1.5, "an error rate must be within [0, 1]"),
        ("EDDM", ("state", "_p2s_prime_max"), 0, "must be -1 (none yet) or > 0"),
        ("HDDM_A", ("state", "_x_min", "n"), 10**6, "cannot have seen more than the total"),
        ("HDDM_W", ("state", "_s2_incr", "ibc"), -0.5, "a bound condition is never negative"),
        ("KSWIN", ("state", "window", 0), float("nan"), "samples must be finite"),
    ],
)
def test_forged_state_is_refused_with_a_one_line_reason(
    name: str, path: tuple[Any, ...], value: Any, why: str
) -> None:
    data = _forge(_saved(name), path, value)

    with pytest.raises(MonitorStateError) as info:
        DriftMonitor.from_bytes(data)

    message = str(info.value)
    assert message.startswith("monitor.from_bytes: ")
    assert why in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json at all",
        b"\xff\xfe\x00garbage",
        b"[]",
        b'{"format": "fedge.drift_monitor"}',
        b'{"format": "fedge.drift_monitor", "format": "fedge.drift_monitor", "version": 2}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"format": "fedge.drift_monitor", "version": 2, "x": 1' + b"9" * 5000 + b"}",
    ],
    ids=["empty", "text", "binary", "list", "partial", "duplicate", "deep", "huge-int"],
)
def test_garbage_is_refused_as_unreadable_state(data: bytes) -> None:
    with pytest.raises(MonitorStateError, match=r"^monitor\.from_bytes: "):
        DriftMonitor.from_bytes(data)


def test_a_state_larger_than_the_bound_is_refused_before_parsing() -> None:
    data = b" " * (MAX_STATE_BYTES + 1)

    with pytest.raises(MonitorStateError, match="larger than"):
        DriftMonitor.from_bytes(data)


# -- nothing runs, whatever the bytes --------------------------------------------------------

_WATCHING: list[str] = []
_FORBIDDEN = ("pickle.find_class", "exec", "os.system", "subprocess.Popen", "os.exec", "import")


def _audit(event: str, _args: tuple[Any, ...]) -> None:
    if _WATCHING and event.startswith(_FORBIDDEN):
        _WATCHING.append(event)


sys.addaudithook(_audit)


def _load_watched(data: bytes) -> list[str]:
    """Load ``data``; return the code-running audit events it caused (none is allowed)."""
    _WATCHING[:] = ["on"]
    try:
        try:
            DriftMonitor.from_bytes(data)
        except MonitorStateError:
            pass
    finally:
        events, _WATCHING[:] = _WATCHING[1:], []
    return events


def test_the_watch_sees_an_unpickling_attempt() -> None:
    _WATCHING[:] = ["on"]
    try:
        pickle.loads(pickle.dumps(DriftMonitor))
    finally:
        events, _WATCHING[:] = _WATCHING[1:], []
    assert "pickle.find_class" in events


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes_only_ever_raise_the_documented_error(data: bytes) -> None:
    assert _load_watched(data) == []


_VALID = {name: _saved(name, **PARAMS[name]) for name in DETECTOR_NAMES}
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value[:3]):
            yield from _paths(item, (*prefix, i))


@settings(
    max_examples=int(os.environ.get("FEDGE_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.sampled_from(DETECTOR_NAMES), st.data())
def test_a_tampered_state_is_refused_or_gives_a_detector_that_keeps_working(
    name: str, data: st.DataObject
) -> None:
    state = json.loads(json.dumps(_VALID[name]))
    path = data.draw(st.sampled_from([p for p in _paths(state) if p]))
    forged = _forge(state, path, data.draw(_json_values))

    assert _load_watched(forged) == []
    try:
        monitor = DriftMonitor.from_bytes(forged)
    except MonitorStateError:
        return
    # Accepted: then it must take the next samples like any detector (80 fill KSWIN's
    # tuned window, so its test runs too).
    monitor.update(regime_stream(seed=0, n=80))
    DriftMonitor.from_bytes(monitor.to_bytes())


# -- on the device ---------------------------------------------------------------------------

CFG = load_config(
    None, ["scenario.clients=2", "scenario.ticks=6", "scenario.schedule.at=4",
           "scenario.bad_row_fraction=0.0"]
)


def _device_with_state(tmp_path: Path) -> Path:
    path = tmp_path / "device.sqlite"
    cfg, signer = trusting(CFG, tmp_path)
    device = fed_device(cfg, 0, path)
    model = nets.build_model(
        device.schema.n_features, device.schema.n_classes, CFG.model.hidden, CFG.model.layers
    )
    nets.initial_weights(model, 0)
    # A device monitors only a deployed model, and installs only a signed one.
    deploy_signed(device, signer, 1, nets.get_weights(model))
    for tick in range(2):
        device.monitor_tick(tick)
    assert device.monitor.samples_seen > 0
    device.close()
    return path


def _plant(path: Path, blob: bytes) -> int:
    with DeviceStore(path) as store:
        store.put_state(MONITOR_KEY, blob)
        return len(store)


@pytest.mark.parametrize("blob", ["malicious-pickle", "garbage", "wrong-detector"])
def test_device_moves_an_unreadable_detector_aside_and_starts_fresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, blob: str
) -> None:
    path = _device_with_state(tmp_path)
    marker = tmp_path / "pwned"
    planted = {
        "malicious-pickle": _live_payload(tmp_path, marker, pickle.HIGHEST_PROTOCOL),
        "garbage": os.urandom(512),
        "wrong-detector": _forge(_saved(), ("detector",), "builtins.eval"),
    }[blob]
    window = _plant(path, planted)

    with caplog.at_level(logging.WARNING, logger="fedge.device"):
        device = fed_device(trusting(CFG, tmp_path)[0], 0, path)

    try:
        assert not marker.exists()
        assert device.monitor.samples_seen == 0 and device.monitor.detector == "ADWIN"
        assert device.version == 1, "the deployed model is kept"
        assert len(device.store) == window, "the sample window is kept"
        assert device.store.get_state(MONITOR_KEY) is None
        moved = list(tmp_path.glob("device.sqlite.monitor.corrupt-*"))
        assert len(moved) == 1
        assert moved[0].read_bytes() == planted, "kept as it was, for inspection"
        assert stat.S_IMODE(moved[0].stat().st_mode) == 0o600
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(str(moved[0]) in w and "'monitor'" in w for w in warnings)

        device.monitor_tick(2)  # the fresh detector is saved on the next tick
    finally:
        device.close()
    again = fed_device(trusting(CFG, tmp_path)[0], 0, path)
    try:
        assert again.monitor.samples_seen == device.monitor.samples_seen > 0
        assert not marker.exists()
        assert len(list(tmp_path.glob("device.sqlite.monitor.corrupt-*"))) == 1
    finally:
        again.close()
