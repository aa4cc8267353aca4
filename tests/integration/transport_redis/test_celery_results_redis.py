"""Celery's result records on Redis, both ways (greenq/transports/redis/celery_results.py):

- chords counted in Celery's keys by greenq and by Celery's own backend code
  (``RedisBackend.on_chord_part_return``, run in a Celery process: the code
  a Celery worker runs), in either order: one claim, the body sent once,
  duplicates counted once, a finished chord ignores late members;
- STARTED in Celery's format, read by Celery's ``AsyncResult``;
- ``celery-taskset-meta-<id>`` written by greenq, read by Celery's
  ``GroupResult.restore``;
- greenq's ``AsyncResult`` reading records Celery's backend wrote (value,
  exception, traceback, REVOKED), waiting on Celery's PUBLISH.

Every id is fresh (uuid4), and every ``celery-*`` key a test made is deleted
by it: those keys are outside the test's prefix."""
from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from greenq import GreenQ
from greenq.celery import results as celery_results
from greenq.exceptions import TaskRevokedError
from greenq.message import Codec
from greenq.task import Request
from greenq.transports.redis.celery_results import CeleryRedisBackend
from greenq.worker.runners import StartedRecorder
from tests.conftest import make_config, until
from tests.fixtures.celery.clients import run_celery

pytestmark = pytest.mark.redis

SUFFIXES = ("", ".j", ".t", ".s", ".d", ".c")


@pytest.fixture
def celery_keys(redis_url):
    """Names of Celery's keys this test makes, deleted at the end."""
    import redis
    client = redis.Redis.from_url(redis_url)
    names: list = []
    yield client, names
    if names:
        client.delete(*names)
    client.close()


@pytest.fixture
def backend(redis_url, redis_prefix):
    made = CeleryRedisBackend(redis_url, make_config(result_backend=redis_url, key_prefix=redis_prefix,
                                                     result_expires=600))
    yield made
    made.close()


CELERY_CHORD = r"""
import json, sys
from celery import Celery, signature
from celery.app.task import Context
app = Celery("c", broker=sys.argv[1], backend=sys.argv[1])
app.conf.result_expires = 600
action, group_id = sys.argv[2], sys.argv[3]
body = signature("chords.tsum", queue=sys.argv[4], options={"task_id": sys.argv[5]}, app=app)
if action == "size":
    app.backend.set_chord_size(group_id, int(sys.argv[6]))
else:                                      # a member finished on a Celery worker
    member, index, value = sys.argv[6], int(sys.argv[7]), int(sys.argv[8])
    app.backend.store_result(member, value, "SUCCESS")
    request = Context(id=member, group=group_id, group_index=index, chord=dict(body))
    app.backend.on_chord_part_return(request, "SUCCESS", value)
"""


def _chord_keys(group_id):
    return [celery_results.group_key(group_id, s) for s in SUFFIXES]


def _part(group_id, index, value, member=None):
    member = member or str(uuid.uuid4())
    return (group_id, member, index, celery_results.chord_part(member, "SUCCESS", value=value))


def _body_messages(client, queue):
    """The body messages on ``queue`` (kombu's list): their args."""
    from greenq.celery import protocol
    return [protocol.decode_redis(raw, queue=queue).args for raw in client.lrange(queue, 0, -1)]


def test_a_chord_counted_by_greenq_and_completed_by_greenq_claims_once(backend, celery_keys, redis_url,
                                                                       redis_prefix):
    client, names = celery_keys
    group_id, body_id, queue = str(uuid.uuid4()), str(uuid.uuid4()), f"{redis_prefix}-bodies"
    names += _chord_keys(group_id) + [f"_kombu.binding.{queue}"]
    run_celery(CELERY_CHORD, redis_url, "size", group_id, queue, body_id, "4")
    parts = [_part(group_id, i, i * 10) for i in range(4)]
    assert backend.celery_chord_parts(parts[:2]) == [None, None]
    # member 2 on a Celery worker: Celery's own code counts it in the same keys
    on_celery = str(uuid.uuid4())
    names.append(f"celery-task-meta-{on_celery}")
    run_celery(CELERY_CHORD, redis_url, "part", group_id, queue, body_id, on_celery, "2", "20")
    [token] = backend.celery_chord_parts([parts[3]])
    assert token is not None                                   # the last member claims the body
    other = CeleryRedisBackend(redis_url, backend.config)       # another worker
    try:
        assert other.celery_chord_parts([parts[3]]) == [None]  # run again there: counted once, no claim
    finally:
        other.close()
    assert backend.celery_chord_parts([parts[3]]) == [token]   # the sender retrying finds its own claim
    values, error = celery_results.chord_results(backend.celery_chord_entries(group_id))
    assert (values, error) == ([0, 10, 20, 30], None)          # in group_index order
    assert backend.celery_chord_done(group_id, token) is True
    assert client.exists(*_chord_keys(group_id)[1:5]) == 0 and client.get(_chord_keys(group_id)[5]) == b"done"
    assert backend.celery_chord_parts([parts[0]]) == [None]    # a late member of a done chord
    assert client.exists(celery_results.group_key(group_id, ".j")) == 0
    assert _body_messages(client, queue) == []                 # Celery's side never sent the body


