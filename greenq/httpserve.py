"""The small HTTP server behind /healthz, /metrics, the supervisor's endpoint
and the dashboard.

No client can delay another:

- Under threads, solo and the unpatched dashboard, one thread accepts
  connections and reads every request's head and body without blocking, all
  connections at once (a selector): an idle or slow client costs a file
  descriptor and a buffer, never a thread.  A complete request goes to one
  of ``HANDLERS`` handler threads, which call the WSGI application and write
  its answer.
- Under gevent and eventlet, a greenlet accepts and each connection gets a
  greenlet of its own (a parked greenlet costs a few KiB, and the hub waits
  on each socket alone: a green select over a thousand sockets would cost
  O(n) per event under eventlet).

Every answer closes its connection.  Units come from ``driver.spawn``: the
worker's control side, never its task pool.

Ceilings (docs/operations.md, "The HTTP endpoints"):

- ``READ_TIMEOUT``: a connection that has not sent a whole request this many
  seconds after it was accepted is closed (idle, half-open, slow clients).
- ``WRITE_TIMEOUT``: seconds a handler waits for a client to take its answer.
- ``MAX_CONNECTIONS``: connections open at once (lower when the process's
  descriptor limit is: that limit less ``FD_RESERVE``).  Past it, the oldest
  connection still reading its request is closed to make room (a probe that
  sends its request at once is served whatever others hold open); when every
  open connection is being answered, the newcomer is closed at once.
- ``MAX_HEAD`` bytes of request line and headers (else 431), ``MAX_BODY``
  bytes of body (else 413).
"""
from __future__ import annotations

import io
import logging
import selectors
import socket
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple
from urllib.parse import unquote

log = logging.getLogger("greenq.http")

READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0
MAX_CONNECTIONS = 4096
MAX_HEAD = 16384
MAX_BODY = 1 << 20
HANDLERS = 8
BACKLOG = 1024
#: connections accepted in one turn of the selector loop before the loop reads
#: the ready ones: a flood accepted in one go would evict (oldest first) the
#: connections it had just accepted, a request already waiting in them unread
ACCEPT_BATCH = 32
FD_RESERVE = 256            # descriptors left to the rest of the process (brokers, files, children)
_TICK = 0.5                 # the loop's longest sleep: how soon it sees stop() and expiries

