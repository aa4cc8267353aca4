"""The control plane on RabbitMQ, over a py-amqp connection of its own:

    greenq.control   fanout exchange of commands; each worker binds an
                     exclusive, auto-deleted queue ``greenq.control.<name>`` to it
    (reply queue)    the sender's exclusive, server-named queue; workers publish
                     replies to it through the default exchange
    greenq.events    fanout exchange of event batches; each reader binds an
                     exclusive, server-named queue (a reader sees what is
                     published while it is connected, as in Celery)

Nothing here is persistent: commands and events are for the workers and
readers connected now.
"""
from __future__ import annotations

import socket
import time
from typing import Any, List, Optional

import amqp

from ..brokers.amqp_adapter import RawConnection, close_quietly
from ..brokers.amqp_common import connection_params, open_connection
from ..events import decode_batch
from .base import Document, Transport, dumps, loads

CONTROL_EXCHANGE = "greenq.control"
EVENTS_EXCHANGE = "greenq.events"


class AMQPTransport(Transport):
    def __init__(self, url: str, config: Any, driver: Any = None) -> None:
        super().__init__(url, config, driver)
        self.params = connection_params(url)          # every node of a ;-separated list
        self._conn: Optional[amqp.Connection] = None
        self._channel: Any = None
        self._inbox: List[Any] = []
        self._listening: Optional[str] = None    # worker name whose control queue we consume
        self._reply_queue: Optional[str] = None
        self._events_queue: Optional[str] = None

    @property
    def channel(self) -> Any:
        if self._channel is None:
            self._conn = open_connection(self.params, heartbeat=0, role="control")
            # content headers py-amqp can read: a command published with bad
            # property bytes would make drain_events raise, and the loop reconnect
            RawConnection(self._conn, fast_reads=False)
            ch = self._conn.channel()
            ch.exchange_declare(CONTROL_EXCHANGE, "fanout", durable=True, auto_delete=False)
            ch.exchange_declare(EVENTS_EXCHANGE, "fanout", durable=True, auto_delete=False)
            self._channel = ch
            if self._listening is not None:     # reconnected: consume again
                self._bind_control(self._listening)
        return self._channel

    def _consume(self, queue: str) -> None:
        self.channel.basic_consume(queue, callback=self._inbox.append, no_ack=True)

    def _drain(self, timeout: float) -> List[Any]:
        """Bodies of the messages that arrive within ``timeout``: the first, and
        those read with it."""
        channel = self.channel
        deadline = time.monotonic() + timeout
        while not self._inbox:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                channel.connection.drain_events(timeout=left)
            except socket.timeout:
                break
        bodies = [m.body for m in self._inbox]
        self._inbox.clear()        # in place: the consumers' callback is this list's append
        return bodies

    # -- worker side -----------------------------------------------------------
    def listen(self, name: str) -> None:
        self._listening = None
        self._bind_control(name)
        self._listening = name

    def _bind_control(self, name: str) -> None:
        queue = f"{CONTROL_EXCHANGE}.{name}"
        ch = self.channel
        ch.queue_declare(queue, exclusive=True, auto_delete=True)
        ch.queue_bind(queue, CONTROL_EXCHANGE)
        self._consume(queue)

    def receive(self, timeout: float) -> List[Document]:
        return [doc for doc in map(loads, self._drain(timeout)) if isinstance(doc, dict)]

    def reply(self, reply_to: str, reply: Document) -> None:
        self.channel.basic_publish(amqp.Message(dumps(reply), content_type="application/json"),
                                   exchange="", routing_key=reply_to)

    def send_events(self, body: str) -> None:
        self.channel.basic_publish(amqp.Message(body, content_type="application/json"),
                                   exchange=EVENTS_EXCHANGE, routing_key="")

    # -- admin side ------------------------------------------------------------
    def broadcast(self, command: Document) -> Optional[str]:
        ch = self.channel
        if command.get("reply_to") is not None:  # replies wanted: to our own queue
            if self._reply_queue is None:
                self._reply_queue = ch.queue_declare("", exclusive=True, auto_delete=True)[0]
                self._consume(self._reply_queue)
            command = dict(command, reply_to=self._reply_queue)
        ch.basic_publish(amqp.Message(dumps(command), content_type="application/json"),
                         exchange=CONTROL_EXCHANGE, routing_key="")
        return command["reply_to"]

    def replies(self, reply_to: str, timeout: float) -> List[Document]:
        return [doc for doc in map(loads, self._drain(timeout)) if isinstance(doc, dict)]

    def subscribe(self, history: int = 0) -> None:
        ch = self.channel
        self._events_queue = ch.queue_declare("", exclusive=True, auto_delete=True)[0]
        ch.queue_bind(self._events_queue, EVENTS_EXCHANGE)
        self._consume(self._events_queue)

    def events(self, timeout: float) -> List[Document]:
        if self._events_queue is None:
            self.subscribe()
        out: List[Document] = []
        for body in self._drain(timeout):
            out.extend(decode_batch(body))
        return out

    def reset(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        self._inbox = []
        self._reply_queue = self._events_queue = None
        close_quietly(conn)
