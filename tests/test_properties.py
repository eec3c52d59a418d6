"""Random and malformed configs, reports and rows: clear errors only, never a crash."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.validation import UNLABELLED, validate_rows
from fedge.contracts.config import ConfigError
from fedge.contracts.config_load import from_dict, parse_override
from fedge.contracts.protocol import REPORT_FIELDS, DriftReport

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10**6, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
sections = st.sampled_from(
    ["scenario", "monitor", "trigger", "campaign", "model", "tracking", "run", "nonsense"]
)
keys = st.sampled_from(
    ["name", "generator", "seed", "clients", "ticks", "detector", "policy", "quorum", "rounds",
     "participants", "lr", "hidden", "layers", "uri", "output_dir", "schedule", "params", "zzz"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(sections, st.dictionaries(keys, values, max_size=4), max_size=4))
def test_any_config_is_accepted_or_refused_in_one_line(data: dict) -> None:
    try:
        from_dict(data)
    except ConfigError as exc:
        text = str(exc)
        assert text and "\n" not in text
        assert len(text) < 600


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_override_text_parses_or_is_refused(text: str) -> None:
    try:
        path, _ = parse_override(text)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert len(path) >= 2


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([*REPORT_FIELDS, "extra"]), scalars, max_size=14))
def test_any_report_payload_is_read_or_refused_with_a_value_error(data: dict) -> None:
    try:
        report = DriftReport.from_dict(data)
    except ValueError as exc:
        assert "drift report" in str(exc)
    else:
        assert isinstance(report.drift, bool)
        assert all(isinstance(getattr(report, f), (int, bool)) for f in REPORT_FIELDS)


rows = st.lists(
    st.one_of(
        st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=0, max_size=4),
        st.lists(st.one_of(st.none(), st.text(max_size=3), st.integers()), max_size=3),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(rows, st.data())
def test_any_rows_are_split_into_kept_and_counted(x: list, data: st.DataObject) -> None:
    y = data.draw(st.lists(st.one_of(st.integers(-3, 5), st.floats(), st.text(max_size=2)),
                           min_size=len(x), max_size=len(x)))
    out = validate_rows(x, y, n_features=2, n_classes=2)
    assert out.x.shape == (len(out.y), 2)
    assert out.x.dtype == np.float32 and out.y.dtype == np.int64
    assert len(out.y) + out.rejected["total"] == len(x), "every row is kept or counted"
    assert all(math.isfinite(v) for v in out.x.ravel())
    assert set(out.y.tolist()) <= {0, 1, UNLABELLED}, "a class, or no label (NaN)"
