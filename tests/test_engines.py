"""The same scenario and seed give the same numbers in-process and on Flower's simulation."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fedge.runner import RunRequest, feed_devices, quiet_tick, run

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SMALL = (
    "scenario.clients=3",
    "scenario.ticks=6",
    "scenario.schedule.at=3",
    "campaign.rounds=2",
    "campaign.initial_rounds=3",
)


def _flower_processes() -> list[str]:
    """Live (not zombie) Flower and Ray processes."""
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True, check=True).stdout
    me = str(os.getpid())
    rows = [line.split(None, 2) for line in out.splitlines()[1:]]
    return [
        row[2] for row in rows
        if len(row) == 3 and not row[1].startswith("Z") and row[0] != me
        and any(name in row[2] for name in ("flower-superlink", "flwr-simulation", "ray::"))
    ]


def test_inprocess_and_flower_simulation_agree(tmp_path: Path) -> None:
    before = _flower_processes()
    results = {}
    for engine in ("inprocess", "simulation"):
        overrides = (*SMALL, f'run.output_dir="{tmp_path / engine}"')
        request = RunRequest(EXPERIMENTS / "sine2_sudden.toml", overrides, engine)
        results[engine] = run(request, on_tick=quiet_tick)
    ours, flower = results["inprocess"], results["simulation"]
    assert flower["engine"] == "simulation"
    assert [t["accuracy"] for t in ours["ticks"]] == [t["accuracy"] for t in flower["ticks"]]
    keys = ("tick", "reason", "devices", "version", "promoted", "rounds")
    assert [{k: c[k] for k in keys} for c in ours["campaigns"]] == [
        {k: c[k] for k in keys} for c in flower["campaigns"]
    ]
    assert [c["candidate_acc"] for c in ours["campaigns"]] == pytest.approx(
        [c["candidate_acc"] for c in flower["campaigns"]], abs=1e-6
    )
    assert len(ours["campaigns"]) >= 2, "the drift at tick 3 is retrained on both engines"
    assert _flower_processes() == before, "the simulation leaves no Flower or Ray process behind"


def _run_on_grid(tmp_path: Path, workers: int) -> tuple[dict, list[tuple[str, str, bool]], Path]:
    from clients.client_app import app as client_app
    from clients.client_app import forget_devices
    from fedge.contracts.config_load import load_config
    from fedge.engines.inprocess import InProcessGrid
    from fedge.server.app import run_server

    overrides = [*SMALL, "scenario.clients=5", f'run.output_dir="{tmp_path}"']
    cfg = load_config(EXPERIMENTS / "sine2_sudden.toml", overrides)
    folder = tmp_path / "run"
    run_config = {
        "scenario": str(EXPERIMENTS / "sine2_sudden.toml"),
        "overrides": ";".join(overrides),
        "run-dir": str(folder),
    }
    crossed: list[tuple[str, str, bool]] = []
    feed_devices(cfg, folder)
    with InProcessGrid(client_app, cfg.scenario.clients, run_config, workers=workers) as grid:
        grid.on_exchange = lambda req, rep: crossed.append(
            (req.metadata.message_type, str(req.metadata.dst_node_id), rep.has_error())
        )
        try:
            summary = run_server(grid, cfg, folder, on_tick=quiet_tick, engine="inprocess")
        finally:
            forget_devices()
    return summary, crossed, folder / "devices"


def test_worker_processes_give_the_numbers_of_one_process(tmp_path: Path) -> None:
    from fedge.privacy.anchors import summarise, verify

    one, crossed_one, devices_one = _run_on_grid(tmp_path / "one", workers=1)
    two, crossed_two, devices_two = _run_on_grid(tmp_path / "two", workers=2)
    assert [t["accuracy"] for t in one["ticks"]] == [t["accuracy"] for t in two["ticks"]]
    assert [t.get("drift_fraction") for t in one["ticks"]] == [t.get("drift_fraction") for t in two["ticks"]]
    keys = ("tick", "reason", "devices", "version", "promoted", "rounds", "candidate_acc")
    assert [{k: c[k] for k in keys} for c in one["campaigns"]] == [
        {k: c[k] for k in keys} for c in two["campaigns"]
    ]
    assert len(one["campaigns"]) >= 2
    # the same messages (Flower's strategy may address the sampled nodes in another order)
    assert sorted(crossed_one) == sorted(crossed_two)
    assert not any(failed for *_, failed in crossed_two)
    # every device's audit log was written by its worker, and its chain holds
    for log in sorted(devices_two.glob("*.audit.jsonl")):
        assert verify(log).ok, log
        assert summarise(log)["by_type"] == summarise(devices_one / log.name)["by_type"]


def test_a_device_process_that_dies_fails_its_nodes_not_the_run() -> None:
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fedge.engines.inprocess import InProcessGrid

    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) == 1 and msg.content["config"]["die"]:
            os._exit(3)  # the worker holding node 1 (and node 3) crashes
        return Message(RecordDict({"m": MetricRecord({"pid": os.getpid()})}), reply_to=msg)

    with InProcessGrid(app, 4, {}, workers=2) as grid:
        def ask(die: bool) -> list[Message]:
            messages = [
                grid.create_message(RecordDict({"config": ConfigRecord({"die": die})}), "query", n, "g")
                for n in grid.get_node_ids()
            ]
            return list(grid.send_and_receive(messages))

        first = ask(False)
        assert not any(r.has_error() for r in first)
        assert len({r.content["m"]["pid"] for r in first}) == 2, "two worker processes served the nodes"
        crashed = ask(True)
        assert [r.has_error() for r in crashed] == [False, True, False, True]
        assert [r.has_error() for r in ask(False)] == [False, True, False, True]


def test_worker_count_must_be_a_positive_whole_number() -> None:
    from flwr.clientapp import ClientApp

    from fedge.engines.inprocess import InProcessGrid

    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="workers must be a whole number >= 1"):
            InProcessGrid(ClientApp(), 2, {}, workers=bad)  # type: ignore[arg-type]
