"""Which ``key_prefix`` the workers of an app use, recorded outside every prefix.

Apps that share a Redis through ``key_prefix`` never see each other (CONTRACT
section 10): that is the point, but a client and a worker of *one* app that
disagree on the prefix (a worker started with an INI file that sets
``key_prefix = shop``, a client without it) see nothing of each other either.
The client's ``get()`` times out and ``greenq inspect`` finds no worker, with
no word on why.  So each worker records its app's name and prefix in one small
entry that no prefix hides, and the client side reads it when it found nothing:

    greenq:apps   Redis hash; field "<app name> <key_prefix>", value JSON
                  {"app", "key_prefix", "worker", "seen"} (seen: epoch seconds
                  of the worker's start); at most MAX_ENTRIES fields, the
                  oldest dropped

``announce`` (a worker, once consuming) writes its entry; ``mismatch_hint`` (a client
whose wait timed out, ``greenq inspect`` with no answer) says which prefix the
app's workers use when it is not the client's.  Both are warnings, never
errors, and never raise.  Only Redis has a registry: on SQLite (one file) and
RabbitMQ (one vhost) apps are kept apart by the URL, which a client and a
worker compare by eye in their banner and ``config show``.
"""
from __future__ import annotations

import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional

if TYPE_CHECKING:  # pragma: no cover
    from .app import GreenQ

log = logging.getLogger("greenq.prefixes")

REGISTRY = "greenq:apps"
MAX_ENTRIES = 100        # apps x prefixes remembered; the oldest are dropped beyond
MAX_FIELD = 300          # bytes of one field (app name and prefix); longer ones are not recorded


def _client(app: "GreenQ") -> Any:
    """The app's Redis broker client, or None on another broker."""
    from . import transports
    desc = transports.lookup(app.config.broker_url, app.config)
    if desc is None or desc.name != "redis":      # the registry is kept in Redis only
        return None
    from .transports.redis.broker import RedisBroker     # redis-py is there: the URL is Redis's
    broker = app.broker
    return broker.client if isinstance(broker, RedisBroker) else None


def _entries(client: Any) -> List[Dict[str, Any]]:
    out = []
    for value in client.hvals(REGISTRY):
        try:
            entry = json.loads(value)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(entry, dict) and isinstance(entry.get("seen"), (int, float)) \
                and math.isfinite(entry["seen"]) \
                and all(isinstance(entry.get(k), str) for k in ("app", "key_prefix", "worker")):
            out.append(entry)       # anything else (written by hand, or garbage) is passed over
    return out


def _shown(text: str) -> str:
    """A name read from the registry, as a terminal may print it: control
    characters escaped, cut to 100 characters."""
    return ascii(text[:100])[1:-1]


def announce(app: "GreenQ", worker: str) -> None:
    """Record that ``worker`` serves ``app`` under its key_prefix.  Quiet:
    one app deployed twice under two prefixes on one Redis (staging and
    production) is legitimate, so only a client that found no worker warns."""
    try:
        client = _client(app)
        field = f"{app.name} {app.config.key_prefix}"
        if client is None or len(field.encode()) > MAX_FIELD:
            return
        entry = {"app": app.name, "key_prefix": app.config.key_prefix, "worker": worker, "seen": time.time()}
        client.hset(REGISTRY, field, json.dumps(entry))
        entries = _entries(client)
        if len(entries) > MAX_ENTRIES:
            entries.sort(key=lambda e: e["seen"])
            client.hdel(REGISTRY, *[f"{e.get('app')} {e.get('key_prefix')}" for e in entries[:-MAX_ENTRIES]])
    except Exception as exc:           # a hint, never a reason to stop
        log.debug("could not record app %r in %s: %s", app.name, REGISTRY, exc)


def mismatch_hint(app: "GreenQ") -> Optional[str]:
    """One sentence when the app's workers were last seen under another
    key_prefix than this client's (and not since under its own), else None."""
    try:
        client = _client(app)
        if client is None:
            return None
        mine = app.config.key_prefix
        entries = [e for e in _entries(client) if e.get("app") == app.name]
    except Exception:
        return None
    others = [e for e in entries if e.get("key_prefix") != mine]
    if not others:
        return None
    latest = max(others, key=lambda e: e["seen"])
    if any(e["seen"] >= latest["seen"] for e in entries if e.get("key_prefix") == mine):
        return None
    return (f"no worker of app {app.name!r} uses this client's key_prefix {mine!r}; workers of app "
            f"{app.name!r} were seen under key_prefix '{_shown(latest['key_prefix'])}' ({_shown(latest['worker'])}, "
            f"{_ago(latest['seen'])}): give the client and the workers the same key_prefix "
            f"(the same INI file, $GREENQ_CONFIG or GREENQ_KEY_PREFIX)")


def _ago(seen: float) -> str:
    seconds = max(0, int(time.time() - seen))
    if seconds < 120:
        return f"started {seconds} s ago"
    if seconds < 7200:
        return f"started {seconds // 60} min ago"
    return f"started {seconds // 3600} h ago"
