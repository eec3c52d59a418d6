"""What a stranger, a foreign app and a local user cannot do to a ``fedge deploy`` deployment.

Real ``flower-superlink``, ``flower-supernode``, ``flwr`` and ``mlflow server``
processes on loopback, started the way ``fedge deploy`` starts them.
"""

from __future__ import annotations

import base64
import json
import socket
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients.app_pin import AppNotProvisioned, PinError, check_fab, fab_sha256, parse_pins
from fedge.deploy import DeployError
from fedge.deploy.keys import create_node_key
from fedge.deploy.launcher import CONNECT_TIMEOUT, SUPERLINK_HOST, LocalDeployment
from fedge.deploy.mlflow_auth import ensure_mlflow_auth
from fedge.deploy.runs import submit_run, wait_for_run

STRANGER = "stranger"

HOSTILE_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "hostileapp"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "stranger"

[tool.flwr.app.components]
serverapp = "hostile_app:server"
clientapp = "hostile_app:client"

[tool.flwr.app.config]
out = ""
"""

# A ServerApp that asks every node once and writes down what each answered, and a
# ClientApp that leaves a file behind wherever it runs.
HOSTILE_APP = """\
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["out"]))
    nodes = []
    for _ in range(120):
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= 2:
            break
        time.sleep(1)
    messages = [
        Message(RecordDict({"c": ConfigRecord({"x": 1})}), node, "query") for node in nodes
    ]
    answers = {}
    for reply in grid.send_and_receive(messages, timeout=240):
        node = str(reply.metadata.src_node_id)
        answers[node] = reply.error.reason if reply.has_error() else "ok"
    (out / "answers.json").write_text(json.dumps(answers))


@client.query()
def query(msg: Message, context: Context) -> Message:
    out = Path(str(context.run_config["out"]))
    (out / f"ran-on-{context.node_id}").write_text("the stranger's code ran here")
    return Message(RecordDict(), reply_to=msg)
