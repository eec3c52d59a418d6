"""What a person reads after a run: the tick log line, the summary and the accuracy plot."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from fedge.contracts.config import FedgeConfig
from fedge.core.records import CampaignRecord, RunRecord, TickRecord, drift_recoveries
from fedge.scenarios import Scenario
from fedge.tracking import Tracker, TrackingError, ui_command

log = logging.getLogger("fedge.server")


def log_tick(rec: TickRecord, campaign: CampaignRecord | None) -> None:
    acc = "-" if rec.accuracy is None else f"{rec.accuracy:.3f}"
    log.info("tick %d: accuracy %s, drift %.0f%%", rec.tick, acc, 100 * rec.drift_fraction)
    if campaign is not None:
        verdict = "promoted" if campaign.promoted else "kept champion"
        log.info(
            "tick %d: campaign (%s) -> v%d %s (%.3f vs %.3f)",
            rec.tick,
            campaign.reason,
            campaign.version,
            verdict,
            campaign.candidate_acc,
            campaign.champion_acc,
        )


def build_summary(
    cfg: FedgeConfig,
    record: RunRecord,
    scenario: Scenario,
    tracker: Tracker,
    uri: str,
    folder: Path,
    engine: str,
) -> dict[str, Any]:
    """Everything a person wants to know after a run, JSON-ready.

    ``tracking`` says whether the run's MLflow writes landed or wait in its outbox
    (the tracking server unreachable); then ``versions`` lists the versions this
    run registered, by the numbers it used, as ``pending``.
    """
    tracking = tracker.sync_state()
    try:
        versions = [
            {"version": v["version"], "aliases": v["aliases"], "tags": v["tags"]}
            for v in tracker.versions()
        ]
    except TrackingError:
        versions = [
            {"version": v["version"], "aliases": [], "tags": {}, "state": v["state"]}
            for v in tracking["versions"]
        ]
    # The devices' own data has no known schedule (``schedule`` is None).
    schedule_drifts = scenario.schedule.drift_steps() if scenario.schedule is not None else ()
    return {
        "scenario": cfg.scenario.name,
        "engine": engine,
        "run_id": tracker.run_id,
        "run_dir": str(folder),
        "tracking_uri": uri,
        "ui_command": ui_command(uri),
        "model_name": cfg.model_name,
        "policy": cfg.trigger.policy,
        "resumed_from": record.resumed_from,
        "champion": record.champion,
        "drift_steps": list(schedule_drifts),
        "recoveries": [asdict(r) for r in drift_recoveries(record, schedule_drifts)],
        "campaigns": [asdict(c) for c in record.campaigns],
        "ticks": [asdict(t) for t in record.ticks],
        "versions": versions,
        "tracking": tracking,
        "rejected_rows": sum(t.rejected for t in record.ticks),
        "refused": list(record.refused),
        "config": cfg.flat(),
    }


def plot_run(record: RunRecord, drift_steps: Sequence[int], path: Path) -> Path | None:
    """Accuracy per tick with drifts and campaigns marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ticks = [t.tick for t in record.ticks if t.accuracy is not None]
    acc = [t.accuracy for t in record.ticks if t.accuracy is not None]
    if not ticks:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(ticks, acc, marker="o", label="prequential accuracy")
    for i, step in enumerate(drift_steps):
        ax.axvline(step, color="red", linestyle="--", alpha=0.6, label="drift" if i == 0 else None)
    for i, c in enumerate(record.campaigns):
        ax.axvline(
            c.tick + 0.5,
            color="green" if c.promoted else "grey",
            alpha=0.5,
            label=("campaign" if i == 0 else None),
        )
    ax.set_xlabel("tick")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class TickHistory:
    """The ticks a run folder has finished, kept across the processes that ran it.

    Each finished tick is appended to a JSON-lines file with its campaigns; a run
    resumed after a kill reads the earlier ticks back, so its summary covers the
    whole run, not only what the last process did.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def recorder(
        self,
        then: Callable[[TickRecord, CampaignRecord | None], None],
        record: Callable[[], RunRecord],
    ) -> Callable[[TickRecord, CampaignRecord | None], None]:
        """An ``on_tick`` callback that appends the tick, then calls ``then``."""

        def on_tick(rec: TickRecord, campaign: CampaignRecord | None) -> None:
            campaigns = [asdict(c) for c in record().campaigns if c.tick == rec.tick]
            line = json.dumps({"tick": asdict(rec), "campaigns": campaigns})
            with self.path.open("a", encoding="utf-8") as out:
                out.write(line + "\n")
            then(rec, campaign)

        return on_tick

    def whole(self, record: RunRecord) -> RunRecord:
        """``record`` with the ticks earlier processes finished before it (by tick number)."""
        first = min((t.tick for t in record.ticks), default=None)
        earlier_ticks: list[TickRecord] = []
        earlier_campaigns: list[CampaignRecord] = []
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return record
        seen: set[int] = set()
        for line in lines:
            try:
                entry = json.loads(line)
                tick = TickRecord(**{**entry["tick"], "drifted": tuple(entry["tick"]["drifted"])})
                campaigns = [
                    CampaignRecord(**{**c, "devices": tuple(c["devices"])}) for c in entry["campaigns"]
                ]
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by the kill
            if (first is not None and tick.tick >= first) or tick.tick in seen:
                continue
            seen.add(tick.tick)
            earlier_ticks.append(tick)
            earlier_campaigns += campaigns
        if not earlier_ticks:
            return record
        return replace(
            record,
            ticks=[*earlier_ticks, *record.ticks],
            campaigns=[*earlier_campaigns, *record.campaigns],
        )
