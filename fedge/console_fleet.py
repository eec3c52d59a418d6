"""``fedge fleet RUN_DIR [DEVICE]``: the fleet register of a run, as tables.

Reads the run folder's ``fleet.jsonl`` (:mod:`fedge.server.fleet`) and nothing
else, so it works on a finished run and, with ``--watch``, on one still going.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from fedge.server.fleet import FLEET_FILE, STATUSES, FleetRegister

SORT_KEYS = ("device", "status", "version", "last_seen", "accuracy", "errors")
_STYLE = {"healthy": "green", "drifting": "yellow", "degraded": "magenta", "failing": "red", "stale": "dim"}


class FleetError(ValueError):
    """A run folder without a fleet register, an unknown device or option (one line)."""


def open_register(run_dir: Path) -> FleetRegister:
    """The register of ``run_dir``; :class:`FleetError` when there is none."""
    path = run_dir / FLEET_FILE
    if not run_dir.is_dir():
        raise FleetError(f"{run_dir}: no such run folder")
    if not path.is_file():
        raise FleetError(f"{run_dir}: no fleet register ({FLEET_FILE}); is it a fedge run folder?")
    try:
        return FleetRegister.load(path)
    except OSError as exc:
        raise FleetError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _acc(value: float | None, estimated: bool = False) -> str:
    return "-" if value is None else f"{value:.3f}" + ("~" if estimated else "")


def _sort_key(sort: str) -> Any:
    if sort == "status":
        return lambda r: (-STATUSES.index(r["status"]), r["device"])
    if sort in ("accuracy", "last_seen", "version", "errors"):
        return lambda r: (r[sort] is None, r[sort] if r[sort] is not None else 0, r["device"])
    return lambda r: r["device"]


#: Rows the table shows unless told otherwise: a terminal reader wants the worst first, not 10,000.
DEFAULT_LIMIT = 200
#: Beyond this many rows the table is plain fixed-width text (a rich table lays out ~3 ms a row).
PLAIN_ROWS = 1000


def fleet_table(
    register: FleetRegister, status: str | None = None, sort: str = "device", limit: int = DEFAULT_LIMIT
) -> Group:
    """The fleet table (``status`` devices only, sorted by ``sort``, the first ``limit``; 0: all)."""
    if status is not None and status not in STATUSES:
        raise FleetError(f"--status {status!r}: allowed: {', '.join(STATUSES)}")
    if sort not in SORT_KEYS:
        raise FleetError(f"--sort {sort!r}: allowed: {', '.join(SORT_KEYS)}")
    if limit < 0:
        raise FleetError(f"--limit {limit}: must be 0 (all) or more")
    rows = sorted(register.table(status), key=_sort_key(sort))
    hidden = len(rows) - limit if limit and len(rows) > limit else 0
    rows = rows[:limit] if limit else rows
    counts = "  ".join(f"{name}: {register.counts.get(name, 0)}" for name in STATUSES)
    more = [f"... {hidden} more devices (--limit 0 shows all, --status and --sort choose which)"] if hidden else []
    if len(rows) > PLAIN_ROWS:
        return Group(f"{len(register.devices)} devices  {counts}", _plain(rows, register.last_tick), *more)
    table = Table(title=f"fleet at tick {register.last_tick}", title_justify="left")
    for name in ("device", "status", "version", "last seen", "accuracy", "drift", "errors", "last error"):
        table.add_column(name, justify="right" if name in ("device", "version", "errors") else "left")
    for r in rows:
        drift = ("now, " if r["drifting"] else "") + f"{r['drifts']} total"
        version = f"v{r['version']}" + ("" if r["verified"] or not r["version"] else " (unverified)")
        table.add_row(
            str(r["device"]),
            f"[{_STYLE[r['status']]}]{r['status']}[/]",
            version,
            "-" if r["last_seen"] is None else f"tick {r['last_seen']}",
            _acc(r["accuracy"], r["estimated"]),
            drift,
            f"{r['errors']}" + (f" +{r['refused']} refused" if r["refused"] else ""),
            r["last_error"] or "-",
        )
    return Group(f"{len(register.devices)} devices  {counts}", table, *more)


def _plain(rows: list[dict[str, Any]], tick: int | None) -> Text:
    """The same columns as fixed-width text, for fleets too large for a laid-out table."""
    header = (f"{'device':>7} {'status':<9} {'version':>8} {'last seen':<10} "
              f"{'accuracy':<9} {'drifts':>6} {'errors':>6}  last error")
    lines = [f"fleet at tick {tick}", header]
    for r in rows:
        seen = "-" if r["last_seen"] is None else f"tick {r['last_seen']}"
        lines.append(f"{r['device']:>7} {r['status']:<9} {'v' + str(r['version']):>8} {seen:<10} "
                     f"{_acc(r['accuracy'], r['estimated']):<9} {r['drifts']:>6} {r['errors']:>6}  "
                     f"{r['last_error'] or '-'}")
    return Text("\n".join(lines))


def device_history(register: FleetRegister, device: int) -> Group:
    """One device: versions installed, drift ticks, errors and its per-tick reports."""
    entry = register.devices.get(device)
    if entry is None:
        known = ", ".join(str(d) for d in sorted(register.devices)[:20]) or "none"
        raise FleetError(f"device {device}: not in this run's fleet (devices: {known})")
    row = entry.row()
    head = (
        f"device {device}: {row['status']}, v{row['version']}, last seen "
        f"{'-' if row['last_seen'] is None else 'tick ' + str(row['last_seen'])}, "
        f"accuracy {_acc(row['accuracy'], row['estimated'])}"
    )
    versions = ", ".join(f"v{v} at tick {t}" for t, v in entry.versions) or "none"
    drifts = ", ".join(str(t) for t in entry.drifts) or "none"
    errors = "; ".join(f"tick {t}: {e}" for t, e in entry.errors) or "none"
    h = entry.health
    extra = (
        f"store {h.store_rows} rows, outbox {h.outbox_reports}, refused {h.models_refused}, "
        f"rejected {h.rejected_total} rows, labels outstanding {h.labels_outstanding}, "
        f"handler {h.handler_seconds:.3f} s, memory {h.resident_bytes / 2**20:.0f} MB, "
        f"uptime {h.uptime_seconds:.0f} s, last error {h.error_kind}"
        if h is not None else "no health received"
    )
    table = Table(title="reports", title_justify="left")
    for name in ("tick", "status", "version", "accuracy", "drift", "error"):
        table.add_column(name)
    for r in entry.history:
        table.add_row(
            str(r["tick"]), r["status"], "-" if r["version"] is None else f"v{r['version']}",
            _acc(r["accuracy"]), "yes" if r["drifting"] else "", r["error"] or "",
        )
    lines = [head, extra, f"versions installed: {versions}", f"drift at ticks: {drifts}",
             f"errors: {errors}"]
    return Group(*lines, table)


def show_fleet(
    console: Console,
    run_dir: Path,
    device: int | None = None,
    *,
    status: str | None = None,
    sort: str = "device",
    watch: bool = False,
    interval: float = 2.0,
    rounds: int | None = None,
    limit: int = DEFAULT_LIMIT,
) -> None:
    """Print the fleet (or one device); with ``watch``, re-read the register every ``interval`` s.

    ``rounds`` bounds the refreshes (tests); None watches until interrupted.
    """
    def render() -> Group:
        register = open_register(run_dir)
        return device_history(register, device) if device is not None else fleet_table(
            register, status, sort, limit)

    view = render()
    if not watch:
        console.print(view)
        return
    done = 0
    with Live(view, console=console, refresh_per_second=4, transient=False) as live:
        try:
            while rounds is None or done < rounds:
                time.sleep(interval)
                live.update(render())
                done += 1
        except KeyboardInterrupt:
            pass
