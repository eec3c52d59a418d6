"""Conversions between fedge's plain values and Flower records, and run-config helpers.

Used by both sides (``clients.client_app`` and ``fedge.server.app``), so the
two can never disagree on how a model or a report is encoded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context

from fedge.contracts.config import FedgeConfig
from fedge.contracts.config_load import inside, load_config, split_overrides

_CONFIG_CACHE: dict[tuple[str, str, str], FedgeConfig] = {}


def to_arrays(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    """NumPy weights to an ``ArrayRecord`` (order preserved)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def from_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``ArrayRecord`` to NumPy weights."""
    return {k: v.numpy() for k, v in record.items()}


def config_from_context(context: Context) -> FedgeConfig:
    """The fedge configuration named by Flower's run config (cached per run)."""
    rc = context.run_config
    key = (str(rc.get("scenario", "")), str(rc.get("overrides", "")), str(rc.get("output-dir", "")))
    if key not in _CONFIG_CACHE:
        overrides = split_overrides(key[1])
        if key[2]:
            overrides.append(f"run.output_dir={json.dumps(key[2])}")
        _CONFIG_CACHE[key] = load_config(key[0] or None, overrides)
    return _CONFIG_CACHE[key]


def run_dir(cfg: FedgeConfig, context: Context) -> Path:
    """Folder of this run: given by ``run-dir`` in the run config, else derived from the run id."""
    given = str(context.run_config.get("run-dir", ""))
    if given:
        return Path(given).expanduser().resolve()
    return inside(cfg.output_dir, cfg.output_dir / cfg.scenario.name / f"run-{context.run_id}")
