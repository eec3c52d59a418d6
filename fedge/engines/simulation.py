"""Flower's simulation engine: the same ServerApp and ClientApp run by `flwr run`.

``fedge run --engine simulation`` comes here. It runs this project's Flower app
(``[tool.flwr.app]`` in ``pyproject.toml``) on Flower's Ray simulation and
blocks until the run has finished; the ServerApp writes ``summary.json`` into
the run folder, exactly as on the in-process engine.

Design
------
* Every call gets its own throw-away ``FLWR_HOME`` (Flower config, installed FABs,
  SuperLink state DB + log, Ray temp dir), so calls are isolated from ``~/.flwr`` and
  from each other.
* We start the SuperLink ourselves with the same command line that `flwr run` uses for
  its "managed local SuperLink" (``flower-superlink --insecure --simulation ...``), on a
  free port, and point `flwr run` at it through an explicit connection in
  ``$FLWR_HOME/config.toml``. So we own its PID, nothing is left in the background,
  and `flwr run` never spawns a detached SuperLink that we don't know about.
* `flwr run --stream` exits 0 even if the ServerApp raises, so success is decided by
  the run status reported by ``flwr list --run-id <id> --format json``
  (``finished:completed``).
* Cleanup: `flwr-simulation` and all Ray processes live in the session of the
  SuperExec, which (like the SuperLink) starts its own session. We record those
  session ids while the run is going; on exit we stop the `flwr run` client (the
  SuperLink's graceful shutdown waits for its log stream), SIGTERM the SuperLink, and
  then SIGTERM->SIGKILL every process still in those sessions, below the SuperLink, or
  carrying our marker env var. Ray's agents ignore SIGTERM and get re-parented to
  init when a run is stopped/killed mid-way, hence the session sweep.
* On timeout the run is stopped with ``flwr stop <run-id>`` first.
* If the calling process itself is killed (e.g. SIGKILL by a test timeout), the
  SuperLink and `flwr run` get SIGTERM via PR_SET_PDEATHSIG, and a small guardian
  process (which notices the closed pipe) kills whatever is left in the tracked
  sessions (flwr-simulation + Ray would otherwise survive).

Linux only (uses /proc). Needs the venv's ``flwr`` and ``flower-superlink`` scripts;
by default they are taken from the directory of ``sys.executable``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from pathlib import Path

from fedge.engines import EngineError

_MARKER_ENV = "FEDGE_FLWR_SIM_ID"
_RUN_ID_RE = re.compile(r"Successfully started run (\d+)")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


# --------------------------------------------------------------------------- helpers
def _toml_value(value: str | float | bool) -> str:
    """Render one run-config value as a TOML literal."""
    if isinstance(value, bool):  # must precede int (bool is an int subclass)
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are valid TOML basic-string escapes
        return json.dumps(value, ensure_ascii=True)
    raise TypeError(f"Unsupported run-config value type: {type(value).__name__}")


def _write_run_config_toml(run_config: dict[str, str | int | float | bool], path: Path) -> None:
    """Write overrides as a TOML file; keys are quoted so dotted keys stay flat."""
    lines = [f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in run_config.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 60) -> str:
    try:
        with path.open("r", encoding="utf-8", errors="replace") as fh:
            return _ANSI_RE.sub("", "".join(deque(fh, maxlen=n)))
    except OSError:
        return "<no log>"


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, session id, state) for all processes (from /proc/<pid>/stat)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            # fields: state ppid pgrp session ...
            table[int(entry)] = (int(fields[1]), int(fields[3]), fields[0].decode())
        except (OSError, IndexError, ValueError):
            continue
    return table


def _descendants(root: int, table: dict[int, tuple[int, int, str]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in out:
                out.add(child)
                stack.append(child)
    return out


def _has_marker(pid: int, marker: str) -> bool:
    # NB: processes that rewrite their title (Ray's ``ray::*`` workers/agents) may
    # clobber their /proc environ, hence we also track sessions and descendants.
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return f"{_MARKER_ENV}={marker}".encode() in fh.read().split(b"\0")
    except OSError:
        return False


class _ProcessTracker:
    """Remembers every session created below our SuperLink, to find all leftovers.

    flower-superlink and flower-superexec each start a new session
    (``start_new_session=True``); flwr-simulation and all Ray processes stay in the
    SuperExec's session even after being re-parented to init.
    """

    def __init__(self, root: int, marker: str) -> None:
        self.root, self.marker = root, marker
        self.sessions: set[int] = {root}

    def snapshot(self) -> None:
        table = _proc_table()
        self.sessions |= {table[p][1] for p in _descendants(self.root, table)}

    def alive(self) -> list[int]:
        me = os.getpid()
        table = _proc_table()
        desc = _descendants(self.root, table) | {self.root}
        return sorted(
            pid for pid, (_, sid, state) in table.items()
            if pid != me and state not in ("Z", "X")
            and (pid in desc or sid in self.sessions or _has_marker(pid, self.marker))
        )

    def kill_all(self, grace: float) -> None:
        """SIGTERM every tracked live process, then SIGKILL what survives `grace` s."""
        self.snapshot()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.alive():
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
            while time.monotonic() < deadline and self.alive():
                time.sleep(0.1)


def _die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGTERM the child if this Python process dies
    (e.g. a test runner is killed), so no SuperLink is left behind (Linux only)."""
    try:
        import ctypes  # pylint: disable=import-outside-toplevel

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _wait_http_ok(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                if 200 <= resp.status < 300:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"flower-superlink not healthy at {url} within {timeout:.0f}s")


