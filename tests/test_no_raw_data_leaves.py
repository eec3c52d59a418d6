"""Inspect every message that crossed between server and devices in a full scenario."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from inprocess_helpers import run_captured

from fedge.contracts.config_load import load_config
from fedge.contracts.protocol import EGRESS
from fedge.privacy.anchors import summarise, verify
from fedge.privacy.report import write_report
from fedge.scenarios import build_scenario


def test_only_the_contract_crosses_and_no_raw_sample_does(tmp_path: Path) -> None:
    overrides = [
        f'run.output_dir="{tmp_path}"',
        "scenario.clients=3",
        "scenario.ticks=6",
        "scenario.schedule.at=3",
        "campaign.rounds=2",
        "campaign.initial_rounds=2",
    ]
    cfg = load_config(None, overrides)
    folder = tmp_path / "run"
    summary, crossed = run_captured(overrides, folder)
    assert len(summary["campaigns"]) >= 2

    scenario = build_scenario(cfg.scenario)
    raw_rows = [
        row.tobytes()
        for c in range(cfg.scenario.clients)
        for t in range(cfg.scenario.ticks)
        for row in scenario.batch(c, t)[0]
        if np.isfinite(row).all()
    ]
    kinds = set()
    for request, reply in crossed:
        assert not reply.has_error(), reply.error
        kind = request.metadata.message_type.split(".")[0]  # "evaluate.scores" is an evaluate reply
        kinds.add(kind)
        allowed = EGRESS[kind]
        for name, record in reply.content.items():
            assert name in allowed, (kind, name)
            if allowed[name][0] != "arrays":
                assert set(record) <= set(allowed[name][1])
                assert all(isinstance(v, (bool, int, float)) for v in record.values())
        for name, arrays in reply.content.array_records.items():
            sent = request.content.array_records[name]
            assert {k: a.shape for k, a in arrays.items()} == {k: a.shape for k, a in sent.items()}
        wire = reply.deflate() + b"".join(
            a.data for arrays in reply.content.array_records.values() for a in arrays.values()
        )
        assert not any(row in wire for row in raw_rows), "a raw sample left a device"
    assert kinds == {"query", "train", "evaluate"}

    per_device = len(crossed) // cfg.scenario.clients
    for log in sorted((folder / "devices").glob("*.audit.jsonl")):
        assert verify(log).ok
        assert summarise(log)["messages"] == per_device
    report = write_report(folder).read_text()
    assert "Blocked messages in total: 0." in report
    assert report.count("| intact |") == cfg.scenario.clients
