"""One /metrics and /healthz for every child of ``--processes N``.

Under the supervisor, ``--http HOST:PORT`` is served by the supervisor: each
child serves its own /metrics and /healthz on an ephemeral port of
127.0.0.1 and writes that port to ``<its heartbeat file>.http``; the
supervisor answers a scrape by asking every child and merging the answers,
each sample labelled ``child="<slot>"`` (the slot, 0 to N-1, is kept by a
replacement child).  /healthz is 200 while every child is healthy, else 503,
with each child's own answer in the body.
"""
from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple

log = logging.getLogger("greenq.supervisor")

PORT_SUFFIX = ".http"
ASK_TIMEOUT = 5.0

Children = Callable[[], List[Tuple[int, str]]]     # -> [(slot, heartbeat file)]


def write_port(heartbeat_file: str, port: int) -> None:
    """Called by a child once its own server listens."""
    with open(heartbeat_file + PORT_SUFFIX, "w") as fh:
        fh.write(str(port))


def _ask(heartbeat_file: str, path: str) -> Tuple[int, str]:
    try:
        with open(heartbeat_file + PORT_SUFFIX) as fh:
            port = int(fh.read().strip())
    except (OSError, ValueError):
        return 503, json.dumps({"status": "starting"})
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=ASK_TIMEOUT) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (OSError, ValueError) as exc:
        return 503, json.dumps({"status": "unreachable", "error": str(exc)})


def merge(texts: List[Tuple[int, str]]) -> str:
    """Prometheus text from several children as one exposition: each family's
    HELP and TYPE once, then its samples from every child, labelled by slot."""
    families: Dict[str, Dict[str, Any]] = {}
    for slot, text in texts:
        family: Optional[Dict[str, Any]] = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                name = line.split(" ", 3)[2]
                family = families.setdefault(name, {"help": None, "type": None, "samples": []})
                family["help" if line.startswith("# HELP") else "type"] = line
            elif line and not line.startswith("#") and family is not None:
                family["samples"].append(_labelled(line, slot))
    out = []
    for family in families.values():
        out.extend(x for x in (family["help"], family["type"]) if x)
        out.extend(family["samples"])
    return "\n".join(out) + "\n"


def _labelled(sample: str, slot: int) -> str:
    name_end = min((i for i in (sample.find("{"), sample.find(" ")) if i >= 0), default=len(sample))
    if sample[name_end:name_end + 1] == "{":
        return f'{sample[:name_end]}{{child="{slot}",{sample[name_end + 1:]}'
    return f'{sample[:name_end]}{{child="{slot}"}}{sample[name_end:]}'


class ChildrenEndpoint:
    def __init__(self, http: str, children: Children, driver: Any) -> None:
        self.http = http
        self.children = children
        self.driver = driver
        self._server: Optional[HTTPServer] = None
        self._running = False

    def metrics(self) -> str:
        return merge([(slot, body) for slot, hb in self.children()
                      for code, body in [_ask(hb, "/metrics")] if code == 200])

    def health(self) -> Tuple[bool, Dict[str, Any]]:
        answers = {}
        ok = True
        for slot, hb in self.children():
            code, body = _ask(hb, "/healthz")
            ok = ok and code == 200
            try:
                answers[str(slot)] = json.loads(body)
            except ValueError:
                answers[str(slot)] = {"status": body[:200]}
        ok = ok and bool(answers)
        return ok, {"status": "ok" if ok else "unhealthy", "children": answers}

    def start(self) -> None:
        host, _, port = self.http.rpartition(":")
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path.startswith("/healthz"):
                    ok, body = endpoint.health()
                    self._send(200 if ok else 503, json.dumps(body), "application/json")
                elif self.path.startswith("/metrics"):
                    self._send(200, endpoint.metrics(), "text/plain; version=0.0.4")
                else:
                    self._send(404, "not found\n", "text/plain")

            def _send(self, code: int, body: str, ctype: str) -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = HTTPServer((host or "127.0.0.1", int(port)), Handler)
        self._server.timeout = 0.5
        self._running = True
        log.info("serving /metrics and /healthz of every child on %s", self.http)

        def serve() -> None:
            while self._running:
                self._server.handle_request()
        self.driver.spawn(serve)

    def stop(self) -> None:
        self._running = False
        if self._server is not None:
            self._server.server_close()
