"""The broker round trips of one ``delay().get()`` on Redis (issue 22,
deliverable 2; docs/performance.md "Round trip"): counted on the redis-py
clients of a real client app and of a real worker running in this process
(threads driver), so that a round trip added back fails here.

The caller: XADD, then the CHECK_IN script (record or register), then the
notification, which carries the record: no GET after it.  The worker: a
blocking read that hands the message out at once (no second read before the
task runs), one store script (SET + PUBLISH), one ack script."""
from __future__ import annotations

import threading
import uuid

import pytest

from greenq import GreenQ
from greenq.drivers import get_driver
from greenq.transports.redis.results import CHECK_IN, NOTIFY_MAX, STORE, split_notification
from greenq.worker.consumer import Worker
from tests.conftest import make_config, until
from tests.integration.redis_round_trips import RoundTrips

pytestmark = pytest.mark.redis


def _sha(script: str) -> str:
    import hashlib
    return hashlib.sha1(script.encode()).hexdigest()


class Pair:
    """A client app and a worker app (a thread of this process) on the
    test's own key prefix; the task ``rt.gated`` returns its argument once
    ``gate`` is set, so the caller is surely waiting when it finishes."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.queue = f"rt-{uuid.uuid4().hex[:8]}"
        config = make_config(broker_url=redis_url, key_prefix=prefix, default_queue=self.queue)
        self.gate = threading.Event()
        self.client = self._tasks(GreenQ("rt", config=config))
        self.worker_app = self._tasks(GreenQ("rt", config=config))
        self.worker = Worker(self.worker_app, get_driver("threads"), queues=[self.queue],
                             concurrency=4, burst=False, fetch_timeout=5.0)
        self.thread = threading.Thread(target=self.worker.run, name="rt-test-worker", daemon=True)
        self.thread.start()

    def _tasks(self, app: GreenQ) -> GreenQ:
        gate = self.gate

        @app.task(name="rt.gated")
        def gated(x):
            assert gate.wait(30), "the test never opened the gate"
            return x

        @app.task(name="rt.big")
        def big(n):
            return "x" * n
        return app

    def close(self) -> None:
        self.gate.set()
        self.worker.request_stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the worker did not stop"
        self.client.close()
        self.worker_app.close()


@pytest.fixture
def pair(redis_url, redis_prefix):
    p = Pair(redis_url, redis_prefix)
    yield p
    p.close()


#: a new pooled connection's handshake, not a round trip of the call
HANDSHAKE = {"CLIENT", "SELECT", "HELLO", "AUTH"}


def _calls(trips: RoundTrips):
    return [c for c in trips.commands if c[0] not in HANDSHAKE]


def _waiting(app: GreenQ, task_id: str) -> bool:
    with app.backend._listener._lock:
        return task_id in app.backend._listener._waiters


def test_one_round_trip_counts_its_broker_round_trips(pair):
    client, worker_app = pair.client, pair.worker_app
    pair.gate.set()
    assert client.tasks["rt.gated"].delay(0).get(timeout=30) == 0     # warm: listener, scripts, worker
    assert until(lambda: not pair.worker.held, 10)                    # the warm-up's ack sent
    pair.gate.clear()
    wbroker = worker_app.broker
    with RoundTrips(client.broker.client) as publish, RoundTrips(client.backend.client) as results, \
            RoundTrips(worker_app.backend.client) as stores, RoundTrips(wbroker.client) as fetches:
        r = client.tasks["rt.gated"].delay(7)
        got = []
        getter = threading.Thread(target=lambda: got.append(r.get(timeout=30)))
        getter.start()
        assert until(lambda: _waiting(client, r.id), 10)              # registered: the wait path
        assert until(lambda: bool(fetches.commands), 10)                # the worker's next fetch began
        pair.gate.set()
        getter.join(30)
        assert got == [7]
        assert until(lambda: ("EVALSHA", wbroker._ack_script.sha) in fetches.commands, 10)
    # the caller: XADD, CHECK_IN, and nothing after the notification (it carried the record)
    assert [c for c, _ in _calls(publish)] == ["XADD"]
    assert _calls(results) == [("EVALSHA", _sha(CHECK_IN))]
    # the worker: the result stored and its waiter notified in one script, the ack in one
    # (the worker's backend client also reads revocations now and then: not scripts, not writes)
    worker_calls = _calls(stores)
    assert [c for c in worker_calls if c[0] in ("EVALSHA", "EVAL", "SET", "PUBLISH", "GET")] == \
        [("EVALSHA", _sha(STORE))]
    assert _calls(fetches).count(("EVALSHA", wbroker._ack_script.sha)) == 1


def test_the_blocking_read_hands_a_lone_message_out_at_once(pair):
    """An idle worker's fetch: the script finds nothing, the blocking read
    wakes with the message and returns it, with no second read first."""
    broker = pair.worker_app.broker
    pair.worker.request_stop()                # this test fetches itself
    pair.thread.join(30)
    broker.declare([pair.queue])
    broker._consuming = True
    got = []
    with RoundTrips(broker.client) as trips:
        fetcher = threading.Thread(target=lambda: got.append(broker.fetch([pair.queue], 10, 20.0)))
        fetcher.start()
        assert until(lambda: any(c == "XREADGROUP" for c, _ in trips.commands), 10)
        pair.client.tasks["rt.gated"].delay(1)
        fetcher.join(30)
    assert len(got) == 1 and len(got[0]) == 1
    # (the reclaim script,) the fetch script, the blocking read, and nothing after it (a slow
    # machine may see a blocking read end empty first: the loop reads again)
    names = [c for c, _ in _calls(trips)]
    assert names[-2:] == ["EVALSHA", "XREADGROUP"] and set(names) == {"EVALSHA", "XREADGROUP"}
    broker.ack(got[0])


def test_a_lone_result_is_stored_before_the_next_fetch(redis_url, redis_prefix):
    """A gevent worker whose fetch found the queues dry lets the task run and
    the settler store its result before the next fetch's round trips: nothing
    goes to Redis between the message handed out and its result's store
    script (before, the next fetch script and blocking read went first)."""
    import json
    import os
    import subprocess
    import sys

    queue = f"rt-{uuid.uuid4().hex[:8]}"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.transport_redis.gevent_order_worker",
                             redis_url, redis_prefix, queue], cwd=root, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": root})
    client = GreenQ("rt", config=make_config(broker_url=redis_url, key_prefix=redis_prefix,
                                             default_queue=queue))

    @client.task(name="rt.echo")
    def echo(x):
        return x
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        assert echo.delay(5).get(timeout=30) == 5
        calls = [tuple(c) for c in json.loads(proc.stdout.readline())]
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        client.close()
    calls = [c for c in calls if c[0] not in HANDSHAKE]
    store = calls.index(("EVALSHA", _sha(STORE)))
    handed = max(i for i, c in enumerate(calls[:store]) if c[0] == "HANDED-OUT")
    assert calls[handed + 1:store] == [], calls
    assert calls[store + 1:], "the next fetch began after the store"


def test_a_record_over_the_notification_limit_is_read_after_it(pair):
    """A final record over NOTIFY_MAX is not carried: the waiter reads it."""
    client = pair.client
    assert client.tasks["rt.big"].delay(10).get(timeout=30) == "x" * 10     # warm
    pair.gate.clear()
    with RoundTrips(client.backend.client) as results:
        r = client.tasks["rt.big"].delay(NOTIFY_MAX + 10)
        assert r.get(timeout=30) == "x" * (NOTIFY_MAX + 10)
    names = [c for c, _ in _calls(results)]
    assert names[0] == "EVALSHA"
    assert names[1:] in ([], ["GET"])     # the record may be stored before CHECK_IN reads it


def test_split_notification():
    record = b'Fjson:{"state":"SUCCESS"}'
    assert split_notification(b"\0" + b"5:abcde" + record) == ("abcde", record)
    assert split_notification(b"abcde") == ("abcde", None)                 # an id alone (older worker)
    assert split_notification(b"\0x:abc") == ("\0x:abc", None)             # not ours: an id
    assert split_notification(b"\x003:ab") == ("\x003:ab", None)           # cut short
    assert split_notification("plain") == ("plain", None)


def test_a_carried_record_is_checked_like_a_stored_one(redis_url, redis_prefix):
    """With a signing key, a record that comes with the notification goes
    through the same check as one read: an unsigned one written by whoever
    can reach Redis is refused, never returned."""
    import json

    import redis

    from greenq.exceptions import MessageError

    app = GreenQ("rt", config=make_config(broker_url=redis_url, key_prefix=redis_prefix,
                                          signing_key="rt-secret"))
    admin = redis.Redis.from_url(redis_url)
    try:
        task_id = f"forged-{uuid.uuid4().hex[:8]}"
        outcome = []

        def wait() -> None:
            try:
                outcome.append(app.AsyncResult(task_id).get(timeout=20))
            except Exception as exc:
                outcome.append(exc)
        waiter = threading.Thread(target=wait)
        waiter.start()
        assert until(lambda: _waiting(app, task_id), 10)
        record = {"id": task_id, "state": "SUCCESS", "result": "forged"}
        store = admin.register_script(STORE)
        with RoundTrips(app.backend.client) as reads:
            store(keys=[f"{redis_prefix}:result:{task_id}", f"{redis_prefix}:waiters:{task_id}"],
                  args=[60, task_id, b"Fjson:" + json.dumps(record).encode()])
            waiter.join(30)
        assert len(outcome) == 1 and isinstance(outcome[0], MessageError), outcome
        assert "GET" not in [c for c, _ in _calls(reads)]     # it came with the notification
    finally:
        admin.close()
        app.close()
