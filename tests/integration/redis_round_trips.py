"""Counting the round trips a redis-py client makes (tests only): every
command or pipeline a connection of the client's pool sends is one
``send_packed_command`` on that connection."""
from __future__ import annotations

from typing import Any, List


class RoundTrips:
    """``with RoundTrips(client) as trips: ...`` then ``trips.count``: the
    commands (a pipeline, a script: one each) the client's connections sent
    inside the block.  Wraps the pool's connections, not the server: other
    clients of the same Redis do not count."""

    def __init__(self, client: Any) -> None:
        self.pool = client.connection_pool
        self.count = 0
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
            return send(command, check_health)
        conn.send_packed_command = counted
        self._wrapped.append(conn)

    def __exit__(self, *exc: Any) -> None:
        self.pool.make_connection = self._orig_make
        for conn in self._wrapped:
            del conn.send_packed_command          # the class's own again
