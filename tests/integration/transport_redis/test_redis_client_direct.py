"""The client's direct path to Redis (issue 22, item 1): ``publish`` and
``publish_many`` write a command packed once (``greenq.transports.redis.resp``)
straight to a pooled connection, and the pool hands connections out and takes
them back for less (``Pool._take`` and ``Pool._put_back``).  What redis-py's
own path did still happens: a pooled connection the server closed is replaced
at checkout, one with a reply left unread is never handed out as it is, a
connection broken mid-call is dropped and the send retried (then given up on)
as the Reconnector says, an error reply raises, a flushed script cache is
refilled, and a forked child never uses its parent's connections or waits for
its parent's checkouts."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from greenq.exceptions import BrokerError
from tests.integration.transport_redis import test_redis as _shared

out = _shared.out
admin, make, opened, private_redis = _shared.admin, _shared.make, _shared.opened, _shared.private_redis   # fixtures

pytestmark = pytest.mark.redis
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _client_id(connection) -> int:
    connection.send_command("CLIENT", "ID")
    return connection.read_response()


def _intact(pool) -> None:
    """Every slot free, nothing held or in use: no checkout leaked."""
    assert not pool._held and not pool._in_use_connections
    assert pool._slots._free == pool.max_connections


def test_the_direct_path_is_taken_for_a_plain_client(make):
    broker = make()
    assert broker._direct and broker.pool._plain


def test_a_pooled_connection_the_server_closed_is_replaced_at_checkout(make, admin, redis_prefix):
    broker = make()
    broker.publish(out("q"))                               # registers the queue
    broker.publish(out("q"))                               # the direct XADD
    pool = broker.pool
    conn = pool.get_connection()
    first = _client_id(conn)
    pool.release(conn)
    admin.client_kill_filter(_id=first)
    deadline = time.monotonic() + 5
    while first in {int(c["id"]) for c in admin.client_list()} and time.monotonic() < deadline:
        time.sleep(0.01)                                   # the server closes it
    conn = pool.get_connection()                           # checkout sees the EOF and reconnects
    assert _client_id(conn) != first
    pool.release(conn)
    admin.client_kill_filter(_id=_client_id_of(pool))
    broker.publish(out("q"))                               # the same through publish
    assert broker.healthy
    assert admin.xlen(broker.streams("q")[9]) == 3
    _intact(pool)


def _client_id_of(pool) -> int:
    conn = pool.get_connection()
    try:
        return _client_id(conn)
    finally:
        pool.release(conn)


def test_a_connection_with_a_reply_left_unread_is_not_handed_out_as_it_is(make):
    pool = make().pool
    conn = pool.get_connection()
    conn.send_command("ECHO", "left over")                 # its reply never read
    time.sleep(0.05)                                       # ... and arrived
    pool.release(conn)
    again = pool.get_connection()
    again.send_command("ECHO", "mine")
    assert again.read_response() == b"mine"
    pool.release(again)
    _intact(pool)


def test_an_error_reply_raises_and_the_connection_serves_the_next_call(make, admin):
    broker = make()
    broker.publish(out("q"))
    stream = broker.streams("q")[9]
    admin.delete(stream)
    admin.set(stream, "not a stream")
    with pytest.raises(BrokerError, match="WRONGTYPE"):
        broker.publish(out("q"))
    admin.delete(stream)
    broker.publish(out("q", b"after"))
    assert [f[b"b"] for _, f in admin.xrange(stream)] == [b"after"]
    assert broker.healthy
    _intact(broker.pool)


def test_publish_many_loads_the_script_again_after_the_cache_was_flushed(private_redis, make):
    server = private_redis(persist=False)
    broker = make(url=server.url)
    broker.publish_many([out("q", b"one")])
    with server._admin() as client:
        client.script_flush()
        broker.publish_many([out("q", b"two"), out("q", b"three")])
        assert [f[b"b"] for _, f in client.xrange(broker.streams("q")[9])] == [b"one", b"two", b"three"]
    _intact(broker.pool)


class _DroppingServer:
    """Speaks just enough RESP 2 for a client's handshake (+OK to anything)
    and closes the connection on every XADD before replying, except the
    ones listed in ``answer`` (by 1-based count), which get a stream id."""

    def __init__(self, answer=()) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.xadds = 0
        self.answer = set(answer)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(sock,), daemon=True).start()

    def _client(self, sock: socket.socket) -> None:
        with sock:
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                data += chunk
                while True:
                    command, data = _parse(data)
                    if command is None:
                        break
                    if command[0].upper() == b"XADD":
                        self.xadds += 1
                        if self.xadds not in self.answer:
                            return                          # dropped mid-call: no reply
                        sock.sendall(b"$3\r\n1-1\r\n")
                    else:
                        sock.sendall(b"+OK\r\n")

    def close(self) -> None:
        self.listener.close()


def _parse(data: bytes):
    """One RESP array of bulk strings from the front of ``data``, or (None, data)."""
    if not data.startswith(b"*") or b"\r\n" not in data:
        return None, data
    head, rest = data.split(b"\r\n", 1)
    parts = []
    for _ in range(int(head[1:])):
        if b"\r\n" not in rest:
            return None, data
        size, rest = rest.split(b"\r\n", 1)
        n = int(size[1:])
        if len(rest) < n + 2:
            return None, data
        parts.append(rest[:n])
        rest = rest[n + 2:]
    return parts, rest


def test_a_connection_dropped_mid_call_is_replaced_and_the_publish_retried_at_once(make):
    server = _DroppingServer(answer=(3,))
    try:
        broker = make(url=f"redis://127.0.0.1:{server.port}/0?protocol=2")
        broker._registered.add("q")                        # the plain XADD path
        assert broker._direct
        broker.publish(out("q"))           # XADD 1 dropped, retried at once; 2 dropped, backoff; 3 answered
    finally:
        server.close()
    # the first drop was retried at once (a stale connection), the second put the
    # state down and a backoff retry (the third XADD) went through
    assert server.xadds == 3 and broker.healthy
    _intact(broker.pool)


def test_a_connection_dropped_on_every_call_fails_the_publish_within_its_budget(make):
    server = _DroppingServer()
    try:
        broker = make(url=f"redis://127.0.0.1:{server.port}/0?protocol=2", redis__connect_timeout=0.5)
        broker._registered.add("q")
        start = time.monotonic()
        with pytest.raises(BrokerError) as info:
            broker.publish(out("q"))
        took = time.monotonic() - start
    finally:
        server.close()
    assert 0.3 < took < 1.5 and f"127.0.0.1:{server.port}" in str(info.value)
    assert server.xadds >= 2                               # sent, and retried at once at least
    assert not broker.healthy
    _intact(broker.pool)


def test_a_forked_child_uses_new_connections_and_all_the_slots(make, admin):
    broker = make(redis__max_connections=1)
    broker.publish(out("q"))
    pool = broker.pool
    held = pool.get_connection()                           # the parent's only slot, held across the fork
    parent_id = _client_id(held)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                           # the child
        code = 1
        try:
            signal_alarm(5)                                # never hang the test run
            conn = pool.get_connection()                   # a slot of its own: no wait
            child_id = _client_id(conn)
            pool.release(conn)
            broker.publish(out("q", b"from the child"))
            os.write(write, str(child_id).encode())
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child_id = int(os.read(read, 100) or b"0")
    os.close(read)
    assert os.WEXITSTATUS(status) == 0 and child_id not in (0, parent_id)
    assert _client_id(held) == parent_id                   # the parent's connection untouched
    pool.release(held)
    broker.publish(out("q", b"from the parent"))
    bodies = [f[b"b"] for _, f in admin.xrange(broker.streams("q")[9])]
    assert bodies[-2:] == [b"from the child", b"from the parent"]
    _intact(pool)


def signal_alarm(seconds: int) -> None:
    import signal
    signal.alarm(seconds)


_PATCHED_CLIENT = """
import sys
if sys.argv[1] == "gevent":
    import gevent.monkey; gevent.monkey.patch_all()
else:
    import eventlet; eventlet.monkey_patch()
import select
from greenq import GreenQ
app = GreenQ("direct", broker=sys.argv[2], key_prefix=sys.argv[3], config_file=False)
send = app.task(name="direct.t")(lambda: None)
for _ in range(3):
    send.delay()
pool = app.broker.pool
assert pool._select is not select.select and pool._select.__module__ == "select", pool._select
print(len(app.broker.client.xrange(app.broker.streams("default")[9])))
app.close()
"""


@pytest.mark.parametrize("driver", ["gevent", "eventlet"])
def test_a_patched_client_checks_its_pooled_connections_without_the_hub(driver, redis_url, redis_prefix):
    """Under gevent or eventlet the checkout's readiness check is the
    operating system's select (eventlet's would yield to its hub each time)."""
    pytest.importorskip(driver)
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", _PATCHED_CLIENT, driver, redis_url, redis_prefix],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=_REPO))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3"
