"""What the embedded brokers promise beyond the shared suite: URLs, the SQLite
schema, stale lease holders, interrupt, separate processes on one file."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from greenq.backends import backend_url_for, make_backend
from greenq.brokers import Outgoing, make_broker
from greenq.transports.sqlite.client import SCHEMA_VERSION
from greenq.exceptions import BrokerError, ConfigError
from tests.conftest import make_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(params=["memory", "sqlite"])
def url(request, tmp_path):
    if request.param == "memory":
        return f"memory://embedded-{os.getpid()}-{time.monotonic_ns()}"
    return f"sqlite:///{tmp_path}/embedded.sqlite3"


def test_sqlite_url_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = make_config()
    relative = make_broker("sqlite:///sub.sqlite3", config)
    relative.publish(Outgoing("q", b"x", "m"))
    assert (tmp_path / "sub.sqlite3").exists()
    absolute = make_broker(f"sqlite:///{tmp_path}/sub.sqlite3?synchronous=normal", config)
    assert [d.message_id for d in absolute.fetch(["q"], 1, 0)] == ["m"]
    relative.close()
    absolute.close()
    for bad in ("sqlite://", "sqlite:///:memory:", "sqlite://host/x.db", "sqlite:///x.db?journal=off"):
        with pytest.raises(ConfigError, match="sqlite"):
            make_broker(bad, config)


def test_sqlite_unopenable_file_is_a_broker_error(tmp_path):
    broker = make_broker(f"sqlite:///{tmp_path}/no/such/dir/x.sqlite3", make_config())
    with pytest.raises(BrokerError, match="no/such/dir"):
        broker.publish(Outgoing("q", b"x", "m"))


def test_sqlite_schema_is_created_once_and_versioned(tmp_path):
    path = tmp_path / "schema.sqlite3"
    broker = make_broker(f"sqlite:///{path}", make_config())
    broker.queue_stats()
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"messages", "queues", "dead_letters", "results", "revocations"} <= tables
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    broker.close()
    with pytest.raises(BrokerError, match="upgrade greenq"):
        make_broker(f"sqlite:///{path}", make_config()).queue_stats()


def test_sqlite_version_1_file_is_upgraded_in_place(tmp_path):
    """A file made by greenq with schema 1 (no revocations.revoked_at) keeps
    its messages and revocations and gains the column."""
    from greenq.transports.sqlite.client import SCHEMA, Tables
    path = tmp_path / "v1.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(Tables().sql(SCHEMA).replace(",\n    revoked_at REAL NOT NULL DEFAULT 0", ""))
    assert "revoked_at" not in {r[1] for r in conn.execute("PRAGMA table_info(revocations)")}
    conn.execute("INSERT INTO revocations (task_id, terminate, expires_at) VALUES ('old', 1, ?)",
                 (time.time() + 3600,))
    conn.execute("INSERT INTO messages (queue, visible_at, message_id, body) VALUES ('q', 0, 'm1', x'00')")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    url = f"sqlite:///{path}"
    backend = make_backend(url, make_config(broker_url=url))
    backend.revoke("new", terminate=False)
    assert backend.revoked(["old", "new"]) == {"old": True, "new": False}
    assert [(r.task_id, r.terminate) for r in backend.revocations()] == [("old", True), ("new", False)]
    assert [r.task_id for r in backend.revocations(since=time.time() - 60)] == ["new"]
    broker = make_broker(url, make_config(broker_url=url))
    assert [d.message_id for d in broker.fetch(["q"], 5, 0)] == ["m1"]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    conn.close()
    backend.close()
    broker.close()


def test_sqlite_backend_defaults_to_the_broker_file(tmp_path):
    url = f"sqlite:///{tmp_path}/one.sqlite3"
    config = make_config(broker_url=url)
    assert backend_url_for(config) == url
    backend = make_backend(backend_url_for(config), config)
    backend.store("t", b"r")
    backend.close()
    assert sqlite3.connect(tmp_path / "one.sqlite3").execute("SELECT data FROM results").fetchone() == (b"r",)


def test_same_memory_url_shares_state_other_names_do_not():
    config = make_config()
    name = f"memory://shared-{time.monotonic_ns()}"
    make_broker(name, config).publish(Outgoing("q", b"x", "m"))
    assert make_broker(name + "-other", config).fetch(["q"], 1, 0) == []
    second = make_broker(name, config)
    assert [d.message_id for d in second.fetch(["q"], 1, 0)] == ["m"]
    second.reset()
    [stats] = make_broker(name, config).queue_stats(["q"])
    assert (stats.ready, stats.held) == (0, 0)


def test_stale_holder_cannot_renew_or_requeue_a_reclaimed_message(url):
    config = make_config(lease_seconds=1)
    stale, fresh = make_broker(url, config), make_broker(url, config)
    stale.publish(Outgoing("q", b"x", "m"))
    [old] = stale.fetch(["q"], 1, 0)
    [new] = fresh.fetch(["q"], 1, 3)
    assert new.deliveries == 2
    stale.renew([old])
    stale.requeue([old])
    assert stale.fetch(["q"], 1, 0) == []   # still held by the fresh consumer
    fresh.ack([new])
    stale.ack([old])                         # late ack of an acked message: harmless
    assert fresh.queue_stats(["q"])[0].held == 0


def test_interrupt_ends_a_blocked_fetch_early(url):
    broker = make_broker(url, make_config())
    threading.Timer(0.2, broker.interrupt).start()
    start = time.monotonic()
    assert broker.fetch(["q"], 1, 10) == []
    assert time.monotonic() - start < 5.0   # ended by the interrupt, not at its 10 s timeout
    start = time.monotonic()
    assert broker.fetch(["q"], 1, 0.3) == []   # the interrupt was used up
    assert time.monotonic() - start >= 0.25


def test_priority_is_clamped_to_0_9(url):
    broker = make_broker(url, make_config())
    broker.publish_many([Outgoing("q", b"", "low", -3), Outgoing("q", b"", "mid", 5),
                         Outgoing("q", b"", "top", 42)])
    got = broker.fetch(["q"], 3, 0)
    assert [(d.message_id, d.priority) for d in got] == [("top", 9), ("mid", 5), ("low", 0)]


def test_result_expires_zero_keeps_results(url):
    backend = make_backend(url, make_config(result_expires=0))
    backend.store("forever", b"r")
    backend.revoke("forever")
    assert backend.get("forever") == b"r" and backend.revoked(["forever"]) == {"forever": False}


CONSUMER = """
import sys, time
from greenq.brokers import make_broker
from tests.conftest import make_config
broker = make_broker(sys.argv[1], make_config())
broker.queue_stats()
print("ready", flush=True)
sys.stdin.readline()  # start together
seen, idle_since = [], time.monotonic()
while time.monotonic() - idle_since < 0.5:
    batch = broker.fetch(["q"], 10, 0.1)
    if batch:
        broker.ack(batch)
        seen.extend(d.message_id for d in batch)
        idle_since = time.monotonic()
        time.sleep(0.002)  # the work: without any, one process can keep the lock to itself
