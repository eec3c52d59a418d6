"""Any tracking URI works through config: a run against a real ``mlflow server``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow_helpers import MlflowServer

from fedge.runner import RunRequest, quiet_tick, run
from fedge.tracking import list_model_versions

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server.start()
    finally:
        server.stop()


def test_run_registers_versions_on_a_real_tracking_server(
    mlflow_server: str, tmp_path: Path
) -> None:
    summary = run(
        RunRequest(
            EXPERIMENTS / "sine2_sudden.toml",
            (
                f'run.output_dir="{tmp_path}"',
                f'tracking.uri="{mlflow_server}"',
                "scenario.clients=3",
                "scenario.ticks=6",
                "scenario.schedule.at=3",
                "campaign.rounds=2",
                "campaign.initial_rounds=3",
            ),
        ),
        on_tick=quiet_tick,
    )
    assert summary["tracking_uri"] == mlflow_server
    assert not (tmp_path / "mlflow.db").exists(), "nothing goes to the embedded store"
    versions = list_model_versions(mlflow_server, "fedge-sine2-sudden")
    assert [v["version"] for v in versions] == [c["version"] for c in summary["campaigns"]]
    champion = [v for v in versions if "champion" in v["aliases"]]
    assert [v["version"] for v in champion] == [summary["champion"]]
