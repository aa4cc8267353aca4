"""Issue 17 items 1, 2 and 7: with ``signing_key``, result and group records
are authenticated before they are deserialized.  Each forgery is written
straight into the real Redis or SQLite result store (not through greenq), and
an in-process worker (threads driver) settles the real messages.  The pickle
forgeries would create a marker file if they were ever unpickled."""
from __future__ import annotations

import json
import pickle
import sqlite3
import threading
import uuid

import pytest

from greenq import ChordError, GreenQ, MessageError, TaskError, chord
from greenq.drivers import get_driver
from greenq.signing import Signer
from greenq.worker.consumer import Worker
from tests.conftest import AMQP_PREFIX, delete_queues


class Planted:
    """Unpickling this runs ``open(path, "w")``: the marker of code run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class Store:
    """Raw access to one test's result store, beside greenq."""

    def __init__(self, kind: str, request, tmp_path) -> None:
        self.kind = kind
        self.settings = {}
        if kind == "sqlite":
            self.path = f"{tmp_path}/signed.sqlite3"
            self.url = f"sqlite:///{self.path}"
        else:
            import redis
            self.url = request.getfixturevalue("redis_url")
            self.prefix = self.settings["key_prefix"] = request.getfixturevalue("redis_prefix")
            self.client = redis.Redis.from_url(self.url)

    def write_result(self, task_id: str, data: bytes) -> None:
        if self.kind == "redis":
            self.client.set(f"{self.prefix}:result:{task_id}", b"F" + data)     # F: a final record
        else:
            with sqlite3.connect(self.path) as db:
                db.execute("INSERT OR REPLACE INTO results (task_id, data, final, expires_at) "
                           "VALUES (?, ?, 1, 1e300)", (task_id, data))

    def read_result(self, task_id: str) -> bytes:
        if self.kind == "redis":
            return self.client.get(f"{self.prefix}:result:{task_id}")[1:]
        with sqlite3.connect(self.path) as db:
            return db.execute("SELECT data FROM results WHERE task_id = ?", (task_id,)).fetchone()[0]

    def read_group(self, group_id: str) -> bytes:
        if self.kind == "redis":
            return self.client.get(f"{self.prefix}:group:{group_id}")
        with sqlite3.connect(self.path) as db:
            return db.execute("SELECT data FROM group_records WHERE group_id = ?", (group_id,)).fetchone()[0]

    def write_group(self, group_id: str, data: bytes) -> None:
        if self.kind == "redis":
            self.client.set(f"{self.prefix}:group:{group_id}", data)
        else:
            with sqlite3.connect(self.path) as db:
                assert db.execute("UPDATE group_records SET data = ? WHERE group_id = ?",
                                  (data, group_id)).rowcount == 1


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request, tmp_path):
    return Store(request.param, request, tmp_path)


def make_app(store: Store, key: str, **settings) -> GreenQ:
    """An app on ``store`` signing with ``key``; ``app.calls`` lists the
    calls of ``sign.note``, the chords' callback."""
    app = GreenQ("sign", broker=store.url, signing_key=key, **store.settings, **settings)
    app.calls = []
    lock = threading.Lock()

    @app.task(name="sign.add")
    def add(x, y):
        return x + y

    @app.task(name="sign.note")
    def note(*args):
        with lock:
            app.calls.append(args)
        return list(args)

    @app.task(name="sign.other")
    def other(*args):
        with lock:
            app.calls.append(("other",) + args)
    return app


def work(app: GreenQ) -> None:
    assert Worker(app, get_driver("threads"), queues=["default"], concurrency=2, burst=True,
                  fetch_timeout=0.1).run() == 0


def pickled_planting(marker) -> bytes:
    """A record body whose unpickling would create ``marker``."""
    return b"pickle:" + pickle.dumps({"state": "SUCCESS", "result": Planted(str(marker))})


PICKLE = {"serializer": "pickle", "accept_content": ["json", "pickle"]}


def test_pickle_result_forged_in_the_store_never_runs_code(store, tmp_path, caplog):
    app = make_app(store, "k1", **PICKLE)
    marker = tmp_path / "ran"
    r = app.tasks["sign.add"].delay(1, 2)
    work(app)
    assert r.get(timeout=5) == 3                                   # signed and read back
    signed = store.read_result(r.id)
    forged_tag = b"s1:" + b"0" * 64 + b":" + pickled_planting(marker)
    for task_id, data in (("unsigned", pickled_planting(marker)), ("badtag", forged_tag),
                          ("copied", signed)):                      # a valid record under another id
        store.write_result(task_id, data)
        fresh = app.AsyncResult(task_id)
        with pytest.raises(MessageError, match="unsigned|signature does not match"):
            fresh.get(timeout=5)
        for reader in (lambda: fresh.state, fresh.ready, lambda: app.AsyncResult(task_id).result):
            with pytest.raises(MessageError):
                reader()
    assert not marker.exists()
    assert any("result record of copied" in rec.getMessage() and "read from" in rec.getMessage()
               for rec in caplog.records)


def test_forged_group_record_fails_the_chord_and_never_sends_its_callback(store, tmp_path):
    """A pickle planted as a chord's group record: the worker that completes
    the chord refuses it unread, the chord fails with ChordError, the
    callback is never sent and nothing is unpickled."""
    app = make_app(store, "k1", **PICKLE)
    marker = tmp_path / "ran"
    add = app.tasks["sign.add"]
    r = chord([add.s(1, 1), add.s(2, 2)], app.tasks["sign.note"].s()).delay()
    group_id = r.parent.id
    store.write_group(group_id, b"pickle:" + pickle.dumps({"state": "GROUP", "members": [Planted(str(marker))]}))
    work(app)
    with pytest.raises(ChordError, match=f"chord {group_id}: its record in the result backend was refused"):
        r.get(timeout=5)
    assert app.calls == [] and not marker.exists()
    with pytest.raises(MessageError):
        app.GroupResult(group_id)


