"""The devices' detector of a FedDrift harness run: the dataset's calibrated setting, or the hand setting.

The calibration (:mod:`experiments.feddrift_calibrate`) writes
``experiments/feddrift_calibration.json``; the harness reads the chosen
setting of each dataset from it here. A dataset it does not cover, or one it
measured on other data, runs :data:`DEFAULT_DETECTOR`, and the run says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The committed calibration the harness reads.
CALIBRATION_FILE = Path(__file__).with_name("feddrift_calibration.json")
#: The document's ``format``.
FORMAT = "fedge.feddrift_calibration"
#: The hand setting: what a dataset the calibration does not cover runs.
DEFAULT_DETECTOR: tuple[str, dict[str, Any]] = ("ADWIN", {"delta": 0.002})


def data_key(generator: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """What a calibration was measured on: the generator and its parameters (a csv folder by its name)."""
    return {"generator": generator,
            "params": {k: (f"csv:{Path(str(v)).name}" if k == "source" else v) for k, v in params.items()}}


def load_calibration(path: Path | None = None) -> dict[str, Any]:
    """The calibration document (default :data:`CALIBRATION_FILE`); empty when absent or not a calibration."""
    try:
        doc = json.loads((path or CALIBRATION_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else {}


def calibrated_setting(
    dataset: str, generator: str, params: Mapping[str, Any], path: Path | None = None
) -> tuple[str, dict[str, Any]] | None:
    """The chosen detector and parameters of ``dataset``, or None when it was not calibrated.

    A calibration measured on other data (SEA-4 from the generator while the
    FedDrift csv is present, other generator parameters) does not count.
    """
    entry = load_calibration(path).get("datasets", {}).get(dataset)
    if not isinstance(entry, dict) or entry.get("data") != data_key(generator, params):
        return None
    chosen = entry["chosen"]
    return str(chosen["detector"]), dict(chosen["params"])


def detector_setting(
    dataset: str,
    generator: str,
    params: Mapping[str, Any],
    detector: str | None = None,
    delta: float | None = None,
    path: Path | None = None,
) -> tuple[str, dict[str, Any], str]:
    """The devices' detector for ``dataset``: name, parameters and where they came from.

    Parameters
    ----------
    dataset, generator, params
        The dataset as the harness names it, and its generator with parameters.
    detector, delta
        The user's override (``Settings.detector``, ``Settings.delta``): with
        either given, ``detector`` (default ADWIN) runs, ADWIN with ``delta``
        (default 0.002), another detector with river's defaults.
    path
        The calibration (default :data:`CALIBRATION_FILE`).

    Returns
    -------
    tuple
        Name, parameters and ``"given"``, ``"calibrated"`` or ``"default"``
        (:data:`DEFAULT_DETECTOR`: the dataset is not in the calibration).
    """
    if detector is not None or delta is not None:
        name = detector or "ADWIN"
        value = delta if delta is not None else DEFAULT_DETECTOR[1]["delta"]
        return name, ({"delta": value} if name == "ADWIN" else {}), "given"
    found = calibrated_setting(dataset, generator, params, path)
    if found is not None:
        return found[0], found[1], "calibrated"
    return DEFAULT_DETECTOR[0], dict(DEFAULT_DETECTOR[1]), "default"
