"""What the RabbitMQ broker (``amqp.py``) and the ``rpc://`` backend share:
connection parameters from a URL, the reconnect state machine, the topology
greenq declares, and the publishers' channel pool.

Imported only when an ``amqp://``, ``pyamqp://``, ``amqps://`` or ``rpc://``
URL is used; ``ssl`` is imported only for ``amqps://``.

Topology (docs/brokers-rabbitmq.md has the full table):

* every task queue ``<q>``: durable; ``x-dead-letter-exchange = greenq.dlx``;
  ``x-max-priority = [amqp] max_priority`` (classic queues, when > 0);
  ``x-queue-type = quorum`` with ``[amqp] queue_type = quorum``.  Messages are
  published persistent to the default exchange with routing key ``<q>``.
* ``greenq.dlx`` (fanout) -> ``greenq.dlq``: the dead-letter store.  greenq
  publishes dead letters there itself with the reason in headers; messages that
  RabbitMQ dead-letters on its own (a consumer's reject) land there too.
* delayed delivery, no plugin: a cascade per task queue, made on the first
  delayed publish to it.  For i in 0..31, ``greenq.delay.<q>.<i>`` is a topic
  exchange and a queue of the same name whose ``x-message-ttl`` is 2**i ms and
  whose dead-letter exchange is the level below (level 0 dead-letters straight
  into ``<q>``).  A delay of d ms is written in binary in the routing key, one
  word per level, highest first (``"0.0...1.0.1"``); the level-i exchange sends
  a message whose i-th bit is 1 into its queue (it waits 2**i ms there) and one
  whose bit is 0 straight on to level i-1.  Every queue of a cascade holds
  messages of one TTL only, so a long delay never holds up a short one; the
  ``greenq-eta`` header tells the eta (``next_due``).  Delays beyond 2**32 ms
  (~49 days) go round again.
"""
from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from struct import Struct, pack
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import parse_qsl, unquote, urlsplit

import amqp
from amqp import spec
from amqp.exceptions import AMQPError, ChannelError, PreconditionFailed
from amqp.serialization import dumps

from ..config import Config, mask_url
from ..exceptions import BrokerError, ConfigError

log = logging.getLogger("greenq.amqp")

DLX = "greenq.dlx"
DLQ = "greenq.dlq"
DELAY_LEVELS = 32                     # 2**32 ms ~ 49.7 days per pass
MAX_DELAY_MS = 2 ** DELAY_LEVELS - 1
REVOKED_STREAM = "greenq.revoked"     # rpc:// revocations
H_QUEUE = "greenq-queue"              # headers greenq sets
H_ETA = "greenq-eta"
H_DELIVERIES = "greenq-deliveries"
H_REASON = "greenq-reason"
H_FAILED_AT = "greenq-failed-at"
H_DEAD_ID = "greenq-dead-id"

#: errors after which a connection is dead and must be rebuilt
#: (socket.timeout is an OSError too: callers catch it first where it means "no data")
CONNECTION_ERRORS = (amqp.exceptions.ConnectionError, OSError, EOFError)
#: any AMQP failure, connection or channel level
AMQP_ERRORS = CONNECTION_ERRORS + (AMQPError,)


def delay_name(queue: str, level: int) -> str:
    """The exchange and the queue of ``level`` of ``queue``'s delay cascade."""
    return f"greenq.delay.{queue}.{level}"


# -- settings and connection parameters ---------------------------------------

@dataclass(frozen=True)
class Settings:
    """The ``[amqp]`` section and the other keys the AMQP classes read."""
    confirm_publish: bool = True
    queue_type: str = "classic"
    heartbeat: int = 30
    max_priority: int = 9
    result_expires: int = 86400

    @classmethod
    def from_config(cls, config: Config) -> "Settings":
        sec = config.section("amqp")
        return cls(sec["confirm_publish"], sec["queue_type"], sec["heartbeat"],
                   sec["max_priority"], config.result_expires)

    @property
    def quorum(self) -> bool:
        return self.queue_type == "quorum"


_QUERY_KEYS = ("connect_timeout", "heartbeat", "cafile", "certfile", "keyfile", "verify",
               "server_hostname")


