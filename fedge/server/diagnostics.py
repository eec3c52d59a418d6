"""Remote diagnostics in the run folder: requests in, devices' answers out.

``fedge diagnose RUN_DIR DEVICE`` appends a request to
``<run dir>/diagnostics/requests.jsonl``; the ServerApp's federation reads the
pending requests at every poll (:class:`DiagnosticsDesk`), sets
:data:`~fedge.contracts.protocol.DIAGNOSE` in that device's query, and writes the
answer to ``<run dir>/diagnostics/device-<device>-tick-<tick>.json``. Both files
are owner-only (0600, the folder 0700); a request names a device by its integer
id, so a path built from it cannot leave the folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from fedge.contracts.diagnostics import DeviceDiagnostics

log = logging.getLogger("fedge.server")

DIAGNOSTICS_DIR = "diagnostics"
REQUESTS_FILE = "requests.jsonl"
_ANSWER = re.compile(r"device-(\d{1,9})-tick-(\d{1,9})\.json")
_DEVICE = re.compile(r"\d{1,9}")


class DiagnosticsError(ValueError):
    """A bad device id, a run folder without devices, no answer yet (one line)."""


def parse_device(text: str) -> int:
    """A device id as an operator typed it: a non-negative integer, else one line."""
    if not _DEVICE.fullmatch(text.strip()):
        raise DiagnosticsError(f"device {text!r}: expected a device number such as 3")
    return int(text)


def folder_of(run_dir: Path) -> Path:
    """``<run dir>/diagnostics``, checked to stay inside the run folder."""
    root = run_dir.resolve()
    folder = (root / DIAGNOSTICS_DIR).resolve()
    if not folder.is_relative_to(root):  # a symlinked folder pointing elsewhere
        raise DiagnosticsError(f"{folder}: the diagnostics folder leaves the run folder")
    return folder


def answer_path(run_dir: Path, device: int, tick: int) -> Path:
    """Where the answer of ``device`` at ``tick`` is kept (ints only: it stays in the folder)."""
    return folder_of(run_dir) / f"device-{int(device)}-tick-{int(tick)}.json"


def _private_folder(folder: Path) -> None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)


def _write_private(path: Path, text: str, append: bool = False) -> None:
    """Write (or append) ``text`` to an owner-only file, created 0600 from the start."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "a" if append else "w", encoding="utf-8") as f:
        f.write(text)
    path.chmod(0o600)


def request_diagnostics(run_dir: Path, device: int, known: set[int]) -> dict[str, Any]:
    """Ask ``device`` for its summary at its next poll; ``known``: the run's devices.

    Raises
    ------
    DiagnosticsError
        When the device is not one of the run's.
    """
    if device not in known:
        listed = ", ".join(str(d) for d in sorted(known)[:10]) + (" ..." if len(known) > 10 else "")
        raise DiagnosticsError(f"device {device}: not a device of this run (devices: {listed or 'none yet'})")
    folder = folder_of(run_dir)
    _private_folder(folder)
    request = {"id": uuid.uuid4().hex, "device": device, "requested_at": time.time()}
    _write_private(folder / REQUESTS_FILE, json.dumps(request) + "\n", append=True)
    return request


