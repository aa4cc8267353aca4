"""Claims and acks commit without waiting for the disk on a ``synchronous=full``
file (broker.unflushed); every connection goes back to the pool at the
file's own level, whatever happened inside."""
from __future__ import annotations

import sqlite3

import pytest

from greenq.brokers import Outgoing, make_broker
from greenq.transports.sqlite.broker import unflushed
from tests.conftest import make_config

LEVELS = {"full": 2, "normal": 1, "off": 0}


@pytest.mark.parametrize("synchronous", ["full", "normal"])
def test_pooled_connections_keep_the_files_level(tmp_path, synchronous):
    broker = make_broker(f"sqlite:///{tmp_path}/f.sqlite3?synchronous={synchronous}", make_config())
    try:
        broker.publish_many([Outgoing("q", b"x", f"m{i}") for i in range(3)])
        got = broker.fetch(["q"], 3, 0)
        broker.ack(got)
        assert len(got) == 3 and broker.fetch(["q"], 3, 0) == []
        levels = {conn.execute("PRAGMA synchronous").fetchone()[0] for conn in broker._db._idle}
    finally:
        broker.close()
    assert levels == {LEVELS[synchronous]}


def test_unflushed_restores_full_after_an_error(tmp_path):
    conn = sqlite3.connect(tmp_path / "e.sqlite3", isolation_level=None)
    conn.execute("PRAGMA synchronous=full")
    with pytest.raises(ZeroDivisionError):
        with unflushed(conn, "full"):
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1
            1 / 0
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    conn.close()
