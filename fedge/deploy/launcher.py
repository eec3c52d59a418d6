"""A Flower deployment on this machine: SuperLink, SuperNodes and MLflow server.

:class:`LocalDeployment` owns the processes, their TLS files and node keys, and
knows how to talk to them with Flower's own tools (``flower-superlink``,
``flower-supernode``, ``flwr``). :func:`start_deployment` brings up all of them
for a number of devices. Running an app on a deployment (submitting, waiting,
``fedge deploy`` itself) is :mod:`fedge.deploy.runs`.

Layout of a deployment (the user owns every file)::

    <output dir>/deployment/tls/        ca.crt, ca.key (0600), server.crt, server.key (0600)
    <output dir>/deployment/keys/       device-<i> (0600) and device-<i>.pub, one pair per SuperNode
    <output dir>/deployment/mlflow/     basic_auth.ini (0600), flask-secret (0600), users.db
    <run dir>/deployment/               state of this run: FLWR_HOMEs, SuperLink database,
                                        one log per process, the connection file, and
                                        pinned-bin/ (the SuperNodes' app-pinning flwr-clientapp)
    <run dir>/devices/                  each SuperNode's on-device store and ingest inbox
    <run dir>/summary.json              written by the ServerApp
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from fedge.deploy import DeployError
from fedge.deploy.certs import DEFAULT_HOSTS, TlsFiles, ensure_tls
from fedge.deploy.keys import NodeKey, create_node_key
from fedge.deploy.mlflow_auth import MlflowAuth, ensure_mlflow_auth
from fedge.deploy.processes import ManagedProcess, ProcessGroup, free_port

CONNECTION = "fedge"
"""Name of the SuperLink connection in the deployment's ``config.toml``."""

PLAIN_CONNECTION = "fedge-plaintext"
"""A second connection to the same address without TLS (refused by a TLS SuperLink)."""

SUPERLINK_HOST = "127.0.0.1"
"""Where the SuperLink listens. In Flower 1.42 one port serves the Fleet API (for
SuperNodes), the Control API (``flwr run``, ``flwr supernode register``) and the
Runtime API (for the ServerApp); the Control API has no authentication in
open-source Flower, so that port must never face a network the operator does
not trust (``--control-api-address`` only moves a legacy gRPC copy of it)."""

