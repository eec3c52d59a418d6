"""The fleet register: every device's latest health, its history and its status.

The federation feeds it each poll (:meth:`FleetRegister.observe` for a reply,
:meth:`FleetRegister.observe_error` for an error reply) and closes the tick with
:meth:`FleetRegister.end_tick`, which decides every device's status:

========== ===============================================================================
status     when (the first that holds, in this order)
========== ===============================================================================
stale      not heard from for ``fleet.stale_ticks`` ticks (or never)
failing    its latest reply was an error, or it refused a model or failed a handler since
           its previous health
degraded   its live accuracy is below ``fleet.degraded_floor``
drifting   a drift signal fired on its latest tick
healthy    none of these
========== ===============================================================================

Everything observed is appended to ``fleet.jsonl`` in the run folder (owner-only,
one JSON object a line, never unpickled), so a restarted server, and ``fedge
fleet RUN_DIR``, rebuild the same register by replaying it (:meth:`FleetRegister.load`).
Nothing here imports Flower or MLflow.
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.contracts.config import FleetConfig
from fedge.contracts.protocol import DeviceHealth, DriftReport

log = logging.getLogger("fedge.server")

FLEET_FILE = "fleet.jsonl"
#: The fleet table at the end of a run (also an MLflow artifact).
TABLE_FILE = "fleet.json"
STATUSES: tuple[str, ...] = ("healthy", "drifting", "degraded", "failing", "stale")


def health_from_report(report: DriftReport) -> DeviceHealth:
    """What a device's report alone says of its health (a device that sends no ``health``)."""
    accuracy = report.accuracy
    estimated = accuracy is None and report.estimate is not None
    if accuracy is None:
        accuracy = report.estimate
    return DeviceHealth(
        device=report.device,
        tick=report.tick,
        model_version=report.model_version,
        models_refused=report.models_refused,
        live_accuracy=-1.0 if accuracy is None else accuracy,
        accuracy_estimated=estimated,
        drifting=bool(report.signals),
        drifts_total=report.drifts_total,
        rejected_non_finite=report.rejected_non_finite,
        rejected_wrong_width=report.rejected_wrong_width,
        rejected_unknown_label=report.rejected_unknown_label,
        store_rows=report.window_size,
    )