print(" ".join(seen))
"""


def test_two_processes_on_one_file_never_share_a_message(tmp_path):
    url = f"sqlite:///{tmp_path}/shared.sqlite3"
    total = 3000
    make_broker(url, make_config()).publish_many([Outgoing("q", b"x", f"m{i}") for i in range(total)])
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", CONSUMER, url], cwd=ROOT, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outputs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    union = outputs[0] + outputs[1]
    assert len(union) == len(set(union)) == total
    assert all(outputs), "one process got nothing: the test proved little"


@pytest.mark.parametrize("driver", ["gevent", "eventlet"])
def test_a_fetch_that_dead_letters_logs_it_from_the_callers_thread(driver, tmp_path):
    """Patched, a fetch's query runs in another OS thread; the oversized row it
    dead-letters is logged after the call returns, in the caller's green
    thread: logging from the database's thread waited on a green lock held
    by the caller (eventlet: "Cannot switch to a different thread"; the fetch
    never returned and its transaction never committed)."""
    pytest.importorskip(driver)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "green_oversized.py")
    done = subprocess.run([sys.executable, script, driver, str(tmp_path / "broker.sqlite3")], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fetched []\ndead ['big-0']\n" in done.stdout, done.stdout
    assert "log message big-0 dead-lettered: message is 1048576 bytes, over max_message_size 65536" \
        in done.stdout, done.stdout
