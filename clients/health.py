"""A device's health, as its ``query`` reply carries it (:class:`~fedge.contracts.protocol.DeviceHealth`).

Everything here is a count or a scalar the device already has: nothing about a
sample, no error text (an exception's type becomes a code of
:data:`~fedge.contracts.protocol.ERROR_KINDS`). The egress policy lets the
``health`` record leave only with the keys of that contract.

Handler failures are seen by the egress mod (:func:`clients.egress.make_egress_mod`),
which turns them into error replies; it notes them here, keyed by the device's
audit log, so the device's next health says how many there were and of what type.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedge.contracts.protocol import DeviceHealth, DriftReport, error_code

if TYPE_CHECKING:
    from clients.device import Device

_LOCK = threading.Lock()
#: Per device (its audit log path): handler failures and the code of the latest.
_ERRORS: dict[Path, tuple[int, int]] = {}
#: Per device (its audit log path): handler failures by error code (for diagnostics).
_BY_CODE: dict[Path, dict[int, int]] = {}
#: Per device (its store path): when this process opened it.
_OPENED: dict[Path, float] = {}


def note_failure(key: Path, exc: BaseException) -> None:
    """Count a handler failure of the device whose audit log is ``key``."""
    with _LOCK:
        count, _ = _ERRORS.get(key, (0, 0))
        code = error_code(exc)
        _ERRORS[key] = (count + 1, code)
        kinds = _BY_CODE.setdefault(key, {})
        kinds[code] = kinds.get(code, 0) + 1


def failures(key: Path) -> tuple[int, int]:
    """Handler failures of the device whose audit log is ``key`` and the latest's code."""
    with _LOCK:
        return _ERRORS.get(key, (0, 0))


def failures_by_code(key: Path) -> dict[int, int]:
    """Handler failures of the device whose audit log is ``key``, by error code."""
    with _LOCK:
        return dict(_BY_CODE.get(key, {}))


def opened_at(store: Path, default: float) -> float:
    """``time.monotonic()`` when this process opened the device of ``store`` (else ``default``)."""
    with _LOCK:
        return _OPENED.get(store, default)


def note_opened(store: Path) -> None:
    """The device of ``store`` was (re)opened in this process: its uptime starts now."""
    with _LOCK:
        _OPENED[store] = time.monotonic()
        # A reopened device is a restarted one: its failures were its previous life's.
        _ERRORS.pop(store.with_suffix(".audit.jsonl"), None)
        _BY_CODE.pop(store.with_suffix(".audit.jsonl"), None)


def resident_bytes() -> int:
    """Resident memory of this process: ``/proc/self/statm`` where present, else the peak."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux reports KiB, macOS bytes.
        return int(peak if sys.platform == "darwin" else peak * 1024)


def device_health(
    device: Device,
    report: DriftReport,
    previous_tick: int | None,
    started: float,
) -> DeviceHealth:
    """The health of ``device`` as of ``report``.

    Parameters
    ----------
    device : Device
        The device answering the query.
    report : DriftReport
        Its report for this query's tick.
    previous_tick : int or None
        The latest tick it had monitored before this query (None: never).
    started : float
        ``time.monotonic()`` when the query handler started.
    """
    accuracy = report.accuracy
    estimated = accuracy is None and report.estimate is not None
    if accuracy is None:
        accuracy = report.estimate
    errors, last_error = failures(device.audit_path)
    opened = _OPENED.get(device.store.path, started)
    return DeviceHealth(
        device=device.device_id,
        tick=report.tick,
        model_version=device.version,
        # A device installs (and reloads) only models whose seal verifies.
        model_verified=device.version > 0,
        models_refused=report.models_refused,
        ticks_since_report=-1 if previous_tick is None else report.tick - previous_tick,
        live_accuracy=-1.0 if accuracy is None else float(accuracy),
        accuracy_estimated=estimated,
        drifting=bool(report.signals),
        drifts_total=report.drifts_total,
        rejected_non_finite=report.rejected_non_finite,
        rejected_wrong_width=report.rejected_wrong_width,
        rejected_unknown_label=report.rejected_unknown_label,
        rejected_total=int(device.counters.get("rejected_total", 0)),
        # Late labels are counted by the report once it carries them.
        labels_outstanding=int(getattr(report, "labels_outstanding", 0)),
        store_rows=len(device.store),
        outbox_reports=device.store.outbox_size(),
        handler_seconds=max(0.0, time.monotonic() - started),
        resident_bytes=resident_bytes(),
        uptime_seconds=max(0.0, time.monotonic() - opened),
        errors_total=errors,
        last_error=last_error,
    )
