"""fedge: on-device drift detection starts federated retraining; MLflow registers each model."""

from __future__ import annotations

import os

# Nothing leaves unannounced: Flower's and MLflow's usage telemetry stay off
# unless the user opts in with FEDGE_TELEMETRY=1.
if os.environ.get("FEDGE_TELEMETRY", "0") != "1":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")

__version__ = "0.1.0"