def test_a_chord_counted_by_greenq_and_completed_by_celery_sends_the_body_once(backend, celery_keys, redis_url,
                                                                               redis_prefix):
    client, names = celery_keys
    group_id, body_id, queue = str(uuid.uuid4()), str(uuid.uuid4()), f"{redis_prefix}-bodies"
    last = str(uuid.uuid4())
    names += _chord_keys(group_id) + [f"_kombu.binding.{queue}", f"celery-task-meta-{last}"]
    run_celery(CELERY_CHORD, redis_url, "size", group_id, queue, body_id, "3")
    parts = [_part(group_id, i, i + 1) for i in range(2)]
    assert backend.celery_chord_parts(parts) == [None, None]
    run_celery(CELERY_CHORD, redis_url, "part", group_id, queue, body_id, last, "2", "3")
    assert _body_messages(client, queue) == [[[1, 2, 3]]]      # Celery's worker sent the body, once
    assert backend.celery_chord_parts(parts) == [None, None]   # greenq's members run again: nothing
    assert _body_messages(client, queue) == [[[1, 2, 3]]]


def test_started_is_stored_in_celery_s_format(backend, celery_keys, redis_url, redis_prefix):
    client, names = celery_keys
    task_id = str(uuid.uuid4())
    names.append(f"celery-task-meta-{task_id}")
    queue = f"{redis_prefix}-celery"
    codec = Codec(celery_queues=[queue])
    app = GreenQ("started", broker=redis_url, key_prefix=redis_prefix, config_file=False)

    @app.task(name="started.slow", track_started=True)
    def slow():
        return 1

    recorder = StartedRecorder(codec, lambda: backend, default=False)
    recorder.hostname = "greenq@test-host"
    request = Request(task_id, "started.slow", (), {}, delivery_info={"queue": queue}, group_id="g-1")
    recorder(slow, request)
    seen = json.loads(run_celery(
        "import json, sys\nfrom celery import Celery\napp = Celery('c', backend=sys.argv[1])\n"
        "r = app.AsyncResult(sys.argv[2])\nprint(json.dumps([r.state, r.info]))", redis_url, task_id))
    import os
    assert seen == ["STARTED", {"pid": os.getpid(), "hostname": "greenq@test-host"}]
    record = json.loads(client.get(f"celery-task-meta-{task_id}"))
    assert record["group_id"] == "g-1" and record["date_done"] is None
    # a task of a greenq queue stores no Celery record
    other = str(uuid.uuid4())
    recorder(slow, Request(other, "started.slow", (), {}, delivery_info={"queue": f"{redis_prefix}-own"}))
    assert client.get(f"celery-task-meta-{other}") is None
    app.close()


def test_celery_s_group_result_restores_a_group_greenq_saved(backend, celery_keys, redis_url):
    client, names = celery_keys
    group_id, members = str(uuid.uuid4()), [str(uuid.uuid4()) for _ in range(3)]
    names += [f"celery-taskset-meta-{group_id}"] + [f"celery-task-meta-{m}" for m in members]
    backend.save_celery_group(group_id, members)
    backend.store_celery([(m, celery_results.encode(celery_results.meta(m, "SUCCESS", result=i)))
                          for i, m in enumerate(members)])
    seen = json.loads(run_celery(
        "import json, sys\nfrom celery import Celery\nfrom celery.result import GroupResult\n"
        "app = Celery('c', backend=sys.argv[1])\ng = GroupResult.restore(sys.argv[2], app=app)\n"
        "print(json.dumps([g.id, [r.id for r in g.results], g.get(timeout=5)]))", redis_url, group_id))
    assert seen == [group_id, members, [0, 1, 2]]
    assert celery_results.group_members(client.get(f"celery-taskset-meta-{group_id}")) == members


CELERY_STORE = r"""
import sys
from celery import Celery
app = Celery("c", backend=sys.argv[1])
app.conf.result_expires = 600
ok, failed, revoked = sys.argv[2:5]
app.backend.store_result(ok, {"total": 42}, "SUCCESS")
try:
    raise KeyError("no such order")
except KeyError as exc:
    import traceback
    app.backend.mark_as_failure(failed, exc, traceback=traceback.format_exc())
app.backend.mark_as_revoked(revoked, reason="revoked by test")
"""


