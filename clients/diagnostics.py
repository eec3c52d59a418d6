"""A device's diagnostic summary, for the operator who asked (``fedge diagnose``).

Built only from what the device already counts: its store's statistics, its
drift detector's lifetime counters, the types of its handler failures (codes of
:data:`~fedge.contracts.protocol.ERROR_KINDS`, as :mod:`clients.health` keeps
them: never an exception's text), the versions it installed and a digest of its
run configuration. No sample value, label or path leaves: the record is
:class:`~fedge.contracts.diagnostics.DeviceDiagnostics`, which the egress policy
checks key by key like every other reply record.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from clients.device_data import stream_versions
from clients.health import failures, failures_by_code, opened_at
from clients.inbox import inbox_path
from fedge.contracts.diagnostics import DeviceDiagnostics, config_digest, detector_code
from fedge.contracts.protocol import ERROR_KINDS

if TYPE_CHECKING:
    from clients.device import Device


def file_bytes(path: Path) -> int:
    """Bytes on disk of an SQLite file with its journal files (-1 when it does not exist)."""
    if not path.exists():
        return -1
    total = 0
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            total += part.stat().st_size
        except OSError:
            continue  # no journal: nothing to add
    return total


def _estimate(device: Device) -> float:
    """The detector's current error-rate estimate, -1 for detectors that keep none.

    river's ADWIN exposes ``estimation``; the others have no such public value,
    and a diagnostic must not guess one.
    """
    detector = getattr(device.monitor, "_detector", None)
    value = getattr(detector, "estimation", None)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return -1.0


def device_diagnostics(device: Device, tick: int, now: float | None = None) -> DeviceDiagnostics:
    """The diagnostic summary of ``device`` at the query of ``tick``.

    Parameters
    ----------
    device : Device
        The device answering the query.
    tick : int
        The query's tick.
    now : float, optional
        ``time.monotonic()`` to measure the uptime against (now when omitted).
    """
    now = time.monotonic() if now is None else now
    store = device.store
    rows = len(store)
    labelled = store.labelled_count()
    errors_total, _ = failures(device.audit_path)
    by_code = failures_by_code(device.audit_path)
    versions = stream_versions(device)
    previous = next((v for v in reversed(versions) if v != device.version), 0)
    audit = device.audit_path
    return DeviceDiagnostics(
        device=device.device_id,
        tick=tick,
        store_rows=rows,
        store_labelled=labelled,
        labels_outstanding=max(0, rows - labelled),
        outbox_reports=store.outbox_size(),
        store_bytes=file_bytes(store.path),
        audit_bytes=audit.stat().st_size if audit.exists() else -1,
        inbox_bytes=file_bytes(inbox_path(store.path)),
        detector=detector_code(device.monitor.detector),
        samples_seen=int(device.monitor.samples_seen),
        drifts_total=int(device.monitor.drifts_total),
        detector_estimate=_estimate(device),
        model_version=int(device.version),
        previous_version=int(previous),
        uptime_seconds=max(0.0, now - opened_at(store.path, now)),
        errors_total=errors_total,
        errors=tuple(
            (ERROR_KINDS[code] if 0 <= code < len(ERROR_KINDS) else "other", count)
            for code, count in sorted(by_code.items())
        ),
        config_digest=config_digest(device.cfg),
    )
