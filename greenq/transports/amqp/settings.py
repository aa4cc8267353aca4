"""``[amqp]``: the settings of the RabbitMQ transport (docs/configuration.md)."""
from __future__ import annotations

from typing import Dict

from ...setting import Setting

SETTINGS: Dict[str, Setting] = {
    "confirm_publish": Setting("bool", True, "wait for publisher confirms when enqueuing"),
    "queue_type": Setting("choice:classic|quorum", "classic", "type of the queues greenq declares"),
    "heartbeat": Setting("int", 30, "AMQP heartbeat in seconds; 0 = off", 65535),
    "max_priority": Setting("int", 9, "x-max-priority of declared queues; 0 = no priorities", 255),
    "celery_queue_type": Setting("choice:classic|quorum", "classic", "type of the Celery queues "
                                 "([greenq] celery_queues), as Celery's task_default_queue_type"),
    "celery_exchange_type": Setting("choice:direct|topic", "direct", "type of a Celery queue's exchange, "
                                    "as Celery's task_default_exchange_type (topic for native delayed delivery)"),
    "celery_max_priority": Setting("int", 0, "x-max-priority of the Celery queues, as Celery's "
                                   "task_queue_max_priority; 0 = none", 255),
    "management_url": Setting("str", "", "RabbitMQ management API for `greenq queues`; "
                              "empty = http://BROKER_HOST:15672 with the broker's user"),
}
