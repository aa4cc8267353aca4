"""Concurrency drivers: gevent (default), eventlet (legacy), threads, solo.

``get_driver(name)`` imports only the module of the driver asked for.
"""
from __future__ import annotations

import importlib

from ..pools import POOLS
from .base import Driver, Handle

DRIVERS = {
    "gevent": ("greenq.drivers.gevent", "GeventDriver", "gevent"),
    "eventlet": ("greenq.drivers.eventlet", "EventletDriver", "eventlet"),
    "threads": ("greenq.drivers.threads", "ThreadsDriver", None),
    "solo": ("greenq.drivers.threads", "SoloDriver", None),
}


assert tuple(DRIVERS) == POOLS, "greenq/pools.py lists the pools; every one needs a driver here"


def get_driver(name: str) -> Driver:
    """The driver called ``name``; ImportError with an install hint when its library is missing."""
    try:
        module, cls, extra = DRIVERS[name]
    except KeyError:
        raise ValueError(f"unknown pool {name!r}; choose one of {', '.join(DRIVERS)}") from None
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"pool {name!r} needs {extra}: pip install 'greenq[{extra}]' ({exc})") from None
    return getattr(mod, cls)()


__all__ = ["Driver", "Handle", "get_driver", "detect_patched", "DRIVERS"]


def detect_patched() -> "Driver | None":
    """The driver matching how this process was patched, if it was: a client
    used inside a gevent or eventlet web server then keeps blocking calls
    (SQLite) off the hub.  Imports nothing that is not already loaded."""
    import sys
    if "gevent.monkey" in sys.modules and sys.modules["gevent.monkey"].is_module_patched("socket"):
        return get_driver("gevent")
    if "eventlet.patcher" in sys.modules and sys.modules["eventlet.patcher"].is_monkey_patched("socket"):
        return get_driver("eventlet")
    return None
