"""Fleet operations: device health in every report, the fleet register, ``fedge fleet``."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from inprocess_helpers import run_captured
from mlflow import MlflowClient
from typer.testing import CliRunner

from clients.egress import egress_violations
from fedge.cli import app as cli
from fedge.contracts import protocol as p
from fedge.contracts.config import FleetConfig
from fedge.contracts.wire import from_arrays, to_arrays
from fedge.engines.inprocess import InProcessGrid
from fedge.server.fleet import FLEET_FILE, FleetRegister

OFFLINE_NODE = 1001  # device 1 stops answering after its report of tick 1
TAMPERED = 0  # device 0 gets every model after its first with a weight changed in flight


def _overrides(tmp: Path) -> list[str]:
    return [
        f'run.output_dir="{tmp}"',
        "scenario.clients=3",
        "scenario.ticks=6",
        "scenario.schedule.at=3",
        "scenario.bad_row_fraction=0.05",
        "campaign.rounds=1",
        "campaign.initial_rounds=2",
        'trigger.policy="periodic"',
        "trigger.period=2",
        "fleet.stale_ticks=2",
        "fleet.degraded_floor=0.2",
    ]


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run: device 1 goes offline after tick 1, device 0 refuses tampered models."""
    tmp = tmp_path_factory.mktemp("fleet")
    push = InProcessGrid.push_messages
    first_model: dict[int, int] = {}

    def tamper(grid: InProcessGrid, messages: Any) -> Any:
        messages = list(messages)
        for msg in messages:
            device = msg.metadata.dst_node_id - 1000
            carries = msg.metadata.message_type == "query" and p.ARRAYS in msg.content.array_records
            if device != TAMPERED or not carries:
                continue
            if device not in first_model:
                first_model[device] = int(msg.content.config_records[p.CONFIG][p.CHAMPION_VERSION])
                continue
            weights = {k: v.copy() for k, v in from_arrays(msg.content.array_records[p.ARRAYS]).items()}
            next(iter(weights.values())).reshape(-1)[0] += 1.0
            msg.content[p.ARRAYS] = to_arrays(weights)
        return push(grid, messages)

    def watch(grid: InProcessGrid, request: Message, reply: Message) -> None:
        md = request.metadata
        if md.message_type == "query" and md.dst_node_id == OFFLINE_NODE and md.group_id == "tick-1":
            grid.offline.add(OFFLINE_NODE)

    mp = pytest.MonkeyPatch()
    mp.setattr(InProcessGrid, "push_messages", tamper)
    try:
        summary, crossed = run_captured(_overrides(tmp), tmp / "run", watch=watch)
    finally:
        mp.undo()
    return {"summary": summary, "crossed": crossed, "folder": tmp / "run", "first": first_model}


def test_every_query_reply_carries_the_devices_health_within_the_egress_policy(
    fleet_run: dict[str, Any],
) -> None:
    replies = [(q, r) for q, r in fleet_run["crossed"] if q.metadata.message_type == "query"]
    assert replies
    for request, reply in replies:
        assert not reply.has_error(), "the health record passed the egress policy"
        health = p.DeviceHealth.from_dict(reply.content.config_records[p.HEALTH])
        report = p.DriftReport.from_dict(reply.content.config_records[p.REPORT])
        tick = int(request.content.config_records[p.CONFIG][p.TICK])
        assert (health.device, health.tick, health.model_version) == (report.device, tick, report.model_version)
        assert health.ticks_since_report == (-1 if tick == 0 else 1)
        assert health.store_rows == report.window_size > 0
        assert health.resident_bytes > 2**20 and health.handler_seconds > 0
        assert health.rejected_total >= report.rejected
        assert health.model_verified == (report.model_version > 0)
        if report.accuracy is not None:
            assert health.live_accuracy == pytest.approx(report.accuracy)
    tampered = [
        p.DeviceHealth.from_dict(r.content.config_records[p.HEALTH])
        for _, r in replies
        if p.DriftReport.from_dict(r.content.config_records[p.REPORT]).device == TAMPERED
    ]
    assert tampered[-1].models_refused > 0, "the refusals are in its health"


def test_the_egress_policy_blocks_a_health_record_with_anything_else() -> None:
    request = Message(RecordDict({p.CONFIG: ConfigRecord({p.TICK: 0})}), 1, "query")
    health = p.DeviceHealth(device=0, tick=0).to_dict()
    ok = Message(RecordDict({p.HEALTH: ConfigRecord(health)}), reply_to=request)
    assert egress_violations(request, ok) == []
    leaky = Message(
        RecordDict({p.HEALTH: ConfigRecord({**health, "last_row": [0.5, 0.25]})}), reply_to=request
    )
    assert egress_violations(request, leaky) == ["health.last_row is not an allowed key"]
    texty = Message(RecordDict({p.HEALTH: ConfigRecord({**health, "last_error": "boom"})}), reply_to=request)
    assert egress_violations(request, texty) == ["health.last_error must be a scalar, got str"]


def test_an_error_type_becomes_a_code_never_its_text() -> None:
    assert p.ERROR_KINDS[p.error_code(FileNotFoundError("/secret/path"))] == "OSError"

    class SensorGlitch(RuntimeError):
        pass

    assert p.ERROR_KINDS[p.error_code(SensorGlitch("value 0.73"))] == "RuntimeError"
    assert p.ERROR_KINDS[p.error_code(KeyboardInterrupt())] == "other"


