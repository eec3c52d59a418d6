"""A grid that bounds every wait for replies and holds campaign rounds to a quorum.

Devices die, restart and go offline. :class:`ReplyQuorum` stands in front of
the real grid: no exchange waits longer than ``run.reply_timeout``, and a
strategy round (its ``train`` or ``evaluate`` exchange) counts only when at
least ``campaign.min_devices`` devices replied in time. A round short of some
devices goes on with the others and says who was missing; a round short of the
quorum abandons the campaign (:class:`fedge.core.orchestrator.CampaignRefused`), so
no model version is registered from too few devices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedge.contracts import protocol as p
from fedge.core.ports import CampaignRefused
from fedge.engines.view import GridView

log = logging.getLogger("fedge.server")

ROUND_TYPES = (MessageType.TRAIN, MessageType.EVALUATE)


@dataclass(frozen=True)
class ShortRound:
    """A strategy exchange that went on without some of its devices."""

    tick: int
    round: int
    kind: str
    replied: int
    sent: int
    #: Nodes without a usable reply: silent ones and those that answered with an error.
    missing_nodes: tuple[int, ...]
    #: Of those, the nodes that answered with an error, with its type and first line.
    failed: tuple[tuple[int, str], ...] = ()

    def describe(self, timeout: float) -> str:
        """One line for the log: who was silent, who answered with an error and why."""
        errored = dict(self.failed)
        silent = [n for n in self.missing_nodes if n not in errored]
        parts = []
        if silent:
            parts.append(f"no reply from node {', '.join(str(n) for n in silent)}")
        parts += [f"node {n} answered with an error: {why}" for n, why in self.failed]
        return (
            f"tick {self.tick} round {self.round} {self.kind}: {self.replied} of {self.sent} "
            f"devices replied within {timeout:g} s ({'; '.join(parts)})"
        )


class ReplyQuorum(GridView):
    """Bound every wait by ``timeout``; a round needs ``min_devices`` replies.

    Parameters
    ----------
    grid : Grid
        The grid that moves the messages.
    min_devices : int, default 1
        Replies (without error) a ``train`` or ``evaluate`` exchange needs for
        its round to count.
    timeout : float, default 600.0
        Seconds any exchange waits for replies at most (``run.reply_timeout``).
    on_short : callable, optional
        Called with a :class:`ShortRound` for every round that went on without
        some of its devices.
    """

    def __init__(
        self,
        grid: Grid,
        min_devices: int = 1,
        timeout: float = 600.0,
        on_short: Callable[[ShortRound], None] | None = None,
    ) -> None:
        super().__init__(grid)
        self.min_devices = min_devices
        self.timeout = timeout
        self.on_short = on_short
        #: Every short round so far, in order.
        self.shorts: list[ShortRound] = []
        #: Per tick, the nodes that had nothing to evaluate (left out of the averages).
        self.unevaluated: dict[int, set[int]] = {}
        #: Per tick, the labelled holdout samples its latest evaluate exchange rested on.
        self.evaluated: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"ReplyQuorum(min_devices={self.min_devices}, timeout={self.timeout})"

    def _note_unevaluated(self, request: Message, replies: Iterable[Message]) -> None:
        empty = {
            r.metadata.src_node_id for r in replies if not r.has_error() and _examples(r) == 0
        }
        if empty:
            self.unevaluated.setdefault(_config_int(request, p.TICK), set()).update(empty)
        counts = [_examples(r) or 0 for r in replies if not r.has_error()]
        self.evaluated[_config_int(request, p.TICK)] = sum(counts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        sent = list(messages)
        wait = self.timeout if timeout is None else min(timeout, self.timeout)
        replies = list(self._grid.send_and_receive(sent, timeout=wait))
        kinds = {m.metadata.message_type for m in sent}
        if len(kinds) != 1 or not kinds <= set(ROUND_TYPES):
            return replies
        ok = {r.metadata.src_node_id for r in replies if not r.has_error()}
        if kinds == {MessageType.EVALUATE}:
            self._note_unevaluated(sent[0], replies)
        if len(ok) >= len(sent):
            return replies
        failed = tuple(
            sorted(
                (r.metadata.src_node_id, error_line(r))
                for r in replies
                if r.has_error() and r.metadata.src_node_id not in ok
            )
        )
        short = ShortRound(
            tick=_config_int(sent[0], p.TICK),
            round=_config_int(sent[0], p.ROUND),
            kind=kinds.pop(),
            replied=len(ok),
            sent=len(sent),
            missing_nodes=tuple(sorted({m.metadata.dst_node_id for m in sent} - ok)),
            failed=failed,
        )
        if short.replied < self.min_devices:
            raise CampaignRefused(
                f"campaign abandoned: {short.describe(wait)}; "
                f"campaign.min_devices is {self.min_devices}"
            )
        log.warning("%s; the round goes on with them", short.describe(wait))
        self.shorts.append(short)
        if self.on_short is not None:
            self.on_short(short)
        return replies


def missing_by_round(grid: Grid, tick: int, kind: str = MessageType.TRAIN) -> dict[int, set[int]]:
    """Per strategy round of ``tick``, the nodes ``grid``'s quorum went on without (empty: none)."""
    out: dict[int, set[int]] = {}
    for short in getattr(grid, "shorts", ()):
        if short.tick == tick and short.kind == kind:
            out.setdefault(short.round, set()).update(short.missing_nodes)
    return out


def _examples(reply: Message) -> int | None:
    metrics = reply.content.metric_records.get(p.METRICS) if reply.has_content() else None
    value = metrics.get(p.NUM_EXAMPLES) if metrics is not None else None
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def error_line(reply: Message, limit: int = 300) -> str:
    """A reply's error as one line: what the device's handler raised and its first line."""
    reason = " ".join(str(reply.error.reason).split())
    return reason[:limit] or f"error code {reply.error.code}"


def _config_int(message: Message, key: str) -> int:
    config: Any = message.content.config_records.get(p.CONFIG) if message.has_content() else None
    value = config.get(key, -1) if config is not None else -1
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else -1
