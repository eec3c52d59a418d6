"""In-process engine: a Flower ``Grid`` that hands messages to ClientApps in this process.

The ServerApp and ClientApp are the very objects Flower's engines run; only
the transport differs. Messages are delivered one node at a time, in the
order sent, which makes a run deterministic for a given seed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
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
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: UserConfig,
        run_id: int = 1,
    ) -> None:
        self.client_app = client_app
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
        self.bytes_sent = 0
        self.bytes_received = 0

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
        ids = []
        for msg in messages:
            md = msg.metadata
            md.__dict__["_message_id"] = uuid4().hex
            md.__dict__["_run_id"] = self._run.run_id
            ids.append(md.message_id)
            context = self._contexts.get(md.dst_node_id)
            if context is None or md.dst_node_id in self.offline:
                continue  # unreachable node: no reply, as on a real network
            self.messages_sent += 1
            self.bytes_sent += content_bytes(msg)
            started = time.perf_counter()
            try:
                reply = self.client_app(msg, context)
            except Exception as exc:  # noqa: BLE001 - a failing device must not stop the server
                log.warning("node %d failed on %s: %s", md.dst_node_id, md.message_type, exc)
                reply = Message(Error(CLIENT_ERROR, f"{type(exc).__name__}: {exc}"), reply_to=msg)
            self.client_seconds += time.perf_counter() - started
            self.bytes_received += content_bytes(reply)
            reply.metadata.__dict__["_message_id"] = uuid4().hex
            if self.on_exchange is not None:
                self.on_exchange(msg, reply)
            self._replies[md.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def content_bytes(message: Message) -> int:
    """Bytes of the records a message carries (model arrays, configs, metrics)."""
    if not message.has_content():
        return 0
    return sum(int(record.count_bytes()) for record in message.content.values())
