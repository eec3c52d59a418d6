"""Any tracking URI works through config: a run against a real ``mlflow server``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedge.runner import RunRequest, quiet_tick, run
from fedge.tracking import list_model_versions

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    if not mlflow_bin.exists() and shutil.which("mlflow") is None:
        pytest.skip("mlflow server command not installed")
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
    proc = subprocess.Popen(
        [
            str(mlflow_bin if mlflow_bin.exists() else "mlflow"),
            "server",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--backend-store-uri", f"sqlite:///{folder}/server.db",
            "--artifacts-destination", str(folder / "artifacts"),
            "--workers", "1",
        ],
        stdout=(folder / "server.log").open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_run_registers_versions_on_a_real_tracking_server(mlflow_server: str, tmp_path: Path) -> None:
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
