"""What the RabbitMQ broker (``amqp.py``) and the ``rpc://`` backend share:
connection parameters from a URL, opening a connection (``open_connection``,
the only place connections are made), the reconnect state machine, and the
topology greenq declares.  The publishers' pool is in ``publish.py``, the
consumer loop in ``consumer.py``, the wire format in ``wire.py`` and
the only code touching py-amqp's internals in ``adapter.py``.

Imported only when an ``amqp://``, ``pyamqp://``, ``amqps://`` or ``rpc://``
URL is used; ``ssl`` is imported only for ``amqps://``.

Topology (docs/brokers.md (RabbitMQ) has the full table):

Every name greenq uses on the vhost derives from ``[greenq] key_prefix`` P
(default ``greenq``), so apps with prefixes of their own never share a queue
(``Settings.queue_name`` and its inverse ``Settings.logical`` are the one
mapping; users and the CLI speak of the logical name ``<q>``):

* every task queue ``<q>`` is the RabbitMQ queue ``<q>`` itself under the
  default prefix (today's names, Celery's plain names) and ``P.<q>`` under any
  other: durable; ``x-dead-letter-exchange = P.dlx``;
  ``x-max-priority = [amqp] max_priority`` (classic queues, when > 0);
  ``x-queue-type = quorum`` with ``[amqp] queue_type = quorum``.  Messages are
  published persistent to the default exchange with that name as routing key.
  A logical name that would land on greenq's own plumbing (``P.dlq``,
  ``P.delay.*``...) is refused.
* ``P.dlx`` (fanout) -> ``P.dlq``: the dead-letter store.  greenq
  publishes dead letters there itself with the reason in headers; messages that
  RabbitMQ dead-letters on its own (a consumer's reject) land there too.
* delayed delivery, no plugin: a cascade per task queue, made on the first
  delayed publish to it.  For i in 0..31, ``P.delay.<q>.<i>`` is a topic
  exchange and a queue of the same name whose ``x-message-ttl`` is 2**i ms and
  whose dead-letter exchange is the level below (level 0 dead-letters straight
  into the task queue).  A delay of d ms is written in binary in the routing key, one
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
import socket
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import parse_qsl, unquote, urlsplit

import amqp
from amqp.exceptions import AMQPError, PreconditionFailed

from ...backoff import backoff
from ...config import Config, mask_url
from ...reconnect import Refused
from ...exceptions import BrokerError, ConfigError, describe
from .meta import (H_DEAD_ID, H_DELIVERIES, H_ETA, H_FAILED_AT, H_QUEUE,  # noqa: F401 (names
                        H_REASON, MAX_QUEUE_NAME_BYTES, as_bytes)           # shared from here)

log = logging.getLogger("greenq.amqp")

DELAY_LEVELS = 32                     # 2**32 ms ~ 49.7 days per pass
MAX_DELAY_MS = 2 ** DELAY_LEVELS - 1

#: errors after which a connection is dead and must be rebuilt
#: (socket.timeout is an OSError too: callers catch it first where it means "no data")
CONNECTION_ERRORS = (amqp.exceptions.ConnectionError, OSError, EOFError)
#: any AMQP failure, connection or channel level
AMQP_ERRORS = CONNECTION_ERRORS + (AMQPError,)
#: refusals of a connection's login or vhost, raised as Refused (never retried)
REFUSED = (amqp.exceptions.AccessRefused, amqp.exceptions.NotAllowed)

#: ``FORKS[0]`` counts the forks in this process's ancestry: raised in the child
#: by an ``os.register_at_fork`` hook.  Connection holders remember the value
#: they were made under and, when it changed, make new connections and never
#: touch the inherited sockets -- a cheaper test than ``os.getpid()`` on every
#: publish.  (A fork that bypasses Python's hooks, e.g. uWSGI without
#: ``py-call-osafterfork``, is not seen: make the app's connections after it.)
FORKS = [0]


def _forked() -> None:
    FORKS[0] += 1


os.register_at_fork(after_in_child=_forked)


# -- settings and connection parameters ---------------------------------------

DEFAULT_PREFIX = "greenq"


@dataclass(frozen=True)
class Settings:
    """The ``[amqp]`` section and the other keys the AMQP classes read."""
    confirm_publish: bool = True
    queue_type: str = "classic"
    heartbeat: int = 30
    max_priority: int = 9
    result_expires: int = 86400
    prefix: str = DEFAULT_PREFIX      # [greenq] key_prefix: names greenq's own exchanges and queues
    #: [greenq] celery_queues: Celery's queues, declared and spoken as Celery does (celery_broker.py)
    celery_queues: frozenset = frozenset()
    celery: Tuple[str, str, int] = ("classic", "direct", 0)   # [amqp] celery_queue_type, _exchange_type, _max_priority
    accept: Tuple[str, ...] = ("json",)   # [greenq] accept_content (the Celery messages' serializers)

    @classmethod
    def from_config(cls, config: Config) -> "Settings":
        sec = config.section("amqp")
        return cls(sec["confirm_publish"], sec["queue_type"], sec["heartbeat"],
                   sec["max_priority"], config.result_expires, config.key_prefix,
                   frozenset(getattr(config, "celery_queues", None) or ()),
                   (sec["celery_queue_type"], sec["celery_exchange_type"], sec["celery_max_priority"]),
                   tuple(config.accept_content) + ("json",))

    @property
    def dlx(self) -> str:
        """The dead-letter exchange, ``P.dlx``."""
        return f"{self.prefix}.dlx"

    @property
    def dlq(self) -> str:
        """The dead-letter store, ``P.dlq``."""
        return f"{self.prefix}.dlq"

    @property
    def revoked(self) -> str:
        """The rpc:// backend's revocation stream, ``P.revoked``."""
        return f"{self.prefix}.revoked"

    @property
    def quorum(self) -> bool:
        return self.queue_type == "quorum"

    # -- names: the one mapping between logical task queues and RabbitMQ's --
    @property
    def bare(self) -> bool:
        """True under the default prefix: task queues keep their plain names."""
        return self.prefix == DEFAULT_PREFIX

    @property
    def max_queue_name_bytes(self) -> int:
        """Longest logical task queue name, in bytes of UTF-8: its delay queue
        ``P.delay.<q>.31`` must fit in an AMQP short string (239 under the default prefix)."""
        return 255 - len(self.delay_name("", DELAY_LEVELS - 1).encode("utf-8"))

    def queue_name(self, queue: str) -> str:
        """The RabbitMQ queue of logical task queue ``queue``: itself under the
        default prefix, ``P.<queue>`` under any other (a Celery queue: always itself)."""
        return queue if self.bare or queue in self.celery_queues else f"{self.prefix}.{queue}"

    def logical(self, name: str) -> Optional[str]:
        """The logical task queue whose RabbitMQ queue is ``name``; None for a
        queue that is no task queue of this app (greenq's plumbing, RabbitMQ's
        ``amq.*``, another prefix's queues).  Under the default prefix every
        name outside ``greenq.*`` and ``amq.*`` is taken for a task queue."""
        if self.bare or name in self.celery_queues:
            return None if name.startswith(("greenq.", "amq.")) else name
        if not name.startswith(self.prefix + ".") or self.plumbing(name):
            return None
        return name[len(self.prefix) + 1:]

    def usable(self, queue: str) -> bool:
        """Logical ``queue`` can be a task queue: it fits (``max_queue_name_bytes``)
        and its RabbitMQ name is not greenq's plumbing."""
        return (0 < len(queue.encode("utf-8", "surrogatepass")) <= self.max_queue_name_bytes
                and not self.plumbing(self.queue_name(queue)))

    def plumbing(self, name: str) -> bool:
        """``name`` is one of greenq's own exchanges or queues of this prefix:
        dead letters, revocations, delay cascades, control, events, the
        scheduler's leadership (``greenq.leadership``) and ``rpc://`` replies."""
        p = self.prefix
        return name in (self.dlx, self.dlq, self.revoked, f"{p}.control", f"{p}.events") or name.startswith(
            (f"{p}.delay.", f"{p}.control.", f"{p}.control-reply.", f"{p}.beat.", f"{p}.reply."))

    def delay_name(self, queue: str, level: int) -> str:
        """The exchange and the queue of ``level`` of logical ``queue``'s delay cascade."""
        return f"{self.prefix}.delay.{queue}.{level}"

    def delay_route(self, queue: str, delay_ms: int) -> Tuple[str, str]:
        """(exchange, routing key) entering logical ``queue``'s cascade for a delay of ``delay_ms``."""
        delay_ms = max(1, min(delay_ms, MAX_DELAY_MS))
        bits = format(delay_ms, f"0{DELAY_LEVELS}b")
        return self.delay_name(queue, delay_ms.bit_length() - 1), ".".join(bits)


