"""A fault-injecting TCP proxy for the chaos tests: standard library only.

``FaultProxy(host, port)`` listens on a free port of 127.0.0.1 and forwards
every connection to ``host:port`` (Redis, RabbitMQ).  Workers are pointed at
the proxy instead of the server, and the test breaks the path on purpose:

* ``reset_all()`` -- every live connection is aborted: SO_LINGER 0, then close,
  so both the worker and the server see a TCP RST (a crashed router, a
  firewall that drops the state of its connections);
* ``blackhole(seconds)`` -- a network partition: no byte moves either way and
  new connections are accepted but not forwarded, then everything resumes.
  Bytes are held, not dropped: across a partition shorter than its
  retransmission timeout TCP delivers late, it does not lose.  A client that
  gives up meanwhile closes its side, as it would on a real network.
* ``close()`` -- stop listening and close every connection.

One thread runs a ``selectors`` loop; the control methods hand it a command
and wait until it has been applied, so when ``blackhole()`` returns no byte
crosses any more, and when ``reset_all()`` returns every connection is gone.
"""
from __future__ import annotations

import queue
import selectors
import socket
import struct
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

CHUNK = 65536
BUFFER_LIMIT = 1 << 20       # bytes held per direction before reading from that side pauses
CONNECT_TIMEOUT = 5.0
_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST instead of FIN