def answers(run_dir: Path, device: int | None = None) -> list[dict[str, Any]]:
    """The answers kept in the run folder (of ``device`` only when given), oldest tick first."""
    folder = folder_of(run_dir)
    found = []
    for path in folder.glob("device-*-tick-*.json") if folder.is_dir() else ():
        m = _ANSWER.fullmatch(path.name)
        if m is None or (device is not None and int(m.group(1)) != device):
            continue
        try:
            found.append((int(m.group(2)), json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable diagnostics answer, skipped: %s", path, exc)
    return [answer for _, answer in sorted(found, key=lambda pair: pair[0])]


class DiagnosticsDesk:
    """The server's side: which devices owe a summary, and where their answers go.

    Parameters
    ----------
    run_dir : Path or None
        The run folder (None: no folder, so no requests).
    """

    def __init__(self, run_dir: Path | None) -> None:
        self.run_dir = run_dir
        #: device -> the id of its oldest unanswered request.
        self.pending: dict[int, str] = {}
        self._offset = 0
        self._answered: set[str] = set()
        if run_dir is not None:
            # A restarted server must not ask again what was answered before it stopped.
            self._answered = {str(a.get("request", "")) for a in answers(run_dir)}

    def refresh(self) -> dict[int, str]:
        """Read requests appended since the last look (cheap when the file did not grow)."""
        if self.run_dir is None:
            return self.pending
        path = folder_of(self.run_dir) / REQUESTS_FILE
        try:
            size = path.stat().st_size
        except OSError:
            return self.pending  # nobody asked yet
        if size <= self._offset:
            return self.pending
        with path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read(size - self._offset)
        # Only whole lines: a request being written is read at the next poll.
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        for line in chunk[:end].splitlines():
            try:
                request = json.loads(line)
                device, rid = request["device"], str(request["id"])
                if isinstance(device, bool) or not isinstance(device, int):
                    raise TypeError("device is not an int")
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("%s: unreadable diagnostics request, skipped: %s", path, exc)
                continue
            if rid not in self._answered:
                self.pending.setdefault(device, rid)
        return self.pending

    def answered(self, diagnostics: DeviceDiagnostics, digest: str) -> dict[str, Any] | None:
        """Keep a device's answer in the run folder; returns what was written (None: unasked).

        ``digest`` is the server's own config digest: the answer says whether the
        device runs the same configuration.
        """
        request = self.pending.pop(diagnostics.device, None)
        if request is None or self.run_dir is None:
            return None
        self._answered.add(request)
        answer = {
            "request": request,
            "received_at": time.time(),
            "config_matches_server": diagnostics.config_digest == digest,
            **diagnostics.to_json(),
        }
        _private_folder(folder_of(self.run_dir))
        path = answer_path(self.run_dir, diagnostics.device, diagnostics.tick)
        _write_private(path, json.dumps(answer, indent=2, sort_keys=True) + "\n")
        return answer


def run_devices(run_dir: Path) -> set[int]:
    """The devices of a run folder, as its fleet register knows them."""
    from fedge.server.fleet import FLEET_FILE, FleetRegister

    if not run_dir.is_dir():
        raise DiagnosticsError(f"{run_dir}: no such run folder")
    path = run_dir / FLEET_FILE
    if not path.is_file():
        raise DiagnosticsError(f"{run_dir}: no fleet register ({FLEET_FILE}); is it a fedge run folder?")
    try:
        return set(FleetRegister.load(path).devices)
    except (OSError, ValueError) as exc:
        raise DiagnosticsError(f"{path}: cannot read: {exc}") from None


def diagnose(run_dir: Path, device_text: str, show: bool = False) -> str:
    """``fedge diagnose``: file a request (or, with ``show``, the latest answer) as text."""
    device = parse_device(device_text)
    known = run_devices(run_dir)
    if not show:
        request_diagnostics(run_dir, device, known)
        return (
            f"asked device {device} for diagnostics; it answers at its next poll "
            f"(`fedge diagnose {run_dir} {device} --show`)"
        )
    if device not in known:
        raise DiagnosticsError(f"device {device}: not a device of this run")
    found = answers(run_dir, device)
    if not found:
        raise DiagnosticsError(f"device {device}: no diagnostics answer yet")
    latest = found[-1]
    lines = [f"device {device} diagnostics at tick {latest.get('tick')}"]
    for key in sorted(latest):
        if key not in ("device", "tick"):
            value = latest[key]
            lines.append(f"  {key:<22} {json.dumps(value) if isinstance(value, dict) else value}")
    return "\n".join(lines)
