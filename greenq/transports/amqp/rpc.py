"""``rpc://``: results sent back over RabbitMQ to the process that sent the task.

The broker must be ``amqp://`` (the connection comes from ``broker_url``);
``rpc://`` is what an empty ``result_backend`` means with a RabbitMQ broker.

* Each client process has one reply queue, ``P.reply.<uuid>`` (P: ``key_prefix``) (not
  durable; deleted by RabbitMQ after it has had no consumer for
  ``min(result_expires, 1 day)``), consumed on a connection of its own.
  ``reply_to()`` names it and the app puts it in every message it sends.
* The worker publishes each result record to the message's ``reply_to``
  through the default exchange (``correlation_id`` = task id; ``type`` =
  ``final`` or ``update``), with publisher confirms, before it acks the task.
* A reply without ``type`` but with a ``content_type`` is a Celery worker's
  (Celery's record, in an app with ``celery_queues``): ``foreign_reply``
  (celery_rpc.py) reads it into greenq's result meta.
* ``wait(task_id)`` blocks on the reply queue.  Whoever waits first reads for
  everyone: results of other tasks are kept in a per-process cache (the last
  10,000) and the other waiting threads are woken, so many AsyncResults in one
  process work.  ``get`` reads what has arrived without blocking.
* Limits: a result reaches only the process that sent the task (``greenq
  result ID`` from another process sees PENDING); results published while the
  reply queue does not exist (a RabbitMQ restart: it is not durable) are lost.
  Use a Redis or SQLite result backend when you need results that outlive the
  caller.
* Revocations cannot live in a reply queue: they go to ``P.revoked`` (P: ``key_prefix``), a
  RabbitMQ stream (``x-max-age`` = ``result_expires``) that every worker reads
  from its start, so a worker started after a revoke still sees it.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import amqp
from amqp.exceptions import PreconditionFailed

from .. import scheme_of
from . import TRANSPORT
from .adapter import RawConnection, close_quietly
from .common import (AMQP_ERRORS, FORKS, ConnectionState, Settings, connection_params,
                                   open_connection)
from .meta import as_bytes
from .publish import ChannelPool, Publisher, pool_size
from .wire import encode_properties
from ...config import mask_url
from ...exceptions import BrokerError, ConfigError
from ...backends.base import REVOCATIONS_MAX, Record, Revocation, ResultBackend

log = logging.getLogger("greenq.amqp")

CACHE_SIZE = 10000          # results kept per process for AsyncResults not yet asked
CATCH_UP_SECONDS = 5.0      # longest a worker reads the revocation stream at start
ACK_EVERY = 100             # replies acknowledged in one ``multiple`` ack (prefetch is 1000)
ACK_AFTER = 1.0             # seconds after which read replies are acknowledged anyway


def reply_properties(record: Record) -> bytes:
    return encode_properties({"delivery_mode": 1, "correlation_id": record.task_id,
                              "type": "final" if record.final else "update"})


class RPCBackend(ResultBackend):

    def __init__(self, url: str, config: Any, driver: Any = None) -> None:
        super().__init__(url, config, driver)
        broker_url = config.broker_url
        if scheme_of(broker_url) not in TRANSPORT.schemes:
            raise ConfigError(f"result_backend rpc:// needs a RabbitMQ broker (amqp://), not "
                              f"{mask_url(broker_url)!r}; use redis:// or sqlite:// results instead")
        self.broker_url = broker_url
        self.settings = Settings.from_config(config)
        self.params = connection_params(broker_url)
        self.pool = ChannelPool(broker_url, self.settings, pool_size(config), role="rpc")
        self._lock = threading.Lock()
        self._replies: Optional[_Replies] = None
        self._revocation_reader: Optional[_Revocations] = None
        self._stream_declared = False
        self._broker: Any = None

    #: reads a reply that is not greenq's (no ``type`` property, a ``content_type``) into
    #: (greenq's result meta, final), or None to drop it: Celery's
    #: (celery_rpc.py); this class keeps greenq's replies only
    foreign_reply: Optional[Callable[[Dict[str, Any], bytes, str], Optional[Tuple[Dict[str, Any], bool]]]] = None

    def attach_broker(self, broker: Any) -> None:
        """The app's broker: a worker publishes results on its consumer channel."""
        self._broker = broker

    # -- the caller's side ---------------------------------------------------
    def reply_to(self) -> str:
        replies = self._replies
        if replies is None or replies.forks != FORKS[0]:
            with self._lock:
                replies = self._replies
                if replies is None or replies.forks != FORKS[0]:
                    replies = self._replies = _Replies(self.params, self.broker_url, self.settings,
                                                       self.foreign_reply)
        return replies.name

    def _mine(self) -> Optional["_Replies"]:
        replies = self._replies
        return replies if replies is not None and replies.forks == FORKS[0] else None

    def _get(self, task_id: str) -> Optional[bytes]:
        replies = self._mine()
        return replies.get(task_id) if replies is not None else None

    def _wait(self, task_id: str, timeout: Optional[float]) -> Optional[bytes]:
        self.reply_to()   # this process's reply queue, made if it sent nothing yet
        assert self._replies is not None, "made by reply_to()"
        found = self._replies.wait(task_id, timeout)
        return found[0] if found is not None else None

    def _forget(self, task_id: str) -> None:
        replies = self._mine()
        if replies is not None:
            replies.forget(task_id)

    # -- the worker's side ---------------------------------------------------
    def _store_many(self, records: Sequence[Record]) -> None:
        """Send each record to its ``reply_to``; records without one (sent with
        ignore_result, or by a producer not using rpc://) have nowhere to go.

        In a worker the records go out on the consumer channel, the one the
        worker acknowledges the tasks on next: RabbitMQ handles a channel's
        methods in order, so a reply is routed to its reply queue before the
        ack that follows it, without waiting for a publisher confirm (reply
        queues are transient: a confirm would say no more than that).
        Elsewhere (no consumer, or it is reconnecting) they go through the
        publisher pool, with confirms when ``confirm_publish`` is on."""
        out = [r for r in records if r.reply_to]
        if not out:
            return
        broker = self._broker
        if broker is not None and broker.publish_unconfirmed(
                [(r.data, reply_properties(r), "", r.reply_to) for r in out]):
            return

        def send(pub: Publisher) -> None:
            for r in out:
                pub.publish_raw(r.data, reply_properties(r), "", cast(str, r.reply_to))   # out: with a reply_to
            if pub.confirm:
                nacked, returned = pub.wait_confirms()
                if nacked:
                    raise BrokerError(f"RabbitMQ refused {len(nacked)} result(s)")
                if returned:   # the caller's reply queue is gone: nobody to tell
                    log.debug("%d result(s) had no reply queue to go to", len(returned))
        self.pool.run(send)

    # -- revocations ---------------------------------------------------------
    def _revoke(self, task_id: str, terminate: bool) -> None:
        def send(pub: Publisher) -> None:
            if not self._stream_declared:
                declare_stream(pub, self.settings)
                self._stream_declared = True
            pub.publish(amqp.Message(task_id.encode(), delivery_mode=2, application_headers={"at": time.time()},
                                     type="terminate" if terminate else "revoke"), "", self.settings.revoked)
            if pub.confirm:
                nacked, returned = pub.wait_confirms()
                if nacked or returned:
                    raise BrokerError("RabbitMQ did not take the revocation")
        self.pool.run(send)
        revocations = self._revocation_reader
        if revocations is not None and revocations.forks == FORKS[0]:
            with revocations.lock:   # known here at once; other processes read it from the stream
                revocations.revoked[task_id] = (terminate, time.time())

    def _reader(self) -> "_Revocations":
        revocations = self._revocation_reader
        if revocations is None or revocations.forks != FORKS[0]:
            with self._lock:
                revocations = self._revocation_reader
                if revocations is None or revocations.forks != FORKS[0]:
                    revocations = self._revocation_reader = _Revocations(self.params, self.broker_url,
                                                                   self.settings)
        return revocations

    def _revoked(self, task_ids: Sequence[str]) -> Dict[str, bool]:
        return self._reader().check(task_ids)

    def _revocations(self, since: float) -> List[Revocation]:
        return self._reader().since(since)

    def close(self) -> None:
        with self._lock:
            replies, self._replies = self._mine(), None
            revocations, self._revocation_reader = self._revocation_reader, None
        if replies is not None:
            replies.close()
        if revocations is not None and revocations.forks == FORKS[0]:
            revocations.close()
        self.pool.close()


