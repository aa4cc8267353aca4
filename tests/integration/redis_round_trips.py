"""Counting the round trips a redis-py client makes (tests only): every
command or pipeline a connection of the client's pool sends is one
``send_packed_command`` on that connection."""
from __future__ import annotations

from typing import Any, List, Tuple


def _first_words(packed: Any) -> Tuple[str, str]:
    """The first two words of a packed RESP command (bytes or chunks)."""
    head = packed if isinstance(packed, (bytes, bytearray, memoryview)) else \
        b"".join(bytes(c) for c in packed[:4])
    lines = bytes(head[:4096]).split(b"\r\n")
    # *N, $len, word, $len, word, ...
    words = [lines[i].decode("utf-8", "replace") for i in (2, 4) if i < len(lines)]
    return (words + ["", ""])[0].upper(), (words + ["", ""])[1]


class RoundTrips:
    """``with RoundTrips(client) as trips: ...`` then ``trips.count``: the
    commands (a pipeline, a script: one each) the client's connections sent
    inside the block.  Wraps the pool's connections, not the server: other
    clients of the same Redis do not count."""

    def __init__(self, client: Any) -> None:
        self.pool = client.connection_pool
        self.count = 0
        #: per round trip, the first two words of its (first) command, e.g.
        #: ("EVALSHA", "<sha>"), ("XADD", "<stream>")
        self.commands: List[Tuple[str, str]] = []
        self._wrapped: List[Any] = []

    def __enter__(self) -> "RoundTrips":
        self._orig_make = self.pool.make_connection
        for conn in list(getattr(self.pool, "_available_connections", [])) + \
                list(getattr(self.pool, "_in_use_connections", [])):
            self._wrap(conn)

        def make_connection(*a: Any, **kw: Any) -> Any:
            conn = self._orig_make(*a, **kw)
            self._wrap(conn)
            return conn
        self.pool.make_connection = make_connection
        return self

    def _wrap(self, conn: Any) -> None:
        send = conn.send_packed_command

        def counted(command: Any, check_health: bool = True) -> Any:
            self.count += 1
            self.commands.append(_first_words(command))
            return send(command, check_health)
        conn.send_packed_command = counted
        self._wrapped.append(conn)

    def __exit__(self, *exc: Any) -> None:
        self.pool.make_connection = self._orig_make
        for conn in self._wrapped:
            del conn.send_packed_command          # the class's own again
