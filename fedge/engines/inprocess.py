"""In-process engine: a Flower ``Grid`` that hands messages to ClientApps on this machine.

The ServerApp and ClientApp are the very objects Flower's engines run; only
the transport differs. Messages are delivered one node at a time, in the
order sent, which makes a run deterministic for a given seed.

With ``workers > 1`` the nodes are shared out among that many worker
processes, forked when the grid is made: node ``i`` always lives in worker
``i % workers`` (its context, its open device), each worker handles its
nodes' messages in the order sent, and the replies come back in that order.
Devices share nothing, so a run gives the same numbers with any number of
workers; it just uses more cores.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Self
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.app.user_config import UserConfig
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger("fedge.engine")

CLIENT_ERROR = 1
WORKER_LOST = 2


class InProcessGrid(Grid):
    """A grid of ``num_nodes`` simulated nodes, each running ``client_app``.

    Parameters
    ----------
    client_app : ClientApp
        The ClientApp every node runs.
    num_nodes : int
        Number of nodes; node ``i`` gets ``partition-id = i``.
    run_config : dict
        Flower run config handed to every node's context.
    run_id : int, default 1
        Run id in the nodes' contexts.
    workers : int, default 1
        Processes that run the nodes' ClientApps. ``1`` runs them in this
        process; more fork that many workers now (POSIX only), each on one
        thread, and share the nodes out among them. Call :meth:`close` (or use
        the grid as a context manager) to end them; they also end when the
        grid is garbage-collected or the program exits.

    Raises
    ------
    ValueError
        If ``workers`` is below 1, or above 1 where processes cannot be forked.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: UserConfig,
        run_id: int = 1,
        *,
        workers: int = 1,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"InProcessGrid: workers must be a whole number >= 1, got {workers!r}")
        if workers > 1 and "fork" not in multiprocessing.get_all_start_methods():
            raise ValueError("InProcessGrid: workers > 1 needs fork (POSIX); use workers=1 here")
        self.client_app = client_app
        self.workers = workers
        # Messages take their sender from the process's task identity, as in a ServerApp process.
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = run_id
        self._run = Run.create_empty(run_id)
        self._run.override_config = dict(run_config)
        self._contexts = {
            1000 + i: Context(
                run_id=run_id,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        self.offline: set[int] = set()
        #: Called with (request, reply) for every exchange: an observer of what crosses the wire.
        self.on_exchange: Callable[[Message, Message], None] | None = None
        self.messages_sent = 0
        self.client_seconds = 0.0
        #: Seconds the nodes' handlers took, per message type (``train``, ``evaluate``, ...).
        self.client_seconds_by_type: dict[str, float] = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        self._pool: _WorkerPool | None = None
        if workers > 1:
            self._pool = _WorkerPool(client_app, self._contexts, workers)
            self._finalizer = weakref.finalize(self, self._pool.close)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self._contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids, deliver = [], []
        for msg in messages:
            md = msg.metadata
            md.__dict__["_message_id"] = uuid4().hex
            md.__dict__["_run_id"] = self._run.run_id
            ids.append(md.message_id)
            if md.dst_node_id not in self._contexts or md.dst_node_id in self.offline:
                continue  # unreachable node: no reply, as on a real network
            self.messages_sent += 1
            self.bytes_sent += content_bytes(msg)
            deliver.append(msg)
        if self._pool is not None:
            handled = self._pool.handle(deliver)
        else:
            handled = [
                _handle(self.client_app, msg, self._contexts[msg.metadata.dst_node_id])
                for msg in deliver
            ]
        for msg, (reply, seconds) in zip(deliver, handled, strict=True):
            self.client_seconds += seconds
            kind = msg.metadata.message_type
            self.client_seconds_by_type[kind] = self.client_seconds_by_type.get(kind, 0.0) + seconds
            self.bytes_received += content_bytes(reply)
            reply.metadata.__dict__["_message_id"] = uuid4().hex
            if self.on_exchange is not None:
                self.on_exchange(msg, reply)
            self._replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def close(self) -> None:
        """End the worker processes (their devices' audit logs are synced first)."""
        if self._pool is not None:
            self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _handle(client_app: ClientApp, msg: Message, context: Context) -> tuple[Message, float]:
    """The node's reply to ``msg`` (an error reply if its ClientApp raised) and the seconds it took."""
    started = time.perf_counter()
    try:
        reply = client_app(msg, context)
    except Exception as exc:  # noqa: BLE001 - a failing device must not stop the server
        log.warning("node %d failed on %s: %s", msg.metadata.dst_node_id, msg.metadata.message_type, exc)
        reply = Message(Error(CLIENT_ERROR, f"{type(exc).__name__}: {exc}"), reply_to=msg)
    return reply, time.perf_counter() - started


class _WorkerPool:
    """Forked processes, each serving a fixed share of the nodes."""

    def __init__(self, client_app: ClientApp, contexts: dict[int, Context], workers: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self._slot = {node: i % workers for i, node in enumerate(contexts)}
        self._workers: list[tuple[BaseProcess, Connection] | None] = []
        sys.stdout.flush()
        sys.stderr.flush()
        for i in range(workers):
            mine = {n: c for n, c in contexts.items() if self._slot[n] == i}
            here, there = ctx.Pipe()
            # The child closes every parent end it inherits, so it sees the parent go away.
            parent_ends = [here] + [w[1] for w in self._workers if w is not None]
            proc = ctx.Process(
                target=_serve,
                args=(there, parent_ends, client_app, mine),
                name=f"fedge-node-worker-{i}",
                daemon=True,
            )
            proc.start()
            there.close()
            self._workers.append((proc, here))

    def handle(self, messages: list[Message]) -> list[tuple[Message, float]]:
        """Replies in the order of ``messages``; each worker works through its share meanwhile."""
        shares: dict[int, list[int]] = {}
        for k, msg in enumerate(messages):
            shares.setdefault(self._slot[msg.metadata.dst_node_id], []).append(k)
        out: list[tuple[Message, float] | None] = [None] * len(messages)
        sent = []
        for i, positions in shares.items():
            worker = self._workers[i]
            if worker is not None:
                try:
                    worker[1].send([messages[k] for k in positions])
                    sent.append(i)
                    continue
                except (OSError, ValueError):
                    self._lose(i)
            for k in positions:
                out[k] = (_lost(messages[k]), 0.0)
        for i in sent:
            worker = self._workers[i]
            try:
                assert worker is not None
                replies = worker[1].recv()
            except (EOFError, OSError):
                self._lose(i)
                replies = [(_lost(messages[k]), 0.0) for k in shares[i]]
            for k, reply in zip(shares[i], replies, strict=True):
                out[k] = reply
        return [r for r in out if r is not None]

    def _lose(self, i: int) -> None:
        worker = self._workers[i]
        if worker is not None:
            log.warning("node worker %d ended unexpectedly (exit code %s)", i, worker[0].exitcode)
            worker[1].close()
        self._workers[i] = None

    def close(self) -> None:
        for worker in self._workers:
            if worker is None:
                continue
            proc, conn = worker
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            conn.close()
        self._workers = [None] * len(self._workers)


def _lost(msg: Message) -> Message:
    return Message(Error(WORKER_LOST, "the process running this node ended"), reply_to=msg)


def _serve(
    conn: Connection, parent_ends: list[Connection], client_app: ClientApp, contexts: dict[int, Context]
) -> None:
    """A worker's loop: handle each batch of messages for its nodes, reply in order."""
    for end in parent_ends:
        end.close()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)  # one worker per core
    try:
        while True:
            try:
                batch = conn.recv()
            except (EOFError, OSError):
                break
            if batch is None:
                break
            conn.send([_handle(client_app, msg, contexts[msg.metadata.dst_node_id]) for msg in batch])
    finally:
        # The process ends with os._exit (no exit handlers): put what the devices'
        # audit logs hold on disk first.
        audit = sys.modules.get("fedge.privacy.audit")
        if audit is not None:
            audit.sync_all()
        conn.close()


def content_bytes(message: Message) -> int:
    """Bytes of the records a message carries (model arrays, configs, metrics)."""
    if not message.has_content():
        return 0
    return sum(int(record.count_bytes()) for record in message.content.values())
