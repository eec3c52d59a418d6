"""Start long-running processes and make sure none of them outlives the deployment.

Flower's SuperLink and SuperNode start helpers of their own (``flower-superexec``
in a new session, ``flwr-serverapp`` and ``flwr-clientapp`` below it). Every
process this module starts carries a marker in its environment, which all those
helpers inherit, so :meth:`ProcessGroup.stop` finds them wherever they were
re-parented. A small guardian process does the same sweep if the Python process
that owns the group dies without stopping it (for example a killed test run).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MARKER_ENV = "FEDGE_DEPLOYMENT_ID"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FLOWER_EXIT = re.compile(r"Exit Code: (\d+)")

_GUARDIAN = r"""
import os, signal, sys, time
marker = ("%s=" % sys.argv[1]).encode() + sys.argv[2].encode()
data = b""
while True:
    chunk = os.read(0, 64)
    if not chunk:
        break
    data += chunk
    if b"done" in data:
        sys.exit(0)
def marked():
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open("/proc/%s/environ" % entry, "rb") as fh:
                    if marker in fh.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    return found
for sig, pause in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.0)):
    for pid in marked():
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    time.sleep(pause)
"""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, or a note that it is missing."""
    try:
        with path.open("r", encoding="utf-8", errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines))
    except OSError:
        return f"<no log at {path}>"


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM the child when the process that started it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _marked(marker: str, also: str | None = None) -> list[int]:
    needle = f"{MARKER_ENV}={marker}".encode()
    extra = also.encode() if also is not None else None
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in env and state not in (b"Z", b"X") and (extra is None or extra in env):
            found.append(int(entry))
    return found


@dataclass
class ManagedProcess:
    """A process the group started, with its name and log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        """Process id."""
        return int(self.popen.pid)

    def running(self) -> bool:
        """Whether the process has not exited yet."""
        return self.popen.poll() is None

    def describe_exit(self) -> str:
        """One line: the exit code and why, from the log.

        Flower ends a failed process with ``Exit Code: N`` and a few lines of
        explanation; those are joined into the line. Otherwise the last line
        that mentions an error or a code is used.
        """
        lines = [_ANSI.sub("", ln).strip() for ln in tail(self.log, 60).splitlines()]
        lines = [ln for ln in lines if ln]
        for at in range(len(lines) - 1, -1, -1):
            found = _FLOWER_EXIT.search(lines[at])
            if found is None:
                continue
            why = []
            for ln in lines[at + 1 :]:
                if ln.startswith(("For more information", "INFO", "WARNING")):
                    break
                why.append(ln)
            if why:
                reason = " ".join(why)
                return (
                    f"{self.name} exited with code {self.popen.returncode} "
                    f"(Flower exit code {found.group(1)}: {reason}); log: {self.log}"
                )
        hint = next(
            (ln for ln in reversed(lines) if "ERROR" in ln or "rror" in ln or "code" in ln),
            lines[-1] if lines else "",
        )
        return f"{self.name} exited with code {self.popen.returncode} ({hint}); log: {self.log}"


@dataclass
class ProcessGroup:
    """Processes of one deployment; :meth:`stop` ends them and everything they started.

    Parameters
    ----------
    env : mapping of str to str
        Environment for every process (the marker is added).
    log_dir : Path
        Where each process's output goes (``<name>.log``).
    """

    env: Mapping[str, str]
    log_dir: Path
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    processes: list[ManagedProcess] = field(default_factory=list)
    _guardian: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._guardian = subprocess.Popen(
            [sys.executable, "-c", _GUARDIAN, MARKER_ENV, self.marker],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={k: v for k, v in os.environ.items() if k != MARKER_ENV},
        )

    def start(
        self, name: str, argv: Sequence[str], *, cwd: Path | None = None, extra_env: Mapping[str, str] | None = None
    ) -> ManagedProcess:
        """Start ``argv`` in a session of its own, output to ``<log_dir>/<name>.log``."""
        env = dict(self.env)
        env.update(extra_env or {})
        env[MARKER_ENV] = self.marker
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
        proc = ManagedProcess(name, popen, log)
        self.processes.append(proc)
        return proc

    def run(
        self, name: str, argv: Sequence[str], *, timeout: float = 60.0, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command to completion (with the marker) and capture its output."""
        env = dict(self.env)
        env[MARKER_ENV] = self.marker
        try:
            return subprocess.run(
                list(argv),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(list(argv), -9, str(exc.stdout or ""), f"{name} timed out")

    def alive(self) -> list[int]:
        """Live processes of this group, including helpers the started ones spawned."""
        return _marked(self.marker)

    def kill(self, proc: ManagedProcess, env_entry: str, timeout: float = 10.0) -> None:
        """SIGKILL ``proc`` and every helper of this group whose environment has ``env_entry``.

        This is a crash, not a shutdown: nothing gets a chance to clean up. The
        helpers are found by an environment entry they inherited (e.g. the
        process's own ``FLWR_HOME=...``).
        """
        pids = [proc.pid, *_marked(self.marker, env_entry)]
        deadline = time.monotonic() + timeout
        while pids and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            proc.popen.poll()
            time.sleep(0.1)
            pids = _marked(self.marker, env_entry)  # a helper may have started one meanwhile
        proc.popen.wait(timeout=timeout)

    def stop(self, grace: float = 5.0) -> list[int]:
        """SIGTERM the started processes, then everything with the marker; SIGKILL what stays.

        Returns
        -------
        list of int
            Processes still alive afterwards (empty unless the kernel refused).
        """
        for proc in reversed(self.processes):
            if proc.running():
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except OSError:
                    pass
        self._wait_gone(grace)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for pid in self.alive():
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            self._wait_gone(wait)
        for proc in self.processes:
            try:
                proc.popen.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        left = self.alive()
        if self._guardian is not None and self._guardian.stdin is not None:
            try:
                self._guardian.stdin.write(b"done")
                self._guardian.stdin.close()
            except OSError:
                pass
            try:
                self._guardian.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._guardian.kill()
                self._guardian.wait()
            self._guardian = None
        return left

    def _wait_gone(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for proc in self.processes:
                proc.popen.poll()
            if not self.alive():
                return
            time.sleep(0.1)
