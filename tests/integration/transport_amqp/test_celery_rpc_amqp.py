"""greenq's ``AsyncResult`` reading a Celery worker's ``rpc://`` replies on
RabbitMQ (greenq/transports/amqp/celery_rpc.py, docs/celery.md "rpc://
results"): a greenq client with ``result_backend = rpc://`` sends to a queue
in ``celery_queues``; a real Celery worker (``--pool solo``, ``rpc://``)
runs each task and answers on the message's ``reply_to``, which greenq's
client names (its own reply queue); ``get()``, ``get(propagate=False)``,
``.traceback`` and ``.status`` read Celery's reply, RETRY and STARTED
replies are waited past.  A greenq worker that takes such a message answers
in greenq's form only (one reply, not two).  Each test has its own queue,
deleted at the end with its exchange."""
from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from greenq import GreenQ
from greenq.celery import protocol
from greenq.exceptions import TaskError
from greenq.message import TaskMessage
from greenq.transports.amqp import celery_rpc
from greenq.transports.amqp.celery_broker import celery_delivery
from greenq.transports.amqp.common import Settings
from tests.conftest import delete_amqp_names, make_config, until
from tests.fixtures.celery.clients import celery_python

pytestmark = pytest.mark.amqp

CELERY_TASKS = """
import os, time
from celery import Celery
app = Celery("celery-side", broker=os.environ["CELERY_TEST_URL"], backend="rpc://")
app.conf.worker_hijack_root_logger = False


class Oops(Exception):
    pass


@app.task(name="rpcx.add")
def add(x, y):
    return x + y


@app.task(name="rpcx.oops")
def oops(n):
    raise Oops("bad", n)


@app.task(name="rpcx.flaky", bind=True, max_retries=3)
def flaky(self, times):
    if self.request.retries < times:
        raise self.retry(countdown=0, exc=ValueError("again"))
    return self.request.retries


@app.task(name="rpcx.slow", track_started=True)
def slow(path):
    deadline = time.time() + 20
    while not os.path.exists(path) and time.time() < deadline:     # until the test lets it finish
        time.sleep(0.05)
    return "slow done"
"""


