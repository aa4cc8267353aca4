"""The dashboard's WSGI application and server.

Routes (JSON unless said otherwise):

  GET  /                      the page (static/index.html); /static/* its assets
  GET  /api/workers           workers from their heartbeats, online or offline
  GET  /api/stats             what the event reader read, skipped and dropped (malformed events)
  GET  /api/queues            depth of each queue: ready, delayed, held, dead, oldest_ready_age
  GET  /metrics               every queue's autoscaling gauges, Prometheus text (greenq/metrics.py),
                              from greenq queues' listing, asked at most every 5 s; docs/autoscaling.md
  GET  /api/tasks?q=&state=   tasks from task events, newest first; /api/tasks/<id> one, with traceback
  GET  /api/failures          recent failures with their tracebacks
  GET  /api/throughput        succeeded and failed per 5 s over the last 10 minutes
  GET  /api/resources         per resource: the fleet's limit in force, in use, waiting, and per 5 s history
  GET  /api/dlq               the dead-letter store
  GET  /api/schedule          periodic tasks with their last and next run (greenq.beat)
  POST /api/dlq/requeue       {"ids": [...]} or {"all": true}
  POST /api/dlq/purge         {}

Every request must name in its Host header the bound host, localhost,
127.0.0.1 or [::1] (with the port), or one of ``[dashboard] allowed_hosts``,
else 403: a page of another site that rebinds its name to this address (DNS
rebinding) reads and changes nothing.  POSTs must carry the header
``X-GreenQ: 1`` (the page's script sets it; a form on another site cannot)
and an Origin (or Referer), when they send one, of an allowed host; with
``[dashboard] auth`` every request needs HTTP basic auth.  Query parameters
are checked (400 with a message); every answer is strict JSON (NaN and
infinities become null).  /api/dlq lists at most ``DLQ_LIST_MAX`` dead
letters, each body read as a preview of ``DLQ_PREVIEW_BYTES`` (``greenq dlq
show ID`` prints one whole).  Every asset ships in the package: the page
works offline.  The server is greenq/httpserve.py with plain threads: the
admin tool is not monkey-patched, and this keeps it so.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import math
import mimetypes
import os
import time
from typing import Any, Callable, Collection, Dict, FrozenSet, Iterable, List, Optional, Tuple
from urllib.parse import urlsplit

from ..cli.listing import queue_stats as queue_listing
from ..httpserve import Server
from ..metrics import QueueSignals, render_queue_signals
from .state import FleetState

log = logging.getLogger("greenq.dashboard")

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
QUEUES_CACHE = 1.0          # seconds a queue listing is reused (many tabs, one broker call)
DLQ_LIST_MAX = 200          # dead letters /api/dlq lists
DLQ_PREVIEW_BYTES = 4096    # bytes of each dead letter's body /api/dlq reads and shows
TASKS_MAX, FAILURES_MAX = 1000, 100    # ceilings of /api/tasks?limit= and /api/failures?limit=
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
Start = Callable[[str, List[Tuple[str, str]]], Any]


class BadParameter(ValueError):
    """A query parameter out of its range: a 400 with this message."""


def allowed_hosts(host: str, port: int, extra: Collection[str] = ()) -> FrozenSet[str]:
    """The Host header values the dashboard answers to (lower case): the
    bound host and the local names, each with ``:port`` (bare too on port 80),
    and ``extra`` ([dashboard] allowed_hosts) as given, with ``:port`` added
    to those that name none."""
    bound = f"[{host}]" if ":" in host and not host.startswith("[") else host
    names = {bound.lower(), *LOCAL_HOSTS}
    hosts = {f"{name}:{port}" for name in names} | (names if port == 80 else set())
    for entry in extra:
        entry = entry.strip().lower()
        if entry:
            hosts.add(entry)
            if not entry.endswith("]") and ":" not in entry:
                hosts.add(f"{entry}:{port}")
    return frozenset(hosts)


class Dashboard:
    """The WSGI application; ``hosts``: what allowed_hosts() returns."""

    def __init__(self, app: Any, state: FleetState, auth: str = "",
                 hosts: Collection[str] = allowed_hosts("127.0.0.1", 5555)) -> None:
        self.app = app
        self.state = state
        self.auth = auth
        self.hosts = frozenset(hosts)
        self._queues: Tuple[float, List[Dict[str, Any]]] = (0.0, [])
        self._signals = QueueSignals()

    def __call__(self, environ: Dict[str, Any], start: Start) -> Iterable[bytes]:
        refused = self._refused(environ)
        if refused:
            log.warning("dashboard: refused %s %s: %s", environ["REQUEST_METHOD"],
                        environ.get("PATH_INFO", "/"), refused)
            return _json(start, {"error": refused}, "403 Forbidden")
        if self.auth and not self._authorized(environ.get("HTTP_AUTHORIZATION", "")):
            return _send(start, "401 Unauthorized", b"authentication required\n", "text/plain",
                         [("WWW-Authenticate", 'Basic realm="greenq"')])
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        try:
            if method == "GET":
                return self._get(path, environ, start)
            if method == "POST":
                if environ.get("HTTP_X_GREENQ") != "1":
                    return _json(start, {"error": "missing header X-GreenQ: 1"}, "403 Forbidden")
                return self._post(path, environ, start)
            return _json(start, {"error": "method not allowed"}, "405 Method Not Allowed")
        except BadParameter as exc:
            return _json(start, {"error": str(exc)}, "400 Bad Request")
        except Exception as exc:
            log.exception("dashboard: %s %s failed", method, path)
            return _json(start, {"error": f"{type(exc).__name__}: {exc}"}, "500 Internal Server Error")

    def _refused(self, environ: Dict[str, Any]) -> str:
        """Why this request is refused (a Host not ours; a POST from another
        origin), or "" when it may go on."""
        host = environ.get("HTTP_HOST", "").strip().lower()
        if host not in self.hosts:
            return f"Host {host!r} is not this dashboard's; add it to [dashboard] allowed_hosts"
        if environ["REQUEST_METHOD"] != "GET":
            origin = environ.get("HTTP_ORIGIN") or environ.get("HTTP_REFERER")
            if origin is not None and urlsplit(origin).netloc.lower() not in self.hosts:
                return f"origin {origin!r} is not this dashboard's"
        return ""

    def _authorized(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(given.encode(), self.auth.encode())

    # -- GET ---------------------------------------------------------------------
    def _get(self, path: str, environ: Dict[str, Any], start: Start) -> Iterable[bytes]:
        query = _query(environ)
        if path in ("/", "/index.html"):
            return self._static("index.html", start)
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):], start)
        if path == "/api/workers":
            return _json(start, self.state.worker_list())
        if path == "/api/stats":
            return _json(start, self.state.stats())
        if path == "/api/queues":
            return _json(start, self.queues())
        if path == "/metrics":
            # greenq queues' listing: on RabbitMQ, every queue and every consumer's held
            # messages through the management API when it answers
            text = render_queue_signals(self._signals.read(lambda: queue_listing(self.app)[0]))
            return _send(start, "200 OK", text.encode(), "text/plain; version=0.0.4; charset=utf-8")
        if path == "/api/tasks":
            limit = _limit(query, 100, TASKS_MAX)
            return _json(start, self.state.task_list(query.get("q", ""), query.get("state", ""), limit))
        if path.startswith("/api/tasks/"):
            task = self.state.task(path[len("/api/tasks/"):])
            return _json(start, task) if task else _json(start, {"error": "unknown task"}, "404 Not Found")
        if path == "/api/failures":
            return _json(start, self.state.failure_list(_limit(query, 20, FAILURES_MAX)))
        if path == "/api/throughput":
            return _json(start, self.state.throughput())
        if path == "/api/resources":
            return _json(start, self.state.resource_list())
        if path == "/api/dlq":
            return _json(start, self.dead_letters())
        if path == "/api/schedule":
            return _json(start, schedule(self.app))
        return _send(start, "404 Not Found", b"not found\n", "text/plain")

    def _static(self, name: str, start: Start) -> Iterable[bytes]:
        path = os.path.normpath(os.path.join(STATIC, name))
        if not path.startswith(STATIC + os.sep) or not os.path.isfile(path):
            return _send(start, "404 Not Found", b"not found\n", "text/plain")
        with open(path, "rb") as fh:
            body = fh.read()
        ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return _send(start, "200 OK", body, ctype + ("; charset=utf-8" if ctype.startswith("text/") or
                                                       ctype.endswith("javascript") else ""))

    def queues(self) -> List[Dict[str, Any]]:
        when, cached = self._queues
        if time.monotonic() - when < QUEUES_CACHE:
            return cached
        listing = [{"name": q.name, "ready": q.ready, "delayed": q.delayed, "held": q.held, "dead": q.dead,
                    "oldest_ready_age": q.oldest_ready_age}
                   for q in self.app.broker.queue_stats()]
        self._queues = (time.monotonic(), listing)
        return listing

    def dead_letters(self) -> List[Dict[str, Any]]:
        """The first DLQ_LIST_MAX dead letters, each with its task's name and
        a preview of its body, read from the broker DLQ_PREVIEW_BYTES (+1, to
        tell a cut body) at most."""
        out = []
        for d in self.app.broker.dlq_list(limit=DLQ_LIST_MAX, preview=DLQ_PREVIEW_BYTES + 1):
            head = envelope_head(d.body)
            out.append({"id": d.id, "queue": d.queue, "task": _text_or_none(head.get("task")),
                        "message_id": d.message_id, "reason": d.reason, "failed_at": d.failed_at,
                        "preview": d.body[:DLQ_PREVIEW_BYTES].decode("utf-8", "replace"),
                        "truncated": len(d.body) > DLQ_PREVIEW_BYTES})
        return out

    # -- POST --------------------------------------------------------------------
    def _post(self, path: str, environ: Dict[str, Any], start: Start) -> Iterable[bytes]:
        body = _body(environ)
        broker = self.app.broker
        self._queues = (0.0, [])
        if path == "/api/dlq/requeue":
            if body.get("all") is True:
                count = broker.dlq_requeue(None)
            else:
                ids = body.get("ids")
                if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
                    return _json(start, {"error": "expected {\"ids\": [...]} or {\"all\": true}"}, "400 Bad Request")
                count = broker.dlq_requeue(ids)
            log.info("dashboard: requeued %d dead letter(s)", count)
            return _json(start, {"requeued": count})
        if path == "/api/dlq/purge":
            count = broker.dlq_purge()
            log.info("dashboard: purged %d dead letter(s)", count)
            return _json(start, {"purged": count})
        return _send(start, "404 Not Found", b"not found\n", "text/plain")


def schedule(app: Any) -> List[Dict[str, Any]]:
    """The periodic schedule with each entry's last run sent (read from the
    scheduler's leadership in the broker) and next run; [] without entries."""
    from ..beat import entries, scheduled
    if not entries(app):
        return []
    from ..leadership import make_leadership
    from ..beat import LEADERSHIP_SECONDS
    leadership = make_leadership(app, LEADERSHIP_SECONDS)
    try:
        return scheduled(app, leadership=leadership)
    except Exception:                   # the broker is away: the schedule still has its next runs
        return scheduled(app)
    finally:
        leadership.close()


