"""What a person reads after a run: the tick log line, the summary and the accuracy plot."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from fedge.contracts.config import FedgeConfig
from fedge.core.records import CampaignRecord, RunRecord, TickRecord, drift_recoveries
from fedge.scenarios import ConceptSchedule, Scenario
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


#: A device's detector firing up to this many ticks after its true drift caught that drift.
DETECTION_WINDOW = 3


def detected_drifts(record: RunRecord) -> dict[int, list[int]]:
    """Per device, the ticks at which its drift detector fired, from its drift reports.

    Reports that arrived late (store and forward) count at the tick they describe.

    Parameters
    ----------
    record : RunRecord
        The run's ticks and late reports.

    Returns
    -------
    dict of int to list of int
        Device id to its sorted detection ticks; devices whose detector never fired are absent.
    """
    fired: dict[int, set[int]] = {}
    for tick in record.ticks:
        for device in tick.drifted:
            fired.setdefault(int(device), set()).add(tick.tick)
    for late in record.late:
        for device in late.drifted:
            fired.setdefault(int(device), set()).add(late.tick)
    return {device: sorted(ticks) for device, ticks in sorted(fired.items())}


def score_detections(
    detected: Mapping[int, Sequence[int]],
    truth: Iterable[tuple[int, int]],
    within: int = DETECTION_WINDOW,
) -> dict[str, Any]:
    """Set each device's detections beside its true drifts: caught, missed, false alarm.

    A true drift of a device at tick ``s`` is *caught* by that device's first
    unused detection in ``s .. s + within`` (and before its next true drift);
    otherwise it is *missed*. A detection that catches no drift is a *false alarm*.

    Parameters
    ----------
    detected : mapping of int to sequence of int
        Device id to its detection ticks (:func:`detected_drifts`).
    truth : iterable of (int, int)
        ``(device, tick)`` of every true drift (``ConceptSchedule.drift_points()``).
    within : int, default DETECTION_WINDOW
        How many ticks after the drift a detection still catches it.

    Returns
    -------
    dict
        ``within``, the totals ``caught``, ``missed``, ``false_alarms`` and
        ``devices``: one entry per device with a true drift or a detection
        (``device``, ``true``, ``caught`` as ``{"drift", "detected", "delay"}``,
        ``missed``, ``false_alarms``).
    """
    true_of: dict[int, list[int]] = {}
    for device, step in truth:
        true_of.setdefault(int(device), []).append(int(step))
    devices = []
    for device in sorted(set(true_of) | set(detected)):
        steps = sorted(true_of.get(device, []))
        unused = sorted(detected.get(device, []))
        caught, missed = [], []
        for i, step in enumerate(steps):
            last = step + within
            if i + 1 < len(steps):
                last = min(last, steps[i + 1] - 1)
            hit = next((t for t in unused if step <= t <= last), None)
            if hit is None:
                missed.append(step)
            else:
                unused.remove(hit)
                caught.append({"drift": step, "detected": hit, "delay": hit - step})
        devices.append(
            {"device": device, "true": steps, "caught": caught, "missed": missed,
             "false_alarms": unused}
        )
    return {
        "within": within,
        "caught": sum(len(d["caught"]) for d in devices),
        "missed": sum(len(d["missed"]) for d in devices),
        "false_alarms": sum(len(d["false_alarms"]) for d in devices),
        "devices": devices,
    }


def drift_truth(scenario: Scenario) -> ConceptSchedule | None:
    """The schedule of true drifts: the generator's, when the devices' rows are the generator's.

    With ``data.source = "scenario"`` every inbox holds only generated rows (an
    inbox holding a device application's own rows is refused when the run feeds
    it, :func:`fedge.scenarios.feed.feed_scenario`), so the schedule is the truth;
    the devices' own data has none (``schedule`` is None).
    """
    return scenario.schedule


def build_summary(
    cfg: FedgeConfig,
    record: RunRecord,
    scenario: Scenario,
    tracker: Tracker,
    uri: str,
    folder: Path,
    engine: str,
    truth: ConceptSchedule | None = None,
) -> dict[str, Any]:
    """Everything a person wants to know after a run, JSON-ready.

    ``detected_drifts`` lists, per device, the ticks its detector fired (from
    its drift reports). Where the truth is known (``truth``, the generator's
    schedule, see :func:`drift_truth`), ``drift_truth`` scores those detections
    against it (:func:`score_detections`) and ``drift_steps`` and
    ``recoveries`` describe the accuracy around each true drift; without a
    truth ``drift_truth`` is None and both lists are empty.

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
    detected = detected_drifts(record)
    steps = list(truth.drift_steps()) if truth is not None else []
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
        "devices": scenario.n_clients,
        "detected_drifts": {str(d): ticks for d, ticks in detected.items()},
        "drift_truth": (
            score_detections(detected, truth.drift_points()) if truth is not None else None
        ),
        "drift_steps": steps,
        "recoveries": [asdict(r) for r in drift_recoveries(record, steps)],
        "campaigns": [asdict(c) for c in record.campaigns],
        "ticks": [asdict(t) for t in record.ticks],
        "versions": versions,
        "tracking": tracking,
        "rejected_rows": sum(t.rejected for t in record.ticks),
        "refused": list(record.refused),
        "rollbacks": list(record.rollbacks),
        "config": cfg.flat(),
    }


def plot_run(
    record: RunRecord,
    drift_steps: Sequence[int],
    path: Path,
    detected: Mapping[int, Sequence[int]] | None = None,
) -> Path | None:
    """Accuracy per tick with true drifts, detections and campaigns marked.

    Parameters
    ----------
    record : RunRecord
        The run.
    drift_steps : sequence of int
        Ticks of the true drifts (empty when the truth is unknown): red dashed lines.
    path : Path
        Where the PNG goes.
    detected : mapping of int to sequence of int, optional
        Per device, the ticks its detector fired (:func:`detected_drifts`): a
        marker at each such tick, labelled with how many devices fired.
    """
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
        ax.axvline(step, color="red", linestyle="--", alpha=0.6, label="true drift" if i == 0 else None)
    fired: dict[int, int] = {}
    for ticks_of_device in (detected or {}).values():
        for tick in ticks_of_device:
            fired[tick] = fired.get(tick, 0) + 1
    if fired:
        xs = sorted(fired)
        ax.scatter(xs, [0.04] * len(xs), marker="^", color="darkorange", zorder=3,
                   label="detected (devices)")
        for x in xs:
            ax.annotate(str(fired[x]), (x, 0.07), ha="center", fontsize=7, color="darkorange")
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
