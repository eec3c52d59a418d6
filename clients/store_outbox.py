"""The outbox of a device store: drift reports kept until the server acknowledges them.

Part of :class:`clients.store.DeviceStore` (which supplies the connection, the lock and
the transactions); kept apart because store and forward is its own reason to change.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np

logger = logging.getLogger("fedge.device")


class ReportOutbox:
    """Store and forward: the ``outbox`` table of a device store."""

    _outbox_capacity: int
    _path: Path
    _lock: threading.RLock

    def _connection(self) -> sqlite3.Connection:
        raise NotImplementedError

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    # -- outbox: reports waiting for the server's acknowledgement -----------------------------
    def put_report(self, tick: int, report: Mapping[str, int | bool]) -> int:
        """Keep the report of ``tick`` until the server acknowledges it.

        A report of the same tick replaces the earlier one. Beyond the outbox capacity
        the oldest reports are dropped (a warning says how many).

        Parameters
        ----------
        tick
            Monitoring tick the report belongs to.
        report
            Its fields: scalars only (what :class:`fedge.contracts.protocol.DriftReport` holds).

        Returns
        -------
        int
            Reports dropped to stay within capacity (0 normally).
        """
        tick = _as_int(tick)
        if any(not isinstance(v, bool | int | float) for v in report.values()):
            raise TypeError("store.put_report: report values must be scalars")
        text = json.dumps(dict(report), sort_keys=True)
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO outbox (tick, report) VALUES (?, ?)", (tick, text))
            row = conn.execute(
                "SELECT tick FROM outbox ORDER BY tick DESC LIMIT 1 OFFSET ?",
                (self._outbox_capacity,),
            ).fetchone()
            dropped = 0
            if row is not None:
                dropped = conn.execute("DELETE FROM outbox WHERE tick <= ?", (row[0],)).rowcount
        if dropped:
            logger.warning(
                "device store %s: outbox full (%d reports); dropped the %d oldest",
                self._path,
                self._outbox_capacity,
                dropped,
            )
        return int(dropped)

    def pending_reports(self, limit: int | None = None) -> list[dict[str, int | bool]]:
        """Reports not acknowledged yet, oldest tick first (at most ``limit``)."""
        query = "SELECT report FROM outbox ORDER BY tick"
        params: tuple[int, ...] = ()
        if limit is not None:
            query += " LIMIT ?"
            params = (max(0, int(limit)),)
        with self._lock:
            rows = self._connection().execute(query, params).fetchall()
        return [json.loads(row[0]) for row in rows]

    def get_report(self, tick: int) -> dict[str, int | bool] | None:
        """The waiting report of ``tick``, or ``None`` (never sent, or acknowledged)."""
        with self._lock:
            row = (
                self._connection()
                .execute("SELECT report FROM outbox WHERE tick = ?", (int(tick),))
                .fetchone()
            )
        return None if row is None else dict(json.loads(row[0]))

    def ack_reports(self, ticks: Iterable[int]) -> int:
        """Drop the reports the server acknowledged; returns how many were waiting."""
        wanted = [(int(t),) for t in ticks]
        if not wanted:
            return 0
        with self._transaction() as conn:
            cursor = conn.executemany("DELETE FROM outbox WHERE tick = ?", wanted)
        return int(cursor.rowcount)

    def outbox_size(self) -> int:
        """Reports waiting for an acknowledgement."""
        with self._lock:
            (count,) = self._connection().execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(count)



def _as_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"store.put_report: tick must be an int, got {value!r}")
    return int(value)