def envelope_head(prefix: bytes) -> Dict[str, Any]:
    """The top-level fields of a JSON message envelope that are whole in
    ``prefix`` (its first bytes: "id" and "task" come before the arguments),
    {} when it is not one.  Never raises."""
    decoder = json.JSONDecoder()
    text = prefix.decode("utf-8", "ignore")
    fields: Dict[str, Any] = {}
    pos = _skip(text, 0)
    if not text.startswith("{", pos):
        return fields
    pos += 1
    try:
        while True:
            key, pos = decoder.raw_decode(text, _skip(text, pos))
            pos = _skip(text, pos)
            if not isinstance(key, str) or not text.startswith(":", pos):
                return fields
            value, pos = decoder.raw_decode(text, _skip(text, pos + 1))
            fields[key] = value
            pos = _skip(text, pos)
            if not text.startswith(",", pos):
                return fields
            pos += 1
    except (ValueError, RecursionError):    # cut in the middle of a value: what came before stands
        return fields


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _text_or_none(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


def _limit(query: Dict[str, str], default: int, ceiling: int) -> int:
    """``?limit=``: a whole number from 1; more than ``ceiling`` is cut to it."""
    raw = query.get("limit", "")
    if raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise BadParameter(f"limit={raw!r}: expected a whole number from 1 (at most {ceiling} are returned)")
    return min(int(raw), ceiling)


def finite(value: Any) -> Any:
    """``value`` with every NaN and infinity replaced by None (JSON has none)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _query(environ: Dict[str, Any]) -> Dict[str, str]:
    from urllib.parse import parse_qs
    return {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _body(environ: Dict[str, Any]) -> Dict[str, Any]:
    try:
        size = min(int(environ.get("CONTENT_LENGTH") or 0), 1 << 20)
    except ValueError:
        size = 0
    raw = environ["wsgi.input"].read(size) if size else b"{}"
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {}


def _send(start: Start, status: str, body: bytes, ctype: str,
          extra: Optional[List[Tuple[str, str]]] = None) -> List[bytes]:
    headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
               ("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY")]
    start(status, headers + (extra or []))
    return [body]


def _json(start: Start, value: Any, status: str = "200 OK") -> List[bytes]:
    body = json.dumps(finite(value), default=repr, allow_nan=False).encode()
    return _send(start, status, body, "application/json")


def serve(wsgi_app: Dashboard, host: str, port: int) -> Server:
    """The server of ``wsgi_app`` (greenq/httpserve.py on plain threads);
    call ``serve_forever()`` on it, then ``server_close()``."""
    from ..drivers.threads import ThreadsDriver
    return Server(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", wsgi_app, ThreadsDriver())
