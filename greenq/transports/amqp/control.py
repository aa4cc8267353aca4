"""The control plane on RabbitMQ, over a py-amqp connection of its own.
Every name starts with the app's ``key_prefix`` P (default ``greenq``), so
apps sharing a vhost never see each other's commands, replies or events:

    P.control        fanout exchange of commands; each worker binds an
                     exclusive, auto-deleted queue ``P.control.<name>`` to it
    P.control-reply.<hex>
                     the sender's exclusive, auto-deleted reply queue (32 hex
                     digits); workers publish replies to it through the default
                     exchange, and to no queue not named so
    P.events         fanout exchange of event batches; each reader binds an
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

from .adapter import RawConnection, close_quietly
from .common import connection_params, open_connection
from ...config import mask_url
from ...events import decode_batch
from ...control.base import REPLY_TOKEN, Document, Transport


def control_exchange(prefix: str) -> str:
    """The fanout exchange of the commands of the app whose ``key_prefix`` is ``prefix``."""
    return f"{prefix}.control"


def events_exchange(prefix: str) -> str:
    """The fanout exchange of the event batches of that app."""
    return f"{prefix}.events"


class AMQPTransport(Transport):
    def __init__(self, url: str, config: Any, driver: Any = None) -> None:
        super().__init__(url, config, driver)
        self.params = connection_params(url)          # every node of a ;-separated list
        self.control_exchange = control_exchange(config.key_prefix)
        self.events_exchange = events_exchange(config.key_prefix)
        self.reply_prefix = f"{config.key_prefix}.control-reply."
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
            ch.exchange_declare(self.control_exchange, "fanout", durable=True, auto_delete=False)
            ch.exchange_declare(self.events_exchange, "fanout", durable=True, auto_delete=False)
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
        queue = f"{self.control_exchange}.{name}"
        ch = self.channel
        ch.queue_declare(queue, exclusive=True, auto_delete=True)
        ch.queue_bind(queue, self.control_exchange)
        self._consume(queue)

    def receive(self, timeout: float) -> List[Any]:
        return self._drain(timeout)

    def where(self) -> str:
        return f"{mask_url(self.url)} exchange {self.control_exchange}"

    def owns_reply(self, reply_to: Any) -> bool:
        prefix = self.reply_prefix
        return (isinstance(reply_to, str) and reply_to.startswith(prefix)
                and REPLY_TOKEN.match(reply_to, len(prefix)) is not None)

    def reply(self, reply_to: str, body: str) -> None:
        self.channel.basic_publish(amqp.Message(body, content_type="application/json"),
                                   exchange="", routing_key=reply_to)

    def send_events(self, body: str) -> None:
        self.channel.basic_publish(amqp.Message(body, content_type="application/json"),
                                   exchange=self.events_exchange, routing_key="")

    # -- admin side ------------------------------------------------------------
    def reply_address(self) -> str:
        """This transport's reply queue, ``P.control-reply.<hex>``, declared (and
        consumed) on first use; one per transport."""
        if self._reply_queue is None:
            queue = self.reply_prefix + super().reply_address()
            self.channel.queue_declare(queue, exclusive=True, auto_delete=True)
            self._consume(queue)
            self._reply_queue = queue
        return self._reply_queue

    def broadcast(self, body: str) -> None:
        self.channel.basic_publish(amqp.Message(body, content_type="application/json"),
                                   exchange=self.control_exchange, routing_key="")

    def replies(self, reply_to: str, timeout: float) -> List[Any]:
        return self._drain(timeout)

    def subscribe(self, history: int = 0) -> None:
        ch = self.channel
        self._events_queue = ch.queue_declare("", exclusive=True, auto_delete=True)[0]
        ch.queue_bind(self._events_queue, self.events_exchange)
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