@pytest.fixture
def setup(tmp_path, amqp_url):
    queue = f"gqrpc-{uuid.uuid4().hex[:8]}"
    app = GreenQ("rpcx", config=make_config(broker_url=amqp_url, result_backend="rpc://",
                                            celery_queues=[queue], default_queue=queue))
    (tmp_path / "celery_side.py").write_text(CELERY_TASKS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GREENQ_", "CELERY_"))}
    env.update(CELERY_TEST_URL=amqp_url, PYTHONPATH=str(tmp_path))
    worker = None

    def start():
        nonlocal worker
        worker = subprocess.Popen([celery_python(), "-m", "celery", "-A", "celery_side", "worker", "--pool", "solo",
                                   "-Q", queue, "--without-heartbeat", "--without-gossip", "--without-mingle",
                                   "-l", "INFO"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        return worker
    try:
        yield app, queue, start, tmp_path
    finally:
        if worker is not None:      # its tasks are done (or the test failed): no warm shutdown to wait for
            worker.kill()
            worker.communicate(timeout=30)
        app.close()
        delete_amqp_names(amqp_url, [queue], [queue])


def test_greenq_reads_a_celery_workers_rpc_replies(setup):
    app, queue, start, tmp_path = setup
    release = tmp_path / "release"
    slow = app.send_task("rpcx.slow", args=[str(release)], queue=queue)
    plain = app.send_task("rpcx.add", args=[2, 3], queue=queue)
    builtin = app.send_task("rpcx.add", args=["a", 1], queue=queue)
    custom = app.send_task("rpcx.oops", args=[7], queue=queue)
    retried = app.send_task("rpcx.flaky", args=[2], queue=queue)
    assert plain.status == "PENDING"
    start()
    # track_started: Celery's STARTED reply is the status while it runs, and get() waits past it
    assert until(lambda: slow.status == "STARTED", 30), slow.status
    assert not slow.ready()
    release.write_text("go")
    assert slow.get(timeout=20) == "slow done" and slow.status == "SUCCESS"
    assert plain.get(timeout=20) == 5
    assert (plain.status, plain.traceback, plain.result) == ("SUCCESS", None, 5)
    with pytest.raises(TypeError, match="can only concatenate"):      # a builtin: its own class
        builtin.get(timeout=20)
    exc = builtin.get(timeout=1, propagate=False)
    assert isinstance(exc, TypeError) and builtin.status == "FAILURE" and builtin.failed()
    assert "Traceback" in builtin.traceback and "can only concatenate" in builtin.traceback
    failed = custom.get(timeout=20, propagate=False)          # a class greenq does not import: TaskError naming it
    assert isinstance(failed, TaskError) and "celery_side.Oops" in str(failed) and "bad" in str(failed)
    assert "raise Oops" in custom.traceback
    assert retried.get(timeout=20) == 2                       # two RETRY replies waited past, then SUCCESS


def test_a_greenq_worker_answers_a_greenq_client_in_greenqs_form_only(amqp_url):
    """The message greenq's client sends names its reply queue in Celery's
    ``reply_to`` (for a Celery worker) and in ``greenq_reply_to``: a greenq
    worker taking it keeps no Celery destination (it sends greenq's record,
    not Celery's as well); a Celery client's message it does."""
    settings = Settings.from_config(make_config(broker_url=amqp_url, celery_queues=["q"]))
    mine = TaskMessage("rpcx.add", [1, 2], {}, id=f"g-{uuid.uuid4().hex}", queue="q")
    mine.reply_to = "P.reply.abc"
    env = protocol.encode(mine)
    assert env.properties["reply_to"] == env.headers["greenq_reply_to"] == "P.reply.abc"
    props = {"content_type": env.content_type, "content_encoding": env.content_encoding,
             "application_headers": env.headers, "correlation_id": mine.id, "reply_to": "P.reply.abc"}

    class Meta:
        message_id, deliveries, priority, error = None, 1, 0, None
    d = celery_delivery("q", props, env.body, Meta, (1, 1), settings, None)
    assert d.message.reply_to == "P.reply.abc"
    assert celery_rpc.destination(mine.id, True) is None
    theirs = dict(props, application_headers={k: v for k, v in env.headers.items() if k != "greenq_reply_to"},
                  reply_to="celery-client-oid")
    d = celery_delivery("q", theirs, env.body, Meta, (1, 2), settings, None)
    assert d.message.reply_to is None
    assert celery_rpc.destination(mine.id, True) == ("celery-client-oid", mine.id)


def test_a_chord_member_is_refused_while_the_apps_results_are_rpc(amqp_url):
    """A Celery chord member consumed where the app's results are rpc://
    (which cannot count it) is dead-lettered with the reason; with that
    backend closed (or another app's settings) it decodes."""
    from greenq.backends import make_backend
    config = make_config(broker_url=amqp_url, celery_queues=["q"])
    settings = Settings.from_config(config)
    member = TaskMessage("chords.add", [1, 1], {}, id=f"m-{uuid.uuid4().hex}", queue="q", group_id="g1")
    env = protocol.encode(member)
    body = protocol.json_loads(env.body)
    body[2]["chord"] = {"task": "chords.tsum", "args": [], "kwargs": {}, "options": {}}
    props = {"content_type": env.content_type, "content_encoding": env.content_encoding,
             "application_headers": env.headers, "correlation_id": member.id}

    class Meta:
        message_id, deliveries, priority, error = None, 1, 0, None
    raw = protocol.json_dumps(body).encode()
    assert celery_delivery("q", props, raw, Meta, (1, 1), settings, None).decode(None).chord is not None
    backend = make_backend("rpc://", config)
    try:
        refused = celery_delivery("q", props, raw, Meta, (1, 2), settings, None)
        with pytest.raises(protocol.CeleryMessageError, match="Redis result backend only"):
            refused.decode(None)
        assert refused.message_id == member.id
        plain = protocol.encode(TaskMessage("chords.add", [1, 1], {}, id="p1", queue="q"))
        assert celery_delivery("q", dict(props, application_headers=plain.headers), plain.body, Meta, (1, 3),
                               settings, None).decode(None).id == "p1"
    finally:
        backend.close()
    assert celery_delivery("q", props, raw, Meta, (1, 4), settings, None).decode(None).chord is not None


def test_celery_replies_read_into_greenqs_meta():
    """What the reply reader makes of each reply: final or not, an
    exception in greenq's form, an undecodable body a final FAILURE saying
    why, something that is no Celery record dropped."""
    accept = frozenset({"application/json"})
    js = {"content_type": "application/json", "content_encoding": "utf-8"}
    retry = b'{"status": "RETRY", "result": {"exc_type": "ValueError", "exc_message": ["again"], ' \
            b'"exc_module": "builtins"}, "traceback": null, "task_id": "t"}'
    meta, final = celery_rpc.read_reply(js, retry, "t", accept)
    assert not final and meta["state"] == "RETRY" and meta["exc"]["type"] == "builtins.ValueError"
    meta, final = celery_rpc.read_reply(js, b'{"status": "SUCCESS", "result": [1, 2], "task_id": "t"}', "t", accept)
    assert final and (meta["state"], meta["result"]) == ("SUCCESS", [1, 2])
    meta, final = celery_rpc.read_reply({"content_type": "application/x-python-serialize",
                                         "content_encoding": "binary"}, b"\x80\x04K\x01.", "t", accept)
    assert final and meta["state"] == "FAILURE" and "not accepted" in meta["exc"]["message"]
    assert celery_rpc.read_reply(js, b'[1, 2]', "t", accept) is None