CONNECT_TIMEOUT = 30.0
"""Seconds a SuperNode keeps retrying a request the SuperLink does not answer
before it exits (``flower-supernode --max-wait-time``); Flower's default is to
retry forever, so a node with the wrong TLS setting would hang instead of failing."""


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string (JSON's escapes are valid TOML)."""
    return json.dumps(value, ensure_ascii=True)


@dataclass
class SuperNodeHandle:
    """A started SuperNode."""

    partition_id: int
    process: ManagedProcess
    key: NodeKey | None
    runtime_port: int
    #: Plain text to a SuperLink that speaks TLS (which refuses it).
    plain_to_tls: bool = False

    def describe_exit(self) -> str:
        """One line: why the SuperNode exited, with a hint if it spoke plain text to TLS."""
        line = self.process.describe_exit()
        if self.plain_to_tls:
            line += " (it was started without TLS, and the SuperLink accepts TLS only)"
        return line

    def activated(self) -> bool:
        """Whether the SuperNode's log says the SuperLink gave it a node id."""
        try:
            return "SuperNode ID:" in self.process.log.read_text(errors="replace")
        except OSError:
            return False


class LocalDeployment:
    """Flower's deployment runtime on loopback, with TLS and SuperNode authentication.

    Parameters
    ----------
    folder : Path
        State of this deployment: FLWR_HOMEs, SuperLink database, logs.
    credentials : Path, optional
        Where the TLS files and node keys live (``tls/`` and ``keys/``); kept
        between runs so devices keep trusting the same CA. Default: ``folder``.
    insecure : bool, default False
        Plain text everywhere and no SuperNode authentication. Only for
        experiments on a trusted machine.
    node_auth : bool, default True
        Start the SuperLink with ``--enable-supernode-auth`` (needs TLS).
    app_dir : Path, optional
        The Flower app (a folder with ``pyproject.toml``); default: this project.
    bin_dir : Path, optional
        Where ``flower-superlink``, ``flower-supernode``, ``flwr`` and ``mlflow`` are;
        default: beside the running Python.
    hosts : sequence of str, default ``("127.0.0.1", "localhost", "::1")``
        Names in the server certificate.
    pin_app : bool, default True
        SuperNodes run only the FAB built from ``app_dir`` (see :mod:`clients.app_pin`);
        any other app submitted to the SuperLink is refused on the device.

    Examples
    --------
    >>> with LocalDeployment(Path("/tmp/dep")) as dep:  # doctest: +SKIP
    ...     dep.start_superlink()
    ...     key = dep.node_key(0)
    ...     dep.register(key)
    ...     dep.start_supernode(0, 1, key)
    ...     dep.wait_online(1)
    """

    def __init__(
        self,
        folder: Path,
        *,
        credentials: Path | None = None,
        insecure: bool = False,
        node_auth: bool = True,
        app_dir: Path | None = None,
        bin_dir: Path | None = None,
        hosts: Sequence[str] = DEFAULT_HOSTS,
        pin_app: bool = True,
    ) -> None:
        from fedge.contracts.config import PROJECT_ROOT

        self.folder = Path(folder).expanduser().resolve()
        self.credentials = Path(credentials or folder).expanduser().resolve()
        self.insecure = insecure
        self.node_auth = node_auth and not insecure
        self.app_dir = Path(app_dir or PROJECT_ROOT).expanduser().resolve()
        self.bin_dir = Path(bin_dir or Path(sys.executable).parent)
        self.hosts = tuple(hosts)
        self.pin_app = pin_app
        self._app_pins: tuple[str, ...] | None = None
        if not (self.app_dir / "pyproject.toml").is_file():
            raise DeployError(f"no Flower app at {self.app_dir} (pyproject.toml is missing)")
        for exe in ("flower-superlink", "flower-supernode", "flwr"):
            if not os.access(self.bin_dir / exe, os.X_OK):
                raise DeployError(f"{exe} not found in {self.bin_dir}; install flwr into this environment")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tls: TlsFiles | None = None
        if not insecure:
            self.tls = ensure_tls(self.credentials / "tls", self.hosts)
        self.port = 0
        self.superlink: ManagedProcess | None = None
        self.supernodes: list[SuperNodeHandle] = []
        self.mlflow_url = ""
        self.mlflow: ManagedProcess | None = None
        #: Basic-auth credentials of the MLflow server, if it was started with them.
        self.mlflow_auth: MlflowAuth | None = None
        #: Where runs on this deployment are tracked (set by :func:`start_deployment`).
        self.tracking_uri = ""
        #: Node id the SuperLink gave each registered device (partition id -> node id).
        self.node_ids: dict[int, int] = {}
        self.cli_home = self.folder / "cli"
        self.cli_home.mkdir(exist_ok=True)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("FLWR_") and k not in ("VIRTUAL_ENV_PROMPT",)
        }
        env.update(
            {
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "MLFLOW_DISABLE_TELEMETRY": "true",
                "DO_NOT_TRACK": "1",
                "PYTHONUNBUFFERED": "1",
                "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                "FLWR_HOME": str(self.cli_home),
            }
        )
        self.group = ProcessGroup(env, self.folder / "logs")

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """End every process of the deployment, including Flower's helpers."""
        left = self.group.stop()
        if left:
            raise DeployError(f"processes left after stopping the deployment: {left}")

    @property
    def address(self) -> str:
        """The SuperLink's address as ``host:port``."""
        return f"{SUPERLINK_HOST}:{self.port}"

    # -- SuperLink ---------------------------------------------------------------------------
    def start_superlink(self, timeout: float = 60.0) -> str:
        """Start the SuperLink (TLS and node authentication unless insecure); returns its address."""
        self.port = free_port()
        home = self.folder / "superlink"
        home.mkdir(exist_ok=True)
        argv = [
            str(self.bin_dir / "flower-superlink"),
            "--host", SUPERLINK_HOST,
            "--port", str(self.port),
            "--database", str(home / "state.db"),
            "--disable-runtime-dependency-installation",
        ]
        if self.tls is None:
            argv.append("--insecure")
        else:
            argv += [
                "--ssl-ca-certfile", str(self.tls.ca_cert),
                "--ssl-certfile", str(self.tls.server_cert),
                "--ssl-keyfile", str(self.tls.server_key),
            ]
            if self.node_auth:
                argv.append("--enable-supernode-auth")
        env = {"FLWR_HOME": str(home)}
        if self.mlflow_auth is not None:
            # The ServerApp runs below the SuperLink and inherits its environment;
            # the run config would keep the password in the SuperLink's database.
            env.update(self.mlflow_auth.client_env())
        self.superlink = self.group.start("superlink", argv, cwd=home, extra_env=env)
        self._write_connections()
        scheme = "http" if self.tls is None else "https"
        context = None if self.tls is None else ssl.create_default_context(cafile=str(self.tls.ca_cert))
        self._wait_http(f"{scheme}://{self.address}/health", self.superlink, timeout, context)
        return self.address

    def _write_connections(self) -> None:
        lines = ["[superlink]", f"default = {toml_string(CONNECTION)}", ""]
        lines += [f"[superlink.{CONNECTION}]", f"address = {toml_string(self.address)}"]
        if self.tls is None:
            lines.append("insecure = true")
        else:
            lines.append(f"root-certificates = {toml_string(str(self.tls.ca_cert))}")
        lines += ["", f"[superlink.{PLAIN_CONNECTION}]", f"address = {toml_string(self.address)}"]
        lines.append("insecure = true")
        (self.cli_home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _wait_http(
        self,
        url: str,
        proc: ManagedProcess,
        timeout: float,
        context: ssl.SSLContext | None = None,
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.running():
                raise DeployError(proc.describe_exit())
            try:
                with urllib.request.urlopen(url, timeout=1.0, context=context) as resp:
                    if 200 <= resp.status < 300:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise DeployError(f"{proc.name} did not answer at {url} within {timeout:.0f} s; log: {proc.log}")

    # -- flwr CLI ----------------------------------------------------------------------------
    def flwr(self, *args: str, connection: str = CONNECTION, timeout: float = 60.0) -> Any:
        """Run ``flwr <args> <connection> --format json`` and return the parsed reply.

        Raises
        ------
        DeployError
            If the reply does not say ``"success": true``.
        """
        argv = [str(self.bin_dir / "flwr"), *args, connection, "--format", "json"]
        done = self.group.run("flwr", argv, timeout=timeout, cwd=self.app_dir)
        try:
            reply = json.loads(done.stdout)
        except ValueError:
            reply = {"success": False, "error-message": (done.stdout + done.stderr).strip()}
        if not isinstance(reply, dict) or not reply.get("success"):
            message = str(reply.get("error-message", reply)) if isinstance(reply, dict) else str(reply)
            last = [ln for ln in message.splitlines() if ln.strip()]
            raise DeployError(f"flwr {args[0]}: {last[-1] if last else 'failed'}")
        return reply

    # -- SuperNodes --------------------------------------------------------------------------
    def node_key(self, partition_id: int) -> NodeKey:
        """The key pair of SuperNode ``partition_id`` (created on first use)."""
        return create_node_key(
            self.credentials / "keys", f"device-{partition_id}", comment=f"fedge-device-{partition_id}"
        )

    def register(self, key: NodeKey) -> int:
        """Register a SuperNode's public key with the SuperLink; returns the node id."""
        reply = self.flwr("supernode", "register", str(key.public))
        return int(reply["node-id"])

    def start_supernode(
        self,
        partition_id: int,
        num_partitions: int,
        key: NodeKey | None,
        *,
        insecure: bool | None = None,
        max_wait_time: float = CONNECT_TIMEOUT,
        max_retries: int | None = None,
        name: str | None = None,
        log_name: str | None = None,
        pins: Sequence[str] | None = None,
    ) -> SuperNodeHandle:
        """Start one SuperNode with its node config and its own Runtime API port.

        Parameters
        ----------
        partition_id, num_partitions : int
            Passed as ``--node-config "partition-id=<i> num-partitions=<n>"``;
            the ClientApp finds its store by the partition id.
        key : NodeKey or None
            Authentication key; ``None`` starts the node without one.
        insecure : bool, optional
            Plain text to the SuperLink; default: as the deployment.
        max_wait_time : float, default :data:`CONNECT_TIMEOUT`
            Exit when a request to the SuperLink has failed for this many seconds.
        max_retries : int, optional
            Also exit after this many failed retries of one request.
        name : str, optional
            Name of its folder (``FLWR_HOME``) and log file; default ``supernode-<partition id>``.
        log_name : str, optional
            Another name for the log file (a restarted node keeps its folder).
        pins : sequence of str, optional
            SHA-256 of the FABs this node may run; default: the deployment's
            app (:meth:`app_pins`), or any app if the deployment does not pin.
        """
        if max_wait_time <= 0:
            raise DeployError(f"max_wait_time must be positive, got {max_wait_time}")
        plain = self.tls is None if insecure is None else insecure
        label = name or f"supernode-{partition_id}"
        home = self.folder / label
        home.mkdir(exist_ok=True)
        runtime_port = free_port()
        argv = [
            str(self.bin_dir / "flower-supernode"),
            "--superlink", self.address,
            "--node-config", f"partition-id={int(partition_id)} num-partitions={int(num_partitions)}",
            "--isolation", "subprocess",
            "--host", "127.0.0.1",
            "--port", str(runtime_port),
        ]
        if plain:
            argv.append("--insecure")
        elif self.tls is not None:
            argv += ["--root-certificates", str(self.tls.ca_cert)]
        if key is not None:
            argv += ["--auth-supernode-private-key", str(key.private)]
        argv += ["--max-wait-time", str(max_wait_time)]
        if max_retries is not None:
            argv += ["--max-retries", str(int(max_retries))]
        env = {"FLWR_HOME": str(home)}
        allowed = self.app_pins() if pins is None else tuple(pins)
        if self.pin_app or pins is not None:
            from clients.app_pin import PIN_ENV, parse_pins, write_shim

            parse_pins(",".join(allowed))  # a malformed pin is the caller's error, here
            shim_dir = self.folder / "pinned-bin"
            write_shim(shim_dir)
            # The SuperNode's executor starts `flwr-clientapp` from PATH for every
            # message: the pinning one comes first.
            env["PATH"] = f"{shim_dir}{os.pathsep}{self.group.env.get('PATH', '')}"
            env[PIN_ENV] = ",".join(allowed)
        proc = self.group.start(log_name or label, argv, cwd=home, extra_env=env)
        handle = SuperNodeHandle(
            partition_id, proc, key, runtime_port, plain_to_tls=plain and self.tls is not None
        )
        self.supernodes.append(handle)
        return handle

    def app_pins(self) -> tuple[str, ...]:
        """SHA-256 of the FAB ``flwr run`` builds from :attr:`app_dir` (empty if not pinning).

        Computed once, when the first SuperNode starts: an app changed after that
        is a different app, and the devices refuse it.
        """
        if not self.pin_app:
            return ()
        if self._app_pins is None:
            from clients.app_pin import fab_sha256

            try:
                self._app_pins = (fab_sha256(self.app_dir),)
            except (OSError, ValueError) as exc:
                raise DeployError(f"cannot build the app at {self.app_dir}: {exc}") from None
        return self._app_pins

    def supernode(self, partition_id: int) -> SuperNodeHandle:
        """The running SuperNode of device ``partition_id``."""
        for node in self.supernodes:
            if node.partition_id == partition_id and node.process.running():
                return node
        raise DeployError(f"no running SuperNode for device {partition_id}")

    def kill_supernode(self, partition_id: int) -> None:
        """Kill a SuperNode and the ClientApp it is running, as a power cut would.

        The SuperLink is not told; it finds out when the node's heartbeats stop.
        The device's store and inbox stay on disk.
        """
        node = self.supernode(partition_id)
        home = self.folder / f"supernode-{partition_id}"
        self.group.kill(node.process, f"FLWR_HOME={home}")
        self.supernodes.remove(node)

    def node_status(self, node_id: int) -> str:
        """What the SuperLink says about a registered node (``online``, ``offline``, ...)."""
        for node in self.flwr("supernode", "list").get("nodes", []):
            if int(node.get("node-id", -1)) == node_id:
                return str(node.get("status", ""))
        return "unknown"

    def restart_supernode(
        self, partition_id: int, num_partitions: int, timeout: float = 150.0
    ) -> SuperNodeHandle:
        """Start a killed SuperNode again with its key and folder, and wait until it is back.

        The SuperLink refuses to activate a node it still counts as online, and it
        counts a killed node online until two of its heartbeats (30 s apart in
        Flower 1.42) are missed; so with node authentication this first waits for
        the SuperLink to see the node offline. The new process logs to
        ``supernode-<i>-restart<n>.log``.
        """
        deadline = time.monotonic() + timeout
        key = self.node_key(partition_id) if self.node_auth else None
        node_id = self.node_ids.get(partition_id)
        if key is not None and node_id is not None:
            while self.node_status(node_id) == "online":
                if time.monotonic() > deadline:
                    raise DeployError(f"the SuperLink still counts device {partition_id} online")
                time.sleep(2.0)
        restarts = len(list(self.group.log_dir.glob(f"supernode-{partition_id}-restart*.log")))
        node = self.start_supernode(
            partition_id,
            num_partitions,
            key,
            log_name=f"supernode-{partition_id}-restart{restarts + 1}",
        )
        while not node.activated():
            if not node.process.running():
                raise DeployError(node.process.describe_exit())
            if time.monotonic() > deadline:
                raise DeployError(f"device {partition_id} did not rejoin within {timeout:.0f} s")
            time.sleep(0.3)
        return node

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink sees online right now."""
        reply = self.flwr("supernode", "list")
        return sum(1 for node in reply.get("nodes", []) if node.get("status") == "online")

    def wait_online(
        self,
        count: int,
        timeout: float = 60.0,
        watch: Sequence[SuperNodeHandle] | None = None,
    ) -> None:
        """Wait until ``count`` SuperNodes are online.

        A watched SuperNode (default: every one started) that exits meanwhile is
        an error naming it.
        """
        deadline = time.monotonic() + timeout
        watched = self.supernodes if watch is None else list(watch)
        while True:
            for node in watched:
                if not node.process.running():
                    raise DeployError(node.describe_exit())
            # A SuperNode logs its id once the SuperLink accepted it; reading the
            # logs is cheap, so the SuperLink is asked only when they say so.
            if sum(node.activated() for node in watched) >= count and self.online_nodes() >= count:
                return
            if time.monotonic() > deadline:
                raise DeployError(
                    f"only {self.online_nodes()} of {count} SuperNodes online after {timeout:.0f} s; "
                    f"logs in {self.group.log_dir}"
                )
            time.sleep(0.3)

    # -- MLflow ------------------------------------------------------------------------------
    def start_mlflow(
        self,
        backend_uri: str,
        artifacts: Path,
        *,
        wait: bool = True,
        timeout: float = 180.0,
        auth: MlflowAuth | None = None,
    ) -> str:
        """Start an MLflow tracking server on loopback; returns its URL.

        With ``wait=False`` it returns at once; :meth:`wait_mlflow` waits for it
        later, so the server can start while the Flower processes do. With
        ``auth`` it runs MLflow's basic-auth app: every request needs the user
        name and password, which the SuperLink (and so the ServerApp) started
        after it gets in its environment.
        """
        exe = self.bin_dir / "mlflow"
        if not os.access(exe, os.X_OK):
            raise DeployError(f"mlflow not found in {self.bin_dir}; install mlflow into this environment")
        port = free_port()
        artifacts.mkdir(parents=True, exist_ok=True)
        self.mlflow = self.group.start(
            "mlflow",
            [
                str(exe), "server",
                "--host", "127.0.0.1",
                "--port", str(port),
                "--backend-store-uri", backend_uri,
                "--artifacts-destination", str(artifacts),
                "--workers", "1",
                *(["--app-name", "basic-auth"] if auth is not None else []),
            ],
            cwd=self.folder,
            extra_env=auth.server_env() if auth is not None else None,
        )
        self.mlflow_auth = auth
        self.mlflow_url = f"http://127.0.0.1:{port}"
        if wait:
            self.wait_mlflow(timeout)
        return self.mlflow_url

    def wait_mlflow(self, timeout: float = 180.0) -> None:
        """Wait until the MLflow server started by :meth:`start_mlflow` answers."""
        if self.mlflow is None:
            raise DeployError("no MLflow server was started")
        self._wait_http(f"{self.mlflow_url}/health", self.mlflow, timeout)


def start_deployment(
    folder: Path,
    output_dir: Path,
    n_devices: int,
    *,
    credentials: Path | None = None,
    insecure: bool = False,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    tracking_uri: str = "",
    on_status: Callable[[str], None] | None = None,
    mlflow_auth: bool = False,
) -> LocalDeployment:
    """Start an MLflow server (unless ``tracking_uri``), a SuperLink and ``n_devices`` SuperNodes.

    Returns the running deployment (its :attr:`LocalDeployment.tracking_uri` says
    where runs are tracked); the caller submits runs and stops it. Nothing is left
    running if a step fails. SuperNodes run only this project's app. With
    ``mlflow_auth`` the MLflow server needs a password (``fedge deploy`` turns it
    on; a caller that reads the server itself then needs
    :meth:`MlflowAuth.client_env` of :attr:`LocalDeployment.mlflow_auth`).
    """
    say = on_status or (lambda _msg: None)
    dep = LocalDeployment(folder, credentials=credentials, insecure=insecure, hosts=hosts)
    try:
        dep.tracking_uri = tracking_uri
        if not tracking_uri:
            auth = None
            if mlflow_auth:
                auth = ensure_mlflow_auth(dep.credentials / "mlflow")
            say(f"starting the MLflow tracking server{' (basic auth)' if auth else ''}")
            dep.tracking_uri = dep.start_mlflow(
                f"sqlite:///{output_dir / 'mlflow.db'}",
                output_dir / "mlartifacts",
                wait=False,
                auth=auth,
            )
        say(f"starting the SuperLink ({'plain text' if insecure else 'TLS, SuperNode auth'})")
        dep.start_superlink()
        say(f"starting {n_devices} SuperNodes")
        for device in range(n_devices):
            key = None
            if dep.node_auth:
                key = dep.node_key(device)
                dep.node_ids[device] = dep.register(key)
            dep.start_supernode(device, n_devices, key)
        if dep.mlflow is not None:
            dep.wait_mlflow()
        dep.wait_online(n_devices)
    except BaseException:
        dep.stop()
        raise
    return dep
