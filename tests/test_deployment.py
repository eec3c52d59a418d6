"""A real Flower deployment on loopback: TLS and SuperNode authentication are enforced.

These tests start real ``flower-superlink``, ``flower-supernode``, ``flwr`` and
``mlflow server`` processes on 127.0.0.1 and check that none is left behind.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from cryptography import x509

from clients.device import Device
from clients.inbox import Inbox, inbox_path
from fedge.contracts.config import ConfigError
from fedge.deploy import DeployError
from fedge.deploy.certs import ensure_tls
from fedge.deploy.keys import create_node_key
from fedge.deploy.launcher import PLAIN_CONNECTION, LocalDeployment
from fedge.deploy.processes import MARKER_ENV, ManagedProcess
from fedge.deploy.runs import DeployRequest, deploy
from fedge.runner import RunRequest, quiet_tick, run

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SMALL = (
    "scenario.clients=2",
    "scenario.ticks=2",
    "scenario.schedule.at=1",
    "campaign.rounds=1",
    "campaign.initial_rounds=1",
)


def _processes_under(folder: Path) -> list[int]:
    """Live processes started for a deployment in ``folder`` (found by their environment)."""
    found = []
    needle = str(folder).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != b"Z" and any(v.startswith(MARKER_ENV.encode()) for v in env) and any(
            v.startswith(b"FLWR_HOME=") and needle in v for v in env
        ):
            found.append(int(entry))
    return found


def _wait_exit(proc: ManagedProcess, timeout: float) -> int:
    popen = proc.popen
    deadline = time.monotonic() + timeout
    while popen.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert popen.poll() is not None, f"the SuperNode was not refused within {timeout:.0f} s"
    return int(popen.returncode)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    folder = tmp_path_factory.mktemp("secure-deployment")
    dep = LocalDeployment(folder)
    try:
        dep.start_superlink()
        yield dep
    finally:
        dep.stop()
    assert _processes_under(folder) == [], "stopping the deployment ends every process"


def test_credentials_are_generated_with_private_keys_for_the_owner_only(tmp_path: Path) -> None:
    files = ensure_tls(tmp_path / "tls")
    for key in (files.ca_key, files.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    again = ensure_tls(tmp_path / "tls")
    assert again.ca_cert.read_bytes() == files.ca_cert.read_bytes(), "the CA is kept between runs"
    node = create_node_key(tmp_path / "keys", "device-0")
    assert stat.S_IMODE(node.private.stat().st_mode) == 0o600
    assert node.public.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_supernode_with_unregistered_key_is_refused(secure: LocalDeployment) -> None:
    intruder = secure.node_key(90)
    node = secure.start_supernode(0, 1, intruder, max_wait_time=15, name="intruder")
    code = _wait_exit(node.process, 60)
    assert code != 0
    assert "Failed to activate SuperNode" in node.process.log.read_text()
    assert secure.superlink is not None
    assert "No SuperNode found with the given public key" in secure.superlink.log.read_text()
    assert secure.online_nodes() == 0


def test_plaintext_supernode_is_refused_by_a_tls_superlink(secure: LocalDeployment) -> None:
    node = secure.start_supernode(0, 1, None, insecure=True, max_wait_time=8, name="plaintext")
    code = _wait_exit(node.process, 60)
    assert code != 0
    assert "could not establish a connection" in node.process.log.read_text()
    assert secure.online_nodes() == 0


def test_plaintext_flwr_client_is_refused_by_a_tls_superlink(secure: LocalDeployment) -> None:
    with pytest.raises(DeployError, match="unavailable"):
        secure.flwr("supernode", "list", connection=PLAIN_CONNECTION)
    assert isinstance(secure.flwr("supernode", "list"), dict), "the same call over TLS works"


def test_registered_supernode_joins(secure: LocalDeployment) -> None:
    key = secure.node_key(0)
    secure.register(key)
    node = secure.start_supernode(0, 1, key)
    secure.wait_online(1, timeout=60, watch=[node])
    assert secure.online_nodes() == 1


def test_plaintext_needs_the_explicit_insecure_flag(tmp_path: Path) -> None:
    with LocalDeployment(tmp_path / "plain", insecure=True) as dep:
        assert dep.tls is None and not dep.node_auth
        dep.start_superlink()
        node = dep.start_supernode(0, 1, None)
        dep.wait_online(1, timeout=60, watch=[node])
        assert "--insecure" in cast(list[str], node.process.popen.args)
    assert not (tmp_path / "plain" / "tls").exists(), "no certificate is made for plain text"
    assert _processes_under(tmp_path / "plain") == []


def test_scenario_runs_on_a_tls_deployment_like_in_process(tmp_path: Path) -> None:
    overrides = (*SMALL, f'run.output_dir="{tmp_path / "deployed"}"')
    summary = deploy(
        DeployRequest(EXPERIMENTS / "sine2_sudden.toml", overrides, timeout=240),
        run_dir=tmp_path / "deployed" / "run",
    )
    written = json.loads((tmp_path / "deployed" / "run" / "summary.json").read_text())
    assert written["run_id"] == summary["run_id"]
    assert summary["engine"] == "deployment"
    assert summary["tracking_uri"].startswith("http://127.0.0.1:"), "an MLflow server tracked it"
    assert "sqlite:///" in summary["ui_command"], "the UI opens the store the server wrote"
    assert [v["version"] for v in summary["versions"]] == [c["version"] for c in summary["campaigns"]]
    stores = sorted(p.name for p in (tmp_path / "deployed" / "run" / "devices").glob("device-?.sqlite"))
    assert stores == ["device-0.sqlite", "device-1.sqlite"], "each SuperNode kept its own store"
    assert _processes_under(tmp_path / "deployed") == [], "no process is left behind"
    if hasattr(Device, "read_inbox"):
        for device in (0, 1):
            box = inbox_path(tmp_path / "deployed" / "run" / "devices" / f"device-{device}.sqlite")
            with Inbox(box) as inbox:
                assert len(inbox) == 0 and inbox.last_tick == 1, "each device read its inbox"

    local = run(
        RunRequest(EXPERIMENTS / "sine2_sudden.toml", (*SMALL, f'run.output_dir="{tmp_path / "local"}"')),
        on_tick=quiet_tick,
    )
    assert [t["accuracy"] for t in summary["ticks"]] == [t["accuracy"] for t in local["ticks"]]
    assert [c["version"] for c in summary["campaigns"]] == [c["version"] for c in local["campaigns"]]


def test_deployment_of_a_killed_owner_leaves_no_process(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from fedge.deploy.launcher import LocalDeployment\n"
        "dep = LocalDeployment(Path(sys.argv[1]))\n"
        "dep.start_superlink()\n"
        "print('up', flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "up"
        assert _processes_under(tmp_path), "the SuperLink and its SuperExec are running"
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 30
    while _processes_under(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_under(tmp_path) == []


def test_bad_deploy_request_fails_before_starting_anything(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trigger.policy: 'sometimes' is not allowed"):
        deploy(
            DeployRequest(None, (f'run.output_dir="{tmp_path}"', 'trigger.policy="sometimes"')),
            run_dir=tmp_path / "run",
        )
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "deployment").exists(), "no certificate or key was written"
