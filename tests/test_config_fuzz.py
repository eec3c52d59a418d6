"""Whatever bytes a scenario file holds, the loader answers with a ConfigError or a config."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedge.contracts.config import ConfigError, FedgeConfig
from fedge.contracts.config_load import load_config

_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _load(raw: bytes) -> FedgeConfig | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scenario.toml"
        path.write_bytes(raw)
        try:
            return load_config(path)
        except ConfigError as exc:
            assert "\n" not in str(exc), str(exc)
            return None


@_FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_give_a_config_error_or_a_config(raw: bytes) -> None:
    _load(raw)


_SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["sine2", "sudden", "ADWIN", "fedavg", "../x", "/etc", "a\x00b", "quorum"]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
_KEYS: dict[str, list[str]] = {
    "scenario": ["name", "generator", "seed", "clients", "ticks", "samples_per_tick",
                 "bad_row_fraction", "schedule", "generator_params", "bogus"],
    "monitor": ["detector", "params", "window", "reset_window_on_drift"],
    "trigger": ["policy", "quorum", "cooldown", "period"],
    "campaign": ["strategy", "rounds", "local_epochs", "batch_size", "lr", "min_devices",
                 "compression", "assumed_malicious"],
    "privacy": ["secure_aggregation", "secagg_shares", "secagg_threshold", "dp", "delta"],
    "model": ["hidden", "layers"],
    "tracking": ["uri", "experiment", "model_name"],
    "run": ["output_dir", "resume", "reply_timeout", "workers"],
}


@st.composite
def _documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for section in draw(st.lists(st.sampled_from(sorted(_KEYS)), max_size=4, unique=True)):
        keys = draw(st.lists(st.sampled_from(_KEYS[section]), max_size=4, unique=True))
        doc[section] = {key: draw(_VALUES) for key in keys}
    return doc


@_FUZZ
@given(_documents())
def test_well_formed_toml_with_wrong_values_gives_a_config_error_or_a_config(
    doc: dict[str, Any],
) -> None:
    try:
        raw = tomli_w.dumps(doc).encode()
    except (TypeError, ValueError):
        return  # not expressible in TOML (tomli_w refuses it): nothing to load
    _load(raw)
