"""The result backend interface (base.py); each implementation lives with its
technology under greenq/transports/ and is imported on first use only."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from .. import transports
from .base import ResultBackend

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config
    from ..drivers.base import Driver


def backend_url_for(config: "Config") -> str:
    """``result_backend`` when set, else the one the broker's transport
    implies (``rpc://`` for RabbitMQ, the broker URL itself for the others)."""
    if config.result_backend:
        return str(config.result_backend)
    desc = transports.lookup(config.broker_url, config)
    derived = desc.derived_results if desc is not None else None
    return derived or str(config.broker_url)


def make_backend(url: str, config: "Config", driver: Optional["Driver"] = None) -> ResultBackend:
    cls = transports.load(url, "results", "result backend", config)
    backend: ResultBackend = cls(url, config, driver)
    return backend


__all__ = ["ResultBackend", "make_backend", "backend_url_for"]
