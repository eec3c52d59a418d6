"""The compliance report of a run: who trained which model, and what left the devices.

Built from the run folder (``summary.json`` and the devices' audit logs) so it
can be produced after the fact, on the server or by an auditor with a copy of
the folder. Devices appear under pseudonyms: a salted hash of their id, stable
within one report.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fedge.contracts.protocol import EGRESS
from fedge.privacy.audit import summarise, verify
from fedge.privacy.secagg_protocol import DEVICE_REPLIES as SECAGG_REPLIES


def pseudonym(device: int | str, salt: str) -> str:
    """A stable pseudonymous id for ``device``."""
    return "dev-" + hashlib.sha256(f"{salt}:{device}".encode()).hexdigest()[:10]


def _device_of(path: Path) -> str:
    return path.name.split(".")[0].removeprefix("device-")


def collect(run_dir: Path) -> dict[str, Any]:
    """Everything the report states, as data."""
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{run_dir}: no summary.json; is this a fedge run folder?")
    summary = json.loads(summary_path.read_text())
    salt = str(summary.get("run_id") or run_dir.name)
    devices = []
    for log in sorted((run_dir / "devices").glob("*.audit.jsonl")):
        verdict = verify(log)
        stats = summarise(log) if verdict.ok else {"messages": verdict.entries}
        devices.append(
            {
                "device": pseudonym(_device_of(log), salt),
                "chain_ok": verdict.ok,
                "chain_problem": verdict.reason,
                **stats,
            }
        )
    versions = []
    for v in summary.get("versions", []):
        tags = v.get("tags", {})
        ids = [d for d in tags.get("fedge.devices", "").split(",") if d]
        versions.append(
            {
                "version": v["version"],
                "aliases": v.get("aliases", []),
                "trigger": tags.get("fedge.trigger_reason", ""),
                "devices": [pseudonym(d, salt) for d in ids],
                "aggregation": tags.get("fedge.aggregation", "plaintext"),
                "dp": tags.get("fedge.dp", "none"),
                "epsilon": tags.get("fedge.epsilon", "n/a"),
            }
        )
    return {"summary": summary, "devices": devices, "versions": versions}


def render_markdown(data: dict[str, Any]) -> str:
    """The report as Markdown."""
    s = data["summary"]
    lines = [
        f"# Compliance report: {s.get('scenario')} (run {s.get('run_id')})",
        "",
        (f"Tracking: `{s.get('tracking_uri')}`, model `{s.get('model_name')}`, "
        f"champion v{s.get('champion')}."),
        "",
        "## What a device may send",
        "",
        "| reply | record | kind | allowed keys |",
        "| --- | --- | --- | --- |",
    ]
    for kind, records in EGRESS.items():
        for name, (rkind, keys) in records.items():
            allowed = ", ".join(keys) if keys else "names and shapes of the model received"
            lines.append(f"| {kind} | {name} | {rkind} | {allowed} |")
    for kind, fields in SECAGG_REPLIES.items():
        lines.append(
            f"| {kind} | secagg | config | {', '.join(fields)} (public keys and encrypted shares "
            "of secure aggregation) |"
        )
    lines += [
        "",
        "Everything else is blocked on the device and recorded in its audit log.",
        "",
        "## Privacy",
        "",
        *_privacy_lines(s),
        "",
        "## Model versions",
        "",
        "| version | aliases | trigger | devices | aggregation | DP | epsilon |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in data["versions"]:
        lines.append(
            f"| v{v['version']} | {', '.join(v['aliases'])} | {v['trigger']} | "
            f"{len(v['devices'])}: {' '.join(v['devices'])} | {v['aggregation']} | {v['dp']} | "
            f"{v['epsilon']} |"
        )
    lines += [
        "",
        "## Egress, from the devices' audit logs",
        "",
        "| device | audit chain | messages | bytes sent | blocked |",
        "| --- | --- | --- | --- | --- |",
    ]
    total_blocked = 0
    for d in data["devices"]:
        blocked = len(d.get("blocked", []))
        total_blocked += blocked
        chain = "intact" if d["chain_ok"] else f"BROKEN: {d['chain_problem']}"
        lines.append(
            f"| {d['device']} | {chain} | {d.get('messages', 0)} | {d.get('bytes_sent', '-')} | "
            f"{blocked} |"
        )
    if not data["devices"]:
        lines.append("| (no audit logs in this run folder) | | | | |")
    lines += ["", f"Blocked messages in total: {total_blocked}."]
    for d in data["devices"]:
        for b in d.get("blocked", []):
            lines.append(f"- {d['device']} entry {b['seq']}: {'; '.join(b['violations'])}")
    return "\n".join(lines) + "\n"


def tick_ranges(ticks: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` as ``0-2, 5, 7-8``."""
    parts: list[str] = []
    for t in sorted(set(ticks)):
        if parts and "-" in parts[-1] and int(parts[-1].split("-")[1]) == t - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{t}"
        elif parts and "-" not in parts[-1] and int(parts[-1]) == t - 1:
            parts[-1] = f"{parts[-1]}-{t}"
        else:
            parts.append(str(t))
    return ", ".join(parts)


def _privacy_lines(s: dict[str, Any]) -> list[str]:
    """The run's privacy settings, budget and refused campaigns, for people."""
    flat = s.get("config", {})
    secure = flat.get("privacy.secure_aggregation", False)
    dp = flat.get("privacy.dp", "none")
    lines = [
        "- Secure aggregation: "
        + (
            f"on (SecAgg+, shares {flat.get('privacy.secagg_shares')}, threshold "
            f"{flat.get('privacy.secagg_threshold')}): the server held masked updates and their sum only."
            if secure
            else "off: the server saw each device's update."
        ),
        f"- Differential privacy: {dp}.",
    ]
    budget = s.get("privacy_budget")
    if budget:
        lines.append(
            f"- Epsilon spent: {budget['epsilon_spent']:.4f} of {budget['epsilon_limit']:g} "
            f"at delta {budget['delta']:g} ({len(budget['campaigns'])} DP campaigns in this run, "
            "composed with the lineage's earlier ones)."
        )
    refused = s.get("refused", [])
    if refused:
        ticks = tick_ranges([r["tick"] for r in refused])
        lines.append(f"- Campaigns not started (ticks {ticks}): {refused[-1]['reason']}")
    return lines


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``compliance-report.md`` into the run folder (or ``out``)."""
    text = render_markdown(collect(run_dir))
    path = out or run_dir / "compliance-report.md"
    path.write_text(text)
    return path
