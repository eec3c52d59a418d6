"""``fedge dashboard``: the fleet page, in a real headless Chromium, and its read-only server."""

from __future__ import annotations

import http.client
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from inprocess_helpers import run_captured
from typer.testing import CliRunner

from fedge.cli import app as cli
from fedge.contracts import protocol as p
from fedge.contracts.config import FleetConfig
from fedge.dashboard import DashboardError, DashboardServer, snapshot
from fedge.server.fleet import FLEET_FILE, FleetRegister

CFG = FleetConfig(stale_ticks=3, degraded_floor=0.5)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium driven by Playwright, on the system's browser (nothing downloaded)."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="package 'playwright' is missing (pip install playwright)")
    executable = _chromium()
    if executable is None:
        pytest.skip("package 'chromium' is missing (apt-get install chromium)")
    with sync_api.sync_playwright() as pw:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
        found = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield found
        found.close()


@pytest.fixture()
def serving() -> Iterator[Any]:
    """Start a dashboard for a folder; every one started is shut down after the test."""
    started: list[DashboardServer] = []

    def start(folder: Path) -> DashboardServer:
        server = DashboardServer(folder)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def _report(device: int, tick: int, version: int) -> p.DriftReport:
    return p.DriftReport(device, tick, version, 100, 10, False, 0, 0, 100)


def _synthetic(folder: Path, ticks: int = 3) -> FleetRegister:
    """A running run's register: six devices, v2 rolled out to devices 0-2 at tick 1."""
    folder.mkdir(mode=0o700)
    register = FleetRegister(CFG, folder / FLEET_FILE)
    for tick in range(ticks):
        for device in range(6):
            version = 2 if device < 3 and tick >= 1 else 1
            health = p.DeviceHealth(device, tick, version, True, live_accuracy=0.6 + 0.05 * device,
                                    drifting=device == 5 and tick == 2)
            register.observe(tick, _report(device, tick, version), health)
        register.end_tick(tick)
    return register


def _page(browser: Any, url: str) -> tuple[Any, list[str]]:
    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.goto(url)
    page.wait_for_selector("#fleet tbody tr")
    return page, problems


def _statuses(page: Any) -> dict[int, str]:
    rows = page.eval_on_selector_all(
        "#fleet tbody tr", "rs => rs.map(r => [r.dataset.device, r.dataset.status])")
    return {int(d): s for d, s in rows}


# -- a real run ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small staged-rollout run, to its end."""
    tmp = tmp_path_factory.mktemp("dash")
    overrides = [
        f'run.output_dir="{tmp}"', "scenario.clients=4", "scenario.ticks=6",
        'scenario.schedule.kind="stationary"', "campaign.rounds=1", "campaign.initial_rounds=1",
        'trigger.policy="periodic"', "trigger.period=2", 'rollout.mode="staged"',
        "rollout.canary=1", "rollout.waves=2", "rollout.hold_ticks=1", "rollout.max_drop=0.5",
        "campaign.min_improvement=-1.0",
    ]
    summary, _ = run_captured(overrides, tmp / "run")
    return {"summary": summary, "folder": tmp / "run"}


def test_the_page_shows_every_device_of_a_finished_run(
    browser: Any, serving: Any, finished_run: dict[str, Any]
) -> None:
    folder = finished_run["folder"]
    register = FleetRegister.load(folder / FLEET_FILE)
    server = serving(folder)
    page, problems = _page(browser, server.url)
    devices = sorted(register.devices)
    assert len(devices) == finished_run["summary"]["devices"] == 4
    statuses = _statuses(page)
    assert statuses == {d: register.devices[d].status for d in devices}
    assert "finished" in page.inner_text("#state")
    # The version map: one cell per device, holding the version its table row says.
    cells = page.eval_on_selector_all("#map .cell", "cs => cs.map(c => [c.dataset.device, c.dataset.version])")
    assert {int(d): int(v) for d, v in cells} == {r["device"]: r["version"] for r in register.table()}
    # One accuracy line per device that reported an accuracy, and the promotions marked.
    assert page.get_attribute("#chart-device svg", "data-series") == "4"
    assert page.locator("#chart-device line.rollout").count() >= 1
    assert "v" in page.inner_text("#rollout")
    assert problems == [], problems


