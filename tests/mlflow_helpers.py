"""A real ``mlflow server`` on loopback for tests: start, stop and start again on one port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mlflow_command() -> str:
    """The ``mlflow`` executable beside this interpreter, else on PATH; skips the test if none."""
    beside = Path(sys.executable).with_name("mlflow")
    if beside.exists():
        return str(beside)
    found = shutil.which("mlflow")
    if found is None:
        pytest.skip("mlflow server command not installed")
    return found


class MlflowServer:
    """An ``mlflow server`` with a SQLite backend and artifacts in ``folder``.

    The store lives in ``folder``, so :meth:`stop` then :meth:`start` is the same
    server coming back on the same port with everything it had.
    """

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = Path(folder)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 90.0) -> str:
        """Start the server and wait until ``/health`` answers; returns its URL."""
        assert self.proc is None, "already running"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
        log = (self.folder / f"server-{self.starts}.log").open("w")
        self.proc = subprocess.Popen(
            [
                mlflow_command(),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.folder}/server.db",
                "--artifacts-destination",
                str(self.folder / "artifacts"),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.folder / f"server-{self.starts}.log").read_text()[-2000:]
                self.stop()
                pytest.fail(f"mlflow server did not start:\n{tail}")
            time.sleep(0.3)
        return self.url

    def stop(self) -> None:
        """Stop the server and every process it started; the port is free afterwards."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
        deadline = time.monotonic() + 30
        while self._listening() and time.monotonic() < deadline:
            time.sleep(0.1)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def _listening(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0
