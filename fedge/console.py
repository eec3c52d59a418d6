"""How fedge shows a run to a person on the terminal: the summary tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()


def fmt(value: float | None) -> str:
    """A score with three decimals, or ``-``."""
    return "-" if value is None else f"{value:.3f}"


def privacy_columns(versions: list[dict[str, Any]]) -> tuple[str, ...]:
    """The privacy columns of a versions table: none unless some version carries them."""
    if any("fedge.aggregation" in v["tags"] for v in versions):
        return ("aggregation", "DP", "epsilon")
    return ()


def privacy_cells(tags: dict[str, str], columns: tuple[str, ...]) -> list[str]:
    if not columns:
        return []
    return [
        tags.get("fedge.aggregation", "plaintext"),
        tags.get("fedge.dp", "none"),
        tags.get("fedge.epsilon", "-"),
    ]


def print_summary(s: dict[str, Any]) -> None:
    """The run summary as a person reads it at the end of ``fedge run`` or ``fedge deploy``."""
    console.rule(f"[bold]{s['scenario']}[/] on {s['engine']} in {s.get('wall_seconds', '?')} s")
    if s.get("resumed_from"):
        console.print(f"Resumed from champion v{s['resumed_from']} in the registry.")
    print_drifts(s)
    rec = Table(title="Accuracy around each true drift", title_justify="left")
    for col in ("drift at tick", "before", "right after", "after retraining", "retrained at tick"):
        rec.add_column(col, justify="right")
    for r in s["recoveries"]:
        rec.add_row(
            str(r["step"]),
            fmt(r["before"]),
            fmt(r["right_after"]),
            fmt(r["after_retraining"]),
            "-" if r["retrained_at"] is None else str(r["retrained_at"]),
        )
    if s["recoveries"]:
        console.print(rec)
    camp = Table(title=f"{len(s['campaigns'])} retraining campaigns", title_justify="left")
    for col in ("tick", "why", "devices", "rounds", "candidate", "champion", "result"):
        camp.add_column(col, no_wrap=True)
    for c in s["campaigns"]:
        verdict = "[green]promoted[/]" if c["promoted"] else "[yellow]not promoted[/]"
        camp.add_row(
            str(c["tick"]),
            c["reason"].split(":")[0],
            str(len(c["devices"])),
            str(c["rounds"]),
            f"{c['candidate_acc']:.3f}",
            "-" if c["parent"] == 0 else f"{c['champion_acc']:.3f}",
            f"v{c['version']} {verdict}",
        )
    console.print(camp)
    reasons: dict[str, list[int]] = {}
    for r in s.get("refused", []):
        reasons.setdefault(r["reason"], []).append(r["tick"])
    for reason, ticks in reasons.items():
        from fedge.privacy.report import tick_ranges

        console.print(f"[red]No campaign[/] at ticks {tick_ranges(ticks)}: {reason}", highlight=False)
    for r in s.get("rollbacks", []):
        console.print(
            f"[yellow]Rolled back[/] at tick {r['tick']}: v{r['demoted']} scored {100 * r['champion_acc']:.1f}% "
            f"against v{r['restored']}'s {100 * r['standby_acc']:.1f}% on {r['samples']} samples; "
            f"v{r['restored']} serves again",
            highlight=False,
        )
    budget = s.get("privacy_budget")
    if budget:
        # One budget for one model; one per model lineage when clusters are in service.
        per_lineage = budget if "epsilon_spent" not in budget else {"": budget}
        for lineage, b in per_lineage.items():
            console.print(
                f"Privacy{' of ' + lineage if lineage else ''}: epsilon {b['epsilon_spent']:.3f} of "
                f"{b['epsilon_limit']:g} spent (delta {b['delta']:g}) over "
                f"{len(b['campaigns'])} DP campaigns",
                highlight=False,
            )
    errors = s.get("device_errors") or {}
    if errors:
        failing = Table(title=f"{len(errors)} devices answered with an error", title_justify="left")
        failing.add_column("device")
        failing.add_column("error (type and first line)")
        for who, reason in sorted(errors.items()):
            failing.add_row(who, escape(reason))
        console.print(failing)
    private = privacy_columns(s["versions"])
    vers = Table(title=f"Model versions of {s['model_name']}", title_justify="left")
    for col in ("version", "aliases", "parent", "trigger", *private):
        vers.add_column(col)
    for v in s["versions"]:
        tags = v["tags"]
        row = [
            f"v{v['version']}",
            ", ".join(v["aliases"]) or "",
            tags.get("fedge.parent_version", "?"),
            tags.get("fedge.trigger_reason", "").split(":")[0],
        ]
        vers.add_row(*row, *privacy_cells(tags, private))
    console.print(vers)
    console.print(
        f"Champion: [bold]v{s['champion']}[/]   rejected rows: {s['rejected_rows']}   "
        f"run folder: {s['run_dir']}"
    )
    console.print(f"Open the MLflow UI:  [bold]{s['ui_command']}[/]", highlight=False)


def _ticks(ticks: list[int]) -> str:
    from fedge.privacy.report import tick_ranges

    return tick_ranges(ticks) if ticks else "-"


def print_drifts(s: dict[str, Any]) -> None:
    """What the devices' detectors saw, beside the true schedule where the scenario knows it.

    Without a known truth (the devices' own data) only the detections are shown.
    Devices with neither a true drift nor a detection are left out of the table.
    """
    detected = {int(d): list(t) for d, t in (s.get("detected_drifts") or {}).items()}
    truth = s.get("drift_truth")
    devices = s.get("devices")
    if truth is None:
        if not detected:
            console.print("No device detected a drift (no known drift schedule: the devices' own data).")
            return
        table = Table(
            title=f"Drifts the devices detected ({len(detected)} of {devices or '?'} devices; "
            "no known schedule)",
            title_justify="left",
        )
        table.add_column("device", justify="right")
        table.add_column("detector fired at ticks")
        for device, ticks in sorted(detected.items()):
            table.add_row(str(device), _ticks(ticks))
        console.print(table)
        return
    if not truth["devices"]:
        console.print("No drift in this scenario, and no device detected one.")
        return
    table = Table(
        title=f"Drifts the devices detected against the scenario's schedule (caught: within "
        f"{truth['within']} ticks): {truth['caught']} caught, {truth['missed']} missed, "
        f"{truth['false_alarms']} false alarms",
        title_justify="left",
    )
    for col in ("device", "true drift at", "detected at", "caught (delay)", "missed", "false alarms"):
        table.add_column(col, justify="right" if col == "device" else "left")
    for d in truth["devices"]:
        caught = ", ".join(f"{c['drift']} (+{c['delay']})" for c in d["caught"]) or "-"
        table.add_row(
            str(d["device"]),
            _ticks(d["true"]),
            _ticks(detected.get(d["device"], [])),
            caught,
            _ticks(d["missed"]),
            _ticks(d["false_alarms"]),
        )
    console.print(table)