def connection_params(url: str) -> Dict[str, Any]:
    """py-amqp ``Connection`` keyword arguments from ``amqp://user:pw@host:port/vhost``.

    The vhost is the URL path without its first slash, percent-decoded; an empty
    path or ``//`` means ``/``.  Query keys: ``connect_timeout``, ``heartbeat``
    (overrides ``[amqp] heartbeat`` for the consumer), and for ``amqps://``
    ``cafile``, ``certfile``, ``keyfile``, ``verify=false``, ``server_hostname``.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"broker URL {mask_url(url)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("amqp", "pyamqp", "amqps"):
        raise ConfigError(f"URL {mask_url(url)!r} is not an amqp://, pyamqp:// or amqps:// URL")
    query = dict(parse_qsl(parts.query))
    unknown = set(query) - set(_QUERY_KEYS)
    if unknown:
        raise ConfigError(f"broker URL {mask_url(url)!r}: unknown option(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(_QUERY_KEYS)}")
    host = parts.hostname or "localhost"
    port = port or (5671 if scheme == "amqps" else 5672)
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    params: Dict[str, Any] = {
        "host": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "userid": unquote(parts.username) if parts.username else "guest",
        "password": unquote(parts.password) if parts.password is not None else "guest",
        "virtual_host": unquote(path) or "/",
        "connect_timeout": float(query.get("connect_timeout", 10)),
    }
    if "heartbeat" in query:
        params["heartbeat"] = int(query["heartbeat"])
    if scheme == "amqps":
        params["ssl"] = _ssl_options(host, query)
    return params


def _ssl_options(host: str, query: Dict[str, str]) -> Dict[str, Any]:
    """py-amqp's TLS options: verify the server against the system CAs (or
    ``cafile``) and its name, send a client certificate when ``certfile`` is set."""
    import ssl  # only amqps:// loads ssl
    verify = query.get("verify", "true").lower() not in ("0", "false", "no", "off")
    opts: Dict[str, Any] = {"server_hostname": query.get("server_hostname", host) if verify else None,
                            "cert_reqs": ssl.CERT_REQUIRED if verify else ssl.CERT_NONE}
    if query.get("cafile"):
        opts["ca_certs"] = query["cafile"]
    if query.get("certfile"):
        opts["certfile"] = query["certfile"]
        opts["keyfile"] = query.get("keyfile")
    return opts


def open_connection(params: Dict[str, Any], *, heartbeat: int, role: str) -> "amqp.Connection":
    """Open and return a py-amqp connection (raises AMQP_ERRORS)."""
    kwargs = dict(params)
    kwargs["heartbeat"] = heartbeat
    kwargs["client_properties"] = {
        "connection_name": f"greenq {role} pid={os.getpid()} {socket.gethostname()}",
    }
    conn = amqp.Connection(**kwargs)
    conn.connect()
    return conn


class FrameReader:
    """A faster ``read_frame`` for a plain TCP transport: one ``recv`` of up to
    64 KiB serves many frames (py-amqp reads each frame with three).  A
    timeout leaves the buffer as it was, so a frame is never half-consumed."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.sock = transport.sock
        self.buf = bytearray(transport._read_buffer or b"")
        self.pos = 0

    def read_frame(self, unpack: Any = None) -> Tuple[int, int, bytes]:
        buf = self.buf
        while True:
            pos = self.pos
            avail = len(buf) - pos
            if avail >= 7:
                frame_type, channel, size = _FRAME_HEADER.unpack_from(buf, pos)
                if avail >= size + 8:
                    payload = bytes(buf[pos + 7:pos + 7 + size])
                    if buf[pos + 7 + size] != 0xce:
                        raise amqp.exceptions.UnexpectedFrame(
                            f"received frame-end {buf[pos + 7 + size]:#04x}, expected 0xce")
                    self.pos = pos + size + 8
                    return frame_type, channel, payload
            if pos:
                del buf[:pos]
                self.pos = 0
            chunk = self.sock.recv(65536)   # socket.timeout: nothing consumed
            if not chunk:
                self.transport.connected = False
                raise OSError("Server unexpectedly closed connection")
            buf += chunk


_FRAME_HEADER = Struct(">BHI")