def test_an_offline_device_turns_stale_and_a_device_refusing_models_failing(
    fleet_run: dict[str, Any],
) -> None:
    register = FleetRegister.load(fleet_run["folder"] / FLEET_FILE)
    offline, tampered, fine = (register.devices[d] for d in (1, TAMPERED, 2))
    assert offline.last_seen == 1
    by_tick = {row["tick"]: row["status"] for row in offline.history}
    assert min(t for t, s in by_tick.items() if s == "stale") == 3, "stale once 2 ticks went unseen"
    assert offline.status == "stale"
    assert tampered.status == "failing", tampered.history
    assert tampered.versions[-1][1] == fleet_run["first"][TAMPERED], "it kept its first model"
    assert fine.status in ("healthy", "drifting")
    assert register.counts["stale"] == 1 and register.counts["failing"] == 1
    mode = stat.S_IMODE((fleet_run["folder"] / FLEET_FILE).stat().st_mode)
    assert mode == 0o600, oct(mode)


def test_fleet_counts_and_table_reach_mlflow(fleet_run: dict[str, Any]) -> None:
    summary = fleet_run["summary"]
    run_id = json.loads((fleet_run["folder"] / "mlflow-run.json").read_text())["run_id"]
    client = MlflowClient(summary["tracking_uri"])
    stale = [m.value for m in client.get_metric_history(run_id, "fleet/stale")]
    assert stale[0] == 0 and stale[-1] == 1
    table = json.loads(Path(client.download_artifacts(run_id, "fleet.json")).read_text())
    assert {r["device"]: r["status"] for r in table["devices"]}[1] == "stale"


def test_the_register_survives_a_restart_and_skips_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / FLEET_FILE
    cfg = FleetConfig(stale_ticks=2, degraded_floor=0.5)
    first = FleetRegister(cfg, path)
    for tick in range(3):
        for device in (0, 1):
            if device == 1 and tick > 0:
                continue
            acc = 0.9 if tick < 2 else 0.3
            first.observe(tick, _report(device, tick), p.DeviceHealth(device, tick, 1, True, live_accuracy=acc))
        first.end_tick(tick)
    first.observe_error(3, 0, "device handler failed (OSError)")
    first.end_tick(3)
    with path.open("a") as fh:
        fh.write('{"t": 4, "kind": "hea')  # the server died mid-line
    again = FleetRegister(cfg, path)
    assert again.counts == first.counts == {
        "healthy": 0, "drifting": 0, "degraded": 0, "failing": 1, "stale": 1
    }
    assert [r["status"] for r in again.devices[0].history] == ["healthy", "healthy", "degraded", "failing"]
    assert again.devices[0].errors[-1] == (3, "device handler failed (OSError)")
    again.end_tick(4)
    assert FleetRegister.load(path).last_tick == 4, "it goes on writing after the torn line"


def _report(device: int, tick: int) -> p.DriftReport:
    return p.DriftReport(device, tick, 1, 100, 10, False, 0, 0, 100)


def test_fedge_fleet_shows_the_table_one_device_and_refuses_unknowns(fleet_run: dict[str, Any]) -> None:
    runner = CliRunner()
    folder = str(fleet_run["folder"])
    out = runner.invoke(cli, ["fleet", folder], env={"COLUMNS": "160"})
    assert out.exit_code == 0, out.output
    assert "3 devices" in out.output and "stale: 1" in out.output and "failing: 1" in out.output
    failing = runner.invoke(cli, ["fleet", folder, "--status", "failing"], env={"COLUMNS": "160"})
    lines = [line for line in failing.output.splitlines() if line.startswith("│")]
    assert len(lines) == 1 and "failing" in lines[0] and "refused" in lines[0]
    one = runner.invoke(cli, ["fleet", folder, "1"], env={"COLUMNS": "160"})
    assert one.exit_code == 0 and "device 1: stale" in one.output and "versions installed" in one.output
    for args, said in (
        ([folder, "7"], "device 7: not in this run's fleet"),
        ([str(fleet_run["folder"].parent / "nope")], "no such run folder"),
        ([folder, "--sort", "colour"], "--sort 'colour'"),
    ):
        bad = runner.invoke(cli, ["fleet", *args])
        assert bad.exit_code == 2 and said in bad.output and "Traceback" not in bad.output


def test_a_large_fleet_shows_its_first_rows_and_counts_the_rest(tmp_path: Path) -> None:
    """--limit keeps a 10,000-device table readable and fast; --limit 0 shows every row."""
    import io

    from rich.console import Console

    from fedge.console_fleet import FleetError, fleet_table

    register = FleetRegister(FleetConfig(), tmp_path / FLEET_FILE)
    for device in range(1500):
        register.observe(0, _report(device, 0), p.DeviceHealth(device, 0, 1, True, live_accuracy=0.9))
    register.end_tick(0)

    def shown(**kwargs: Any) -> str:
        out = io.StringIO()
        Console(file=out, width=140).print(fleet_table(register, **kwargs))
        return out.getvalue()

    first = shown(sort="device")
    assert "... 1300 more devices" in first
    assert sum("healthy" in line for line in first.splitlines()[1:]) == 200, "the first 200 rows"
    everything = shown(limit=0)
    assert "more devices" not in everything
    listed = {int(line.split()[0]) for line in everything.splitlines()[3:] if line.strip()[:1].isdigit()}
    assert listed == set(range(1500)), "every device, as plain rows"
    with pytest.raises(FleetError, match="--limit -1"):
        fleet_table(register, limit=-1)
