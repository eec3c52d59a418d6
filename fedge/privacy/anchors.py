"""Checking device audit logs, and the anchors the server keeps to check them against.

The server side of :mod:`fedge.privacy.audit`: devices write their logs, this
module reads them. Every drift report carries its device's log entry count and
chain head (:func:`fedge.privacy.audit.anchor_fields`); the server keeps them
(:class:`AuditAnchors`, saved as :data:`ANCHORS_FILE` beside the run), and
:func:`verify` and :func:`check_logs` hold a log against them: a missing log,
a log with fewer entries than the server saw, or one whose entry at the
anchored count does not hash to the anchored head (rewritten, even with the
key) is flagged. Entries written after the last report the server received
are covered by the key only. :func:`summarise` says what a log recorded
(``fedge audit``, the compliance report).

A line cut short by a crash is not an entry: :func:`verify` and
:func:`summarise` ignore it.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedge.contracts.protocol import DriftReport
from fedge.privacy.audit import (
    ANCHOR_HEX,
    GENESIS,
    MAC,
    Chain,
    anchor_head,
    is_entry,
    key_path,
    read_key,
)

#: Where a run folder keeps the anchors the server recorded.
ANCHORS_FILE = "audit-anchors.json"

# The logger the audit code always used: operators filter on it.
log = logging.getLogger("fedge.device")


@dataclass(frozen=True)
class Verdict:
    """Result of checking a log's chain (and, where there are any, the server's anchors).

    ``torn_tail`` is True when the file ends in a line cut short by a crash
    (not counted as an entry; the entries before it are what was checked).
    ``kind`` names what is wrong: ``"missing"`` (no log), ``"short"`` (fewer
    entries than the server saw), ``"rewritten"`` (an entry the server saw
    hashes differently now), ``"key"`` (keyed entries, no key to check them
    with), ``"chain"`` (the chain itself is broken), ``"anchors"`` (the
    server's record of the run cannot be read); empty when ``ok``.
    ``keyed`` says whether the entries were checked with the device's key,
    ``anchored`` how many entries the server's anchors vouched for.
    """

    ok: bool
    entries: int
    broken_at: int | None = None
    reason: str = ""
    torn_tail: bool = False
    kind: str = ""
    keyed: bool = False
    anchored: int = 0


def _lines(path: str | Path) -> tuple[list[str], bool]:
    """Whole lines of the log, and whether an unfinished last line was left out."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    if text and not text.endswith("\n") and lines and not is_entry(lines[-1]):
        return lines[:-1], True
    return lines, False


@dataclass(frozen=True)
class Anchor:
    """What one drift report said about its device's audit log.

    Parameters
    ----------
    tick : int
        The report's tick.
    entries : int
        Entries the log held when the report was made.
    head : str
        Hex prefix (:data:`ANCHOR_HEX` digits) of the hash of the last of them.
    """

    tick: int
    entries: int
    head: str


def verify(
    path: str | Path,
    *,
    key: bytes | None = None,
    anchors: Sequence[Anchor] | None = None,
) -> Verdict:
    """Check every entry's hash and link, and the log against what the server saw.

    Parameters
    ----------
    path : Path
        The audit log.
    key : bytes, optional
        The device's key; by default read from the key file beside the log
        (:func:`key_path`). With a key, every entry must be keyed and its HMAC
        must match; keyed entries without a key fail (``kind="key"``).
    anchors : sequence of Anchor, optional
        What the server saw of this log. By default those recorded for the
        log's device in its run folder (``<run>/devices/<log>`` ->
        ``<run>/audit-anchors.json`` or the anchors in ``<run>/summary.json``);
        pass ``()`` to check the chain alone.
    """
    path = Path(path)
    if anchors is None:
        anchors = ()
        if path.parent.name == "devices":  # a run folder's device log
            try:
                anchors = load_anchors(path.parent.parent).for_device(device_of(path))
            except ValueError as exc:
                return Verdict(
                    False, 0, None, f"the server's audit anchors are unreadable: {exc}", kind="anchors"
                )
    if key is None:
        try:
            key = read_key(key_path(path))
        except ValueError as exc:
            return Verdict(False, 0, None, str(exc), kind="key")
    want = max((a.entries for a in anchors), default=0)
    try:
        lines, torn = _lines(path)
    except FileNotFoundError:
        seen = f"; the server saw {seen_by_server(anchors)}" if want else ""
        return Verdict(False, 0, None, f"no audit log{seen}", kind="missing", anchored=want)
    chain = Chain(key)
    at: dict[int, list[Anchor]] = {}
    for a in anchors:
        at.setdefault(a.entries, []).append(a)

    def broken(n: int, reason: str, kind: str = "chain") -> Verdict:
        return Verdict(False, n, n, reason, torn, kind, chain.keyed, want)

    prev = GENESIS
    for n, line in enumerate(lines):
        try:
            entry = json.loads(line)
            body = {k: v for k, v in entry.items() if k != "hash"}
            stored = str(entry["hash"])
        except (ValueError, KeyError, AttributeError):
            return broken(n, f"line {n + 1}: not an audit entry")
        if entry.get("seq") != n:
            return broken(n, f"line {n + 1}: sequence {entry.get('seq')} where {n} was due")
        if entry.get("prev") != prev:
            return broken(n, f"line {n + 1}: does not follow the previous entry")
        if (entry.get("mac") == MAC) != chain.keyed:
            if chain.keyed:
                return broken(n, f"line {n + 1}: not keyed, though the log has a key")
            return broken(n, f"line {n + 1}: keyed, but the log's key file is missing", "key")
        if not hmac.compare_digest(chain.digest(prev, body), stored):
            return broken(n, f"line {n + 1}: content does not match its hash")
        for a in at.get(n + 1, ()):
            if stored[: len(a.head)] != a.head:
                return broken(
                    n,
                    f"line {n + 1}: not the entry the server saw there at tick {a.tick} "
                    "(the log was rewritten up to here)",
                    "rewritten",
                )
        prev = stored
    if len(lines) < want:
        what = "is empty" if not lines else f"holds {len(lines)} entries"
        return Verdict(
            False, len(lines), len(lines), f"the log {what}; the server saw {seen_by_server(anchors)}",
            torn, "short", chain.keyed, want,
        )
    return Verdict(True, len(lines), torn_tail=torn, keyed=chain.keyed, anchored=want)


def seen_by_server(anchors: Sequence[Anchor]) -> str:
    """The most the anchors vouch for, for people: ``"40 entries at tick 7"``."""
    best = max(anchors, key=lambda a: (a.entries, a.tick))
    return f"{best.entries} entries at tick {best.tick}"


def device_of(path: str | Path) -> str:
    """The device id in a log's name: ``device-3.audit.jsonl`` -> ``"3"``."""
    return Path(path).name.split(".")[0].removeprefix("device-")


# -- what the server saw ----------------------------------------------------------------------
class AuditAnchors:
    """The audit-log anchors the server received in the devices' drift reports.

    Pure and JSON-ready: the server calls :meth:`record` with every report it
    reads, saves :meth:`to_dict` (or :meth:`save`) beside the run, and
    :func:`check_logs` later holds each device's log against it.

    Per device it keeps two anchors: the one with the most entries (its head
    commits to the whole chain up to there, so it alone catches any deletion,
    truncation or rewrite before it) and the one of the latest tick (which
    catches a log replaced during the run by a shorter one that grew again).

    Examples
    --------
    >>> from fedge.contracts.protocol import DriftReport
    >>> anchors = AuditAnchors()
    >>> hi, lo = anchor_fields("ab" * 32)
    >>> anchors.record(DriftReport(3, 5, 1, 10, 0, False, 0, 0, 10,
    ...                            audit_entries=7, audit_head_hi=hi, audit_head_lo=lo))
    True
    >>> anchors.for_device(3)[0].entries
    7
    """

    def __init__(self) -> None:
        self._strongest: dict[str, Anchor] = {}
        self._latest: dict[str, Anchor] = {}

    def record(self, report: DriftReport) -> bool:
        """Keep what ``report`` says about its device's log; False when it says nothing."""
        if report.audit_entries <= 0:
            return False  # a device of an older version, or nothing logged yet
        try:
            head = anchor_head(report.audit_head_hi, report.audit_head_lo)
        except OverflowError:
            log.warning(
                "device %s tick %d: audit head out of range; not recorded", report.device, report.tick
            )
            return False
        self._keep(str(report.device), Anchor(report.tick, report.audit_entries, head))
        return True

    def record_all(self, reports: Iterable[DriftReport]) -> int:
        """Record several reports (a poll's replies with their late reports); returns how many counted."""
        return sum(self.record(r) for r in reports)

    def _keep(self, device: str, anchor: Anchor) -> None:
        strongest = self._strongest.get(device)
        if strongest is None or anchor.entries > strongest.entries:
            self._strongest[device] = anchor
        latest = self._latest.get(device)
        if latest is None or anchor.tick >= latest.tick:
            self._latest[device] = anchor

    def devices(self) -> list[str]:
        """Devices with at least one anchor, in id order."""
        return sorted(self._strongest, key=_natural)

    def for_device(self, device: int | str) -> tuple[Anchor, ...]:
        """The anchors kept for ``device`` (empty when the server has none)."""
        key = str(device)
        kept = [a for a in (self._strongest.get(key), self._latest.get(key)) if a is not None]
        return tuple(dict.fromkeys(kept))

    def merge(self, other: AuditAnchors) -> AuditAnchors:
        """Add another record's anchors to this one (returns self)."""
        for device in other.devices():
            for anchor in other.for_device(device):
                self._keep(device, anchor)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: ``{"devices": {id: {"strongest": {...}, "latest": {...}}}}``."""
        return {
            "devices": {
                d: {"strongest": asdict(self._strongest[d]), "latest": asdict(self._latest[d])}
                for d in self.devices()
            }
        }

    @classmethod
    def from_dict(cls, data: Any) -> AuditAnchors:
        """Read :meth:`to_dict`'s output, refusing anything else with one line.

        Raises
        ------
        ValueError
            If ``data`` is not an anchors record.
        """
        anchors = cls()
        devices = data.get("devices") if isinstance(data, dict) else None
        if not isinstance(devices, dict):
            raise ValueError("audit anchors: expected an object with 'devices'")  # noqa: TRY004 - a file's content
        for device, kept in devices.items():
            if not isinstance(kept, dict):
                raise ValueError(f"audit anchors: device {device!r}: expected an object")  # noqa: TRY004
            for which in ("strongest", "latest"):
                raw = kept.get(which)
                if raw is None:
                    continue
                try:
                    anchor = Anchor(int(raw["tick"]), int(raw["entries"]), str(raw["head"]))
                    if len(bytes.fromhex(anchor.head)) * 2 != ANCHOR_HEX:
                        raise ValueError("wrong head length")
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(f"audit anchors: device {device!r}: bad {which} anchor") from exc
                anchors._keep(str(device), anchor)
        return anchors

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` to ``path`` atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.to_dict(), fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> AuditAnchors:
        """Read a file :meth:`save` wrote; an absent file is an empty record.

        Raises
        ------
        ValueError
            If the file is not an anchors record.
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        try:
            return cls.from_dict(json.loads(text))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def __len__(self) -> int:
        return len(self._strongest)

    def __repr__(self) -> str:
        return f"AuditAnchors(devices={len(self)})"


def _natural(device: str) -> tuple[int, int | str]:
    return (0, int(device)) if device.isdigit() else (1, device)


def load_anchors(run_dir: str | Path) -> AuditAnchors:
    """The anchors a run's server recorded: ``audit-anchors.json`` and ``summary.json``'s.

    Both are read and merged, so removing one of them does not hide the other.

    Raises
    ------
    ValueError
        If either holds something that is not an anchors record.
    """
    run_dir = Path(run_dir)
    anchors = AuditAnchors.load(run_dir / ANCHORS_FILE)
    summary_path = run_dir / "summary.json"
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return anchors  # no summary yet (a live run), or not one the report would read either
    if isinstance(summary, dict) and summary.get("audit_anchors") is not None:
        try:
            anchors.merge(AuditAnchors.from_dict(summary["audit_anchors"]))
        except ValueError as exc:
            raise ValueError(f"{summary_path}: {exc}") from None
    return anchors


@dataclass(frozen=True)
class Finding:
    """One device whose audit log does not hold up.

    ``kind`` is a :attr:`Verdict.kind`; ``problem`` a one-line explanation.
    """

    device: str
    path: str
    kind: str
    problem: str


def check_logs(
    anchors: AuditAnchors, log_paths: Iterable[str | Path] | Mapping[str, str | Path]
) -> list[Finding]:
    """Every device whose log is missing, short, rewritten or broken, in device order.

    Parameters
    ----------
    anchors : AuditAnchors
        What the server saw.
    log_paths : iterable of Path, or mapping of device id to Path
        The logs found (a list of ``device-<id>.audit.jsonl`` files is mapped
        by name). Each is checked (with its key, if it has one) against its
        device's anchors; a device with anchors but no log here is missing.
    """
    if isinstance(log_paths, Mapping):
        paths = {str(d): Path(p) for d, p in log_paths.items()}
    else:
        paths = {device_of(p): Path(p) for p in log_paths}
    findings = []
    for device in sorted(set(paths) | set(anchors.devices()), key=_natural):
        path = paths.get(device)
        mine = anchors.for_device(device)
        if path is None:
            verdict = Verdict(False, 0, None, f"no audit log; the server saw {seen_by_server(mine)}", kind="missing")
        else:
            verdict = verify(path, anchors=mine)
        if not verdict.ok:
            findings.append(Finding(device, str(path or ""), verdict.kind, verdict.reason))
    return findings


def summarise(path: str | Path) -> dict[str, Any]:
    """Counts per message type, bytes sent, blocked messages and what they tried to send."""
    by_type: Counter[str] = Counter()
    sent_bytes = 0
    blocked: list[dict[str, Any]] = []
    lines, _ = _lines(path)
    for line in lines:
        entry = json.loads(line)
        by_type[str(entry.get("message_type"))] += 1
        if entry.get("blocked"):
            blocked.append({"seq": entry["seq"], "violations": entry.get("violations", [])})
        else:
            sent_bytes += int(entry.get("bytes", 0))
    return {
        "messages": sum(by_type.values()),
        "by_type": dict(by_type),
        "bytes_sent": sent_bytes,
        "blocked": blocked,
    }