def test_rewritten_callback_in_a_json_chord_record_is_refused(store):
    """The callback of a json chord record rewritten (another task, other
    arguments), its old tag kept or dropped: refused either way."""
    for keep_tag in (True, False):
        app = make_app(store, "k1")
        add = app.tasks["sign.add"]
        r = chord([add.s(1, 1), add.s(2, 2)], app.tasks["sign.note"].s("from the caller")).delay()
        group_id = r.parent.id
        data = store.read_group(group_id)
        assert data.startswith(b"s1:")
        head, payload = data[:68], data[68:]
        record = json.loads(payload[len(b"json:"):])
        record["callback"]["task"] = "sign.other"
        record["callback"]["args"] = ["from the forger"]
        payload = b"json:" + json.dumps(record).encode()
        store.write_group(group_id, head + payload if keep_tag else payload)
        work(app)
        with pytest.raises(ChordError, match="refused"):
            r.get(timeout=5)
        assert app.calls == []


def test_group_record_copied_over_another_group_is_refused(store):
    app = make_app(store, "k1")
    add = app.tasks["sign.add"]
    first = chord([add.s(1, 1)], app.tasks["sign.note"].s()).delay()
    second = chord([add.s(5, 5)], app.tasks["sign.other"].s()).delay()
    store.write_group(second.parent.id, store.read_group(first.parent.id))   # validly signed, other id
    work(app)
    assert first.get(timeout=5) == [[2]]
    with pytest.raises(ChordError, match="refused"):
        second.get(timeout=5)
    assert app.calls == [([2],)]


def test_key_rotation_new_key_first_reads_records_of_the_old(store):
    """Step 2 of the rotation: the client still signs with "old" (it has
    "old,new"), the worker signs with "new" and still reads "old"."""
    client = make_app(store, "old,new")
    worker_app = make_app(store, "new,old")
    r = client.tasks["sign.add"].delay(20, 22)
    c = chord([client.tasks["sign.add"].s(1, 1), client.tasks["sign.add"].s(2, 2)],
              client.tasks["sign.note"].s()).delay()
    work(worker_app)
    assert r.get(timeout=5) == 42 and c.get(timeout=5) == [[2, 4]]
    assert worker_app.calls == [([2, 4],)]
    signed_by = store.read_result(r.id)
    assert Signer("new").unwrap(f"result:{r.id}", signed_by)          # the worker signed with its first key
    with pytest.raises(MessageError, match="signature does not match"):
        make_app(store, "old").AsyncResult(r.id).get(timeout=1)     # step 3 drops "old": readers of it stop


@pytest.mark.parametrize("type_name", ["builtins.SystemExit", "builtins.KeyboardInterrupt",
                                       "builtins.GeneratorExit", "greenq.worker.jobs.HardKill"])
def test_result_naming_a_base_exception_is_never_rebuilt_as_one(store, type_name):
    """Without a key, a result record written into the store is trusted, but
    is still never rebuilt as a BaseException outside Exception: it would
    pass through the caller's ``except Exception``."""
    app = make_app(store, "", exception_modules=["greenq.worker"])
    app.tasks["sign.add"].delay(1, 1)
    work(app)                                            # creates the store's tables
    store.write_result("forged", b"json:" + json.dumps({"id": "forged", "state": "FAILURE", "exc": {
        "type": type_name, "args": [0], "message": "bye"}}).encode())
    try:
        app.AsyncResult("forged").get(timeout=5)
    except Exception as exc:
        assert isinstance(exc, TaskError) and exc.type_name == type_name
    else:  # pragma: no cover
        raise AssertionError("no exception")


def test_pickle_without_a_signing_key_is_refused_at_start(store):
    from greenq import ConfigError
    for settings in (PICKLE, {"accept_content": ["json", "pickle"]}, {"serializer": "pickle"}):
        with pytest.raises(ConfigError, match="signing_key"):
            GreenQ("sign", broker=store.url, **store.settings, **settings)


@pytest.mark.amqp
def test_rpc_replies_are_checked_like_stored_results(amqp_url):
    """rpc://: the worker's reply is signed and read back; a reply published
    straight to the caller's reply queue, unsigned, is refused."""
    amqp = pytest.importorskip("amqp")
    from greenq.transports.amqp.common import connection_params
    queue = f"sign-{uuid.uuid4().hex[:8]}"
    apps = [GreenQ("sign", broker=amqp_url, backend="rpc://", signing_key="k1", default_queue=queue,
                   key_prefix=AMQP_PREFIX) for _ in range(2)]
    client, worker_app = apps
    for app in apps:
        app.task(name="sign.add")(lambda x, y: x + y)
    try:
        r = client.tasks["sign.add"].delay(1, 2)
        assert Worker(worker_app, get_driver("threads"), queues=[queue], concurrency=2, burst=True,
                      fetch_timeout=0.1).run() == 0
        assert r.get(timeout=10) == 3
        conn = amqp.Connection(**connection_params(amqp_url))
        conn.connect()
        try:
            conn.channel().basic_publish(
                amqp.Message(b'json:{"id": "planted", "state": "SUCCESS", "result": "forged"}',
                             correlation_id="planted"), exchange="", routing_key=client.backend.reply_to())
        finally:
            conn.close()
        with pytest.raises(MessageError, match="unsigned result record of planted"):
            client.AsyncResult("planted").get(timeout=10)
    finally:
        for app in apps:
            app.close()
        delete_queues(amqp_url, [queue])
