"""Celery chords, groups and results across Celery and greenq, end to end on
Redis (issue 21): an unmodified Celery client sends chords whose header
members run on a real greenq worker (``--burst``), or split between a real
Celery worker (solo pool) and a greenq worker; the body runs once with the
members' values in order, a failed member fails the body with Celery's
ChordError and calls its errback; Celery's ``GroupResult.restore`` reads a
group run by greenq, and a group greenq sent to a Celery queue; greenq's
``AsyncResult`` reads what a Celery worker stored.  One driver (gevent):
the workers are separate processes and the test is about the records."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import HERE, Env
from tests.e2e.transport_redis.test_celery_interop_e2e import _forget_kombu_bindings, _wait_for_line
from tests.fixtures.celery.clients import celery_python, run_celery

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

SEND = r"""
import json, sys
from celery import Celery, chord, group, signature
app = Celery("client", broker=sys.argv[1], backend=sys.argv[1])
q = sys.argv[2]
s = lambda name, *a, **o: signature("chords." + name, args=a, queue=q, **o)
ok = chord(group(s("add", i, i) for i in range(10)), s("tsum"))()
failed = chord([s("add", 1, 1), s("boom", 2), s("add", 3, 3)], s("tsum", link_error=s("errback")))()
saved = group(s("add", i, 100) for i in range(3)).apply_async()
saved.save()
print(json.dumps({"ok": [ok.id, ok.parent.id], "failed": [failed.id, failed.parent.id],
                  "saved": [saved.id] + [r.id for r in saved.results],
                  "members": [r.id for r in ok.parent.results + failed.parent.results]}))
"""

READ = r"""
import json, sys
from celery import Celery
from celery.result import GroupResult
app = Celery("client", broker=sys.argv[1], backend=sys.argv[1])
ids = json.loads(sys.argv[2])
failed = app.AsyncResult(ids["failed"][0]).get(timeout=20, propagate=False)
group = GroupResult.restore(ids["saved"][0], app=app)
print(json.dumps({
    "ok": app.AsyncResult(ids["ok"][0]).get(timeout=20),
    "failed": [type(failed).__module__, type(failed).__name__, str(failed)],
    "saved": group.get(timeout=20), "saved_ids": [r.id for r in group.results]}))
"""


def _cleanup(redis_url, task_ids, group_ids):
    """Celery's records are outside the test's key prefix: delete what this test made."""
    import redis
    client = redis.Redis.from_url(redis_url)
    names = [f"celery-task-meta-{t}" for t in task_ids]
    for g in group_ids:
        names += [f"celery-taskset-meta-{g}{s}" for s in ("", ".j", ".t", ".s", ".d", ".c")]
    if names:
        client.delete(*names)
    client.close()


@pytest.fixture
def chord_env(tmp_path, redis_url, redis_prefix):
    sys.path.insert(0, str(HERE))
    queue = f"{redis_prefix}-chords"
    env = Env(tmp_path, redis_url, {"GREENQ_KEY_PREFIX": redis_prefix, "GREENQ_CELERY_QUEUES": queue,
                                    "GREENQ_WORKER_QUEUES": queue, "GREENQ_DEFAULT_QUEUE": queue,
                                    "GREENQ_RESULT_EXPIRES": "600"})
    env.queue = queue
    env.made = ([], [])              # Celery task ids, group ids: deleted at the end
    yield env
    env.cleanup()
    _cleanup(redis_url, *env.made)
    _forget_kombu_bindings(redis_url, queue)


def test_a_celery_client_s_chords_and_groups_run_on_a_greenq_worker(chord_env, redis_url):
    import redis
    ids = json.loads(run_celery(SEND, redis_url, chord_env.queue))
    chord_env.made[0].extend([ids["ok"][0], ids["failed"][0], *ids["saved"][1:], *ids["members"]])
    chord_env.made[1].extend([ids["ok"][1], ids["failed"][1], ids["saved"][0]])
    code, out = chord_env.run_worker("gevent", "-A", "celery_chord_tasks", timeout=60)
    assert code == 0, out
    read = json.loads(run_celery(READ, redis_url, json.dumps(ids)))
    assert read["ok"] == 90
    module, name, text = read["failed"]
    assert (module, name) == ("celery.exceptions", "ChordError"), read["failed"]
    assert "Dependency" in text and "boom 2" in text, text
    assert read["saved"] == [100, 101, 102] and read["saved_ids"] == ids["saved"][1:]
    marks = chord_env.markers
    # the body ran once, with the members' values in the header's order
    assert [json.loads(x) for x in (marks / "tsum").read_text().splitlines()] == [[2 * i for i in range(10)]]
    [(errback_of, errback_id)] = [json.loads(x) for x in (marks / "errback").read_text().splitlines()]
    chord_env.made[0].append(errback_id)
    assert errback_of == ids["failed"][0]
    # the chords' counting keys are gone, each marked done (a member run again does nothing)
    client = redis.Redis.from_url(redis_url)
    try:
        for group_id in (ids["ok"][1], ids["failed"][1]):
            assert client.exists(*(f"celery-taskset-meta-{group_id}{s}" for s in (".j", ".t", ".s", ".d"))) == 0
            assert client.get(f"celery-taskset-meta-{group_id}.c") == b"done"
    finally:
        client.close()


CELERY_SIDE = """
import json, os
from celery import Celery
app = Celery("celery-side", broker=os.environ["CELERY_TEST_URL"], backend=os.environ["CELERY_TEST_URL"])
app.conf.worker_hijack_root_logger = False
app.conf.result_expires = 600