def _run_status(flwr: str, run_id: str, env: dict[str, str], cwd: Path) -> tuple[str, str]:
    """Return (status, status-details) of a run, e.g. ('finished:completed', 'N/A')."""
    proc = subprocess.run(
        [flwr, "list", "--run-id", run_id, "--format", "json"],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
    )
    try:
        run = json.loads(proc.stdout)["runs"][0]
        return str(run["status"]), str(run.get("status-details", ""))
    except (ValueError, KeyError, IndexError) as err:
        return "unknown", f"cannot parse `flwr list` output ({err}): {proc.stdout}{proc.stderr}"


# Watchdog run in a separate process. It tracks the sessions created below the
# SuperLink; if the calling Python process dies without saying "done" on the pipe
# (e.g. SIGKILL by a test timeout), it kills everything in those sessions.
_GUARDIAN_SRC = r"""
import os, select, shutil, signal, sys, time
root = int(sys.argv[1]); sessions = {root}
def table():
    t = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                f = open(f"/proc/{e}/stat", "rb").read().rsplit(b")", 1)[1].split()
                t[int(e)] = (int(f[1]), int(f[3]), f[0])
            except Exception:
                pass
    return t
def desc(t):
    out, stack = set(), [root]
    while stack:
        p = stack.pop()
        for c, (pp, _, _) in t.items():
            if pp == p and c not in out:
                out.add(c); stack.append(c)
    return out
buf = b""
while True:
    t = table(); d = desc(t)
    sessions |= {t[p][1] for p in d if p in t}
    r, _, _ = select.select([0], [], [], 0.5)
    if r:
        chunk = os.read(0, 1024)
        buf += chunk
        if b"done" in buf:
            sys.exit(0)
        if not chunk:
            break  # parent died without saying "done"
for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.0)):
    t = table()
    victims = {p for p, (_, sid, st) in t.items() if st not in (b"Z", b"X")
               and (sid in sessions or p in desc(t) or p == root)} - {os.getpid()}
    for p in victims:
        try: os.kill(p, sig)
        except Exception: pass
    time.sleep(wait)
if len(sys.argv) > 2:
    shutil.rmtree(sys.argv[2], ignore_errors=True)
"""