# -- a run still going -----------------------------------------------------------------------
def test_the_page_follows_a_running_fleet(browser: Any, serving: Any, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    register = _synthetic(folder)
    server = serving(folder)
    page, problems = _page(browser, server.url)
    assert set(_statuses(page).values()) <= {"healthy", "drifting"}
    assert "running" in page.inner_text("#state")
    assert page.inner_text("#rollout").startswith("v2 in progress: on 3 of 6")
    assert page.eval_on_selector("#map .cell[data-device='0']", "c => c.style.background") != \
        page.eval_on_selector("#map .cell[data-device='4']", "c => c.style.background")
    assert page.locator("#chart-device line.drift").count() == 0  # ticks.jsonl holds no drift
    # The server goes on: device 2 answers with an error, devices 3 and 4 install v2.
    for device in (0, 1, 3, 4, 5):
        version = 1 if device == 5 else 2
        health = p.DeviceHealth(device, 3, version, True, live_accuracy=0.9)
        register.observe(3, _report(device, 3, version), health)
    register.observe_error(3, 2, "device handler failed (OSError)")
    register.end_tick(3)
    page.wait_for_function(
        "() => document.querySelector(\"#fleet tr[data-device='2']\").dataset.status === 'failing'",
        timeout=10_000)
    row = page.inner_text("#fleet tr[data-device='2']")
    assert "failing" in row and "device handler failed (OSError)" in row
    page.wait_for_function("() => document.getElementById('rollout').textContent.includes('on 5 of 6')")
    assert "tick 3" in page.inner_text("#state")
    assert problems == [], problems


# -- the server, without a browser -----------------------------------------------------------
def _request(server: DashboardServer, method: str, path: str, host: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=5)
    headers = {"Host": host} if host else {}
    conn.request(method, path, headers=headers)
    res = conn.getresponse()
    body = res.read()
    conn.close()
    return res.status, body


def test_the_server_is_read_only_and_serves_fixed_routes_only(serving: Any, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    _synthetic(folder, ticks=1)
    server = serving(folder)
    status, body = _request(server, "GET", "/api/fleet")
    assert status == 200 and len(json.loads(body)["devices"]) == 6
    for method in ("POST", "PUT", "DELETE"):
        assert _request(server, method, "/api/fleet")[0] == 405
    for path in ("/fleet.jsonl", "/../fleet.jsonl", "/%2e%2e/fleet.jsonl", "/api/fleet/../../x"):
        status, body = _request(server, "GET", path)
        assert status == 404 and b"health" not in body, path
    # A page on another site reaching 127.0.0.1 through its own name (DNS rebinding) is refused.
    assert _request(server, "GET", "/api/fleet", host="evil.example:80")[0] == 403
    assert _request(server, "GET", "/", host=f"localhost:{server.server_address[1]}")[0] == 200


def test_a_non_loopback_host_or_a_wrong_folder_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    _synthetic(folder, ticks=1)
    with pytest.raises(DashboardError, match="not a loopback address.*--allow-remote"):
        DashboardServer(folder, host="0.0.0.0")
    with pytest.raises(DashboardError, match="holds no fedge run"):
        DashboardServer(tmp_path)
    runner = CliRunner()
    for args in (["dashboard", str(folder), "--host", "0.0.0.0"],
                 ["dashboard", str(tmp_path / "nowhere")],
                 ["dashboard", str(folder), "--port", "70000"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_the_snapshot_reads_a_register_being_written(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    _synthetic(folder, ticks=2)
    with (folder / FLEET_FILE).open("a") as fh:
        fh.write('{"t": 2, "kind": "hea')  # the server is mid-line
    (folder / "ticks.jsonl").write_text(
        json.dumps({"tick": {"tick": 0, "accuracy": 0.7, "drifted": [5]}, "campaigns": [
            {"tick": 0, "version": 2, "promoted": True, "reason": "drift"}]}) + "\n{\"tick\": ")
    data = snapshot(folder)
    assert data["run"]["finished"] is False and data["run"]["tick"] == 1
    assert data["drift_ticks"] == [0] and data["campaigns"][0]["version"] == 2
    assert data["rollout"]["version"] == 2 and data["rollout"]["on"] == [0, 1, 2]
    assert set(data["version_accuracy"]) == {"1", "2"}


def test_a_poll_rebuilds_the_snapshot_only_when_the_run_folder_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedge import dashboard

    folder = tmp_path / "run"
    register = _synthetic(folder, ticks=1)
    server = DashboardServer(folder)
    try:
        built: list[Path] = []
        real = dashboard.snapshot
        monkeypatch.setattr(dashboard, "snapshot", lambda d: built.append(d) or real(d))
        first = server.snapshot_body()
        assert server.snapshot_body() is first and len(built) == 1, "an unchanged folder is not re-read"
        for device in range(6):
            register.observe(1, _report(device, 1, 1), p.DeviceHealth(device, 1, 1, True, live_accuracy=0.9))
        register.end_tick(1)
        again = json.loads(server.snapshot_body())
        assert len(built) == 2 and again["run"]["tick"] == 1, "a new tick is read on the next poll"
    finally:
        server.server_close()
