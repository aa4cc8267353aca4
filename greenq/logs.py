"""Logging set-up: every record carries the running task's id (or '-')."""
from __future__ import annotations

import logging
import logging.config
import os
from typing import Optional

from .exceptions import ConfigError
from .task import current_request

#: libraries whose DEBUG lines drown greenq's at --loglevel DEBUG (GREENQ_DEBUG_ALL=1 keeps them)
THIRD_PARTY = ("amqp", "redis", "urllib3", "asyncio", "gevent", "eventlet", "kombu", "sqlalchemy", "django")
FORMAT = "%(asctime)s %(levelname)s %(process)d [%(task_id)s] %(name)s: %(message)s"


class TaskIdFilter(logging.Filter):
    """Adds ``task_id`` (and ``task_name``) of the task running in this greenlet."""

    def filter(self, record: logging.LogRecord) -> bool:
        req = current_request()
        record.task_id = req.id if req and req.id else "-"
        record.task_name = req.task if req else "-"
        return True


def setup(level: str = "INFO", config_file: Optional[str] = None) -> None:
    """Configure logging from ``logging_config`` (fileConfig INI) or a default handler."""
    root = logging.getLogger()
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"[greenq] logging_config = {config_file!r}: no such file")
        try:
            logging.config.fileConfig(config_file, disable_existing_loggers=False)
        except Exception as exc:
            raise ConfigError(f"[greenq] logging_config = {config_file!r}: {exc}") from None
    else:
        handler: logging.Handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.handlers[:] = [handler]
        root.setLevel(level)
        if level == "DEBUG" and not os.environ.get("GREENQ_DEBUG_ALL"):
            for noisy in THIRD_PARTY:   # greenq's DEBUG lines, not every library's
                logging.getLogger(noisy).setLevel(logging.INFO)
    for handler in root.handlers:
        if not any(isinstance(f, TaskIdFilter) for f in handler.filters):
            handler.addFilter(TaskIdFilter())