#: seconds to open a connection (TCP and the AMQP handshake): a client's
#: delay() fails this fast while RabbitMQ is unreachable; workers retry
CONNECT_TIMEOUT = 2.0
_QUERY_KEYS = ("connect_timeout", "heartbeat", "cafile", "certfile", "keyfile", "verify",
               "server_hostname")


def connection_params(url: str) -> Dict[str, Any]:
    """py-amqp ``Connection`` keyword arguments from ``amqp://user:pw@host:port/vhost``,
    or from a ``;``-separated list of such URLs (the nodes of one cluster):
    then the first node's, plus ``nodes``, every node's, which
    :func:`open_connection` tries in turn."""
    urls = [u.strip() for u in url.split(";") if u.strip()]
    if len(urls) <= 1:
        return _node_params(url)
    nodes = [_node_params(u) for u in urls]
    return dict(nodes[0], nodes=nodes, turn=[0])


def _node_params(url: str) -> Dict[str, Any]:
    """py-amqp ``Connection`` keyword arguments from one node's URL.

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
        "connect_timeout": float(query.get("connect_timeout", CONNECT_TIMEOUT)),
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


#: ``TCP_USER_TIMEOUT`` of greenq's connections, ms.  py-amqp's default is
#: 1 s: a publisher that RabbitMQ's flow control keeps from writing for a
#: second (its socket's send window closed) then has its connection aborted
#: by the kernel, and whatever it had written and RabbitMQ had not read yet
#: is lost (silently without confirms).  Dead peers are found by heartbeats
#: (consumer), confirm timeouts (publishers) and TCP keepalive.
TCP_USER_TIMEOUT_MS = 60000


def socket_settings() -> Dict[int, int]:
    """Socket options for py-amqp, on top of its own defaults (keepalive, nodelay)."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    return {option: TCP_USER_TIMEOUT_MS} if option is not None else {}


