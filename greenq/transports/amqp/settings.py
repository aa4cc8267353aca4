"""``[amqp]``: the settings of the RabbitMQ transport (docs/configuration.md)."""
from __future__ import annotations

from typing import Dict

from ...setting import Setting

SETTINGS: Dict[str, Setting] = {
    "confirm_publish": Setting("bool", True, "wait for publisher confirms when enqueuing"),
    "queue_type": Setting("choice:classic|quorum", "classic", "type of the queues greenq declares"),
    "heartbeat": Setting("int", 30, "AMQP heartbeat in seconds; 0 = off", 65535),
    "max_priority": Setting("int", 9, "x-max-priority of declared queues; 0 = no priorities", 255),
    "management_url": Setting("str", "", "RabbitMQ management API for `greenq queues`; "
                              "empty = http://BROKER_HOST:15672 with the broker's user"),
}