def fast_reads(conn: "amqp.Connection") -> None:
    """Give a plain-TCP connection the buffered frame reader (not TLS: there
    py-amqp's own reader stays)."""
    transport = conn.transport
    if type(transport).__name__ == "TCPTransport":
        transport.read_frame = FrameReader(transport).read_frame


def close_quietly(conn: Optional["amqp.Connection"], forked: bool = False) -> None:
    """Close ``conn`` cleanly if it answers within 2 s, else drop it; never raises.
    In a forked child (``forked``) the socket is the parent's: leave it alone."""
    transport = getattr(conn, "_transport", None)
    if transport is None or forked:
        return   # closed already, or the parent's
    try:
        transport.sock.settimeout(2.0)
        conn.close()
    except Exception:
        try:
            conn.collect()
        except Exception:
            pass


def describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text


# -- the reconnect state machine ----------------------------------------------

class Link:
    """The state of one connection: ``down`` -> ``connecting`` -> ``up`` -> ``down``...

    ``lost()`` records a failure and returns how long to wait before the next
    attempt: exponential from 0.1 s, capped at ``cap`` (5 s), with jitter.  The
    first failure is logged as a warning, repeated ones at debug level, and the
    recovery at info level.  ``healthy`` and ``last_ok`` feed /healthz.
    """

    def __init__(self, what: str, url: str, cap: float = 5.0) -> None:
        self.what = what
        self.where = mask_url(url)
        self.cap = cap
        self.state = "down"
        self.failures = 0
        self.last_ok = 0.0               # time.monotonic() of the last successful exchange
        self.last_error: Optional[str] = None

    @property
    def healthy(self) -> bool:
        return self.state == "up"

    def connecting(self) -> None:
        self.state = "connecting"

    def up(self) -> None:
        if self.failures:
            log.info("%s connection to %s restored after %d failed attempt(s)",
                     self.what, self.where, self.failures)
        self.state = "up"
        self.failures = 0
        self.last_ok = time.monotonic()

    def alive(self) -> None:
        self.last_ok = time.monotonic()

    def lost(self, exc: BaseException) -> float:
        self.state = "down"
        self.failures += 1
        self.last_error = describe(exc)
        delay = min(self.cap, 0.1 * 2 ** min(self.failures - 1, 10))
        delay = random.uniform(delay / 2, delay)
        level = logging.WARNING if self.failures == 1 else logging.DEBUG
        log.log(level, "%s connection to %s failed: %s; reconnecting in %.1f s",
                self.what, self.where, self.last_error, delay)
        return delay


# -- topology -----------------------------------------------------------------

def queue_arguments(settings: Settings) -> Dict[str, Any]:
    args: Dict[str, Any] = {"x-dead-letter-exchange": DLX}
    if settings.quorum:
        args["x-queue-type"] = "quorum"
    elif settings.max_priority:
        args["x-max-priority"] = min(settings.max_priority, 255)
    return args


def declare_base(channel: "amqp.Channel", settings: Settings) -> None:
    """Declare the dead-letter store (idempotent).  ``greenq.dlq`` is a classic
    queue whatever ``queue_type``, so that workers of either setting share it."""
    channel.exchange_declare(DLX, "fanout", durable=True, auto_delete=False)
    channel.queue_declare(DLQ, durable=True, auto_delete=False)
    channel.queue_bind(DLQ, DLX, "")


def declare_queue(channel: "amqp.Channel", name: str, settings: Settings) -> None:
    """Declare task queue ``name``."""
    if len(delay_name(name, DELAY_LEVELS - 1).encode()) > 255:
        raise BrokerError(f"queue name {name[:40]!r}... is too long for RabbitMQ with greenq's "
                          f"delay queues: at most {255 - len(delay_name('', DELAY_LEVELS - 1))} bytes")
    try:
        channel.queue_declare(name, durable=True, auto_delete=False,
                              arguments=queue_arguments(settings))
    except PreconditionFailed as exc:
        raise BrokerError(
            f"queue {name!r} exists on the broker with other arguments ({exc.reply_text}); it was "
            f"declared with other [amqp] settings (queue_type, max_priority) or by another tool: "
            f"delete it or align the settings") from None


