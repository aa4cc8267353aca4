"""The chaos tests' TCP fault proxy, against a local echo server."""
from __future__ import annotations

import socket
import threading
import time
from typing import Iterator, List

import pytest

from .fault_proxy import FaultProxy


class EchoServer:
    """Echoes every byte back; counts the connections it accepted."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.errors: List[BaseException] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        return
                    conn.sendall(data)
            except OSError as exc:
                self.errors.append(exc)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.sock.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", echo.port)
    yield p
    p.close()


def _client(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)


def _round_trip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_forwards_both_ways_including_large_payloads(proxy):
    with _client(proxy) as sock:
        assert _round_trip(sock, b"ping") == b"ping"
        big = bytes(range(256)) * 20000          # 5 MB: more than the proxy buffers per direction
        assert _round_trip(sock, big) == big
    assert proxy.accepted == 1


def test_reset_all_aborts_every_connection_with_a_rst(proxy, echo):
    socks = [_client(proxy) for _ in range(3)]
    for s in socks:
        assert _round_trip(s, b"x") == b"x"
    assert proxy.reset_all() == 3
    for s in socks:
        with pytest.raises(ConnectionResetError):
            s.sendall(b"y")
            s.recv(1)
        s.close()
    assert proxy.live() == 0
    with _client(proxy) as again:              # the proxy itself still serves
        assert _round_trip(again, b"z") == b"z"


def test_blackhole_holds_bytes_and_new_connections_then_delivers(proxy, echo):
    old = _client(proxy, timeout=0.3)
    assert _round_trip(old, b"before") == b"before"
    accepted = echo.accepted
    before = time.time()
    proxy.blackhole(1.0)
    assert proxy.holding()
    old.sendall(b"during")
    with pytest.raises(socket.timeout):
        old.recv(16)
    new = _client(proxy, timeout=0.3)          # accepted by the proxy, not forwarded
    new.sendall(b"fresh")
    with pytest.raises(socket.timeout):
        new.recv(16)
    assert echo.accepted == accepted
    old.settimeout(5)
    new.settimeout(5)
    assert old.recv(16) == b"during"           # held, not lost
    assert new.recv(16) == b"fresh"
    assert proxy.resumed_at is not None and proxy.resumed_at >= before + 1.0
    assert echo.accepted == accepted + 1
    old.close()
    new.close()


def test_close_stops_listening(echo):
    p = FaultProxy("127.0.0.1", echo.port)
    sock = _client(p)
    assert _round_trip(sock, b"a") == b"a"
    p.close()
    assert sock.recv(1) == b""                 # closed gracefully
    sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", p.port), timeout=1)


def test_refused_upstream_is_reset_at_once():
    dead = socket.create_server(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    p = FaultProxy("127.0.0.1", port)
    try:
        with pytest.raises((ConnectionResetError, ConnectionAbortedError)):
            with _client(p) as sock:            # the RST may even beat connect() back
                sock.sendall(b"x")
                if sock.recv(1) == b"":
                    raise ConnectionAbortedError
    finally:
        p.close()
