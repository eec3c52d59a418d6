"""The compliance report of a run: who trained which model, and what left the devices.

Built from the run folder (``summary.json``, the devices' audit logs and the
audit anchors the server recorded) so it can be produced after the fact, on
the server or by an auditor with a copy of the folder. Every device's log is
held against what the server saw in its drift reports
(:func:`fedge.privacy.anchors.verify`): a device whose log is missing, shorter
than the server saw, or rewritten is flagged, and so is a device that trained
a model but left no log.

Devices appear under pseudonyms: an HMAC-SHA256 of the run id and the device id
under a secret that stays with the server operator (:func:`pseudonym_key_path`,
created on first use, owner-only). Nothing printed in the report reproduces
them; two reports made with the same secret use the same ones.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

from fedge.contracts.protocol import EGRESS
from fedge.privacy.anchors import (
    AuditAnchors,
    Verdict,
    device_of,
    load_anchors,
    seen_by_server,
    summarise,
    verify,
)
from fedge.privacy.audit import load_or_create_key
from fedge.privacy.secagg_protocol import DEVICE_REPLIES as SECAGG_REPLIES

#: The pseudonym secret's file name, in the output folder's state dir.
PSEUDONYM_KEY = "report-pseudonyms.key"

#: How the report names what is wrong with a device's log (see :attr:`Verdict.kind`).
_PROBLEM = {
    "missing": "MISSING",
    "short": "SHORT",
    "rewritten": "REWRITTEN",
    "key": "KEY MISSING",
    "anchors": "UNCHECKED",
}


def pseudonym(device: int | str, key: bytes, run_id: str = "") -> str:
    """A pseudonymous id for ``device``, stable for one ``key`` and run.

    Parameters
    ----------
    device : int or str
        The device's id.
    key : bytes
        The operator's secret (:func:`pseudonym_key_path`); without it the
        pseudonym cannot be recomputed from the device id.
    run_id : str, default ""
        The run; the same device gets another pseudonym in another run.
    """
    mac = hmac.new(key, f"{run_id}:{device}".encode(), hashlib.sha256)
    return "dev-" + mac.hexdigest()[:12]


def pseudonym_key_path(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Where the pseudonym secret of a run lives: ``<output dir>/state/report-pseudonyms.key``.

    The output folder is the one the run's summary names; when it is not
    there (a copy of the run folder elsewhere), the secret lives in the run
    folder's own ``state`` dir instead, so a copy gets pseudonyms of its own.
    """
    output = (summary.get("config") or {}).get("run.output_dir")
    if isinstance(output, str) and output and Path(output).expanduser().is_absolute():
        base = Path(output).expanduser()
        if base.is_dir():
            return base / "state" / PSEUDONYM_KEY
    return run_dir / "state" / PSEUDONYM_KEY


def _trained(summary: dict[str, Any]) -> set[str]:
    """Devices that trained one of the run's model versions."""
    out: set[str] = set()
    for v in summary.get("versions", []):
        out.update(d for d in v.get("tags", {}).get("fedge.devices", "").split(",") if d)
    return out


def _natural(device: str) -> tuple[int, int | str]:
    return (0, int(device)) if device.isdigit() else (1, device)