def _record(name, value):
    with open(os.path.join(os.environ["CELERY_TEST_MARKS"], name), "a") as fh:
        fh.write(json.dumps(value) + chr(10))


@app.task(name="chords.add")
def add(x, y):
    _record("add", [x, y])
    return x + y


@app.task(name="chords.tsum")
def tsum(values):
    _record("tsum", values)
    return sum(values)


@app.task(name="chords.boom")
def boom(x):
    raise ValueError(f"boom {x}")
"""

SEND_MIXED = r"""
import json, sys
from celery import Celery, chord, signature
app = Celery("client", broker=sys.argv[1], backend=sys.argv[1])
on_celery, on_greenq = sys.argv[2], sys.argv[3]
add = lambda i: signature("chords.add", args=(i, i), queue=(on_celery, on_greenq)[i % 2])
# members alternate between the queues; one body on greenq's queue, one on Celery's
to_greenq = chord([add(i) for i in range(8)], signature("chords.tsum", queue=on_greenq))()
to_celery = chord([add(i) for i in range(10, 18)], signature("chords.tsum", queue=on_celery))()
print(json.dumps({"to_greenq": to_greenq.get(timeout=30), "to_celery": to_celery.get(timeout=30),
                  "ids": [to_greenq.id, to_celery.id, to_greenq.parent.id, to_celery.parent.id]
                  + [r.id for r in to_greenq.parent.results + to_celery.parent.results]}))