def test_greenq_s_async_result_reads_what_celery_s_backend_stored(celery_keys, redis_url, redis_prefix):
    client, names = celery_keys
    ok, failed, revoked = (str(uuid.uuid4()) for _ in range(3))
    names += [f"celery-task-meta-{t}" for t in (ok, failed, revoked)]
    app = GreenQ("reader", broker=redis_url, key_prefix=redis_prefix, config_file=False,
                 celery_queues=f"{redis_prefix}-celery")
    try:
        waiting = app.AsyncResult(ok)
        assert waiting.status == "PENDING" and not waiting.ready()
        got: dict = {}
        thread = threading.Thread(target=lambda: got.update(value=waiting.get(timeout=30)))
        started = time.monotonic()
        thread.start()
        # the waiter hears Celery's PUBLISH on the record's key (subscribed, not polling)
        assert until(lambda: client.pubsub_numsub(f"celery-task-meta-{ok}")[0][1] == 1, 10)
        run_celery(CELERY_STORE, redis_url, ok, failed, revoked)
        thread.join(30)
        assert got == {"value": {"total": 42}} and time.monotonic() - started < 25
        assert until(lambda: client.pubsub_numsub(f"celery-task-meta-{ok}")[0][1] == 0, 10)   # unsubscribed after

        result = app.AsyncResult(failed)
        assert result.status == "FAILURE" and result.ready() and result.failed()
        exc = result.get(timeout=5, propagate=False)
        assert isinstance(exc, KeyError) and exc.args == ("no such order",)
        assert "line 9, in <module>" in result.traceback and "KeyError: 'no such order'" in result.traceback
        with pytest.raises(KeyError):
            app.AsyncResult(failed).get(timeout=5)
        gone = app.AsyncResult(revoked)
        assert gone.status == "REVOKED"
        with pytest.raises(TaskRevokedError):
            gone.get(timeout=5)
    finally:
        app.close()


def test_greenq_s_group_saves_celery_s_record_only_for_a_celery_queue_and_a_chord_there_is_refused(
        celery_keys, redis_url, redis_prefix):
    from greenq import chord, group
    from greenq.exceptions import ConfigError
    client, names = celery_keys
    on_celery, own = f"{redis_prefix}-celery", f"{redis_prefix}-own"
    names += [f"_kombu.binding.{on_celery}"]
    app = GreenQ("groups", broker=redis_url, key_prefix=redis_prefix, config_file=False, celery_queues=on_celery)
    try:
        to_celery = group(app.signature("g.add", args=[i], queue=on_celery) for i in range(2)).apply_async()
        to_own = group(app.signature("g.add", args=[i], queue=own) for i in range(2)).apply_async()
        names += [f"celery-taskset-meta-{to_celery.id}", f"celery-taskset-meta-{to_own.id}"]
        saved = client.get(f"celery-taskset-meta-{to_celery.id}")
        assert celery_results.group_members(saved) == [r.id for r in to_celery.results]
        assert 0 < client.ttl(f"celery-taskset-meta-{to_celery.id}") <= app.config.result_expires
        assert client.get(f"celery-taskset-meta-{to_own.id}") is None
        assert client.llen(on_celery) == 2
        with pytest.raises(ConfigError, match="Celery queue"):
            chord([app.signature("g.add", args=[9], queue=on_celery)], app.signature("g.sum", queue=own)).apply_async()
        assert client.llen(on_celery) == 2                      # nothing sent
    finally:
        app.close()


def test_a_sender_that_died_after_its_claim_leaves_the_body_to_the_member_run_again(
        backend, celery_keys, redis_url, monkeypatch):
    from greenq.transports.redis import celery_results as module
    monkeypatch.setattr(module, "CLAIM_SECONDS", 1)
    client, names = celery_keys
    group_id = str(uuid.uuid4())
    names += _chord_keys(group_id)
    client.set(celery_results.group_key(group_id, ".s"), 2, ex=600)       # as Celery's client does
    parts = [_part(group_id, i, i) for i in range(2)]
    assert backend.celery_chord_parts([parts[0]]) == [None]
    [dead] = backend.celery_chord_parts([parts[1]])        # claimed, then its worker died (-9): never sent
    assert dead is not None
    other = CeleryRedisBackend(redis_url, backend.config)   # the member's message runs again elsewhere
    try:
        assert other.celery_chord_parts([parts[1]]) == [None]                  # the claim still holds
        assert until(lambda: client.get(celery_results.group_key(group_id, ".c")) is None, 5)
        [token] = other.celery_chord_parts([parts[1]])                         # lapsed: taken anew
        assert token is not None and token != dead
        assert celery_results.chord_results(other.celery_chord_entries(group_id)) == ([0, 1], None)
        assert other.celery_chord_done(group_id, token) is True
        assert backend.celery_chord_done(group_id, dead) is False               # the dead claim changes nothing
    finally:
        other.close()