def serve_heartbeats(conn: "amqp.Connection") -> None:
    """Read what the broker sent (its heartbeats) without waiting, and send
    ours when due: what an idle holder of an exclusive queue calls to stay
    alive (the scheduler's leadership, counted leases)."""
    try:
        conn.drain_events(timeout=0)
    except socket.timeout:
        pass
    conn.heartbeat_tick()


def open_connection(params: Dict[str, Any], *, heartbeat: int, role: str) -> "amqp.Connection":
    """Open and return a py-amqp connection for ``role`` (raises AMQP_ERRORS).
    Every connection greenq makes to RabbitMQ is made here: the consumer's,
    the publishers', and ``rpc://``'s reply and revocation readers.  With a node
    list, the node that worked last is tried first, then the others in turn;
    the last error is raised when none answers (the caller backs off and calls
    again: every reconnect goes round the list)."""
    nodes = params.get("nodes")
    if not nodes:
        return _open_node(params, heartbeat, role)
    turn = params["turn"]
    error: Optional[BaseException] = None
    for step in range(len(nodes)):
        index = (turn[0] + step) % len(nodes)
        try:
            conn = _open_node(nodes[index], heartbeat, role)
        except AMQP_ERRORS as exc:
            log.debug("%s: node %s did not answer: %s", role, nodes[index]["host"], describe(exc))
            error = exc
            continue
        if index != turn[0]:
            log.info("%s connected to node %s", role, nodes[index]["host"])
        turn[0] = index
        return conn
    assert error is not None
    raise error