def declare_delays(channel: "amqp.Channel", queue: str) -> None:
    """Declare the delay cascade of ``queue`` (which must exist).  The many
    small declarations go out without waiting; the last one waits, so an error
    in any of them is raised here."""
    for level in range(DELAY_LEVELS):
        channel.exchange_declare(delay_name(queue, level), "topic", durable=True, auto_delete=False,
                                 nowait=True)
    for level in range(DELAY_LEVELS):
        name = delay_name(queue, level)
        if level:
            args = {"x-message-ttl": 2 ** level, "x-dead-letter-exchange": delay_name(queue, level - 1)}
        else:
            args = {"x-message-ttl": 1, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue}
        channel.queue_declare(name, durable=True, auto_delete=False, arguments=args, nowait=True)
        prefix = "*." * (DELAY_LEVELS - 1 - level)
        channel.queue_bind(name, name, prefix + "1.#", nowait=True)
        if level:
            channel.exchange_bind(delay_name(queue, level - 1), name, prefix + "0.#", nowait=True)
        else:
            channel.queue_bind(queue, name, prefix + "0.#", nowait=True)
    channel.queue_declare(delay_name(queue, 0), passive=True)   # waits: errors surface here


def delay_route(queue: str, delay_ms: int) -> Tuple[str, str]:
    """(exchange, routing key) entering ``queue``'s cascade for a delay of ``delay_ms``."""
    delay_ms = max(1, min(delay_ms, MAX_DELAY_MS))
    bits = format(delay_ms, f"0{DELAY_LEVELS}b")
    return delay_name(queue, delay_ms.bit_length() - 1), ".".join(bits)


