"""``fedge dashboard RUN_DIR``: the fleet of a run as a local, read-only web page.

The page is served by the standard library's :mod:`http.server` from a fixed
set of routes (``/``, ``/dashboard.js``, ``/dashboard.css``, ``/api/fleet``);
nothing is ever served by a path the browser chooses, and only ``GET`` (and
``HEAD``) is answered. It reads the run folder exactly as ``fedge fleet`` does
(:func:`fedge.console_fleet.open_register` on ``fleet.jsonl``) plus the
finished ticks of ``ticks.jsonl`` and, once the run is over, ``summary.json``;
the page polls ``/api/fleet`` every few seconds, so it follows a run that is
still going.

Security by default: the server binds to loopback, refuses any other address
unless ``allow_remote`` is given, and, while on loopback, answers only requests
whose ``Host`` names loopback (a web page elsewhere cannot reach it through DNS
rebinding). Everything is drawn in the browser from JSON by a small script
served with the page: no CDN, nothing fetched from anywhere else.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fedge.console_fleet import FleetError, open_register
from fedge.server.fleet import FLEET_FILE, STATUSES

log = logging.getLogger("fedge.dashboard")

TICKS_FILE = "ticks.jsonl"
SUMMARY_FILE = "summary.json"
#: Seconds between the page's polls of ``/api/fleet``.
POLL_SECONDS = 2.0
_RUN_FILES = (FLEET_FILE, TICKS_FILE, SUMMARY_FILE, "mlflow-run.json")


class DashboardError(ValueError):
    """A run folder that is none, or an address the dashboard will not bind to (one line)."""


# -- what the page shows -----------------------------------------------------------------------
def _ticks(run_dir: Path) -> Iterator[dict[str, Any]]:
    """The finished ticks of ``ticks.jsonl``; a torn last line (a tick being written) is skipped."""
    try:
        text = (run_dir / TICKS_FILE).read_text(encoding="utf-8")
    except OSError:
        return
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("tick"), dict):
            yield entry


def _rollout(devices: list[dict[str, Any]]) -> dict[str, Any]:
    """The rollout as the fleet shows it: who runs the newest version, tick by tick.

    A device that ran the newest version and went back to an older one marks a
    rollback; the newest version on every device that still reports marks a
    completed rollout.
    """
    newest = max((d["version"] for d in devices), default=0)
    for d in devices:
        newest = max([newest, *(v for _, v in d["versions"])])
    live = [d for d in devices if d["status"] != "stale"] or devices
    on = sorted(d["device"] for d in live if d["version"] == newest and newest)
    rolled_back = sorted(
        d["device"] for d in devices
        if newest and d["version"] != newest and any(v == newest for _, v in d["versions"])
    )
    ticks = sorted({t for d in devices for t, _ in d["versions"]})
    adoption = []
    for tick in ticks:
        # Each device's version at ``tick``: the last one it reported installing by then.
        running = [max(((t, v) for t, v in d["versions"] if t <= tick), default=(0, 0))[1]
                   for d in devices]
        adoption.append([tick, sum(v == newest for v in running), len(devices)])
    by_version: dict[str, int] = {}
    for d in devices:
        by_version[str(d["version"])] = by_version.get(str(d["version"]), 0) + 1
    state = ("none" if not newest else "rolled back" if rolled_back and not on
             else "complete" if len(on) == len(live) else "in progress")
    started = min((t for d in devices for t, v in d["versions"] if v == newest), default=None)
    return {"version": newest, "state": state, "on": on, "of": len(live), "started": started,
            "rolled_back": rolled_back, "by_version": by_version, "adoption": adoption}


def snapshot(run_dir: Path) -> dict[str, Any]:
    """Everything the page draws, as one JSON-ready dict (the body of ``/api/fleet``).

    Raises
    ------
    FleetError
        When ``fleet.jsonl`` is there but cannot be read.
    """
    devices: list[dict[str, Any]] = []
    counts = dict.fromkeys(STATUSES, 0)
    last_tick = None
    if (run_dir / FLEET_FILE).is_file():
        register = open_register(run_dir)
        last_tick, counts = register.last_tick, dict(register.counts)
        for number, entry in sorted(register.devices.items()):
            row = entry.row()
            row["history"] = [[r["tick"], r["accuracy"], r["version"], r["drifting"], r["status"]]
                              for r in entry.history]
            row["versions"] = [list(v) for v in entry.versions]
            row["drift_ticks"] = list(entry.drifts)
            devices.append(row)
    fleet_accuracy, drift_ticks, campaigns = [], [], []
    for entry in _ticks(run_dir):
        tick = entry["tick"]
        fleet_accuracy.append([tick.get("tick"), tick.get("accuracy")])
        if tick.get("drifted"):
            drift_ticks.append(tick.get("tick"))
        for c in entry.get("campaigns") or ():
            campaigns.append({"tick": c.get("tick"), "version": c.get("version"),
                              "promoted": bool(c.get("promoted")), "reason": c.get("reason", "")})
    per_version: dict[str, dict[int, list[float]]] = {}
    for d in devices:
        for tick, acc, version, _, _ in d["history"]:
            if acc is not None and version is not None:
                per_version.setdefault(str(version), {}).setdefault(tick, []).append(acc)
    version_accuracy = {
        v: [[t, sum(a) / len(a), len(a)] for t, a in sorted(ticks.items())]
        for v, ticks in sorted(per_version.items(), key=lambda kv: int(kv[0]))
    }
    summary: dict[str, Any] = {}
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass  # a run still going has no summary yet
    rollout = _rollout(devices)
    if summary and rollout["state"] == "in progress":
        rollout["state"] = "stopped part way (the run ended)"
    return {
        "run": {"folder": run_dir.name, "finished": bool(summary), "tick": last_tick,
                "champion": summary.get("champion"), "scenario": summary.get("scenario")},
        "counts": counts, "statuses": list(STATUSES), "devices": devices,
        "fleet_accuracy": fleet_accuracy, "drift_ticks": drift_ticks, "campaigns": campaigns,
        "version_accuracy": version_accuracy, "rollout": rollout,
        "poll_seconds": POLL_SECONDS,
    }


# -- the server --------------------------------------------------------------------------------
def _stamp(path: Path) -> tuple[int, int]:
    """Size and modification time of ``path`` ((-1, -1) when absent): what a change moves."""
    try:
        info = path.stat()
    except OSError:
        return (-1, -1)
    return (info.st_size, info.st_mtime_ns)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The host of a ``Host`` header, without its port (``[::1]:8000`` is ``::1``)."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _Handler(BaseHTTPRequestHandler):
    """The fixed routes; anything else is 404, any method but GET/HEAD is 405."""

    server: DashboardServer
    server_version = "fedge-dashboard"
    sys_version = ""

    def _send(self, status: int, body: bytes, kind: str, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        # Only this server's own script, style and JSON: nothing from anywhere else.
        self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'self'; "
                         "style-src 'self'; connect-src 'self'; img-src 'self'; "
                         "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str, head: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, "application/json", head)

    def _route(self, head: bool) -> None:
        if not self.server.allow_remote and not is_loopback(_host_name(self.headers.get("Host", ""))):
            self._error(HTTPStatus.FORBIDDEN, "this dashboard answers loopback hosts only", head)
            return
        path = self.path.split("?", 1)[0]
        if path in _STATIC:
            body, kind = _STATIC[path]
            self._send(HTTPStatus.OK, body, kind, head)
        elif path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon", head=True)  # none, and no 404
        elif path == "/api/fleet":
            try:
                body = self.server.snapshot_body()
            except (FleetError, ValueError) as exc:
                self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc), head)
                return
            self._send(HTTPStatus.OK, body, "application/json", head)
        else:
            self._error(HTTPStatus.NOT_FOUND, "no such page", head)

    def do_GET(self) -> None:  # the standard library names the handlers so
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def _refuse(self) -> None:
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class DashboardServer(ThreadingHTTPServer):
    """The dashboard of ``run_dir`` on ``(host, port)``; ``port`` 0 takes a free one."""

    daemon_threads = True

    def __init__(self, run_dir: Path, host: str = "127.0.0.1", port: int = 0,
                 allow_remote: bool = False) -> None:
        if not 0 <= port <= 65535:
            raise DashboardError(f"--port {port}: give 0 (any free port) up to 65535")
        if not allow_remote and not is_loopback(host):
            raise DashboardError(
                f"--host {host}: not a loopback address; the dashboard shows the fleet to anyone "
                "who can reach it, give --allow-remote to serve it there")
        if not run_dir.is_dir():
            raise DashboardError(f"{run_dir}: no such run folder")
        if not any((run_dir / name).exists() for name in _RUN_FILES):
            raise DashboardError(
                f"{run_dir}: holds no fedge run ({', '.join(_RUN_FILES)}); is it a run folder?")
        self.run_dir, self.allow_remote = run_dir, allow_remote
        self._cache: tuple[tuple[tuple[int, int], ...], bytes] | None = None
        self._cache_lock = threading.Lock()
        if ":" in host.strip("[]"):
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host.strip("[]"), port), _Handler)
        except OSError as exc:
            raise DashboardError(f"--host {host} --port {port}: cannot listen ({exc.strerror or exc})") from None

    def snapshot_body(self) -> bytes:
        """``/api/fleet``'s body, rebuilt only when a file it reads has changed since the last poll."""
        key = tuple(_stamp(self.run_dir / name) for name in (FLEET_FILE, TICKS_FILE, SUMMARY_FILE))
        with self._cache_lock:
            if self._cache is None or self._cache[0] != key:
                self._cache = (key, json.dumps(snapshot(self.run_dir), allow_nan=False).encode())
            return self._cache[1]

    @property
    def url(self) -> str:
        """The page's address."""
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"

    def start(self) -> threading.Thread:
        """Serve in a daemon thread (tests, embedding); :meth:`shutdown` stops it."""
        thread = threading.Thread(target=self.serve_forever, name="fedge-dashboard", daemon=True)
        thread.start()
        return thread


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedge fleet</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/dashboard.css"></head>
<body>
<header><h1>fedge fleet <span id="run"></span></h1><p id="state">loading...</p></header>
<section><h2>Devices</h2><p id="counts"></p>
<table id="fleet"><thead><tr><th>device</th><th>status</th><th>version</th><th>last seen</th>
<th>accuracy</th><th>drift</th><th>errors</th><th>last error</th></tr></thead><tbody></tbody></table>
</section>
<section><h2>Versions on the fleet</h2><div id="map"></div><p id="legend"></p></section>
<section><h2>Rollout</h2><p id="rollout"></p><div id="bar"><div id="fill"></div></div></section>
<section><h2>Accuracy per device</h2><div id="chart-device"></div></section>
<section><h2>Accuracy per version</h2><div id="chart-version"></div>
<p class="note">Dashed lines: drift (orange) and promoted versions (blue).</p></section>
<script src="/dashboard.js"></script>
</body></html>
"""

_CSS = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;max-width:1100px}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse}td,th{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:left}
.s-healthy{color:#1a7f37}.s-drifting{color:#b08800}.s-degraded{color:#a0a}.s-failing{color:#c00}
.s-stale{color:#888}.cell{display:inline-block;width:3.2em;height:2.4em;margin:2px;color:#fff;
text-align:center;line-height:2.4em;border-radius:4px;font-weight:600}
.cell.stale{opacity:.35}#bar{width:420px;height:14px;background:#eee;border-radius:7px}
#fill{height:14px;background:#2b6cb0;border-radius:7px;width:0}.note{color:#666;font-size:.9em}
.key{display:inline-block;width:.9em;height:.9em;margin:0 .3em 0 1em;vertical-align:middle}
"""