def _open_node(params: Dict[str, Any], heartbeat: int, role: str) -> "amqp.Connection":
    kwargs = dict(params)
    kwargs["heartbeat"] = heartbeat
    kwargs["client_properties"] = {
        "connection_name": f"greenq {role} pid={os.getpid()} {socket.gethostname()}",
    }
    kwargs["socket_settings"] = socket_settings()
    conn = amqp.Connection(**kwargs)
    try:
        conn.connect()
    except REFUSED as exc:   # a wrong password or vhost: no retry can fix it
        where = f"amqp://{params['userid']}@{params['host']}/{params['virtual_host']}"
        raise Refused(f"RabbitMQ {where} refused the {role} connection: {describe(exc)}") from None
    return conn


# -- the reconnect state machine of a long-lived connection --------------------

#: waits between reconnect attempts: from 0.1 s doubling up to 5 s, each one half to all of that
RECONNECT_FIRST, RECONNECT_MAX, RECONNECT_JITTER = 0.1, 5.0, 0.5


class ConnectionState:
    """The state of one long-lived connection: ``down`` -> ``connecting`` -> ``up`` -> ``down``...

    Its owner (the consumer loop, a publisher pool, an rpc:// reader) opens
    the connection, reports what happened (``connecting``/``up``/``alive``/
    ``lost``) and waits as told; this only keeps the state, paces and logs.
    ``lost()`` records a failure and returns how long to wait before the next
    attempt (the ``RECONNECT_*`` backoff).  The first failure is logged as a
    warning, repeated ones at debug level, and the recovery at info level.
    ``healthy`` and ``last_ok`` feed /healthz.

    Not :class:`greenq.reconnect.Reconnector`, the other machine (Redis):
    that one runs each round trip of a connection pool itself and
    retries it for its caller; a RabbitMQ connection is one socket that a
    loop owns and re-opens, with state (channels, consumers, deliveries) that
    dies with it (docs/glossary.md, "Why two reconnect state machines").
    """

    def __init__(self, what: str, url: str) -> None:
        self.what = what
        self.where = mask_url(url)
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

    def lost(self, exc: BaseException, wait: Optional[float] = None) -> float:
        """Record a failure; return (and log) the wait before the next attempt,
        ``wait`` when the caller has its own schedule."""
        self.state = "down"
        self.failures += 1
        self.last_error = describe(exc)
        if wait is None:
            wait = backoff(self.failures, RECONNECT_FIRST, RECONNECT_MAX, RECONNECT_JITTER)
        level = logging.WARNING if self.failures == 1 else logging.DEBUG
        then = f"; reconnecting in {wait:.1f} s" if wait else ""
        log.log(level, "%s connection to %s failed: %s%s", self.what, self.where, self.last_error, then)
        return wait


# -- topology -----------------------------------------------------------------

def queue_arguments(settings: Settings) -> Dict[str, Any]:
    args: Dict[str, Any] = {"x-dead-letter-exchange": settings.dlx}
    if settings.quorum:
        args["x-queue-type"] = "quorum"
    elif settings.max_priority:
        args["x-max-priority"] = min(settings.max_priority, 255)
    return args


