"""A starting worker waits for its broker instead of dying.

A worker is often started with (or before) its broker: by systemd at boot, by
docker compose, after a broker restart.  ``wait_for_broker`` declares the
worker's queues, and while the broker cannot be reached it logs one line per
attempt and tries again with exponential backoff, for
``[greenq] broker_connect_timeout`` seconds (0 = forever).  A broker that
answers and refuses us (wrong password, database number, vhost) is not
waited for: ``Refused`` is raised at once and the worker exits 2.
``refuse_without_tasks`` keeps a worker that has no tasks from
dead-lettering a queue's messages.
"""
from __future__ import annotations

import logging
import socket
import time
from typing import Any, Callable, Collection, Optional, Sequence
from urllib.parse import urlsplit

from ..backoff import backoff
from ..reconnect import Refused
from ..transports import default_port
from ..config import mask_url
from ..exceptions import BrokerError, ConfigError

#: first and longest pause between attempts, in seconds
FIRST_DELAY, MAX_DELAY = 0.5, 30.0


def wait_for_broker(broker: Any, queues: Sequence[str], timeout: float, driver: Any,
                    log: logging.Logger, url: str = "",
                    stopping: Optional[Callable[[], bool]] = None) -> bool:
    """Declare ``queues`` on ``broker``, retrying while it cannot be reached.

    Returns True once the declaration succeeded, False when ``stopping()``
    became true while waiting (a SIGTERM during the wait).  Raises
    BrokerError, naming the broker and the last error, when ``timeout``
    seconds (> 0) passed without success, and Refused (a ConfigError too)
    at once when the broker refuses us.  ``driver.sleep`` keeps the wait
    cooperative."""
    started = time.monotonic()
    attempt = 0
    where = mask_url(url) or type(broker).__name__
    while True:
        attempt += 1
        try:
            _probe(url)
            broker.declare(queues)
        except Refused:
            raise                     # an answer, not an outage: waiting cannot change it
        except (BrokerError, OSError) as exc:
            waited = time.monotonic() - started
            if timeout and waited >= timeout:
                raise BrokerError(f"broker {where} still unreachable after {waited:.0f} s "
                                  f"([greenq] broker_connect_timeout = {timeout:g}): {exc}") from None
            delay = backoff(attempt, FIRST_DELAY, MAX_DELAY)
            if timeout:
                delay = min(delay, max(0.0, timeout - waited))
            limit = f"giving up after {timeout:g} s" if timeout else "waiting for as long as it takes"
            log.warning("broker %s unreachable (attempt %d, %.0f s so far, %s): %s; retrying in %.1f s",
                        where, attempt, waited, limit, exc, delay)
            if not _pause(delay, driver, stopping):
                return False
            continue
        if attempt > 1:
            log.info("broker %s reachable after %d attempts (%.1f s); starting to consume",
                     where, attempt, time.monotonic() - started)
        return True




def _probe(url: str, timeout: float = 2.0) -> None:
    """Open and close a TCP connection to the broker URL's server (OSError if
    nothing answers), so that an absent broker is noticed within ``timeout``
    rather than after the broker client's own, longer, reconnect loop.  Of a
    ``;``-separated node list, one node answering is enough."""
    if ";" in url:
        errors = []
        for part in (p.strip() for p in url.split(";") if p.strip()):
            try:
                return _probe(part, timeout)
            except OSError as exc:
                errors.append(str(exc))
        raise OSError("; ".join(errors))
    try:
        parts = urlsplit(url)
        port = parts.port or default_port(parts.scheme)
    except ValueError:
        return  # the broker reports a malformed URL itself
    if not parts.hostname or port is None:
        return  # embedded brokers (sqlite://, memory://)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        raise OSError(f"nothing answers on {parts.hostname}:{port} ({exc})") from None


def _pause(seconds: float, driver: Any, stopping: Optional[Callable[[], bool]]) -> bool:
    """Sleep ``seconds`` in short steps; False as soon as ``stopping()`` is true."""
    end = time.monotonic() + seconds
    while True:
        if stopping is not None and stopping():
            return False
        left = end - time.monotonic()
        if left <= 0:
            return True
        driver.sleep(min(0.2, left))


def refuse_without_tasks(tasks: Collection[str], broker: Any, queues: Sequence[str],
                         log: logging.Logger) -> None:
    """A worker with no registered task (no ``-A`` and no ``[greenq] app``,
    say) would dead-letter every message it takes as "unknown task".  Warn
    loudly, and raise ConfigError (exit 2) when its queues hold messages it
    would take, so that starting it by mistake loses nothing.  Delayed
    messages count: they become ready in the queue it consumes."""
    if tasks:
        return
    log.warning("this worker has NO registered tasks (no -A APP and no [greenq] app): every message "
                "it takes would be dead-lettered as an unknown task; consuming %s", ", ".join(queues))
    waiting = {s.name: s.ready + s.delayed for s in broker.queue_stats(queues) if s.ready + s.delayed}
    if waiting:
        listed = ", ".join(f"{name} ({count})" for name, count in sorted(waiting.items()))
        raise ConfigError(f"refusing to start a worker with no registered tasks on queues holding "
                          f"messages it would dead-letter: {listed}; name the app with -A MODULE or "
                          f"[greenq] app")
