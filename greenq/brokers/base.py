"""The broker interface.

A broker moves opaque message bodies (bytes made by ``greenq.message.Codec``)
between clients and workers.  It never decodes a body: routing facts travel
beside it in :class:`Outgoing`.  Every implementation passes the shared suite
in ``tests/integration/test_broker_suite.py``.

Delivery model (every broker):

* ``fetch`` hands out up to ``count`` ready messages and *leases* them to this
  broker instance: a leased message is invisible to every other consumer until
  the lease (``config.lease_seconds``) runs out.
* A live worker calls ``renew`` with everything it holds, at least once per
  third of the lease; one call renews many messages.
* ``ack`` removes messages for good; ``requeue`` returns them to their queue
  at once (warm shutdown, ``Reject(requeue=True)``); ``dead_letter`` moves one
  to the dead-letter store with a reason.
* A message whose lease ran out (its worker died) is handed out again.  Every
  hand-out increments ``Delivery.deliveries`` (1 on the first); the worker
  dead-letters a message whose count passed ``max_deliveries``.
* A message published with ``eta`` in the future waits in the broker (never in
  worker memory) and becomes ready at ``eta``.
* Within one queue a higher ``priority`` (0-9) is handed out first; equal
  priorities are FIFO.  (Per broker, see docs/brokers.md for how exact.)
* Memory follows bytes, not only messages: ``fetch`` hands out at most
  ``max_bytes`` of bodies (always at least one message), and a body longer
  than ``body_limit(config)`` is never handed out whole: the Delivery carries
  its first ``PREVIEW_BYTES`` (``size`` says how long it was, ``error`` why
  it is refused), the worker dead-letters it and the dead letter keeps the
  preview.  Each broker checks the size before the body reaches Python where
  its protocol allows (docs/brokers.md, "Message size").

Thread and greenlet safety: ``publish``/``publish_many`` may be called from
many threads or greenlets at once.  The consuming methods (``fetch``, ``ack``,
``requeue``, ``renew``, ``dead_letter``) are called by one worker's control
greenlets and may serialise internally.  A broker made in one process is never
used in a forked child: the app makes a new one per pid.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, cast

from ..drivers.base import UsesDriver
from ..message import _SIZE_SLACK

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config
    from ..drivers.base import Driver


#: how much of an oversized body a broker reads and the dead letter keeps
PREVIEW_BYTES = 4096


def body_limit(config: "Config") -> int:
    """The longest body a worker reads whole: ``max_message_size`` plus the
    slack the codec allows for the envelope and signature."""
    return cast(int, config.max_message_size) + _SIZE_SLACK


def oversize_reason(size: int, max_message_size: int, kept: int) -> str:
    """The dead-letter reason of a body of ``size`` bytes of which only the
    first ``kept`` were read."""
    return (f"message is {size} bytes, over max_message_size {max_message_size} "
            f"(not read; the dead letter keeps its first {kept} bytes)")


@dataclass
class Outgoing:
    """A message to publish."""
    queue: str
    body: bytes
    message_id: str
    priority: int = 0
    eta: Optional[float] = None  # epoch seconds; None or past = ready now


class Delivery:
    """A message handed to this consumer.  ``token`` is the broker's own handle
    (a stream id, a delivery tag, a row id) and means nothing outside it."""

    __slots__ = ("queue", "body", "message_id", "deliveries", "token", "priority", "error", "size")

    def __init__(self, queue: str, body: bytes, message_id: str, deliveries: int,
                 token: Any, priority: int = 0, error: Optional[str] = None,
                 size: Optional[int] = None) -> None:
        self.queue = queue
        self.body = body
        self.message_id = message_id
        self.deliveries = deliveries
        self.token = token
        self.priority = priority
        #: set by the broker when the transport metadata (a header, a stream
        #: field, a column) is invalid: the worker dead-letters the message
        #: with this reason without decoding it.  The token stays usable.
        self.error = error
        #: set (with ``error``) when the body was too big to read: its size in
        #: the broker; ``body`` is then only its first PREVIEW_BYTES, which is
        #: what the dead letter keeps
        self.size = size

    def decode(self, codec: Any) -> Any:
        """The TaskMessage this delivery carries (``codec.decode`` of the body;
        a transport carrying another protocol decodes its own); MessageError
        says why it cannot run."""
        return codec.decode(self.body)

    @property
    def truncated(self) -> bool:
        """Only a preview of the body was read (see ``size``)."""
        return self.size is not None

    @classmethod
    def oversized(cls, queue: str, preview: bytes, message_id: str, deliveries: int, token: Any,
                  priority: int, size: int, max_message_size: int) -> "Delivery":
        """A delivery of a body of ``size`` bytes, over ``body_limit``, of which
        only ``preview`` was read."""
        return cls(queue, preview[:PREVIEW_BYTES], message_id, deliveries, token, priority,
                   oversize_reason(size, max_message_size, min(len(preview), PREVIEW_BYTES)), size)

    def __repr__(self) -> str:
        return f"<Delivery {self.queue}:{self.message_id} #{self.deliveries}>"


@dataclass
class DeadLetter:
    """A message in the dead-letter store."""
    id: str            # the store's own id (for show / requeue)
    queue: str         # the queue it came from and goes back to
    body: bytes
    reason: str
    message_id: str = ""
    failed_at: float = field(default_factory=time.time)


@dataclass
class QueueStats:
    name: str
    ready: int = 0     # waiting to be fetched
    delayed: int = 0   # waiting for their eta
    held: int = 0      # leased to a consumer, not yet acknowledged
    dead: int = 0      # in the dead-letter store
    #: seconds the oldest ready message has waited since it became ready (its
    #: publish, its eta, its return); 0.0 when none is ready; None where the
    #: broker cannot tell (RabbitMQ).  What each broker counts: docs/autoscaling.md
    oldest_ready_age: Optional[float] = None


class Broker(UsesDriver):
    """Base class of every broker.  Subclasses implement every method that
    raises NotImplementedError; the rest are written once here."""

    #: the longest queue name and task id (UTF-8 bytes) this broker carries;
    #: ``apply_async`` refuses longer ones before sending (greenq.validation)
    max_queue_name_bytes = 255
    max_message_id_bytes = 255
    #: deliveries are pushed to this process (RabbitMQ), so one may still be on
    #: its way when ``fetch`` comes back empty (a --burst worker looks twice)
    pushes_deliveries = False
    #: optional: the broker keeps a window of unacknowledged deliveries that
    #: the worker sets with ``set_prefetch`` (RabbitMQ's ``basic_qos``)
    prefetch_window = False

    def __init__(self, url: str, config: "Config", driver: Optional["Driver"] = None) -> None:
        self.url = url
        self.config = config
        self.driver = driver  # None in a plain client: call blocking code directly

    # -- publishing (client and worker) --------------------------------------
    def publish(self, message: Outgoing) -> None:
        """Publish one message; durable once this returns."""
        self.publish_many([message])

    def publish_many(self, messages: Sequence[Outgoing]) -> None:
        """Publish many messages in as few round trips as the broker allows."""
        raise NotImplementedError

    # -- consuming (worker) --------------------------------------------------
    def declare(self, queues: Sequence[str]) -> None:
        """Prepare to consume ``queues`` (create them, join consumer groups)."""

    def fetch(self, queues: Sequence[str], count: int, timeout: float, max_bytes: int = 0) -> List[Delivery]:
        """Lease up to ``count`` ready messages from ``queues`` (in the order
        given, highest priority first within a queue).  Blocks up to ``timeout``
        seconds while none is ready, then returns ``[]``.  Due delayed messages
        and messages with expired leases are made ready as part of this.
        ``max_bytes`` (0: no limit): stop adding messages once their bodies
        would pass this many bytes, though always hand out at least one."""
        raise NotImplementedError

    def set_prefetch(self, prefetch: int) -> None:
        """Hand out at most ``prefetch`` unacknowledged deliveries to this
        process (``prefetch_window``; the worker checks the flag first)."""
        raise NotImplementedError(f"{type(self).__name__} has no prefetch window")

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Remove these messages for good.  Acking twice is harmless."""
        raise NotImplementedError

    def requeue(self, deliveries: Sequence[Delivery], started: bool = True) -> None:
        """Give these messages back to their queue at once, lease released.
        ``started=False`` says their tasks never began (a warm shutdown returning
        its backlog): the delivery count of such a message is not raised, so
        the next hand-out counts as the same delivery."""
        raise NotImplementedError

    def renew(self, deliveries: Sequence[Delivery]) -> None:
        """Extend the lease of every message given to ``now + lease_seconds``."""
        raise NotImplementedError

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move one held message to the dead-letter store with ``reason``."""
        raise NotImplementedError

    def next_due(self, queues: Sequence[str]) -> Optional[float]:
        """The earliest eta of a delayed message in ``queues``, or None."""
        raise NotImplementedError

    def interrupt(self) -> None:
        """Make a ``fetch`` blocked in another greenlet return soon (shutdown).
        Brokers whose fetch blocks for at most ``timeout`` may leave this as is."""

    def stop_consuming(self) -> None:
        """Stop receiving at once (warm shutdown): no message is leased to this
        consumer after this returns (AMQP: ``basic.cancel``), while the held
        ones can still be acknowledged, requeued and renewed.  Brokers that
        lease only inside ``fetch`` may leave this as is."""

    # -- administration ------------------------------------------------------
    def queue_stats(self, queues: Optional[Sequence[str]] = None) -> List[QueueStats]:
        """Depths of ``queues``, or of every queue the broker knows."""
        raise NotImplementedError

    def purge(self, queue: str) -> int:
        """Delete every ready and delayed message of ``queue``; return how many."""
        raise NotImplementedError

    def dlq_list(self, limit: int = 100, preview: Optional[int] = None) -> List[DeadLetter]:
        """Dead letters, oldest first.  With ``preview``, each body is cut to
        its first ``preview`` bytes, read no further where the store allows
        (SQLite, Redis): a listing of big dead letters stays small."""
        raise NotImplementedError

    def dlq_get(self, dead_id: str) -> Optional[DeadLetter]:
        raise NotImplementedError

    def dlq_requeue(self, dead_ids: Optional[Sequence[str]] = None) -> int:
        """Publish dead letters back to their queue (all when ``dead_ids`` is
        None) with a fresh delivery count; return how many."""
        raise NotImplementedError

    def dlq_purge(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections; the broker may not be used afterwards."""

    # -- health (/healthz) -----------------------------------------------------
    @property
    def healthy(self) -> bool:
        """False while the connection is down and being re-established.
        Brokers without a connection (memory, SQLite) are always healthy."""
        return True