def declare_base(channel: "amqp.Channel", settings: Settings) -> None:
    """Declare the dead-letter store (idempotent).  ``P.dlq`` has the
    type of ``queue_type``: with ``quorum`` it is replicated like the task
    queues, so that a cluster that lost a node still takes dead letters (a
    classic queue whose node is down refuses even its declaration, which
    would keep every consumer from reconnecting).  An existing ``P.dlq``
    of the other type is kept as it is (declared on a channel of its own, as
    RabbitMQ closes the channel that asked for other arguments)."""
    channel.exchange_declare(settings.dlx, "fanout", durable=True, auto_delete=False)
    if not settings.quorum:
        channel.queue_declare(settings.dlq, durable=True, auto_delete=False)
        channel.queue_bind(settings.dlq, settings.dlx, "")
        return
    side = channel.connection.channel()
    try:
        side.queue_declare(settings.dlq, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"})
        side.queue_bind(settings.dlq, settings.dlx, "")
    except PreconditionFailed as exc:
        if not _KEPT_DLQ:
            _KEPT_DLQ.append(True)
            log.warning("%s exists as a classic queue and is kept (%s); delete it, once empty, to have "
                        "it made a quorum queue", settings.dlq, exc.reply_text)
    finally:
        if side.is_open:
            side.close()


_KEPT_DLQ: List[bool] = []    # the warning above is given once per process


def declare_queue(channel: "amqp.Channel", queue: str, settings: Settings) -> None:
    """Declare logical task queue ``queue`` (RabbitMQ's ``settings.queue_name(queue)``);
    a Celery queue as Celery declares it (``celery_broker.declare_celery_queue``)."""
    if settings.celery_queues and queue in settings.celery_queues:
        from .celery_broker import declare_celery_queue
        return declare_celery_queue(channel, queue, settings)
    limit = settings.max_queue_name_bytes
    if len(queue.encode("utf-8", "surrogatepass")) > limit:
        raise BrokerError(f"queue name {queue[:40]!r}... is too long for RabbitMQ with greenq's "
                          f"delay queues: at most {limit} bytes")
    name = settings.queue_name(queue)
    if settings.plumbing(name):
        raise BrokerError(f"queue name {queue!r} is reserved: RabbitMQ's {name!r} is greenq's own "
                          f"(key_prefix {settings.prefix!r}); choose another queue name")
    try:
        channel.queue_declare(name, durable=True, auto_delete=False,
                              arguments=queue_arguments(settings))
    except PreconditionFailed as exc:
        raise BrokerError(
            f"queue {name!r} exists on the broker with other arguments ({exc.reply_text}); it was "
            f"declared with other [amqp] settings (queue_type, max_priority) or by another tool: "
            f"delete it or align the settings") from None


def declare_delays(channel: "amqp.Channel", queue: str, settings: Settings) -> None:
    """Declare the delay cascade of logical ``queue`` (which must exist).  The many
    small declarations go out without waiting; the last one waits, so an error
    in any of them is raised here.  With ``queue_type = quorum`` the cascade's
    queues are quorum queues too (replicated; RabbitMQ dead-letters from them
    to the next level at least once)."""
    extra: Dict[str, Any] = {}
    if settings.quorum:
        extra = {"x-queue-type": "quorum", "x-dead-letter-strategy": "at-least-once",
                 "x-overflow": "reject-publish"}
    delay_name = settings.delay_name
    target = settings.queue_name(queue)
    for level in range(DELAY_LEVELS):
        channel.exchange_declare(delay_name(queue, level), "topic", durable=True, auto_delete=False,
                                 nowait=True)
    for level in range(DELAY_LEVELS):
        name = delay_name(queue, level)
        if level:
            args = {"x-message-ttl": 2 ** level, "x-dead-letter-exchange": delay_name(queue, level - 1)}
        else:
            args = {"x-message-ttl": 1, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": target}
        channel.queue_declare(name, durable=True, auto_delete=False, arguments={**args, **extra}, nowait=True)
        prefix = "*." * (DELAY_LEVELS - 1 - level)
        channel.queue_bind(name, name, prefix + "1.#", nowait=True)
        if level:
            channel.exchange_bind(delay_name(queue, level - 1), name, prefix + "0.#", nowait=True)
        else:
            channel.queue_bind(target, name, prefix + "0.#", nowait=True)
    channel.queue_declare(delay_name(queue, 0), passive=True)   # waits: errors surface here


def clean_headers(headers: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Headers of a message to republish: without RabbitMQ's and greenq's bookkeeping."""
    if not headers:
        return {}
    return {k: v for k, v in headers.items()
            if not k.startswith("x-") and not k.startswith("greenq-")}


# -- publishing ---------------------------------------------------------------

def browse(channel: "amqp.Channel", queue: str, limit: int) -> List["amqp.Message"]:
    """Up to ``limit`` messages of ``queue`` fetched without ack, bodies as
    bytes; the caller must ack or reject each (``reject_all``)."""
    out: List[amqp.Message] = []
    while len(out) < limit:
        msg = channel.basic_get(queue, no_ack=False)
        if msg is None:
            break
        msg.body = as_bytes(msg.body)   # py-amqp gives an empty body as ''
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
