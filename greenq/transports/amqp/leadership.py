"""The periodic scheduler's leadership on amqp (greenq/leadership.py tells what leadership is).

Not built on the coordination interface (AMQPCoordination), unlike the other
transports': its exclusive queue ``P.beat.lock`` and state queue
``P.beat.state`` predate the interface and already do what a counted lease of
limit 1 and a compare-and-set record would; moving it would rename the queues
of running deployments for no change in behaviour (docs/coordination.md)."""
from __future__ import annotations

import json
import logging
from typing import Any, Dict

from ...exceptions import MessageError
from ...leadership import DOMAIN, Leadership, check_slot

log = logging.getLogger("greenq.beat")

class AMQPLeadership(Leadership):
    """See greenq/leadership.py and this module's docstring.  One connection, used by the scheduler's
    greenlet only."""

    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None) -> None:
        super().__init__(url, config, ttl, driver)
        from .common import connection_params
        self.params = connection_params(url)
        self.lock_queue = f"{config.key_prefix}.beat.lock"
        self.state_queue = f"{config.key_prefix}.beat.state"
        self.conn: Any = None
        self.channel: Any = None
        self.held = False
        self._state: Dict[str, float] = {}
        self._tags: list = []            # the state messages we hold unacknowledged

    def _connect(self) -> None:
        from .common import open_connection
        self.conn = open_connection(self.params, heartbeat=max(2, int(self.ttl / 2)), role="beat")
        self.channel = self.conn.channel()
        self.channel.confirm_select()
        self.channel.queue_declare(self.state_queue, durable=True, auto_delete=False)

    def _drop(self) -> None:
        from .adapter import close_quietly
        close_quietly(self.conn)
        self.conn = self.channel = None
        self.held = False
        self._tags = []

    def acquire(self, holder: str) -> bool:
        from .common import AMQP_ERRORS, serve_heartbeats
        import amqp
        try:
            if self.conn is None:
                self._connect()
            if self.held:                               # still ours while the connection lives
                serve_heartbeats(self.conn)
                return True
            try:
                self.channel.queue_declare(self.lock_queue, exclusive=True, auto_delete=True)
            except amqp.exceptions.ResourceLocked:      # another scheduler's connection holds it
                self.channel = self.conn.channel()
                self.channel.confirm_select()
                return False
            self.held = True
            self._take_state()
            return True
        except (OSError,) + AMQP_ERRORS:
            self._drop()
            return False

    def _take_state(self) -> None:
        """Take every state message (left by the holders before us) and merge them."""
        runs: Dict[str, float] = {}
        while True:
            msg = self.channel.basic_get(self.state_queue, no_ack=False)
            if msg is None:
                break
            self._tags.append(msg.delivery_tag)    # garbage or forged: dropped at the next write
            for entry, slot in self._read_state(msg.body).items():
                runs[entry] = max(slot, runs.get(entry, slot))
        self._state = runs

    def _read_state(self, body: Any) -> Dict[str, float]:
        """The runs of one state message, each checked; {} (logged) for one
        that is not a JSON object, or is unsigned or forged with a key."""
        from .meta import as_bytes
        try:
            doc = json.loads(self.signer.unwrap(DOMAIN, as_bytes(body), f"scheduler state in {self.state_queue}"))
        except MessageError as exc:
            log.warning("scheduler: %s: ignored", exc)
            return {}
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            log.warning("scheduler: a message in %s is not a JSON object of last runs: ignored", self.state_queue)
            return {}
        return {entry: slot for entry, slot in ((e, check_slot(e, v)) for e, v in doc.items()) if slot is not None}

    def release(self, holder: str) -> None:
        self._drop()

    def last_runs(self) -> Dict[str, float]:
        return dict(self._state) if self.held else {}

    def record(self, holder: str, entry: str, slot: float) -> bool:
        from .common import AMQP_ERRORS
        import amqp
        if not self.held:
            return False
        runs = dict(self._state, **{entry: slot})
        body = self.signer.wrap(DOMAIN, json.dumps(runs).encode())
        try:
            self.channel.basic_publish(amqp.Message(body, delivery_mode=2),
                                       exchange="", routing_key=self.state_queue)
            old, self._tags = self._tags, []
            for tag in old:
                self.channel.basic_ack(tag)
            msg = self.channel.basic_get(self.state_queue, no_ack=False)
            while msg is not None:                      # our own new state: hold it
                self._tags.append(msg.delivery_tag)
                msg = self.channel.basic_get(self.state_queue, no_ack=False)
        except (OSError,) + AMQP_ERRORS:
            self._drop()
            return False
        self._state = runs
        return True

    def close(self) -> None:
        self._drop()