@dataclass
class DeviceEntry:
    """One device in the register.

    ``history`` holds one compact row per tick it was seen or failed
    (tick, status, version, accuracy, drifting, error), at most ``fleet.history``.
    """

    device: int
    limit: int
    health: DeviceHealth | None = None
    last_seen: int | None = None
    status: str = "stale"
    error: str = ""
    error_tick: int | None = None
    #: Tick at which its refusal or failure count last rose.
    trouble_tick: int | None = None
    versions: deque[tuple[int, int]] = field(default_factory=deque)
    drifts: deque[int] = field(default_factory=deque)
    errors: deque[tuple[int, str]] = field(default_factory=deque)
    history: deque[dict[str, Any]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        for name in ("versions", "drifts", "errors", "history"):
            setattr(self, name, deque(getattr(self, name), maxlen=self.limit))

    def row(self) -> dict[str, Any]:
        """The device's line of the fleet table."""
        h = self.health
        return {
            "device": self.device,
            "status": self.status,
            "version": h.model_version if h else 0,
            "verified": h.model_verified if h else False,
            "last_seen": self.last_seen,
            "accuracy": h.accuracy if h else None,
            "estimated": h.accuracy_estimated if h else False,
            "drifting": h.drifting if h else False,
            "drifts": h.drifts_total if h else 0,
            "refused": h.models_refused if h else 0,
            "errors": len(self.errors),
            "last_error": self.error or (h.error_kind if h and h.last_error else ""),
            "outbox": h.outbox_reports if h else 0,
            "resident_mb": round(h.resident_bytes / 2**20, 1) if h else 0.0,
        }


class FleetRegister:
    """Every device's latest health, history and status, kept with the run.

    Parameters
    ----------
    cfg : FleetConfig
        ``stale_ticks``, ``degraded_floor`` and ``history`` (see the module docstring).
    path : Path, optional
        The register's file (``<run>/fleet.jsonl``); what it already holds is
        replayed first (a resumed run). None keeps the register in memory.
    """

    def __init__(self, cfg: FleetConfig, path: Path | None = None) -> None:
        self.cfg = cfg
        self.path = path
        self.devices: dict[int, DeviceEntry] = {}
        self.last_tick: int | None = None
        self.counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        self._pending: list[dict[str, Any]] = []
        if path is not None and path.exists():
            self._replay(_read_lines(path))
            self.cfg = cfg  # replayed under the settings it was written with; this run's from now
        elif path is not None:
            self._pending.append({"t": -1, "kind": "config", **_settings(cfg)})

    def __repr__(self) -> str:
        return f"FleetRegister(devices={len(self.devices)}, last_tick={self.last_tick}, path={self.path})"

    @classmethod
    def load(cls, path: Path, cfg: FleetConfig | None = None) -> FleetRegister:
        """The register a run folder's ``fleet.jsonl`` holds (read-only use: nothing is written)."""
        register = cls(cfg or FleetConfig())
        register._replay(_read_lines(path))
        return register

    # -- observing ---------------------------------------------------------------------------
    def entry(self, device: int) -> DeviceEntry:
        """The device's entry, made on first sight."""
        found = self.devices.get(device)
        if found is None:
            found = self.devices[device] = DeviceEntry(device, self.cfg.history)
        return found

    def observe(self, tick: int, report: DriftReport, health: DeviceHealth | None = None) -> None:
        """A device replied at ``tick`` with ``report`` (and its ``health``, when it sends one)."""
        health = health if health is not None else health_from_report(report)
        self._observe(tick, health)
        self._pending.append({"t": tick, "kind": "health", "health": health.to_dict()})

    def observe_error(self, tick: int, device: int, error: str) -> None:
        """A device answered ``tick``'s poll with an error (its type and first line)."""
        self._error(tick, device, error)
        self._pending.append({"t": tick, "kind": "error", "device": device, "error": error})

    def _observe(self, tick: int, health: DeviceHealth) -> None:
        e = self.entry(health.device)
        before = e.health
        if health.model_version and (before is None or before.model_version != health.model_version):
            e.versions.append((tick, health.model_version))
        rose = before is not None and (
            health.models_refused > before.models_refused
            # A lower count is a restarted device process, not a new failure.
            or health.errors_total > before.errors_total
        )
        if rose or (before is None and (health.models_refused or health.errors_total)):
            e.trouble_tick = tick
        if health.drifting:
            e.drifts.append(tick)
        e.health = health
        e.last_seen = tick if e.last_seen is None else max(e.last_seen, tick)

    def _error(self, tick: int, device: int, error: str) -> None:
        e = self.entry(device)
        e.error, e.error_tick = error, tick
        e.errors.append((tick, error))

    # -- statuses ----------------------------------------------------------------------------
    def status_of(self, e: DeviceEntry, tick: int) -> str:
        """The device's status at ``tick`` (the rules of the module docstring)."""
        seen = [t for t in (e.last_seen, e.error_tick) if t is not None]
        if not seen or tick - max(seen) >= self.cfg.stale_ticks:
            return "stale"
        if e.error_tick is not None and (e.last_seen is None or e.error_tick > e.last_seen):
            return "failing"
        if e.trouble_tick is not None and e.trouble_tick == e.last_seen:
            return "failing"
        acc = e.health.accuracy if e.health is not None else None
        if acc is not None and self.cfg.degraded_floor > 0 and acc < self.cfg.degraded_floor:
            return "degraded"
        if e.health is not None and e.health.drifting:
            return "drifting"
        return "healthy"

    def end_tick(self, tick: int) -> dict[str, int]:
        """Decide every device's status at ``tick``, write what was observed; the per-status counts."""
        self._close(tick)
        self._pending.append({"t": tick, "kind": "tick", "counts": dict(self.counts)})
        self._flush()
        return dict(self.counts)

    def _close(self, tick: int) -> None:
        counts = dict.fromkeys(STATUSES, 0)
        for e in self.devices.values():
            status = self.status_of(e, tick)
            if e.last_seen == tick or e.error_tick == tick or status != e.status:
                h = e.health if e.last_seen == tick else None
                row = {"tick": tick, "status": status, "version": h.model_version if h else None,
                       "accuracy": h.accuracy if h else None, "drifting": h.drifting if h else False,
                       "error": e.error if e.error_tick == tick else ""}
                if e.history and e.history[-1]["tick"] == tick:
                    e.history[-1] = row  # a tick polled again after a restart
                else:
                    e.history.append(row)
            e.status = status
            counts[status] += 1
        self.counts = counts
        self.last_tick = tick

    def failed(self, tick: int) -> set[int]:
        """Devices that failed at ``tick``: an error reply, a refused model or a failed handler."""
        return {
            d for d, e in self.devices.items()
            if e.error_tick == tick or (e.trouble_tick == tick and e.last_seen == tick)
        }

    def table(self, status: str | None = None) -> list[dict[str, Any]]:
        """The fleet table, by device (only ``status`` devices when given)."""
        rows = [e.row() for _, e in sorted(self.devices.items())]
        return [r for r in rows if status is None or r["status"] == status]

    def summary(self) -> dict[str, Any]:
        """The fleet table with the tick and the per-status counts (``fleet.json``)."""
        return {"tick": self.last_tick, "counts": dict(self.counts), "devices": self.table()}

    def write_table(self, folder: Path) -> Path:
        """Write :meth:`summary` to ``folder/fleet.json`` (owner-only); its path."""
        path = folder / TABLE_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(self.summary(), fh)
        os.replace(tmp, path)
        return path

    # -- the file ----------------------------------------------------------------------------
    def _flush(self) -> None:
        lines, self._pending = self._pending, []
        if self.path is None or not lines:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)  # a file made by hand, or by an older version, is closed too
        size = os.fstat(fd).st_size
        # A line torn by a crash is closed first, so the next entry is a line of its own.
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fh.write("\n" * torn + "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines))

    def _replay(self, lines: Iterable[Mapping[str, Any]]) -> None:
        for line in lines:
            try:
                tick, kind = int(line["t"]), line["kind"]
                if kind == "health":
                    self._observe(tick, DeviceHealth.from_dict(line["health"]))
                elif kind == "error":
                    self._error(tick, int(line["device"]), str(line["error"]))
                elif kind == "tick":
                    self._close(tick)
                elif kind == "config":
                    self.cfg = FleetConfig(**{**_settings(self.cfg), **_settings(line)})
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("fleet register: skipped an unreadable entry (%s)", exc)


def _settings(source: Any) -> dict[str, Any]:
    """The status rules' settings of a config or of a register file's ``config`` line."""
    get = source.get if isinstance(source, Mapping) else lambda k, d=None: getattr(source, k, d)
    found = {"stale_ticks": int, "degraded_floor": float}
    return {k: kind(get(k)) for k, kind in found.items() if get(k) is not None}


def _read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The register file's entries; a torn or foreign line is skipped with a warning."""
    with path.open(encoding="utf-8") as fh:
        for number, text in enumerate(fh, 1):
            try:
                line = json.loads(text)
            except ValueError:
                log.warning("fleet register %s: line %d is not JSON; skipped", path, number)
                continue
            if isinstance(line, dict):
                yield line
