"""The control plane's transport interface, and the transport for a broker URL.

A transport carries three kinds of JSON documents over the broker itself, on
connections of its own (never the broker's consuming connection):

* **commands**, broadcast to every worker: ``{"id", "command", "args",
  "destination", "reply_to", "sent", "sender"}``.  ``destination`` is a list
  of worker names, or None for all; each worker ignores commands not meant
  for it.  ``reply_to`` None: nobody waits for a reply (``revoke``); else one
  of the app's reply addresses (``owns_reply``).  With ``signing_key`` the
  body is the document signed whole (greenq/control/auth.py).
* **replies**, sent by a worker to the ``reply_to`` of one command:
  ``{"worker", "id", "ok"}`` or ``{"worker", "id", "error"}``, signed too.
* **events**, published in batches (greenq/events.py gives their encoding):
  heartbeats (``worker-heartbeat``, every 2 s), ``worker-online``/
  ``worker-offline`` and, with ``-E``, task events.

Commands and replies travel as bodies (text: JSON, or ``s1:<tag>:<JSON>``
when signed); the transports move them and never parse them, so every check
is made in one place (auth.py).  Every name a transport uses on the broker
derives from the app's ``key_prefix``, so two apps never see each other's
commands, replies or events (docs/operations.md, "Apps apart").

One transport object is used by one greenlet or thread at a time: the
worker's control greenlet, or one admin command.  Each broker kind has its own
module (sqlite.py, redis.py, amqp.py, memory.py); docs/operations.md tells how
each maps the three kinds onto the broker.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional

from ..events import encode_batch
from ..exceptions import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config
    from ..drivers.base import Driver

Document = Dict[str, Any]

#: a reply address's own part: 32 hex digits (``uuid4().hex``); RabbitMQ puts ``P.control-reply.`` before it
REPLY_TOKEN = re.compile(r"[0-9a-f]{32}\Z")

#: event rows per broker call (and per stored batch): a row is one task's events in one batching period
EVENTS_BATCH_MAX = 500


def dumps(doc: Any) -> str:
    """JSON of a command, reply or event; anything not JSON becomes its repr."""
    return json.dumps(doc, default=repr, separators=(",", ":"))


def loads(text: Any) -> Any:
    """The document of a received body, or None when it is not JSON (or is
    nested too deep to decode: RecursionError must not break a receive loop)."""
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return None


class Transport:
    """The control plane over one broker.  Every method may raise the broker
    library's errors; the callers reconnect (``reset``) and go on."""

    def __init__(self, url: str, config: "Config", driver: Optional["Driver"] = None) -> None:
        self.url = url
        self.config = config
        self.driver = driver

    # -- worker side -----------------------------------------------------------
    def listen(self, name: str) -> None:
        """Start receiving commands as worker ``name`` (commands sent before are not seen)."""
        raise NotImplementedError

    def receive(self, timeout: float) -> List[Any]:
        """Bodies of the commands that arrived, waiting up to ``timeout``
        seconds for the first (unparsed: greenq/control/auth.py reads them)."""
        raise NotImplementedError

    def owns_reply(self, reply_to: Any) -> bool:
        """True when ``reply_to`` is one of this app's reply addresses: a
        command cannot make workers write anywhere else on the broker."""
        return isinstance(reply_to, str) and REPLY_TOKEN.match(reply_to) is not None

    def reply(self, reply_to: str, body: str) -> None:
        """Send one reply body to ``reply_to`` (checked with ``owns_reply``)."""
        raise NotImplementedError

    def where(self) -> str:
        """Where commands come from, for a log line about a refused one."""
        return f"{type(self).__name__}"

    def send_events(self, body: str) -> None:
        """Publish one batch of events, encoded by ``greenq.events.encode_batch``
        (one broker call)."""
        raise NotImplementedError

    def publish_rows(self, sender: str, rows: List[Any], unsent: Deque[Any]) -> None:
        """Publish event rows (``greenq.events``), ``EVENTS_BATCH_MAX`` per broker call.
        On a failure, what was not sent goes back to the front of ``unsent``,
        in order, and the error is raised."""
        for i in range(0, len(rows), EVENTS_BATCH_MAX):
            try:
                self.send_events(encode_batch(sender, rows[i:i + EVENTS_BATCH_MAX]))
            except Exception:
                unsent.extendleft(reversed(rows[i:]))
                raise

    # -- admin side ------------------------------------------------------------
    def reply_address(self) -> str:
        """A new reply address of this app that this transport listens on
        already (no reply can be missed); the command carries it, signed."""
        return uuid.uuid4().hex

    def broadcast(self, body: str) -> None:
        """Send one command body to every worker."""
        raise NotImplementedError

    def replies(self, reply_to: str, timeout: float) -> List[Any]:
        """Bodies of the replies that arrived, waiting up to ``timeout`` seconds for the first."""
        raise NotImplementedError

    def subscribe(self, history: int = 0) -> None:
        """Start receiving events: the last ``history`` ones kept by the broker
        (where it keeps any), then every new one."""
        raise NotImplementedError

    def events(self, timeout: float) -> List[Document]:
        """Events that arrived (``greenq.events.decode_batch`` of each batch: times
        in seconds), waiting up to ``timeout`` seconds for the first."""
        raise NotImplementedError

    # -- both --------------------------------------------------------------------
    def reset(self) -> None:
        """Drop the connection after an error; the next call reconnects."""

    def close(self) -> None:
        self.reset()


def make_transport(url: str, config: "Config", driver: Optional["Driver"] = None) -> Transport:
    """The control transport for ``url`` (the broker URL), by its transport
    package.  Raises ConfigError for a broker without one (Redis Cluster and
    Sentinel URLs, for now)."""
    from .. import transports
    if transports.capability_of(url, "control", config) is None:
        served = [s for d in transports.registered() for s in d.schemes if d.ref("control", s)]
        raise ConfigError(f"the control plane does not support {transports.scheme_of(url)}:// brokers yet; "
                          f"use one of: {', '.join(s + '://' for s in served)}")
    transport: Transport = transports.load(url, "control", "the control plane", config)(url, config, driver)
    return transport
