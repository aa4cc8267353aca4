"""``greenq queues``: the table (or JSON) of queue depths.

The broker gives the figures (``Broker.queue_stats``), unless its transport
declares a ``queue_listing`` of its own: RabbitMQ's, which asks the
management API because AMQP cannot list queues
(greenq/transports/amqp/management.py).

The JSON gives each queue's ``name``, ``ready``, ``delayed``, ``held``,
``dead`` and ``oldest_ready_age`` (seconds, null where the broker cannot
tell): the autoscaling signals of docs/autoscaling.md; the table's "oldest"
column is that age.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, TextIO, Tuple

from .. import transports
from ..brokers.base import QueueStats


def print_queues(app: Any, as_json: bool, out: TextIO, compact: bool = False) -> None:
    """The table, or one JSON document (on one line when ``compact``)."""
    stats, note = queue_stats(app)
    if as_json:
        doc: Dict[str, Any] = {"queues": [vars(s) for s in stats]}
        if note:
            doc["note"] = note
        out.write(json.dumps(doc, indent=None if compact else 2) + "\n")
        return
    out.write(f"{'queue':<30} {'ready':>8} {'delayed':>8} {'held':>8} {'dead':>8} {'oldest':>9}\n")
    for s in stats:
        out.write(f"{s.name:<30} {s.ready:>8} {s.delayed:>8} {s.held:>8} {s.dead:>8} {age(s.oldest_ready_age):>9}\n")
    if note:
        out.write(f"({note})\n")


def age(seconds: Optional[float]) -> str:
    """The oldest ready message's wait for the table: "-" where the broker cannot tell."""
    return "-" if seconds is None else f"{seconds:.1f}s"


def queue_stats(app: Any) -> Tuple[List[QueueStats], Optional[str]]:
    """Every queue's figures, and a note when they are partial."""
    url = app.config.broker_url
    if transports.capability_of(url, "queue_listing", app.config) is None:
        return app.broker.queue_stats(), None
    return transports.load(url, "queue_listing", "greenq queues", app.config)(app)