def clean_headers(headers: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Headers of a message to republish: without RabbitMQ's and greenq's bookkeeping."""
    if not headers:
        return {}
    return {k: v for k, v in headers.items()
            if not k.startswith("x-") and not k.startswith("greenq-")}


# -- publishing ---------------------------------------------------------------

_PUBLISH_SIG = pack(">HH", *spec.Basic.Publish)
WRITE_CHUNK = 256 * 1024      # bytes of frames buffered before a write


def publish_frames(channel_id: int, frame_max: int, msg: "amqp.Message", exchange: str,
                   routing_key: str, mandatory: bool) -> List[bytes]:
    """The frames of one ``basic.publish`` (what py-amqp's frame writer sends),
    so that many publishes go out in one write instead of one write each."""
    method = _PUBLISH_SIG + dumps("Bssbb", (0, exchange, routing_key, mandatory, False))
    body = msg.body if isinstance(msg.body, (bytes, bytearray)) else str(msg.body).encode()
    header = pack(">HHQ", spec.Basic.Publish[0], 0, len(body)) + msg._serialize_properties()
    frames = [pack(">BHI", 1, channel_id, len(method)), method, b"\xce",
              pack(">BHI", 2, channel_id, len(header)), header, b"\xce"]
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        piece = body[start:start + chunk]
        frames += [pack(">BHI", 3, channel_id, len(piece)), piece, b"\xce"]
    return frames


class Publisher:
    """One connection with one channel, used by one caller at a time.

    ``publish`` only buffers the frames; they are written in large chunks, and
    at the latest by ``flush`` (called by ``wait_confirms`` and when the
    publisher goes back to the pool).  With confirms the channel is in confirm
    mode and ``wait_confirms`` reads the broker's acks for everything published
    since, so ``publish_many`` costs one round trip whatever its size.
    Publishes are ``mandatory`` with confirms: a message no queue took comes
    back and is reported by ``wait_confirms``.
    """

    def __init__(self, params: Dict[str, Any], confirm: bool, role: str) -> None:
        self.pid = os.getpid()
        self.confirm = confirm
        self.conn = open_connection(params, heartbeat=0, role=role)
        self.broken = False
        self.last_used = time.monotonic()
        self.pending: List[bytes] = []
        self.pending_size = 0
        self.reopen()

    def reopen(self) -> None:
        """Open a fresh channel on the connection (after a channel error closed it)."""
        self.channel = self.conn.channel()
        self.channel.auto_decode = False
        self.seq = 0
        self.pending, self.pending_size = [], 0
        self.unconfirmed: deque = deque()     # (delivery tag, item) in publish order
        self.early: set = set()               # tags confirmed out of order
        self.nacked: List[Any] = []
        self.returned: List[Tuple[str, Any]] = []   # (reply text, returned message)
        if self.confirm:
            self.channel.confirm_select()
            self.channel.events["basic_ack"].add(self._on_ack)
            self.channel.events["basic_nack"].add(self._on_nack)
            self.channel.events["basic_return"].add(self._on_return)

    def publish(self, msg: "amqp.Message", exchange: str, routing_key: str, item: Any = None) -> None:
        frames = publish_frames(self.channel.channel_id, self.conn.frame_max, msg, exchange,
                                routing_key, self.confirm)
        self.pending += frames
        self.pending_size += sum(map(len, frames))
        if self.confirm:
            self.seq += 1
            self.unconfirmed.append((self.seq, item))
        if self.pending_size >= WRITE_CHUNK:
            self.flush()

    def flush(self) -> None:
        """Write the buffered publishes."""
        if self.pending:
            data = b"".join(self.pending)
            self.pending, self.pending_size = [], 0
            self.conn.transport.write(data)

    def wait_confirms(self, timeout: float = 30.0) -> Tuple[List[Any], List[Tuple[str, Any]]]:
        """Wait for every outstanding confirm; return (nacked items, returned items)."""
        self.flush()
        deadline = time.monotonic() + timeout
        while self.unconfirmed:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerError(f"{len(self.unconfirmed)} publish(es) not confirmed by RabbitMQ "
                                  f"within {timeout:.0f} s")
            try:
                self.conn.drain_events(timeout=left)
            except socket.timeout:
                continue
        nacked, self.nacked = self.nacked, []
        returned, self.returned = self.returned, []
        return nacked, returned

    def _settle(self, tag: int, multiple: bool, nack: bool) -> None:
        unconfirmed = self.unconfirmed
        if multiple:
            while unconfirmed and unconfirmed[0][0] <= tag:
                seq, item = unconfirmed.popleft()
                if nack:
                    self.nacked.append(item)
        elif unconfirmed and unconfirmed[0][0] == tag:
            if nack:
                self.nacked.append(unconfirmed[0][1])
            unconfirmed.popleft()
        else:
            if nack:
                self.nacked.extend(item for seq, item in unconfirmed if seq == tag)
            self.early.add(tag)
        while unconfirmed and unconfirmed[0][0] in self.early:
            self.early.discard(unconfirmed.popleft()[0])

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, False)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, True)

    def _on_return(self, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        # a returned message is confirmed right after; match it by message id
        self.returned.append((getattr(exc, "reply_text", str(exc)), message))

    def check_idle(self) -> None:
        """After a pause, read whatever the broker sent meanwhile (a Close after
        close_all_connections, a restart) so a dead connection is found before
        a publish without confirms would vanish into it."""
        try:
            self.conn.drain_events(timeout=0)
        except socket.timeout:
            pass

    def close(self) -> None:
        close_quietly(self.conn, forked=self.pid != os.getpid())


class ChannelPool:
    """A per-process pool of publishers (connection + channel each), at most
    ``size`` of them; callers beyond that wait for one to come back (threads,
    or greenlets when the process is patched).  A pool used in a forked child
    starts afresh and never touches the parent's sockets.

    Remembers which queues and which parts of the topology were declared by
    this process, so a publish declares a queue only the first time.
    """

    def __init__(self, url: str, settings: Settings, size: int = 8, role: str = "client") -> None:
        self.url = url
        self.params = connection_params(url)
        self.settings = settings
        self.size = max(1, size)
        self.role = role
        self.link = Link(f"{role} publish", url)
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._idle: List[Publisher] = []
        self._count = 0
        self._closed = False
        self.declared: set = set()
        self.delays: set = set()
        self.base_declared = False

    @contextmanager
    def publisher(self) -> Iterator[Publisher]:
        """Borrow a publisher.  An AMQP error inside the block discards it (a
        fresh one is made next time); other errors return it to the pool."""
        pub = self._checkout()
        try:
            yield pub
            pub.flush()
        except AMQP_ERRORS:
            pub.broken = True
            raise
        except BaseException:
            pub.pending, pub.pending_size = [], 0
            pub.broken = pub.broken or bool(pub.unconfirmed)   # a half-read confirm state: start afresh
            raise
        finally:
            self._checkin(pub)

    def _checkout(self) -> Publisher:
        if self._pid != os.getpid():
            self._reset()
        with self._cond:
            while True:
                if self._closed:
                    raise BrokerError("the AMQP broker was closed")
                if self._idle:
                    pub = self._idle.pop()
                    break
                if self._count < self.size:
                    self._count += 1
                    pub = None
                    break
                self._cond.wait(1.0)
        if pub is None:
            try:
                pub = Publisher(self.params, self.settings.confirm_publish, self.role)
            except BaseException as exc:
                with self._cond:
                    self._count -= 1
                    self._cond.notify()
                if isinstance(exc, AMQP_ERRORS):
                    self.link.lost(exc)
                raise
            self.link.up()
        elif time.monotonic() - pub.last_used > 1.0:
            try:
                pub.check_idle()
            except AMQP_ERRORS:
                pub.close()
                with self._cond:
                    self._count -= 1
                return self._checkout()
        return pub

    def _checkin(self, pub: Publisher) -> None:
        pub.last_used = time.monotonic()
        if pub.pid != os.getpid():
            return
        if pub.broken or self._closed:
            pub.close()
            with self._cond:
                self._count -= 1
                self._cond.notify()
            return
        with self._cond:
            self._idle.append(pub)
            self._cond.notify()

    def run(self, fn, *args: Any, attempts: int = 3) -> Any:
        """``fn(publisher, *args)`` with up to ``attempts`` tries on fresh
        connections when the connection fails; BrokerError after that."""
        delay = 0.05
        for attempt in range(attempts):
            try:
                with self.publisher() as pub:
                    result = fn(pub, *args)
                self.link.alive()
                return result
            except CONNECTION_ERRORS as exc:
                if attempt == attempts - 1:
                    self.link.lost(exc)
                    raise BrokerError(f"RabbitMQ at {mask_url(self.url)}: {describe(exc)}") from None
                log.debug("publish connection failed (%s); retrying", describe(exc))
                time.sleep(delay)
                delay *= 4
            except ChannelError as exc:
                raise BrokerError(f"RabbitMQ at {mask_url(self.url)}: {describe(exc)}") from None

    def ensure_queues(self, pub: Publisher, queues: Sequence[str], force: bool = False,
                      delayed: Sequence[str] = ()) -> None:
        """Declare the dead-letter store, ``queues`` and the delay cascades of
        ``delayed`` unless this process already did."""
        if not self.base_declared or force:
            declare_base(pub.channel, self.settings)
            self.base_declared = True
        for name in queues:
            if force or name not in self.declared:
                declare_queue(pub.channel, name, self.settings)
                self.declared.add(name)
        for name in delayed:
            if force or name not in self.delays:
                if name not in self.declared:
                    declare_queue(pub.channel, name, self.settings)
                    self.declared.add(name)
                declare_delays(pub.channel, name)
                self.delays.add(name)

    def close(self) -> None:
        if self._pid != os.getpid():
            self._reset()
            return
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for pub in idle:
            pub.close()


def pool_size(config: Config) -> int:
    """Publishers per process, from the concurrency (lesson 8): 10 by default."""
    return max(4, min(32, config.worker["concurrency"] // 10))


def browse(channel: "amqp.Channel", queue: str, limit: int) -> List["amqp.Message"]:
    """Up to ``limit`` messages of ``queue`` fetched without ack; the caller
    must ack or reject each (``reject_all``)."""
    out: List[amqp.Message] = []
    while len(out) < limit:
        msg = channel.basic_get(queue, no_ack=False)
        if msg is None:
            break
        out.append(msg)
        if msg.delivery_info.get("message_count", 1) == 0:
            break
    return out


def reject_all(channel: "amqp.Channel", queue: str, messages: Sequence["amqp.Message"]) -> None:
    """Return browsed messages to ``queue``, in their order, and wait until
    RabbitMQ has them back (the next user of the pool may be on another connection)."""
    if not messages:
        return
    for msg in reversed(messages):
        channel.basic_reject(msg.delivery_tag, requeue=True)
    channel.queue_declare(queue, passive=True)   # a round trip: the rejects were processed
