"""The one place greenq reaches into py-amqp's internals.

greenq lets py-amqp open connections, negotiate, declare and wait for method
replies, but does the hot paths itself with ``amqp_wire``: a consumer reads
its deliveries, a publisher writes its publishes, acks go out in one write.
That needs four things py-amqp does not offer publicly, all here:

* reading frames: ``transport.read_frame`` replaced by ``SocketFrames`` (one
  ``recv`` serves many frames; plain TCP only, TLS keeps py-amqp's reader);
* seeing every frame read: ``Connection.on_inbound_frame`` wrapped, so a
  consumer's deliveries are read by ``amqp_wire.DeliveryReader`` even while
  py-amqp waits for a method reply, and content headers py-amqp cannot decode
  are rewritten (``amqp_wire.readable_header``);
* writing bytes: ``Connection._transport.write``, with py-amqp's heartbeat
  bookkeeping (``bytes_sent``/``bytes_recv``) kept right;
* the socket and the read buffer of the transport (timeouts, TLS's pending data).

These are private to py-amqp, so the adapter runs only on the py-amqp
releases it was tested with (``SUPPORTED``, the same range as setup.cfg's
``amqp`` extra) and refuses others at import with a message saying which.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

import amqp

from ...exceptions import ConfigError
from .wire import Frame, FrameParser, rewrite_headers

#: py-amqp releases this module was tested with: at least the first, below the second
SUPPORTED = ((5, 1, 1), (5, 5))
REQUIREMENT = "amqp>=5.1.1,<5.5"


def check_version(version: str) -> None:
    """Raise ConfigError unless py-amqp ``version`` is in ``SUPPORTED``."""
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:3])
    if not SUPPORTED[0] <= numbers < SUPPORTED[1]:
        raise ConfigError(f"greenq's RabbitMQ support works with py-amqp {REQUIREMENT[4:]} (it relies "
                          f"on py-amqp internals), not {version}: pip install '{REQUIREMENT}'")


check_version(amqp.__version__)


class SocketFrames(FrameParser):
    """A faster ``read_frame`` for a plain TCP transport: one ``recv`` of up
    to 64 KiB serves many frames (py-amqp reads each frame with three).  A
    timeout leaves the buffer as it was, so a frame is never half-consumed."""

    __slots__ = ("transport", "sock")

    def __init__(self, transport: Any) -> None:
        super().__init__(transport._read_buffer or b"")
        self.transport = transport
        self.sock = transport.sock

    def read_frame(self, unpack: Any = None) -> Frame:
        """The next frame, reading the socket when none is buffered
        (raises ``socket.timeout`` after the socket's timeout)."""
        while True:
            frame = self.next_frame()
            if frame is not None:
                return frame
            chunk = self.sock.recv(65536)   # socket.timeout: nothing consumed
            if not chunk:
                self.transport.connected = False
                raise OSError("Server unexpectedly closed connection")
            self.feed(chunk)


class RawConnection:
    """greenq's raw access to one open py-amqp connection (``conn``).

    Made right after ``connect()``: gives a plain TCP connection the buffered
    frame reader (``reader``; None on TLS or without ``fast_reads``) and makes
    every content header it receives readable by py-amqp.
    """

    def __init__(self, conn: "amqp.Connection", fast_reads: bool = True) -> None:
        self.conn = conn
        transport = conn.transport
        self.sock = transport.sock
        self.reader: Optional[SocketFrames] = None
        if fast_reads and type(transport).__name__ == "TCPTransport":
            self.reader = SocketFrames(transport)
            transport.read_frame = self.reader.read_frame
        conn.on_inbound_frame = rewrite_headers(conn.on_inbound_frame)

    def write(self, data: bytes) -> None:
        """Write ``data`` (whole frames) to the connection.  Raises OSError
        when the write fails, AttributeError when the connection was closed."""
        conn = self.conn
        conn._transport.write(data)
        conn.bytes_sent += 1    # (py-amqp's heartbeat bookkeeping)

    @property
    def transport_write(self) -> Callable[[bytes], None]:
        """The transport's own ``write``, to keep: the cheapest write, for a
        connection without heartbeats (py-amqp's heartbeat check does not see
        it) that is not closed and reopened under its holder (a publisher)."""
        return self.conn._transport.write

    def received(self) -> None:
        """Count a frame read past py-amqp's frame handler (its heartbeat bookkeeping)."""
        self.conn.bytes_recv += 1

    def intercept(self, handler: Callable[[Frame], Any]) -> Callable[[Frame], Any]:
        """Make ``handler`` the handler of every frame the connection reads
        (``drain_events``, and py-amqp's waits for method replies); return
        py-amqp's, which ``handler`` passes the frames it does not take to."""
        previous = self.conn.on_inbound_frame
        self.conn.on_inbound_frame = handler
        return previous

    def buffered(self) -> bool:
        """Data already read from the socket and not yet parsed (a TLS
        record's rest, or py-amqp's read buffer): a read needs no wait."""
        pending = getattr(self.sock, "pending", None)
        return bool((pending is not None and pending()) or self.conn._transport._read_buffer)

    def open_socket(self) -> Any:
        """The socket while the connection is open, else None (py-amqp's
        ``Connection.transport`` would reconnect a closed connection)."""
        transport = self.conn._transport
        return None if transport is None else transport.sock


def close_quietly(conn: Optional["amqp.Connection"], forked: bool = False) -> None:
    """Close ``conn`` cleanly if it answers within 2 s, else drop it; never raises.
    In a forked child (``forked``) the socket is the parent's: leave it alone."""
    transport = getattr(conn, "_transport", None)
    if conn is None or transport is None or forked:
        return   # closed already, or the parent's
    try:
        transport.sock.settimeout(2.0)
        conn.close()
    except Exception:
        try:
            conn.collect()
        except Exception:
            pass