_JS = r"""
"use strict";
const COLORS = ["#999", "#2b6cb0", "#2f855a", "#c05621", "#6b46c1", "#b83280", "#2c7a7b",
                "#975a16", "#4a5568", "#c53030"];
const color = v => (v ? COLORS[1 + ((v - 1) % (COLORS.length - 1))] : COLORS[0]);
const SVG = "http://www.w3.org/2000/svg";
function el(tag, attrs, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4))
                                   : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;  // text, never markup: names come from files
  return e;
}
const acc = (a, est) => (a === null || a === undefined ? "-" : a.toFixed(3) + (est ? "~" : ""));

function table(data) {
  const body = document.querySelector("#fleet tbody");
  body.replaceChildren(...data.devices.map(d => {
    const tr = el("tr", {"data-device": d.device, "data-status": d.status});
    const drift = (d.drifting ? "now, " : "") + d.drifts + " total";
    const ver = d.version ? "v" + d.version + (d.verified ? "" : " (unverified)") : "-";
    const cells = [d.device, d.status, ver, d.last_seen === null ? "-" : "tick " + d.last_seen,
                   acc(d.accuracy, d.estimated), drift,
                   d.errors + (d.refused ? " +" + d.refused + " refused" : ""), d.last_error || "-"];
    cells.forEach((c, i) => tr.append(el("td", i === 1 ? {class: "s-" + d.status} : {}, String(c))));
    return tr;
  }));
  document.getElementById("counts").textContent = data.devices.length + " devices  " +
    data.statuses.map(s => s + ": " + (data.counts[s] || 0)).join("  ");
}

function map(data) {
  const box = document.getElementById("map");
  box.replaceChildren(...data.devices.map(d => {
    const c = el("span", {class: "cell" + (d.status === "stale" ? " stale" : ""),
                          "data-device": d.device, "data-version": d.version,
                          title: "device " + d.device + ": v" + d.version + ", " + d.status}, String(d.device));
    c.style.background = color(d.version);
    return c;
  }));
  const legend = document.getElementById("legend");
  legend.replaceChildren(...Object.entries(data.rollout.by_version).flatMap(([v, n]) => {
    const k = el("span", {class: "key"}); k.style.background = color(Number(v));
    return [k, document.createTextNode("v" + v + ": " + n)];
  }));
}

function rollout(data) {
  const r = data.rollout, p = document.getElementById("rollout");
  if (!r.version) { p.textContent = "no model deployed yet"; return; }
  p.textContent = "v" + r.version + " " + r.state + ": on " + r.on.length + " of " + r.of +
    " reporting devices" + (r.started === null ? "" : " (first installed at tick " + r.started + ")") +
    (r.rolled_back.length ? "; rolled back on device(s) " + r.rolled_back.join(", ") : "");
  p.dataset.state = r.state;
  document.getElementById("fill").style.width = (r.of ? 100 * r.on.length / r.of : 0) + "%";
}

function chart(id, series, data) {
  const W = 720, H = 240, L = 40, B = 24, T = 8, R = 110;
  const ticks = series.flatMap(s => s.points.map(p => p[0])).concat(data.drift_ticks);
  const t0 = Math.min(0, ...ticks), t1 = Math.max(1, ...ticks);
  const x = t => L + (W - L - R) * (t - t0) / (t1 - t0), y = a => T + (H - T - B) * (1 - a);
  const svg = el("svg:svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, "data-series": series.length});
  svg.append(el("svg:line", {x1: L, y1: y(0), x2: W - R, y2: y(0), stroke: "#999"}),
             el("svg:line", {x1: L, y1: T, x2: L, y2: y(0), stroke: "#999"}));
  for (const a of [0, 0.5, 1]) svg.append(el("svg:text", {x: 4, y: y(a) + 4, "font-size": 11}, a.toFixed(1)));
  svg.append(el("svg:text", {x: x(t0), y: H - 6, "font-size": 11}, "tick " + t0),
             el("svg:text", {x: x(t1) - 30, y: H - 6, "font-size": 11}, "tick " + t1));
  const mark = (t, stroke, cls, label) => {
    const g = el("svg:line", {x1: x(t), x2: x(t), y1: T, y2: y(0), stroke, "stroke-dasharray": "4 3", class: cls});
    g.append(el("svg:title", {}, label)); svg.append(g);
  };
  data.campaigns.filter(c => c.promoted).forEach(c =>
    mark(c.tick, "#3182ce", "rollout", "v" + c.version + " promoted at tick " + c.tick));
  // Drawn last: a drift and the promotion it caused often share a tick.
  data.drift_ticks.forEach(t => mark(t, "#dd6b20", "drift", "drift at tick " + t));
  series.forEach((s, i) => {
    const pts = s.points.filter(p => p[1] !== null);
    if (!pts.length) return;
    const line = el("svg:polyline", {fill: "none", stroke: s.color, "stroke-width": 1.6,
                    points: pts.map(p => x(p[0]) + "," + y(p[1])).join(" "), class: "series"});
    line.append(el("svg:title", {}, s.name)); svg.append(line);
    // A dot per point: a version seen at one tick only is a point, not a line.
    pts.forEach(p => svg.append(el("svg:circle", {cx: x(p[0]), cy: y(p[1]), r: 2.5, fill: s.color})));
    // Names for the first 16 only: a large fleet's legend would run off the chart.
    if (i < 16) svg.append(el("svg:text", {x: W - R + 6, y: T + 12 + 13 * i, fill: s.color, "font-size": 11},
                              i < 15 ? s.name : "..."));
  });
  document.getElementById(id).replaceChildren(svg);
}

function draw(data) {
  document.getElementById("run").textContent = data.run.folder;
  document.getElementById("state").textContent = (data.run.finished ? "finished" : "running") +
    (data.run.tick === null ? "" : ", tick " + data.run.tick) +
    (data.run.champion ? ", champion v" + data.run.champion : "");
  table(data); map(data); rollout(data);
  chart("chart-device", data.devices.map((d, i) => ({name: "device " + d.device,
    color: COLORS[1 + (i % (COLORS.length - 1))], points: d.history.map(h => [h[0], h[1]])})), data);
  chart("chart-version", Object.entries(data.version_accuracy).map(([v, pts]) =>
    ({name: "v" + v, color: color(Number(v)), points: pts})), data);
}

async function poll() {
  let wait = 2000;
  try {
    const res = await fetch("/api/fleet", {cache: "no-store"});
    const data = await res.json();
    if (!res.ok) throw new Error(data.error || res.statusText);
    wait = 1000 * data.poll_seconds;
    draw(data);
  } catch (e) {
    document.getElementById("state").textContent = "cannot read the run: " + e.message;
  }
  setTimeout(poll, wait);
}
poll();
"""

_STATIC: dict[str, tuple[bytes, str]] = {
    "/": (_PAGE.encode(), "text/html; charset=utf-8"),
    "/index.html": (_PAGE.encode(), "text/html; charset=utf-8"),
    "/dashboard.js": (_JS.encode(), "text/javascript; charset=utf-8"),
    "/dashboard.css": (_CSS.encode(), "text/css; charset=utf-8"),
}


def serve(run_dir: Path, host: str = "127.0.0.1", port: int = 0, allow_remote: bool = False,
          ready: Any = print) -> None:
    """Serve the dashboard of ``run_dir`` until interrupted; ``ready`` is told its address."""
    server = DashboardServer(run_dir, host, port, allow_remote)
    with server:
        ready(f"fleet dashboard of {run_dir} at {server.url} (read-only; Ctrl-C ends)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
