"""The dashboard's WSGI application and server.

Routes (JSON unless said otherwise):

  GET  /                      the page (static/index.html); /static/* its assets
  GET  /api/workers           workers from their heartbeats, online or offline
  GET  /api/stats             what the event reader read, skipped and dropped (malformed events)
  GET  /api/queues            depth of each queue: ready, delayed, held, dead
  GET  /api/tasks?q=&state=   tasks from task events, newest first; /api/tasks/<id> one, with traceback
  GET  /api/failures          recent failures with their tracebacks
  GET  /api/throughput        succeeded and failed per 5 s over the last 10 minutes
  GET  /api/dlq               the dead-letter store
  GET  /api/schedule          periodic tasks with their last and next run (greenq.beat)
  POST /api/dlq/requeue       {"ids": [...]} or {"all": true}
  POST /api/dlq/purge         {}

POSTs must carry the header ``X-GreenQ: 1`` (the page's script sets it; a form
on another site cannot), and with ``[dashboard] auth`` every request needs
HTTP basic auth.  Every asset ships in the package: the page works offline.
The server is the standard library's (wsgiref) with a thread per request:
the admin tool is not monkey-patched, and this keeps it so.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import mimetypes
import os
import time
from socketserver import ThreadingMixIn
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ..message import peek
from .state import FleetState

log = logging.getLogger("greenq.dashboard")

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
QUEUES_CACHE = 1.0          # seconds a queue listing is reused (many tabs, one broker call)
Start = Callable[[str, List[Tuple[str, str]]], Any]


class Dashboard:
    """The WSGI application."""

    def __init__(self, app: Any, state: FleetState, auth: str = "") -> None:
        self.app = app
        self.state = state
        self.auth = auth
        self._queues: Tuple[float, List[Dict[str, Any]]] = (0.0, [])

    def __call__(self, environ: Dict[str, Any], start: Start) -> Iterable[bytes]:
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
        except Exception as exc:
            log.exception("dashboard: %s %s failed", method, path)
            return _json(start, {"error": f"{type(exc).__name__}: {exc}"}, "500 Internal Server Error")

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
        if path == "/api/tasks":
            limit = min(1000, int(query.get("limit", "100") or 100))
            return _json(start, self.state.task_list(query.get("q", ""), query.get("state", ""), limit))
        if path.startswith("/api/tasks/"):
            task = self.state.task(path[len("/api/tasks/"):])
            return _json(start, task) if task else _json(start, {"error": "unknown task"}, "404 Not Found")
        if path == "/api/failures":
            return _json(start, self.state.failure_list(min(100, int(query.get("limit", "20") or 20))))
        if path == "/api/throughput":
            return _json(start, self.state.throughput())
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
        listing = [{"name": q.name, "ready": q.ready, "delayed": q.delayed, "held": q.held, "dead": q.dead}
                   for q in self.app.broker.queue_stats()]
        self._queues = (time.monotonic(), listing)
        return listing

    def dead_letters(self) -> List[Dict[str, Any]]:
        out = []
        for d in self.app.broker.dlq_list(limit=200):
            _, task = peek(d.body)
            out.append({"id": d.id, "queue": d.queue, "task": task, "message_id": d.message_id,
                        "reason": d.reason, "failed_at": d.failed_at})
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
    scheduler's lease in the broker) and next run; [] without entries."""
    from ..beat import entries, scheduled
    if not entries(app):
        return []
    from ..leases import make_lease
    from ..beat import LEASE_SECONDS
    lease = make_lease(app, LEASE_SECONDS)
    try:
        return scheduled(app, lease=lease)
    except Exception:                   # the broker is away: the schedule still has its next runs
        return scheduled(app)
    finally:
        lease.close()


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
    return _send(start, status, json.dumps(value, default=repr).encode(), "application/json")


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def serve(wsgi_app: Dashboard, host: str, port: int) -> _ThreadingServer:
    """A threaded WSGI server for ``wsgi_app``; call ``serve_forever()`` on it."""
    return make_server(host, port, wsgi_app, server_class=_ThreadingServer, handler_class=_QuietHandler)
