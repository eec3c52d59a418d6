"""The outbox link: a tracker's writes journalled on disk and sent in order by a background thread.

While the tracking server is unreachable the writes wait in the outbox
(:mod:`fedge.tracking.outbox`) and are replayed, in order and once, when it
answers again.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedge.tracking.mlflow_store import (
    _RETRY_MAX_S,
    _RETRY_MIN_S,
    PARENT_TAG,
    TrackingError,
    _describe,
    _display,
    _first_line,
    _outage,
    _reachable,
    _refused,
    _save_model,
)
from fedge.tracking.outbox import (
    DONE,
    FAILED,
    PENDING,
    Entry,
    Outbox,
)
from fedge.tracking.writer import (
    _drain,
    _Unresolvable,
)

if TYPE_CHECKING:
    from fedge.tracking.tracker import Tracker

log = logging.getLogger("fedge.tracking")

_STOP = object()
_KICK = object()


@dataclass
class _Registration:
    """A version this run registered: the number it handed out and where it is."""

    version: int
    uid: str
    landed_as: int | None = None
    state: str = PENDING


class _OutboxLink:
    """A tracker's way to its store through its outbox.

    While the server answers, writes go straight to it (metrics through a
    background thread) and only registrations touch the journal, written ahead.
    From the first write that cannot reach the server, every write is
    journalled; the background thread probes the server and replays the journal
    in order, then writes go straight again. One lock orders "journal an entry"
    against "the journal is empty, go back to direct writes", so nothing is left
    behind in the journal.
    """

    def __init__(self, tracker: Tracker, box: Outbox) -> None:
        self.tracker = tracker
        self.box = box
        self.writer = tracker._writer
        self.uri = tracker.tracking_uri
        self.highest = 0
        self.offline = False
        self.outage_said = False
        self.registrations: list[_Registration] = []
        self.issued: dict[int, str] = {}
        self._state = threading.Lock()
        self._drain_lock = threading.Lock()
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._final: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._work, name="fedge-tracking", daemon=True)
        self._thread.start()

    # -- writes ------------------------------------------------------------------------

    def write(self, kind: str, payload: dict[str, Any], action: str) -> None:
        if not self.offline:
            try:
                self.writer.apply(kind, payload, resolve=self._resolve_uid)
                return
            except Exception as exc:  # noqa: BLE001 - sorted into unreachable or refused
                if not self.writer.unreachable(exc):
                    raise _refused(self.uri, action, exc) from None
                self._went_offline(action, exc)
        self._journal(kind, payload)

    def submit_metrics(self, payload: dict[str, Any]) -> None:
        if self.offline:
            self._journal("metrics", payload)
        else:
            self._jobs.put(payload)

    def register(
        self, model: torch.nn.Module, input_example: np.ndarray, payload: dict[str, Any]
    ) -> int:
        uid = self.box.new_uid()
        _save_model(model, input_example, self.box.files_for(uid) / payload["model_dir"])
        if self.offline:
            self.box.sync_files(uid)  # it may wait long: on disk before the entry names it
        with self._state:
            provisional = max([self.highest, *self.issued]) + 1
            parent = payload["tags"].get(PARENT_TAG, "")
            refs = {}
            if parent.isdigit() and int(parent) in self.issued:
                refs[PARENT_TAG] = self.issued[int(parent)]
            offline = self.offline
            body = {**payload, "refs": refs}
            if offline:
                body["provisional"] = provisional
            entry = self.box.append("register", body, uid=uid)
            record = _Registration(provisional, uid)
            self.registrations.append(record)
        if not offline:
            self._drain(probe=False, first_try=uid)
            if record.landed_as is not None:
                return record.landed_as
            if record.state == FAILED:
                found = self.box.entry(uid)
                raise TrackingError(
                    f"MLflow tracking store {_display(self.uri)}: registering a version of "
                    f"{payload['model_name']!r} failed: {found.error if found else '?'}"
                )
        # The number goes out to the devices: the journal must know it was handed out,
        # and no replay may be under way while it learns that.
        if not offline:
            self.box.sync_files(uid)
        with self._drain_lock, self._state:
            if record.landed_as is not None:
                return record.landed_as
            if not offline:
                self.box.amend(entry.seq, {"provisional": provisional})
            self.issued[provisional] = uid
            self.offline = True
        self._jobs.put(_KICK)
        return provisional

    def resolve_version(self, version: int) -> tuple[int, str | None]:
        """A version number as the store knows it, or the pending registration behind it."""
        with self._state:
            uid = self.issued.get(version)
            if uid is None:
                return version, None
            for record in self.registrations:
                if record.uid == uid and record.landed_as is not None:
                    return record.landed_as, None
            return version, uid

    def require_store(self, action: str) -> None:
        if self.offline:
            self.flush()
        if self.offline:
            n = self.box.counts()[PENDING] if self._final is None else self._final["pending"]
            raise TrackingError(
                f"MLflow tracking server {_display(self.uri)} is unreachable ({action}); "
                f"{n} writes of this run wait in {self.box.folder}"
            )

    # -- flushing and closing ----------------------------------------------------------

    def flush(self) -> None:
        if self._final is not None:
            return
        self._jobs.join()
        if self.offline:
            self._drain(probe=True)

    def state(self, *, refresh: bool) -> dict[str, Any]:
        if self._final is not None:
            return dict(self._final)
        if refresh:
            self.flush()
        counts = self.box.counts()
        with self._state:
            versions = [
                {"version": r.version, "landed_as": r.landed_as, "state": r.state}
                for r in self.registrations
            ]
        return {
            "outbox": str(self.box.folder),
            "server_reachable": not self.offline,
            "pending": counts[PENDING],
            "failed": counts[FAILED],
            "versions": versions,
        }

    def close(self) -> None:
        """Last chance to send the journal; then stop the thread and release the folder."""
        self.flush()
        self._jobs.put(_STOP)
        self._thread.join()
        final = self.state(refresh=False)
        self._final = final
        left = final["pending"] + final["failed"]
        if not left:
            self.box.remove()
            return
        what = _describe(self.box.entries(PENDING if final["pending"] else FAILED))
        self.box.close()
        folder = self.box.folder.parent
        if final["pending"]:
            log.warning(
                "MLflow tracking server %s is unreachable: %s kept in %s; they are sent by the "
                "next run against this server, or now with `fedge sync %s`",
                _display(self.uri),
                what,
                self.box.folder,
                folder,
            )
        else:
            log.warning(
                "MLflow tracking store %s refused %s, kept in %s; `fedge sync %s` retries them",
                _display(self.uri),
                what,
                self.box.folder,
                folder,
            )

    # -- internals ---------------------------------------------------------------------

    def _journal(self, kind: str, payload: dict[str, Any]) -> None:
        uid = self.box.new_uid()
        if kind == "artifact":
            # Keep a copy: the file may change or go before the server is back.
            source = Path(payload["path"])
            staged = self.box.files_for(uid) / source.name
            if payload["is_dir"]:
                shutil.copytree(source, staged)
            else:
                shutil.copy2(source, staged)
            self.box.sync_files(uid)
            payload = {**payload, "staged": source.name}
        with self._state:
            self.box.append(kind, payload, uid=uid)
            # A journalled write means the thread must drain, even if it just emptied it.
            was_offline, self.offline = self.offline, True
        if not was_offline:
            self._jobs.put(_KICK)

    def _went_offline(self, action: str, exc: BaseException) -> None:
        with self._state:
            self.offline = True
            said, self.outage_said = self.outage_said, True
        if not said:
            log.warning(
                "MLflow tracking server %s is unreachable (%s: %s); the run goes on and "
                "buffers its tracking writes in %s",
                _display(self.uri),
                action,
                _outage(exc),
                self.box.folder,
            )
        self._jobs.put(_KICK)

    def _drain(self, *, probe: bool, first_try: str | None = None) -> bool:
        """Send the journal in order; True once it is empty and writes go direct again."""
        with self._drain_lock:
            if probe and not _reachable(self.uri):
                return False
            result = _drain(
                self.writer,
                self.box,
                on_landed=self._landed,
                state=self._state,
                first_try=first_try,
            )
            if result.stopped:
                if not self.offline:
                    self._went_offline("sending buffered writes", RuntimeError(result.stopped))
                return False
            with self._state:
                if self.box.next_pending() is not None:
                    return False
                was_offline, self.offline = self.offline, False
                said, self.outage_said = self.outage_said, False
            if was_offline and said:
                log.warning(
                    "MLflow tracking server %s answers again; buffered tracking writes sent",
                    _display(self.uri),
                )
            return True

    def _resolve_uid(self, uid: str) -> int:
        entry = self.box.entry(uid)
        if entry is None or entry.state != DONE or not entry.result:
            raise _Unresolvable(f"the registration it names ({uid}) has not landed")
        return int(entry.result["version"])

    def _landed(self, entry: Entry, result: Mapping[str, Any] | None) -> None:
        if entry.kind != "register":
            return
        with self._state:
            for record in self.registrations:
                if record.uid == entry.uid:
                    if result is None:
                        record.state = FAILED
                    else:
                        record.landed_as = int(result["version"])
                        record.state = "landed"
                        self.highest = max(self.highest, record.landed_as)

    def _work(self) -> None:
        delay = _RETRY_MIN_S
        while True:
            try:
                job = self._jobs.get(timeout=delay if self.offline else None)
            except queue.Empty:
                job, got = _KICK, False
            else:
                got = True
            try:
                if job is _STOP:
                    return
                if job is _KICK:
                    if self.offline:
                        delay = (
                            _RETRY_MIN_S
                            if self._drain(probe=True)
                            else min(2 * delay, _RETRY_MAX_S)
                        )
                    continue
                self._send_metrics(job)
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one failure
                log.warning("tracking thread: %s", _first_line(exc))
            finally:
                if got:
                    self._jobs.task_done()

    def _send_metrics(self, payload: dict[str, Any]) -> None:
        if not self.offline:
            try:
                self.writer.apply("metrics", payload)
                return
            except Exception as exc:  # noqa: BLE001 - sorted into unreachable or refused
                if not self.writer.unreachable(exc):
                    entry = self.box.append("metrics", payload)
                    self.box.mark_failed(entry.seq, _first_line(exc))
                    log.warning(
                        "MLflow tracking store %s refused metrics at step %s (%s); kept in %s",
                        _display(self.uri),
                        payload["metrics"][0][3] if payload["metrics"] else "?",
                        _first_line(exc),
                        self.box.folder,
                    )
                    return
                self._went_offline("logging metrics", exc)
        self._journal("metrics", payload)