"""


def _hostile_app(folder: Path) -> Path:
    app = folder / "hostileapp"
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(HOSTILE_PYPROJECT)
    (app / "hostile_app.py").write_text(HOSTILE_APP)
    return app


@pytest.fixture(scope="module")
def linked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    """A TLS SuperLink with SuperNode auth, as ``fedge deploy`` starts it; no node yet."""
    folder = tmp_path_factory.mktemp("hardened")
    dep = LocalDeployment(folder)
    try:
        dep.start_superlink()
        # The stranger has what every device has: the CA certificate. Its `flwr`
        # connection points at the SuperLink's port on another address of this
        # machine (as a remote host would reach it on a network interface).
        assert dep.tls is not None
        with (dep.cli_home / "config.toml").open("a", encoding="utf-8") as fh:
            fh.write(
                f'\n[superlink.{STRANGER}]\naddress = "127.0.0.2:{dep.port}"\n'
                f'root-certificates = "{dep.tls.ca_cert}"\n'
            )
        yield dep
    finally:
        dep.stop()


def test_control_api_is_unreachable_from_another_address(linked: LocalDeployment, tmp_path: Path) -> None:
    assert SUPERLINK_HOST == "127.0.0.1"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", linked.port), timeout=5).close()
    with socket.create_connection(("127.0.0.1", linked.port), timeout=5):
        pass  # the same port answers on loopback

    key = create_node_key(tmp_path / "keys", "intruder")
    with pytest.raises(DeployError, match="unavailable"):
        linked.flwr("supernode", "register", str(key.public), connection=STRANGER)
    with pytest.raises(DeployError, match="unavailable"):
        linked.flwr("run", str(_hostile_app(tmp_path)), connection=STRANGER, timeout=120)
    with pytest.raises(DeployError, match="unavailable"):
        linked.flwr("list", connection=STRANGER)

    assert linked.flwr("supernode", "list").get("nodes", []) == [], "no node was registered"
    assert linked.flwr("list").get("runs", []) == [], "no run was started"


def test_plaintext_supernode_exits_within_the_default_bound(linked: LocalDeployment) -> None:
    started = time.monotonic()
    node = linked.start_supernode(0, 1, None, insecure=True, name="plaintext-default")
    assert "--max-wait-time" in node.process.popen.args, "fedge bounds the retries by default"
    with pytest.raises(DeployError) as refused:
        linked.wait_online(1, timeout=CONNECT_TIMEOUT + 45, watch=[node])
    took = time.monotonic() - started
    assert not node.process.running() and node.process.popen.returncode != 0
    assert took < CONNECT_TIMEOUT + 45, f"exited only after {took:.0f} s"
    line = str(refused.value)
    assert "\n" not in line
    assert "The SuperNode could not establish a connection to the SuperLink" in line
    assert "started without TLS, and the SuperLink accepts TLS only" in line
    assert str(node.process.log) in line
    linked.supernodes.remove(node)


def test_device_refuses_an_app_it_was_not_provisioned_for(linked: LocalDeployment, tmp_path: Path) -> None:
    hostile = _hostile_app(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    fedge_pin = linked.app_pins()
    assert len(fedge_pin) == 1 and fedge_pin[0] != fab_sha256(hostile)

    keys = [linked.node_key(0), linked.node_key(1)]
    ids = [linked.register(k) for k in keys]
    device = linked.start_supernode(0, 2, keys[0])  # provisioned for fedge, as fedge deploy does
    other = linked.start_supernode(1, 2, keys[1], pins=[fab_sha256(hostile)])  # for this app
    linked.wait_online(2, timeout=120, watch=[device, other])

    run_id = submit_run(linked, {"out": str(out)}, app=hostile)
    status = wait_for_run(linked, run_id, 300, done_file=out / "answers.json", poll=5.0)
    assert status.startswith("finished"), status
    answers = json.loads((out / "answers.json").read_text())

    assert not (out / f"ran-on-{ids[0]}").exists(), "none of the stranger's code ran on the device"
    assert "not the app this device was provisioned for" in answers[str(ids[0])]
    assert "AppNotProvisioned" in answers[str(ids[0])]
    assert answers[str(ids[1])] == "ok" and (out / f"ran-on-{ids[1]}").exists(), (
        "a node provisioned for the app runs it: the check is what refused it"
    )

    log = device.process.log.read_text(errors="replace")
    refusals = [ln for ln in log.splitlines() if "fedge.app_pin: refused app" in ln]
    assert len(refusals) == 1, refusals
    assert fab_sha256(hostile)[:12] in refusals[0] and fedge_pin[0][:12] in refusals[0]
    assert "Traceback" not in log, "a refusal is one line, not a traceback"
    assert not list((linked.folder / "supernode-0").rglob("hostile_app.py")), "never unpacked"


def test_pins_are_checked_before_anything_is_installed(tmp_path: Path) -> None:
    app = _hostile_app(tmp_path)
    assert fab_sha256(app) == fab_sha256(app), "flwr's FAB build is deterministic"
    fab = (app / "hostile_app.py").read_bytes()
    with pytest.raises(AppNotProvisioned, match="not the app this device was provisioned for"):
        check_fab(fab, parse_pins("ab" * 32))
    with pytest.raises(AppNotProvisioned, match=r"pinned: none"):
        check_fab(fab, parse_pins(""))
    with pytest.raises(PinError, match="is not a SHA-256 hex digest"):
        parse_pins("latest")


def _post(url: str, body: dict[str, object], auth: tuple[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def _get(url: str, auth: tuple[str, str]) -> dict:
    request = urllib.request.Request(url)
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=30) as resp:
        return dict(json.loads(resp.read()))


def test_mlflow_server_refuses_to_move_the_champion_without_the_password(tmp_path: Path) -> None:
    creds = ensure_mlflow_auth(tmp_path / "creds" / "mlflow")
    assert stat.S_IMODE(creds.config.stat().st_mode) == 0o600
    assert stat.S_IMODE(creds.config.parent.stat().st_mode) == 0o700
    assert ensure_mlflow_auth(tmp_path / "creds" / "mlflow") == creds, "kept between deployments"

    with LocalDeployment(tmp_path / "dep", insecure=True) as dep:
        url = dep.start_mlflow(
            f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", auth=creds, timeout=240
        )
        api = f"{url}/api/2.0/mlflow"
        admin = (creds.username, creds.password)
        assert _post(f"{api}/registered-models/create", {"name": "m"})[0] == 401
        assert _post(f"{api}/registered-models/create", {"name": "m"}, admin)[0] == 200
        code, experiment = _post(f"{api}/experiments/create", {"name": "e"}, admin)
        assert code == 200
        for _ in range(2):
            code, run = _post(
                f"{api}/runs/create", {"experiment_id": experiment["experiment_id"]}, admin
            )
            info = run["run"]["info"]
            version = {"name": "m", "source": f"{info['artifact_uri']}/model", "run_id": info["run_id"]}
            assert _post(f"{api}/model-versions/create", version, admin)[0] == 200
        champion = {"name": "m", "alias": "champion", "version": "1"}
        assert _post(f"{api}/registered-models/alias", champion, admin)[0] == 200

        moved = {**champion, "version": "2"}
        assert _post(f"{api}/registered-models/alias", moved)[0] == 401
        assert _post(f"{api}/registered-models/alias", moved, (creds.username, "guess"))[0] == 401
        found = _get(f"{api}/registered-models/alias?name=m&alias=champion", admin)
        assert found["model_version"]["version"] == "1", "the champion did not move"
