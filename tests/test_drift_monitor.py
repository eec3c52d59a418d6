"""The drift monitor fires on a rise in the error rate, stays quiet otherwise, and survives a
save/restore without changing what it would detect next."""

from __future__ import annotations

import numpy as np
import pytest

from clients.monitor import (
    DETECTOR_NAMES,
    DriftMonitor,
    MonitorStateError,
    MonitorUpdate,
    make_detector,
    resolve_detector_name,
)

CHANGE_AT = 2000
QUIET_BEFORE_CHANGE = ("ADWIN", "PageHinkley", "DDM", "HDDM_A")


def error_stream(seed: int = 0, before: int = CHANGE_AT, after: int = 2000) -> np.ndarray:
    """About 5% errors, then about 60%."""
    rng = np.random.default_rng(seed)
    return np.r_[rng.random(before) < 0.05, rng.random(after) < 0.6].astype(np.int8)


def drift_positions(monitor: DriftMonitor, errors: np.ndarray) -> list[int]:
    """Feed one error at a time and return where drift was signalled."""
    return [i for i in range(len(errors)) if monitor.update(errors[i : i + 1]).drift]


def test_detector_names_are_the_seven_canonical_ones() -> None:
    assert DETECTOR_NAMES == ("ADWIN", "KSWIN", "PageHinkley", "DDM", "EDDM", "HDDM_A", "HDDM_W")


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_rise_in_error_rate_fires_drift_soon_after_the_change(name: str) -> None:
    errors = error_stream()
    monitor = DriftMonitor(name, seed=0)

    before = monitor.update(errors[:CHANGE_AT])
    after = monitor.update(errors[CHANGE_AT:])

    assert after.drift
    assert after.first_drift_index is not None and after.first_drift_index < 500
    if name in QUIET_BEFORE_CHANGE:
        assert not before.drift and before.n_drifts == 0 and before.first_drift_index is None
    assert monitor.drifts_total == before.n_drifts + after.n_drifts
    assert monitor.samples_seen == len(errors)


def test_stationary_low_error_stream_gives_no_drift_for_adwin() -> None:
    monitor = DriftMonitor("ADWIN")

    update = monitor.update(np.zeros(len(error_stream()), dtype=np.int8))

    assert update == MonitorUpdate(
        n_samples=4000, n_errors=0, drift=False, n_drifts=0, first_drift_index=None
    )
    assert monitor.drifts_total == 0