"""

READ_GROUP = r"""
import json, sys
from celery import Celery
from celery.result import GroupResult
app = Celery("client", broker=sys.argv[1], backend=sys.argv[1])
print(json.dumps(GroupResult.restore(sys.argv[2], app=app).get(timeout=20)))
"""


def test_chords_split_between_celery_and_greenq_workers_and_greenq_reads_celery_s_results(
        tmp_path, redis_url, redis_prefix):
    sys.path.insert(0, str(HERE))
    on_celery, on_greenq = f"{redis_prefix}-on-celery", f"{redis_prefix}-on-greenq"
    env = Env(tmp_path, redis_url, {"GREENQ_KEY_PREFIX": redis_prefix,
                                    "GREENQ_CELERY_QUEUES": f"{on_celery},{on_greenq}",
                                    "GREENQ_WORKER_QUEUES": on_greenq, "GREENQ_DEFAULT_QUEUE": on_greenq,
                                    "GREENQ_RESULT_EXPIRES": "600"})
    (tmp_path / "celery_side.py").write_text(CELERY_SIDE)
    (tmp_path / "celery_marks").mkdir()
    celery_env = {k: v for k, v in os.environ.items() if not k.startswith(("GREENQ_", "CELERY_"))}
    celery_env.pop("PYTHONPATH", None)
    celery_env.update(CELERY_TEST_URL=redis_url, PYTHONPATH=str(tmp_path),
                      CELERY_TEST_MARKS=str(tmp_path / "celery_marks"))
    celery = subprocess.Popen([celery_python(), "-m", "celery", "-A", "celery_side", "worker", "--pool", "solo",
                               "-Q", on_celery, "--without-heartbeat", "--without-gossip", "--without-mingle",
                               "-l", "INFO"], cwd=tmp_path, env=celery_env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    greenq = env.worker("gevent", "-A", "celery_chord_tasks", burst=False)
    made: "tuple[list, list]" = ([], [])
    try:
        _wait_for_line(celery, "ready.")
        _wait_for_line(greenq, "worker ready")
        sent = json.loads(run_celery(SEND_MIXED, redis_url, on_celery, on_greenq, timeout=60))
        made[0].extend(sent["ids"][:2] + sent["ids"][4:])
        made[1].extend(sent["ids"][2:4])
        assert sent["to_greenq"] == sum(2 * i for i in range(8))
        assert sent["to_celery"] == sum(2 * i for i in range(10, 18))

        # greenq's client: what it sends to Celery's queue runs on the Celery worker,
        # and greenq's AsyncResult reads the record that worker stored
        app = env.app("celery_chord_tasks")
        value = app.send_task("chords.add", args=[20, 22], queue=on_celery)
        failure = app.send_task("chords.boom", args=[5], queue=on_celery)
        made[0].extend([value.id, failure.id])
        assert value.get(timeout=20) == 42
        exc = failure.get(timeout=20, propagate=False)
        assert isinstance(exc, ValueError) and str(exc) == "boom 5"
        assert failure.status == "FAILURE" and failure.ready() and not failure.successful()
        assert "raise ValueError" in failure.traceback and "boom 5" in failure.traceback
        with pytest.raises(ValueError, match="boom 5"):
            app.AsyncResult(failure.id).get(timeout=5)
        # greenq's group sent to Celery's queue: Celery's GroupResult.restore reads it
        members = app.signature("chords.add", args=[1, 1], queue=on_celery)
        from greenq import group
        sent_group = group(members, app.signature("chords.add", args=[2, 2], queue=on_celery)).apply_async()
        made[0].extend(r.id for r in sent_group.results)
        made[1].append(sent_group.id)
        assert json.loads(run_celery(READ_GROUP, redis_url, sent_group.id)) == [2, 4]
    finally:
        celery.terminate()
        greenq.terminate()
        celery_out, _ = celery.communicate(timeout=30)
        greenq_out, _ = greenq.communicate(timeout=60)
        _cleanup(redis_url, *made)
        for queue in (on_celery, on_greenq):
            _forget_kombu_bindings(redis_url, queue)
        env.cleanup()
    # each chord's body ran once, on the worker of its queue, with the values in order
    greenq_bodies = [json.loads(x) for x in (env.markers / "tsum").read_text().splitlines()]
    celery_bodies = [json.loads(x) for x in (tmp_path / "celery_marks" / "tsum").read_text().splitlines()]
    assert greenq_bodies == [[2 * i for i in range(8)]], greenq_out
    assert celery_bodies == [[2 * i for i in range(10, 18)]], celery_out
    # the members were split: odd ones on greenq, even ones on Celery
    ran_on_greenq = sorted(json.loads(x)[0] for x in (env.markers / "add").read_text().splitlines())
    assert ran_on_greenq == [i for i in list(range(8)) + list(range(10, 18)) if i % 2]


STATE = r"""
import json, sys
from celery import Celery
app = Celery("client", broker=sys.argv[1], backend=sys.argv[1])
if sys.argv[2] == "send":
    print(app.send_task("chords.held", args=[sys.argv[4]], queue=sys.argv[3]).id)
else:
    r = app.AsyncResult(sys.argv[3])
    print(json.dumps([r.state, r.info]) if sys.argv[2] == "state" else json.dumps(r.get(timeout=20)))
"""


def test_a_track_started_task_shows_celery_s_started_while_it_runs(chord_env, redis_url):
    release = chord_env.tmp / "release"
    task_id = run_celery(STATE, redis_url, "send", chord_env.queue, str(release)).strip()
    chord_env.made[0].append(task_id)
    worker = chord_env.worker("gevent", "-A", "celery_chord_tasks", "-n", "greenq@started-test", burst=False)
    try:
        chord_env.wait_marker("held")
        state, info = json.loads(run_celery(STATE, redis_url, "state", task_id))
        assert state == "STARTED" and info["hostname"] == "greenq@started-test", info
        assert isinstance(info["pid"], int) and info["pid"] > 0
        release.write_text("")
        assert json.loads(run_celery(STATE, redis_url, "get", task_id)) == "released"
    finally:
        worker.terminate()
        out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, out
