"""One INI setting's declaration (type, default, help, ceiling), apart from
greenq/config.py so that a transport can declare its own ``[section]``
without importing the config machinery (greenq/transports/)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

#: ceiling of socket and health-check intervals, in seconds
MAX_TIMEOUT = 3600.0


@dataclass(frozen=True)
class Setting:
    type: str          # str, int, float, bool, list, hostport, size (MiB), or "choice:a|b|c"
    default: Any
    help: str
    #: the ceiling of a number an operator can raise (docs/configuration.md, "Ceilings")
    high: Optional[float] = None