def declare_stream(pub: Publisher, settings: Settings) -> None:
    """Declare the revocation stream; an existing one with another max-age is used as is."""
    try:
        pub.channel.queue_declare(settings.revoked, durable=True, auto_delete=False, arguments={
            "x-queue-type": "stream", "x-max-age": f"{max(1, settings.result_expires)}s"})
    except PreconditionFailed:
        pub.reopen()
        pub.channel.queue_declare(settings.revoked, passive=True)


class _Replies:
    """This process's reply queue and the results that arrived on it.

    Readers take turns: the first waiter reads (``reading``) while the others
    wait on ``cond``, which every arriving result notifies.
    """

    def __init__(self, params: Dict[str, Any], url: str, settings: Settings,
                 foreign: Optional[Callable[..., Any]] = None) -> None:
        self.forks = FORKS[0]
        self.foreign = foreign
        self.params = params
        self.name = f"{settings.prefix}.reply.{uuid.uuid4().hex}"
        self.expires_ms = int(max(60, min(settings.result_expires, 86400)) * 1000)
        self.conn_state = ConnectionState("rpc reply", url)
        self.cond = threading.Condition()
        #: task id -> (greenq's record, final, False) or (Celery's as greenq's meta, final, True)
        self.results: "OrderedDict[str, Tuple[Any, bool, bool]]" = OrderedDict()
        self.reading = False
        self.conn: Optional[amqp.Connection] = None
        self.channel: Any = None
        self.retry_at = 0.0
        self.unacked = 0          # delivery tag of the last reply read
        self.acked = 0            # ... and of the last one acknowledged
        self.acked_at = 0.0
        self.reader: Any = None   # the buffered frame reader (plain TCP)
        self.sock_timeout: Optional[float] = None
        try:
            self._connect()   # the queue must exist before a task can answer
        except AMQP_ERRORS as exc:
            self.conn_state.lost(exc)
            raise BrokerError(f"rpc:// cannot reach RabbitMQ at {mask_url(url)}: {exc}") from None

    def _connect(self) -> None:
        conn = open_connection(self.params, heartbeat=0, role="rpc reply")
        try:
            raw = RawConnection(conn)
            ch = conn.channel()
            ch.auto_decode = False
            ch.queue_declare(self.name, durable=False, exclusive=False, auto_delete=False,
                             arguments={"x-expires": self.expires_ms})
            ch.basic_qos(0, 1000, False)
            ch.basic_consume(self.name, callback=self._on_reply)
        except BaseException:
            close_quietly(conn)
            raise
        self.conn, self.channel, self.reader = conn, ch, raw.reader
        self.sock_timeout = raw.sock.gettimeout()
        self.unacked = self.acked = 0
        self.acked_at = time.monotonic()
        self.conn_state.up()

    def _on_reply(self, msg: "amqp.Message") -> None:
        props = msg.properties
        task_id = props.get("correlation_id")
        kind = props.get("type")
        self.unacked = msg.delivery_info["delivery_tag"]
        if not task_id:
            return
        payload: Any = as_bytes(msg.body)
        reader = self.foreign
        foreign = kind is None and reader is not None and bool(props.get("content_type"))
        if foreign and reader is not None:   # no type but a content type: a Celery worker's reply
            try:
                read = reader(props, payload, task_id)
            except Exception:      # never breaks the reading of the queue
                log.warning("unreadable reply to task %s dropped", task_id, exc_info=True)
                read = None
            if read is None:
                return
            payload, final = read
        else:
            final = kind != "update"
        with self.cond:
            old = self.results.get(task_id)
            if not (old is not None and old[1] and not final):   # never replace final by a late update
                self.results[task_id] = (payload, final, foreign)
                self.results.move_to_end(task_id)
                while len(self.results) > CACHE_SIZE:
                    self.results.popitem(last=False)
            self.cond.notify_all()

    def _read(self, timeout: float) -> None:
        """Read replies for up to ``timeout`` seconds (0: what has arrived).
        Caller holds the reading turn.

        On plain TCP the socket keeps its timeout between reads (setting it
        costs system calls) and one ``recv`` serves every frame it brought.
        Replies are acknowledged ``ACK_EVERY`` at a time, or ``ACK_AFTER``
        seconds after the last ack, not one by one: one that was read but
        not acknowledged when the connection drops comes again, and is only
        stored again in the cache."""
        if self.conn is None:
            if time.monotonic() < self.retry_at:
                time.sleep(min(timeout, self.retry_at - time.monotonic()))
                return
            try:
                self._connect()
            except AMQP_ERRORS as exc:
                self.retry_at = time.monotonic() + self.conn_state.lost(exc)
                return
        conn, reader = self.conn, self.reader
        assert conn is not None, "connected above"
        try:
            if reader is not None and timeout > 0:
                if self.sock_timeout != timeout:
                    reader.sock.settimeout(timeout)
                    self.sock_timeout = timeout
                conn.drain_events()          # each recv waits up to the socket's timeout
                while reader.has_frame():    # and whatever else that recv brought
                    conn.blocking_read()
            else:
                conn.drain_events(timeout=timeout)
                while True:   # and everything else already there
                    conn.drain_events(timeout=0)
        except socket.timeout:
            pass
        except AMQP_ERRORS as exc:
            self._drop()
            self.retry_at = time.monotonic() + self.conn_state.lost(exc)
            return
        if self.unacked != self.acked:
            now = time.monotonic()
            if self.unacked - self.acked >= ACK_EVERY or now - self.acked_at >= ACK_AFTER:
                try:
                    self.channel.basic_ack(self.unacked, multiple=True)
                except AMQP_ERRORS as exc:
                    self._drop()   # unacked replies come back to the queue
                    self.retry_at = time.monotonic() + self.conn_state.lost(exc)
                    return
                self.acked, self.acked_at = self.unacked, now
        self.conn_state.alive()

    def _drop(self) -> None:
        conn, self.conn, self.channel, self.reader = self.conn, None, None, None
        self.unacked = self.acked = 0
        if conn is not None:
            try:
                conn.collect()
            except Exception:
                pass

    def wait(self, task_id: str, timeout: Optional[float],
             foreign: bool = False) -> Optional[Tuple[Any, bool]]:
        """(the final reply, whether it is foreign) for ``task_id``, or None
        after ``timeout``; a foreign one only when ``foreign`` (else it is
        waited past)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.cond:
                while True:
                    found = self.results.get(task_id)
                    if found is not None and found[1] and (foreign or not found[2]):
                        return found[0], found[2]
                    left = 1.0 if deadline is None else deadline - time.monotonic()
                    if left <= 0:
                        return None
                    if not self.reading:
                        self.reading = True
                        break
                    self.cond.wait(min(left, 1.0))
            try:
                self._read(min(left, 1.0))
            finally:
                with self.cond:
                    self.reading = False
                    self.cond.notify_all()

    def get(self, task_id: str, foreign: bool = False) -> Any:
        """greenq's last record of ``task_id`` (or, with ``foreign``, the
        foreign one) that has arrived, or None."""
        with self.cond:
            turn = not self.reading
            if turn:
                self.reading = True
        if turn:
            try:
                self._read(0)
            finally:
                with self.cond:
                    self.reading = False
                    self.cond.notify_all()
        with self.cond:
            found = self.results.get(task_id)
            return found[0] if found is not None and found[2] == foreign else None

    def forget(self, task_id: str) -> None:
        with self.cond:
            self.results.pop(task_id, None)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        close_quietly(conn)


class _Revocations:
    """The revocation stream, read from its start into a dict by whoever calls
    ``check`` (under a lock; never blocks once caught up).  Entries older than
    ``result_expires`` are forgotten (the stream itself drops them by age, in
    whole segments)."""

    def __init__(self, params: Dict[str, Any], url: str, settings: Settings) -> None:
        self.forks = FORKS[0]
        self.params = params
        self.settings = settings
        self.conn_state = ConnectionState("rpc revocations", url)
        self.lock = threading.Lock()
        self.revoked: Dict[str, Tuple[bool, float]] = {}   # task id -> (terminate, revoked at)
        self.next_prune = time.monotonic() + 60
        self.conn: Optional[amqp.Connection] = None
        self.channel: Any = None
        self.caught_up = False
        self.retry_at = 0.0

    def _connect(self) -> None:
        conn = open_connection(self.params, heartbeat=0, role="rpc revocations")
        try:
            RawConnection(conn, fast_reads=False)   # content headers py-amqp can read, nothing more
            ch = conn.channel()
            ch.auto_decode = False
            try:
                ch.queue_declare(self.settings.revoked, durable=True, auto_delete=False, arguments={
                    "x-queue-type": "stream", "x-max-age": f"{max(1, self.settings.result_expires)}s"})
            except PreconditionFailed:
                ch = conn.channel()
                ch.auto_decode = False
            ch.basic_qos(0, 1000, False)
            ch.basic_consume(self.settings.revoked, callback=self._on_revoke,
                             arguments={"x-stream-offset": "first"})
        except BaseException:
            close_quietly(conn)
            raise
        self.conn, self.channel = conn, ch
        self.caught_up = False
        self.conn_state.up()

    def _on_revoke(self, msg: "amqp.Message") -> None:
        at = (msg.headers or {}).get("at")
        at = float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else time.time()
        if at > time.time() - self.settings.result_expires:
            self.revoked[as_bytes(msg.body).decode("utf-8", "replace")] = (
                msg.properties.get("type") == "terminate", at)
        self.channel.basic_ack(msg.delivery_info["delivery_tag"])

    def check(self, task_ids: Sequence[str]) -> Dict[str, bool]:
        with self.lock:
            revoked = self._current()
            return {t: revoked[t][0] for t in task_ids if t in revoked}

    def since(self, since: float) -> List[Revocation]:
        with self.lock:
            found = sorted((at, t, terminate) for t, (terminate, at) in self._current().items() if at >= since)
        return [Revocation(t, terminate, at) for at, t, terminate in found[-REVOCATIONS_MAX:]]

    def _current(self) -> Dict[str, Tuple[bool, float]]:
        """The revocations read so far, after reading what arrived (under ``lock``)."""
        self._read()
        revoked = self.revoked
        if time.monotonic() > self.next_prune:
            self.next_prune = time.monotonic() + 60
            oldest = time.time() - self.settings.result_expires
            for task_id in [t for t, (_, at) in revoked.items() if at < oldest]:
                del revoked[task_id]
        return revoked

    def _read(self) -> None:
        if self.conn is None:
            if time.monotonic() < self.retry_at:
                return
            try:
                self._connect()
            except AMQP_ERRORS as exc:
                self.retry_at = time.monotonic() + self.conn_state.lost(exc)
                raise BrokerError(f"revocations unavailable: {exc}") from None
        assert self.conn is not None, "connected above"
        try:
            if not self.caught_up:   # read the history until it pauses
                end = time.monotonic() + CATCH_UP_SECONDS
                while time.monotonic() < end:
                    self.conn.drain_events(timeout=0.05)
            while True:
                self.conn.drain_events(timeout=0)
        except socket.timeout:
            self.caught_up = True
        except AMQP_ERRORS as exc:
            conn, self.conn = self.conn, None
            if conn is not None:
                try:
                    conn.collect()
                except Exception:
                    pass
            self.retry_at = time.monotonic() + self.conn_state.lost(exc)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        close_quietly(conn)