def test_update_counts_errors_and_accepts_bools_lists_and_ints() -> None:
    errors = error_stream()[:300]
    results = [
        DriftMonitor("DDM").update(errors),
        DriftMonitor("DDM").update(errors.astype(bool)),
        DriftMonitor("DDM").update(errors.tolist()),
    ]

    assert results[0].n_errors == int(errors.sum())
    assert results[0].n_samples == 300
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_batch_size_does_not_change_what_is_detected(name: str) -> None:
    errors = error_stream(before=500, after=500)
    one_by_one = drift_positions(DriftMonitor(name, seed=3), errors)

    chunk = 100
    chunked = DriftMonitor(name, seed=3)
    firsts = []
    for start in range(0, len(errors), chunk):
        update = chunked.update(errors[start : start + chunk])
        if update.first_drift_index is not None:
            firsts.append(start + update.first_drift_index)

    expected_firsts = [
        min(p for p in one_by_one if p // chunk == c)
        for c in sorted({p // chunk for p in one_by_one})
    ]
    assert one_by_one
    assert firsts == expected_firsts
    assert chunked.drifts_total == len(one_by_one)


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_restored_monitor_continues_exactly_like_the_original(name: str) -> None:
    errors = error_stream(seed=5, before=500, after=500)
    original = DriftMonitor(name, seed=11)
    original.update(errors[:421])

    restored = DriftMonitor.from_bytes(original.to_bytes())
    continuation = errors[421:]
    expected = drift_positions(original, continuation)

    assert expected
    assert drift_positions(DriftMonitor(name, seed=11), continuation) != expected, (
        "a fresh detector must behave differently, otherwise the comparison proves nothing"
    )
    assert drift_positions(restored, continuation) == expected
    assert restored.samples_seen == original.samples_seen
    assert restored.drifts_total == original.drifts_total
    assert repr(restored) == repr(original)


def test_from_bytes_rejects_data_that_is_not_a_monitor() -> None:
    with pytest.raises(MonitorStateError, match="monitor.from_bytes"):
        DriftMonitor.from_bytes(b"not a saved monitor")


def test_kswin_with_the_same_seed_is_reproducible() -> None:
    errors = error_stream(seed=2, before=500, after=500)

    first = drift_positions(DriftMonitor("KSWIN", seed=42), errors)
    second = drift_positions(DriftMonitor("KSWIN", seed=42), errors)

    assert first and first == second


def test_reset_starts_a_fresh_detector_and_keeps_lifetime_counters() -> None:
    errors = error_stream()
    monitor = DriftMonitor("PageHinkley")
    first = monitor.update(errors)
    monitor.reset()

    assert monitor.samples_seen == len(errors)
    assert monitor.drifts_total == first.n_drifts
    # After a reset the detector has forgotten the high-error regime, so replaying the
    # stream detects at the same places as a brand new monitor would.
    again = monitor.update(errors)
    assert again == DriftMonitor("PageHinkley").update(errors)
    assert monitor.samples_seen == 2 * len(errors)


def test_params_reach_the_detector() -> None:
    errors = error_stream()
    default = DriftMonitor("PageHinkley").update(errors)
    strict = DriftMonitor("PageHinkley", {"threshold": 500.0}).update(errors)

    assert default.first_drift_index is not None and strict.first_drift_index is not None
    assert strict.first_drift_index > default.first_drift_index + 500


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("adwin", "ADWIN"),
        ("HDDMA", "HDDM_A"),
        ("hddm-a", "HDDM_A"),
        ("hddm_w", "HDDM_W"),
        ("page_hinkley", "PageHinkley"),
        ("Page-Hinkley", "PageHinkley"),
        ("kswin", "KSWIN"),
        ("eddm", "EDDM"),
    ],
)
def test_detector_names_are_forgiving_about_spelling(spelling: str, canonical: str) -> None:
    assert resolve_detector_name(spelling) == canonical
    assert DriftMonitor(spelling).detector == canonical


def test_unknown_detector_names_the_value_and_the_allowed_ones() -> None:
    with pytest.raises(ValueError) as info:
        DriftMonitor("foo")

    message = str(info.value)
    assert message.startswith("monitor.detector: unknown detector 'foo'; allowed: ADWIN, KSWIN")
    assert "\n" not in message


def test_unknown_parameter_names_it_and_the_allowed_ones() -> None:
    with pytest.raises(ValueError) as info:
        make_detector("ADWIN", {"x": 1})

    assert str(info.value) == (
        "monitor.params: unknown parameter 'x' for ADWIN; allowed: "
        "delta, clock, max_buckets, min_window_length, grace_period"
    )


def test_parameter_value_the_detector_refuses_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match=r"^monitor\.params: KSWIN\(alpha=2\.0\)") as info:
        DriftMonitor("KSWIN", {"alpha": 2.0})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [[0, 1, 2], [0.5], np.zeros((2, 2))])
def test_errors_must_be_a_flat_stream_of_zeros_and_ones(bad: object) -> None:
    monitor = DriftMonitor()
    with pytest.raises(ValueError, match="monitor.update"):
        monitor.update(bad)  # type: ignore[arg-type]
    assert monitor.samples_seen == 0


def test_empty_batch_changes_nothing() -> None:
    monitor = DriftMonitor()

    assert monitor.update([]) == MonitorUpdate(0, 0, False, 0, None)
    assert monitor.samples_seen == 0


def test_repr_shows_detector_and_params() -> None:
    monitor = DriftMonitor("hddm-w", {"lambda_val": 0.1})

    assert repr(monitor) == "DriftMonitor(detector='HDDM_W', params={'lambda_val': 0.1})"
