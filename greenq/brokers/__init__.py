"""The broker interface (base.py); each implementation lives with its
technology under greenq/transports/ and is imported on first use only."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from .. import transports
from .base import Broker, DeadLetter, Delivery, Outgoing, QueueStats

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config
    from ..drivers.base import Driver


def make_broker(url: str, config: "Config", driver: Optional["Driver"] = None) -> Broker:
    """The broker for ``url``, by its transport (greenq/transports/)."""
    cls = transports.load(url, "broker", "broker", config)
    broker: Broker = cls(url, config, driver)
    return broker


__all__ = ["Broker", "Delivery", "Outgoing", "DeadLetter", "QueueStats", "make_broker"]