# ------------------------------------------------------------------------ main API
def run_flower_simulation(  # pylint: disable=too-many-arguments,too-many-locals
    run_config: dict[str, str | int | float | bool],
    num_supernodes: int,
    *,
    log_dir: Path | None = None,
    timeout: float = 3600.0,
    app_dir: Path | None = None,
    log_file: Path | None = None,
    client_num_cpus: int = 1,
    client_num_gpus: float = 0.0,
    bin_dir: Path | None = None,
    keep_flwr_home: bool = False,
) -> None:
    """Run the Flower app in `app_dir` with `flwr run` on the Simulation Runtime.

    Blocks until the run has finished. Raises RuntimeError (with the tail of the log)
    if the run fails, times out, or cannot be started. Leaves no Flower/Ray process.

    run_config keys must exist in [tool.flwr.app.config] of the app's pyproject.toml;
    nested keys are given flattened with dots (e.g. {"model.dim": 16}).
    """
    from fedge.contracts.config import PROJECT_ROOT

    app_dir = Path(app_dir or PROJECT_ROOT).expanduser().resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise EngineError(
            f"the simulation engine runs the Flower app of a fedge source checkout; "
            f"no pyproject.toml in {app_dir}"
        )
    if log_dir is not None and log_file is None:
        log_file = Path(log_dir) / "flower-simulation.log"
    if num_supernodes < 1 or client_num_cpus < 1:
        raise ValueError("num_supernodes and client_num_cpus must be >= 1")

    bin_dir = Path(bin_dir) if bin_dir else Path(sys.executable).parent
    flwr = str(bin_dir / "flwr")
    superlink_exe = str(bin_dir / "flower-superlink")
    for exe in (flwr, superlink_exe):
        if not os.access(exe, os.X_OK):
            raise EngineError(f"Executable not found: {exe}")

    # Short path: Ray's unix-socket paths under RAY_TMPDIR must stay < 107 bytes
    home = Path(tempfile.mkdtemp(prefix="flwr-"))
    log_path: Path = Path(log_file) if log_file else home / "flwr-run.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    marker = uuid.uuid4().hex
    port = _free_port()

    env = os.environ.copy()
    env.update(
        {
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            # Only used if `flwr` ever falls back to a managed `:local:` SuperLink
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
            "RAY_TMPDIR": str(home / "ray"),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            # SuperLink spawns `flower-superexec` / `flwr-simulation` via PATH
            "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
            _MARKER_ENV: marker,
        }
    )

    # Explicit (user-managed) connection: `flwr` will not spawn its own SuperLink
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "sim"\n\n'
        f'[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n',
        encoding="utf-8",
    )
    overrides_toml = home / "run-config-overrides.toml"
    _write_run_config_toml(run_config, overrides_toml)
    sl_dir = home / "local-superlink"
    sl_dir.mkdir()

    superlink: subprocess.Popen | None = None
    guardian: subprocess.Popen | None = None
    tracker: _ProcessTracker | None = None
    runner: subprocess.Popen | None = None
    run_id: str | None = None
    error: str | None = None
    t_start = time.monotonic()

    def find_run_id() -> str | None:
        m = _RUN_ID_RE.search(_ANSI_RE.sub("", log_path.read_text(errors="replace")))
        return m.group(1) if m else None

    try:
        with log_path.open("w", encoding="utf-8") as log_fh:
            superlink = subprocess.Popen(  # pylint: disable=consider-using-with
                [
                    superlink_exe, "--insecure", "--simulation",
                    "--isolation", "subprocess",
                    "--host", "127.0.0.1", "--port", str(port),
                    "--database", str(sl_dir / "state.db"),
                    "--log-file", str(sl_dir / "superlink.log"),
                    "--disable-runtime-dependency-installation",
                ],
                env=env, cwd=app_dir, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
            tracker = _ProcessTracker(superlink.pid, marker)
            guardian_env = {k: v for k, v in env.items() if k != _MARKER_ENV}
            guardian = subprocess.Popen(  # pylint: disable=consider-using-with
                [sys.executable, "-c", _GUARDIAN_SRC, str(superlink.pid)]
                + ([] if keep_flwr_home else [str(home)]),
                env=guardian_env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
            )
            _wait_http_ok(f"http://127.0.0.1:{port}/health", superlink,
                          timeout=min(60.0, max(timeout, 1.0)))

            cmd = [
                flwr, "run", str(app_dir), "--stream",
                "--federation-config",
                (
                    f"num-supernodes={int(num_supernodes)} "
                    f"client-resources-num-cpus={int(client_num_cpus)} "
                    f"client-resources-num-gpus={float(client_num_gpus)}"
                ),
            ]
            if run_config:
                cmd += ["--run-config", str(overrides_toml)]
            log_fh.write("$ " + " ".join(cmd) + "\n")
            log_fh.flush()
            runner = subprocess.Popen(  # pylint: disable=consider-using-with
                cmd, env=env, cwd=app_dir, stdin=subprocess.DEVNULL,
                stdout=log_fh, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
            deadline = t_start + timeout
            while runner.poll() is None and time.monotonic() < deadline:
                tracker.snapshot()  # remember sessions of SuperExec & co.
                time.sleep(0.5)
            rc = runner.poll()
            run_id = find_run_id()

            if rc is None:
                error = f"timed out after {timeout:.0f}s"
                if run_id:  # ask Flower to stop the run so Ray shuts down cleanly
                    subprocess.run([flwr, "stop", run_id], env=env, cwd=app_dir,
                                   capture_output=True, timeout=30, check=False)
                    stop_deadline = time.monotonic() + 20
                    while time.monotonic() < stop_deadline:
                        tracker.snapshot()
                        if _run_status(flwr, run_id, env, app_dir)[0].startswith("finished"):
                            break
                        time.sleep(1)
            elif rc != 0:
                error = f"`flwr run` exited with code {rc}"
            elif run_id is None:
                error = "could not find the run ID in the `flwr run` output"
            else:
                status, details = _run_status(flwr, run_id, env, app_dir)
                if status != "finished:completed":
                    error = f"run {run_id} ended with status {status!r}: {details}"
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        error = f"{type(err).__name__}: {err}"
    finally:
        # 1) the log-streaming client first: SuperLink's graceful shutdown
        #    (uvicorn) waits for open connections such as this log stream
        if runner is not None and runner.poll() is None:
            runner.terminate()
            try:
                runner.wait(timeout=5)
            except subprocess.TimeoutExpired:
                runner.kill()
                runner.wait()
        # 2) SuperLink, SuperExec, flwr-simulation, Ray (incl. re-parented orphans)
        if tracker is not None:
            tracker.snapshot()
            if superlink is not None and superlink.poll() is None:
                superlink.terminate()
                try:
                    superlink.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            tracker.kill_all(grace=3.0)
            if superlink is not None:
                try:
                    superlink.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            leftovers = tracker.alive()
            if leftovers and error is None:
                error = f"processes left over after cleanup: {leftovers}"
        if guardian is not None and guardian.stdin is not None:
            try:
                guardian.stdin.write(b"done")
                guardian.stdin.close()
            except OSError:
                pass
            try:
                guardian.wait(timeout=5)
            except subprocess.TimeoutExpired:
                guardian.kill()
                guardian.wait()
        if error is not None and log_path.parent == home:
            # keep the log: the temp home is about to be deleted
            kept = Path(tempfile.gettempdir()) / f"flwr-run-{marker[:8]}.log"
            shutil.copyfile(log_path, kept)
            log_path = kept
        if not keep_flwr_home:
            shutil.rmtree(home, ignore_errors=True)

    if error is not None:
        raise EngineError(
            f"Flower simulation failed: {error}; log: {log_path}\n"
            f"--- last lines of {log_path} ---\n{_tail(log_path)}"
        )