class _Link:
    """One proxied connection: the client's socket, the server's, and the
    bytes read from one side and not yet written to the other."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.to_server = bytearray()
        self.to_client = bytearray()

    def outbound(self, sock: socket.socket) -> bytearray:
        """Bytes waiting to be written to ``sock``."""
        return self.to_client if sock is self.client else self.to_server

    def inbound(self, sock: socket.socket) -> Tuple[bytearray, socket.socket]:
        """Where bytes read from ``sock`` go, and the socket they go to."""
        if sock is self.client:
            return self.to_server, self.server
        return self.to_client, self.client


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _abort(sock: socket.socket) -> None:
    """Close with a RST."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """Forward 127.0.0.1:``port`` to ``upstream_host:upstream_port``, with faults on demand."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0                    # connections accepted so far
        self.resets = 0                      # connections aborted by reset_all()
        self.resumed_at: Optional[float] = None   # time.time() when the last blackhole ended
        self._links: Dict[socket.socket, _Link] = {}   # both sockets of a link map to it
        self._held: List[socket.socket] = []           # accepted during a blackhole
        self._masks: Dict[socket.socket, int] = {}
        self._until = 0.0                    # monotonic end of the current blackhole
        self._holding = False
        self._closed = False
        self._commands: "queue.SimpleQueue[Tuple[Callable[[], None], threading.Event]]" = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._loop, name=f"fault-proxy-{self.port}", daemon=True)
        self._thread.start()

    # -- control (any thread) ---------------------------------------------------
    def live(self) -> int:
        """Connections currently forwarded or held."""
        count = [0]

        def measure() -> None:
            count[0] = len({id(link) for link in self._links.values()}) + len(self._held)
        self._call(measure)
        return count[0]

    def reset_all(self) -> int:
        """Abort every live connection with a RST on both sides; returns how many."""
        count = [0]

        def reset() -> None:
            for link in {id(l): l for l in self._links.values()}.values():
                self._drop(link, abort=True)
                count[0] += 1
            for sock in self._held:
                self._forget(sock)
                _abort(sock)
                count[0] += 1
            self._held.clear()
            self.resets += count[0]
        self._call(reset)
        return count[0]

    def blackhole(self, seconds: float) -> None:
        """Stop every byte, and forwarding of new connections, for ``seconds``;
        returns once nothing moves any more (it does not wait for the end)."""
        def start() -> None:
            self._until = time.monotonic() + seconds
            self._holding = True
        self._call(start)

    def holding(self) -> bool:
        """True while a blackhole lasts."""
        return self._holding

    def close(self) -> None:
        """Stop listening and close every connection (gracefully)."""
        if self._closed:
            return

        def stop() -> None:
            self._closed = True
            for link in {id(l): l for l in self._links.values()}.values():
                self._drop(link, abort=False)
            for sock in self._held:
                sock.close()
            self._held.clear()
        self._call(stop)
        self._thread.join(5)
        self._sel.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def _call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the proxy's thread and wait for it."""
        if self._closed:
            raise RuntimeError("proxy is closed")
        done = threading.Event()
        self._commands.put((fn, done))
        self._wake_w.send(b"x")
        if not done.wait(10):
            raise RuntimeError("fault proxy thread does not answer")

    # -- the loop (proxy thread) --------------------------------------------------
    def _loop(self) -> None:
        while not self._closed:
            if self._holding and time.monotonic() >= self._until:
                self._resume()
            self._update_interest()
            timeout = max(0.0, self._until - time.monotonic()) if self._holding else None
            for key, mask in self._sel.select(timeout):
                sock = key.fileobj
                if sock is self._wake_r:
                    self._run_commands()
                elif sock is self._listener:
                    self._accept()
                elif sock in self._links and not self._holding:   # a blackhole begun in this batch
                    self._service(self._links[sock], sock, mask)
                if self._closed:
                    return

    def _run_commands(self) -> None:
        try:
            self._wake_r.recv(4096)
        except BlockingIOError:
            pass
        while True:
            try:
                fn, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            finally:
                done.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except BlockingIOError:
                return
            self.accepted += 1
            if self._holding:
                self._held.append(client)   # accepted, not forwarded until the blackhole ends
            else:
                self._connect(client)

    def _connect(self, client: socket.socket) -> None:
        """Open the server side of ``client``; a refused one is aborted."""
        try:
            server = socket.create_connection(self.upstream, timeout=CONNECT_TIMEOUT)
        except OSError:
            _abort(client)
            return
        _tune(client)
        _tune(server)
        link = _Link(client, server)
        self._links[client] = link
        self._links[server] = link

    def _resume(self) -> None:
        self._holding = False
        self.resumed_at = time.time()
        held, self._held = self._held, []
        for client in held:
            self._connect(client)

    def _update_interest(self) -> None:
        """Register each socket for what it can do now: nothing while holding."""
        for sock, link in list(self._links.items()):
            mask = 0
            if not self._holding:
                buffer, _ = link.inbound(sock)
                if len(buffer) < BUFFER_LIMIT:
                    mask |= selectors.EVENT_READ
                if link.outbound(sock):
                    mask |= selectors.EVENT_WRITE
            old = self._masks.get(sock, 0)
            if mask == old:
                continue
            if not mask:
                self._sel.unregister(sock)
                del self._masks[sock]
            elif not old:
                self._sel.register(sock, mask)
                self._masks[sock] = mask
            else:
                self._sel.modify(sock, mask)
                self._masks[sock] = mask

    def _service(self, link: _Link, sock: socket.socket, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ:
                data = sock.recv(CHUNK)
                if not data:                  # one side closed: pass on what is left, then close
                    self._drop(link, abort=False)
                    return
                buffer, _ = link.inbound(sock)
                buffer += data
            if mask & selectors.EVENT_WRITE:
                pending = link.outbound(sock)
                sent = sock.send(pending)
                del pending[:sent]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(link, abort=True)

    def _forget(self, sock: socket.socket) -> None:
        if self._masks.pop(sock, 0):
            self._sel.unregister(sock)
        self._links.pop(sock, None)

    def _drop(self, link: _Link, *, abort: bool) -> None:
        """Close both sides of ``link``: with a RST, or after a last
        best-effort write of what was already read."""
        for sock in (link.client, link.server):
            self._forget(sock)
        for sock in (link.client, link.server):
            if abort:
                _abort(sock)
                continue
            pending = link.outbound(sock)
            if pending:
                try:
                    sock.send(pending)
                except OSError:
                    pass
            sock.close()