def collect(run_dir: Path, *, secret: Path | None = None) -> dict[str, Any]:
    """Everything the report states, as data.

    Parameters
    ----------
    run_dir : Path
        The run folder.
    secret : Path, optional
        The pseudonym secret's file (created when missing); by default
        :func:`pseudonym_key_path`.

    Raises
    ------
    FileNotFoundError
        If ``run_dir`` holds no ``summary.json``.
    """
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{run_dir}: no summary.json; is this a fedge run folder?")
    summary = json.loads(summary_path.read_text())
    key = load_or_create_key(secret or pseudonym_key_path(run_dir, summary))
    run_id = str(summary.get("run_id") or run_dir.name)

    def name(device: int | str) -> str:
        return pseudonym(device, key, run_id)

    anchors_problem = ""
    try:
        anchors = load_anchors(run_dir)
    except ValueError as exc:
        anchors, anchors_problem = AuditAnchors(), f"the server's audit anchors are unreadable: {exc}"
    logs = {device_of(p): p for p in (run_dir / "devices").glob("*.audit.jsonl")}
    trained = _trained(summary)
    devices = []
    for device in sorted(set(logs) | set(anchors.devices()) | trained, key=_natural):
        path = logs.get(device)
        mine = anchors.for_device(device)
        if anchors_problem:
            verdict = Verdict(False, 0, None, anchors_problem, kind="anchors")
        elif path is None:
            seen = "the server saw " + seen_by_server(mine) if mine else "it trained a model of this run"
            verdict = Verdict(False, 0, None, f"no audit log, though {seen}", kind="missing")
        else:
            verdict = verify(path, anchors=mine)
        stats = summarise(path) if verdict.ok and path is not None else {"messages": verdict.entries}
        devices.append(
            {
                "device": name(device),
                "chain_ok": verdict.ok,
                "chain_problem": verdict.reason,
                "problem_kind": verdict.kind,
                "keyed": verdict.keyed,
                "server_saw": verdict.anchored,
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
                "devices": [name(d) for d in ids],
                "aggregation": tags.get("fedge.aggregation", "plaintext"),
                "dp": tags.get("fedge.dp", "none"),
                "epsilon": tags.get("fedge.epsilon", "n/a"),
            }
        )
    return {
        "summary": summary,
        "devices": devices,
        "versions": versions,
        "anchored_devices": len(anchors),
    }


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
        *_anchor_lines(data),
        "",
        "| device | audit chain | keyed | server saw | messages | bytes sent | blocked |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    total_blocked = 0
    for d in data["devices"]:
        blocked = len(d.get("blocked", []))
        total_blocked += blocked
        if d["chain_ok"]:
            chain = "intact"
        else:
            chain = f"{_PROBLEM.get(d.get('problem_kind', ''), 'BROKEN')}: {d['chain_problem']}"
        missing = d.get("problem_kind") == "missing"
        keyed = "-" if missing else "yes" if d.get("keyed") else "no"
        saw = d.get("server_saw") or "-"
        lines.append(
            f"| {d['device']} | {chain} | {keyed} | {saw} | {'-' if missing else d.get('messages', 0)} | "
            f"{d.get('bytes_sent', '-')} | {blocked} |"
        )
    if not data["devices"]:
        lines.append("| (no audit logs in this run folder) | | | | | | |")
    flagged = [d for d in data["devices"] if not d["chain_ok"]]
    lines += ["", f"Blocked messages in total: {total_blocked}."]
    lines.append(
        f"Devices whose audit log does not hold up: {len(flagged)}"
        + (f" ({', '.join(d['device'] for d in flagged)})." if flagged else ".")
    )
    for d in data["devices"]:
        for b in d.get("blocked", []):
            lines.append(f"- {d['device']} entry {b['seq']}: {'; '.join(b['violations'])}")
    return "\n".join(lines) + "\n"


def _anchor_lines(data: dict[str, Any]) -> list[str]:
    """How far the logs could be checked against the server's record."""
    n = data.get("anchored_devices", 0)
    if n:
        text = (
            "Each log is checked against the entry counts and chain heads the server received "
            f"in {n} devices' drift reports: a log that is missing, shorter than the server saw, "
            "or rewritten is flagged. Entries after a device's last report are covered by its key."
        )
    else:
        text = (
            "The server recorded no audit anchors for this run: each log's chain is checked on its "
            "own, so a log cut short, emptied or deleted cannot be told from one that was short."
        )
    return [text]


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


def write_report(run_dir: Path, out: Path | None = None, *, secret: Path | None = None) -> Path:
    """Write ``compliance-report.md`` into the run folder (or ``out``).

    ``secret`` is the pseudonym secret's file (see :func:`collect`).
    """
    text = render_markdown(collect(run_dir, secret=secret))
    path = out or run_dir / "compliance-report.md"
    path.write_text(text)
    return path