WSGIApp = Callable[[Dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Route = Callable[[], Tuple[int, str, str]]


class _Pending:
    """A connection still reading its request."""
    __slots__ = ("sock", "peer", "accepted", "data")

    def __init__(self, sock: socket.socket, peer: Any) -> None:
        self.sock, self.peer, self.accepted, self.data = sock, peer, time.monotonic(), b""


class BadRequest(Exception):
    """A request that cannot be served: ``status`` says why."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class Server:
    """Serves ``app`` on ``address`` (HOST:PORT); ``driver`` provides
    spawn/queue/lock (the worker's, or a ThreadsDriver for the dashboard)."""

    def __init__(self, address: str, app: WSGIApp, driver: Any, handlers: int = HANDLERS,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        family, kind, proto, _, where = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                                                            flags=socket.AI_PASSIVE)[0]
        self.socket = socket.socket(family, kind, proto)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind(where)
            self.socket.listen(BACKLOG)
        except OSError:
            self.socket.close()
            raise
        self.server_address: Tuple[str, int] = self.socket.getsockname()[:2]
        self.app, self.driver = app, driver
        self.max_connections = min(max_connections, max(16, _descriptors() - FD_RESERVE))
        self._jobs = driver.queue()
        self._lock = driver.lock()
        self._busy = 0                              # connections handed to a handler, not yet closed
        self._running = True
        self._handlers = 0 if driver.green else handlers
        for _ in range(self._handlers):
            driver.spawn(self._handle_loop)

    # -- the loop ------------------------------------------------------------------
    def start(self) -> "Server":
        """Run the loop in a unit of the driver; return self."""
        self.driver.spawn(self.serve_forever)
        return self

    def serve_forever(self, poll_interval: float = _TICK) -> None:
        """Accept and read requests until ``server_close()``."""
        if self.driver.green:
            self._serve_green()
        else:
            self._serve_selector(poll_interval)

    def _serve_selector(self, poll_interval: float) -> None:
        self.socket.setblocking(False)
        selector = selectors.DefaultSelector()
        selector.register(self.socket, selectors.EVENT_READ, None)
        pending: Dict[socket.socket, _Pending] = {}        # oldest first
        try:
            while self._running:
                for key, _ in selector.select(min(poll_interval, _TICK)):
                    if key.data is None:
                        self._accept(selector, pending)
                    else:
                        self._read(selector, pending, key.data)
                self._expire(selector, pending)
        except OSError:
            if self._running:          # the socket closed under us by server_close() otherwise
                raise
        finally:
            for conn in list(pending.values()):
                _close(conn.sock)
            selector.close()

    def server_close(self) -> None:
        """Stop serving and release the port."""
        if not self._running:
            return
        self._running = False
        for _ in range(self._handlers):
            self._jobs.put(None)
        _close(self.socket)

    def _accept(self, selector: selectors.BaseSelector, pending: Dict[socket.socket, _Pending]) -> None:
        for _ in range(min(ACCEPT_BATCH, self.max_connections // 4)):   # some of the backlog, then read
            try:
                sock, peer = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:                    # out of descriptors: free the oldest idle one
                if pending:
                    self._drop(selector, pending, next(iter(pending.values())))
                return
            with self._lock:
                busy = self._busy
            if len(pending) + busy >= self.max_connections:
                if not pending:                # every one is being answered: no room
                    _close(sock)
                    continue
                oldest = next(iter(pending.values()))
                self._drop(selector, pending, oldest)
            sock.setblocking(False)
            pending[sock] = _Pending(sock, peer)
            selector.register(sock, selectors.EVENT_READ, pending[sock])

    def _read(self, selector: selectors.BaseSelector, pending: Dict[socket.socket, _Pending],
              conn: _Pending) -> None:
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(selector, pending, conn)
            return
        conn.data += chunk
        try:
            request = parse(conn.data)
        except BadRequest as exc:
            _answer_now(conn.sock, exc.status)
            self._drop(selector, pending, conn)
            return
        if request is None:
            return
        selector.unregister(conn.sock)
        del pending[conn.sock]
        with self._lock:
            self._busy += 1
        self._jobs.put((conn.sock, conn.peer, request))

    def _expire(self, selector: selectors.BaseSelector, pending: Dict[socket.socket, _Pending]) -> None:
        deadline = time.monotonic() - READ_TIMEOUT
        while pending:
            oldest = next(iter(pending.values()))
            if oldest.accepted > deadline:
                return
            _answer_now(oldest.sock, "408 Request Timeout")
            self._drop(selector, pending, oldest)

    @staticmethod
    def _drop(selector: selectors.BaseSelector, pending: Dict[socket.socket, _Pending],
              conn: _Pending) -> None:
        selector.unregister(conn.sock)
        del pending[conn.sock]
        _close(conn.sock)

    # -- green drivers: a greenlet per connection ------------------------------------
    def _serve_green(self) -> None:
        self.socket.settimeout(_TICK)
        reading: Dict[socket.socket, float] = {}         # accepted when; oldest first
        while self._running:
            try:
                sock, peer = self.socket.accept()
            except socket.timeout:
                continue
            except OSError:
                if not self._running:
                    return
                if reading:                    # out of descriptors: free the oldest idle one
                    _shut(_pop_oldest(reading))
                self.driver.sleep(0.01)
                continue
            with self._lock:
                busy = self._busy
            if len(reading) + busy >= self.max_connections:
                if not reading:
                    _close(sock)
                    continue
                _shut(_pop_oldest(reading))    # its greenlet reads EOF and closes it
            reading[sock] = accepted = time.monotonic()
            self.driver.spawn(self._connection, sock, peer, accepted, reading)
            self.driver.sleep(0)               # a flood of connects does not starve the readers

    def _connection(self, sock: socket.socket, peer: Any, accepted: float,
                    reading: Dict[socket.socket, float]) -> None:
        """Read and answer one connection; it may be shut (evicted) meanwhile."""
        try:
            request = _receive(sock, accepted + READ_TIMEOUT)
        finally:
            reading.pop(sock, None)
        if request is None:
            _close(sock)
            return
        with self._lock:
            self._busy += 1
        self._respond(sock, peer, request)

    # -- the handlers ----------------------------------------------------------------
    def _handle_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._respond(*job)

    def _respond(self, sock: socket.socket, peer: Any, request: "Request") -> None:
        """Answer ``request`` and close ``sock``; the caller counted it busy."""
        try:
            self._answer(sock, peer, request)
        except OSError:               # a client gone mid-answer: nothing to tell anyone
            pass
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.target)
            _answer_now(sock, "500 Internal Server Error")
        finally:
            _close(sock)
            with self._lock:
                self._busy -= 1

    def _answer(self, sock: socket.socket, peer: Any, request: "Request") -> None:
        environ = request.environ(self.server_address, peer)
        status_headers: List[Any] = []

        def start_response(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> None:
            status_headers[:] = [status, headers]
        body = b"".join(self.app(environ, start_response))
        status, headers = status_headers
        head = [f"HTTP/1.1 {status}"] + [f"{name}: {value}" for name, value in headers
                                         if name.lower() not in ("connection", "content-length")]
        head += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        sock.settimeout(WRITE_TIMEOUT)
        sock.sendall("\r\n".join(head).encode("latin-1") + body)


class Request:
    """A parsed request: method, target, version, headers (lower-case names), body."""
    __slots__ = ("method", "target", "version", "headers", "body")

    def __init__(self, method: str, target: str, version: str, headers: Dict[str, str], body: bytes) -> None:
        self.method, self.target, self.version, self.headers, self.body = method, target, version, headers, body

    def environ(self, server: Tuple[str, int], peer: Any) -> Dict[str, Any]:
        """The WSGI environ of this request."""
        path, _, query = self.target.partition("?")
        env: Dict[str, Any] = {
            "REQUEST_METHOD": self.method, "PATH_INFO": unquote(path, "latin-1"), "QUERY_STRING": query,
            "SERVER_NAME": str(server[0]), "SERVER_PORT": str(server[1]), "SERVER_PROTOCOL": self.version,
            "REMOTE_ADDR": str(peer[0]) if isinstance(peer, tuple) else "", "SCRIPT_NAME": "",
            "CONTENT_LENGTH": str(len(self.body)), "CONTENT_TYPE": self.headers.get("content-type", ""),
            "wsgi.input": io.BytesIO(self.body), "wsgi.errors": sys.stderr, "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http", "wsgi.multithread": True, "wsgi.multiprocess": False,
            "wsgi.run_once": False}
        for name, value in self.headers.items():
            if name not in ("content-type", "content-length"):
                env["HTTP_" + name.upper().replace("-", "_")] = value
        return env


def parse(data: bytes) -> Optional[Request]:
    """The request in ``data``, None while incomplete; raises BadRequest."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > MAX_HEAD:
            raise BadRequest("431 Request Header Fields Too Large")
        return None
    if end > MAX_HEAD:
        raise BadRequest("431 Request Header Fields Too Large")
    try:
        lines = data[:end].decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise BadRequest("400 Bad Request") from None
    if not version.startswith("HTTP/1.") or not target.startswith("/") or not method.isalpha():
        raise BadRequest("400 Bad Request")
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        name = name.strip().lower()
        if not sep or not name or name in headers and name in ("host", "content-length"):
            raise BadRequest("400 Bad Request")     # two Hosts: no guessing which one is checked
        headers[name] = value.strip()
    if "transfer-encoding" in headers:
        raise BadRequest("411 Length Required")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise BadRequest("400 Bad Request") from None
    if length < 0:
        raise BadRequest("400 Bad Request")
    if length > MAX_BODY:
        raise BadRequest("413 Content Too Large")
    body = data[end + 4:]
    if len(body) < length:
        return None
    return Request(method, target, version, headers, body[:length])


def routes_app(routes: Dict[str, Route]) -> WSGIApp:
    """A WSGI application answering GET ``routes`` (path prefix -> () ->
    (status, body, content type)); anything else is 404 or 405."""
    def app(environ: Dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        if environ["REQUEST_METHOD"] != "GET":
            start("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Allow", "GET")])
            return [b"method not allowed\n"]
        for prefix, route in routes.items():
            if path.startswith(prefix):
                try:
                    code, text, ctype = route()
                except Exception as exc:      # a broken route answers 500, the server stays up
                    code, text, ctype = 500, f"{type(exc).__name__}: {exc}\n", "text/plain"
                start(f"{code} {_REASONS.get(code, 'OK')}", [("Content-Type", ctype)])
                return [text.encode()]
        start("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    return app


_REASONS = {200: "OK", 503: "Service Unavailable", 404: "Not Found", 500: "Internal Server Error"}


def serve(address: str, app: WSGIApp, driver: Any) -> Server:
    """Bind ``address`` and serve ``app`` from a unit of ``driver``; the caller
    stops it with ``server_close()``."""
    return Server(address, app, driver).start()


def _receive(sock: socket.socket, deadline: float) -> Optional[Request]:
    """Read one request from ``sock`` until ``deadline`` (time.monotonic());
    None when there is none to answer (a short error was sent if useful)."""
    data = b""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
            request = parse(data)
            if request is not None:
                return request
    except socket.timeout:
        _answer_now(sock, "408 Request Timeout")
    except BadRequest as exc:
        _answer_now(sock, exc.status)
    except OSError:
        pass
    return None


def _pop_oldest(reading: Dict[socket.socket, float]) -> socket.socket:
    sock = next(iter(reading))
    del reading[sock]
    return sock


def _shut(sock: socket.socket) -> None:
    """End a connection another unit is reading: it sees EOF and closes it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _descriptors() -> int:
    """The process's soft limit of open files (a large number when unknown)."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 1 << 20
    return soft if soft != resource.RLIM_INFINITY and soft > 0 else 1 << 20


def _answer_now(sock: socket.socket, status: str) -> None:
    """A short error answer written without waiting (best effort: the
    socket's buffer takes it, or the client never reads it anyway)."""
    try:
        sock.send(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
    except OSError:
        pass


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
