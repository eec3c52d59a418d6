"""Sending what a run's outbox still holds: ``fedge sync`` and the next run against the same server."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedge.tracking.mlflow_store import (
    TrackingError,
    _connect,
    _display,
    _reachable,
)
from fedge.tracking.outbox import (
    FAILED,
    PENDING,
    Entry,
    Outbox,
    OutboxBusy,
    OutboxError,
    find_outboxes,
)
from fedge.tracking.writer import (
    _drain,
    _StoreWriter,
)

log = logging.getLogger("fedge.tracking")

@dataclass(frozen=True)
class SyncResult:
    """What :func:`sync_outboxes` did with one outbox.

    Attributes
    ----------
    outbox : Path
        The outbox folder.
    tracking_uri : str
        The store its writes are for.
    landed : int
        Writes sent now.
    pending : int
        Writes still waiting (the server did not answer).
    failed : int
        Writes the store refused; they stay for another try.
    versions : list of (int, int)
        Each registration sent now: the number the run used, MLflow's number.
    reason : str
        Why something is left, in one line; empty when the outbox was emptied
        (and removed).
    """

    outbox: Path
    tracking_uri: str
    landed: int = 0
    pending: int = 0
    failed: int = 0
    versions: list[tuple[int, int]] = field(default_factory=list)
    reason: str = ""

    def line(self) -> str:
        """One line for a person."""
        if self.reason and not (self.landed or self.pending or self.failed):
            return f"{self.outbox}: {self.reason}"
        where = _display(self.tracking_uri) if self.tracking_uri else "its store"
        sent = f"{self.landed} buffered tracking writes sent to {where}"
        if self.versions:
            sent += "; versions " + ", ".join(
                f"{p}" if p == v else f"{p} (now {v})" for p, v in self.versions
            )
        if not self.pending and not self.failed:
            return f"{self.outbox}: {sent}; outbox emptied"
        left = []
        if self.pending:
            left.append(f"{self.pending} still pending")
        if self.failed:
            left.append(f"{self.failed} refused by the store")
        return f"{self.outbox}: {sent}; {', '.join(left)}: {self.reason}"


def sync_outboxes(path: Path) -> list[SyncResult]:
    """Send what runs buffered while their tracking server was unreachable.

    Parameters
    ----------
    path : Path
        A run folder, its ``tracking-outbox`` folder, or a folder of runs (an
        output folder or one scenario's folder): every outbox found is sent,
        oldest first, each to the store it was written for. Writes the store
        refused earlier are tried again. An outbox emptied is removed.

    Returns
    -------
    list of SyncResult
        One per outbox found; empty when nothing waits.

    Raises
    ------
    TrackingError
        If ``path`` is not a folder.
    """
    if not Path(path).is_dir():
        raise TrackingError(f"{path}: no such folder")
    folders = find_outboxes(Path(path))
    results = []
    for folder in folders:
        result = sync_outbox(folder, retry_failed=True)
        assert result is not None
        results.append(result)
    return results


def sync_outbox(
    folder: Path,
    *,
    writer: _StoreWriter | None = None,
    only_uri: str | None = None,
    retry_failed: bool = False,
) -> SyncResult | None:
    """Send one outbox; ``None`` when it is for another store than ``only_uri``."""
    try:
        box = Outbox(folder, create=False)
    except OutboxBusy as exc:
        return SyncResult(folder, "", reason=str(exc)) if only_uri is None else None
    except OutboxError as exc:
        if only_uri is not None:
            log.warning("%s", exc)
            return None
        return SyncResult(folder, "", reason=str(exc))
    emptied = False
    try:
        uri = box.meta("tracking_uri") or ""
        if only_uri is not None and uri != only_uri:
            return None
        if retry_failed:
            box.retry_failed()
        counts = box.counts()
        result = SyncResult(folder, uri, pending=counts[PENDING], failed=counts[FAILED])
        if not counts[PENDING] and not counts[FAILED]:
            emptied = True
            return result
        if not uri:
            return replace(result, reason="the outbox does not name its tracking store")
        if writer is None:
            if not _reachable(uri):
                return replace(
                    result, reason=f"MLflow tracking server {_display(uri)} is unreachable"
                )
            try:
                writer = _StoreWriter(uri, _connect(uri))
            except TrackingError as exc:
                return replace(result, reason=str(exc))
        versions: list[tuple[int, int]] = []

        def landed(entry: Entry, res: Mapping[str, Any] | None) -> None:
            if entry.kind == "register" and res is not None:
                used = entry.payload.get("provisional") or res["version"]
                versions.append((int(used), int(res["version"])))

        drained = _drain(writer, box, on_landed=landed)
        counts = box.counts()
        reason = drained.stopped
        if not reason and counts[FAILED]:
            failed = box.entries(FAILED)
            reason = f"first refusal: {failed[0].error}"
        emptied = not counts[PENDING] and not counts[FAILED]
        return SyncResult(
            folder, uri, drained.landed, counts[PENDING], counts[FAILED], versions, reason
        )
    finally:
        if emptied:
            box.remove()
        else:
            box.close()


# -- helpers -----------------------------------------------------------------------------
