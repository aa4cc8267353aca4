"""Celery and greenq on RabbitMQ, end to end (issue 21): an unmodified Celery
client (``result_backend='rpc://'``) sends to a queue in ``[greenq]
celery_queues``; a real greenq-worker (``--burst``) runs the tasks and answers
on the client's reply queue, which Celery's ``AsyncResult.get()`` reads
(values, a countdown, a failure with ``propagate=False``, a link, a retried
task, a time limit).  (An expired message does not reach any worker on
RabbitMQ: Celery's client sets its AMQP ``expiration`` too, docs/celery.md.)
The same with Redis results, and chords with Redis results (with
``rpc://`` a chord member is dead-lettered: it cannot be counted).  greenq
client -> real Celery worker (solo pool, its ``rpc://`` replies read by
greenq's AsyncResult), then a greenq worker beside it on the queue: each
message once.  One
green driver is enough: the broker code is the same under every driver."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.conftest import delete_amqp_names, until
from tests.e2e.conftest import HERE, Env
from tests.fixtures.celery.clients import celery_python, run_celery

pytestmark = [pytest.mark.e2e, pytest.mark.amqp]

CLIENT = r"""
import datetime, json, sys, time
from celery import Celery, signature
app = Celery("client", broker=sys.argv[1], backend="rpc://")
q = sys.argv[2]
sent = {
    "plain": app.send_task("interop.add", args=[2, 3], queue=q),
    "countdown": app.send_task("interop.add", args=[10, 20], queue=q, countdown=2),
    "failed": app.send_task("interop.add", args=["a", 1], queue=q),
    "linked": app.send_task("interop.add", args=[50, 50], queue=q,
                            link=signature("interop.echo", args=("linked",), queue=q)),
    "retried": app.send_task("interop.flaky", args=[2], queue=q),
    "time_limit": app.send_task("interop.slow", args=[30], queue=q, time_limit=1),
}
print(json.dumps({k: r.id for k, r in sent.items()}), time.time(), flush=True)
sys.stdin.readline()                     # the greenq worker ran them
out = {}
for name, r in sent.items():
    try:
        value = r.get(timeout=15, propagate=False)
    except Exception as exc:             # no answer: said so, with the others
        out[name] = ["NO ANSWER", type(exc).__name__, ""]
        continue
    out[name] = [r.state, value if r.successful() else type(value).__name__, (r.traceback or "")[-300:]]
print(json.dumps(out), flush=True)
"""

CELERY_WORKER_TASKS = """
from celery import Celery
import os
app = Celery("celery-side", broker=os.environ["CELERY_TEST_URL"], backend="rpc://")
app.conf.worker_hijack_root_logger = False

@app.task(name="interop.add")
def add(x, y):
    with open(os.environ["CELERY_TEST_MARKS"], "a") as fh:
        fh.write("add " + str(x + y) + chr(10))
    return x + y


@app.task(name="interop.mark")
def mark(i):
    import time
    time.sleep(0.2)                      # slower than greenq's: both get some of a short run
    with open(os.environ["CELERY_TEST_MARKS"], "a") as fh:
        fh.write("mark " + str(i) + chr(10))
    return i
"""

SEND_MARKS = r"""
import sys
from celery import Celery
app = Celery("client", broker=sys.argv[1])
for i in range(int(sys.argv[3]), int(sys.argv[4])):
    app.send_task("interop.mark", args=[i], queue=sys.argv[2])
"""


def _celery_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GREENQ_", "CELERY_"))}
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture
def celery_env(tmp_path, amqp_url, pool):
    if pool != "gevent":
        pytest.skip("one green driver is enough: the Celery RabbitMQ path is the same under every driver")
    sys.path.insert(0, str(HERE))
    queue = f"gqc-{uuid.uuid4().hex[:8]}"
    env = Env(tmp_path, amqp_url, {"GREENQ_CELERY_QUEUES": queue, "GREENQ_WORKER_QUEUES": queue,
                                   "GREENQ_DEFAULT_QUEUE": queue, "GREENQ_RESULT_BACKEND": "rpc://"})
    env.queue = queue
    yield env
    env.cleanup()
    delete_amqp_names(amqp_url, [queue], [queue])


def test_a_celery_client_s_tasks_run_on_a_greenq_worker_and_rpc_answers_it(pool, celery_env, amqp_url):
    queue = celery_env.queue
    client = subprocess.Popen([celery_python(), "-c", CLIENT, amqp_url, queue], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_celery_env())
    try:
        ids, _, sent_at = client.stdout.readline().rpartition(" ")
        ids = json.loads(ids)
        mine = celery_env.app("celery_interop_tasks").send_task("interop.add", args=[20, 22], queue=queue)
        code, out = celery_env.run_worker(pool, "-A", "celery_interop_tasks", timeout=60)
        assert code == 0, out
        stdout, stderr = client.communicate("go\n", timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, stderr
    results = json.loads(stdout.splitlines()[-1])
    assert results["plain"][:2] == ["SUCCESS", 5]
    assert results["countdown"][:2] == ["SUCCESS", 30]
    assert results["failed"][:2] == ["FAILURE", "TypeError"] and "can only concatenate" in results["failed"][2]
    assert results["linked"][:2] == ["SUCCESS", 100]
    assert results["retried"][:2] == ["SUCCESS", 2]                     # two RETRY replies, then SUCCESS
    assert results["time_limit"][:2] == ["FAILURE", "TimeLimitExceeded"]
    adds = {tuple(a[:2]): a[2] for a in map(json.loads, (celery_env.markers / "add").read_text().splitlines())}
    assert adds[(10, 20)] >= float(sent_at) + 1.0               # the countdown did not run early
    echoes = [json.loads(line) for line in (celery_env.markers / "echo").read_text().splitlines()]
    assert [e["args"] for e in echoes] == [[100, "linked"]]
    assert [int(x) for x in (celery_env.markers / "flaky").read_text().split()] == [0, 1, 2]
    assert mine.get(timeout=10) == 42          # a greenq client's call on the Celery queue: greenq's rpc:// reply
    assert "worker stopped: 6 succeeded, 2 failed, 2 retried, 0 dead-lettered" in out, out


def celery_worker(tmp_path, amqp_url, queue):
    """A real Celery worker (solo pool) on ``queue``; it writes what it ran to tmp_path/celery_marks."""
    (tmp_path / "celery_side.py").write_text(CELERY_WORKER_TASKS)
    env = _celery_env()
    env.update(CELERY_TEST_URL=amqp_url, PYTHONPATH=str(tmp_path), CELERY_TEST_MARKS=str(tmp_path / "celery_marks"))
    return subprocess.Popen([celery_python(), "-m", "celery", "-A", "celery_side", "worker", "--pool", "solo",
                             "-Q", queue, "--without-heartbeat", "--without-gossip", "--without-mingle",
                             "-l", "INFO"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

REDIS_CLIENT = r"""
import json, sys
from celery import Celery
app = Celery("client", broker=sys.argv[1], backend=sys.argv[2])
q = sys.argv[3]
sent = [app.send_task("interop.add", args=[2, 3], queue=q), app.send_task("interop.add", args=["a", 1], queue=q)]
print(json.dumps([r.id for r in sent]), flush=True)
sys.stdin.readline()
out = []
for r in sent:
    value = r.get(timeout=15, propagate=False)
    out.append([r.state, value if r.successful() else type(value).__name__])
print(json.dumps(out), flush=True)
"""


def test_a_celery_client_on_rabbitmq_with_redis_results_reads_them(pool, celery_env, amqp_url, redis_url,
                                                                    redis_prefix):
    """Celery's other common setup: RabbitMQ broker, Redis result backend."""
    celery_env.env.update({"GREENQ_RESULT_BACKEND": redis_url, "GREENQ_KEY_PREFIX": redis_prefix,
                           "GREENQ_RESULT_EXPIRES": "600"})     # celery-task-meta-<id>: outside the prefix
    client = subprocess.Popen([celery_python(), "-c", REDIS_CLIENT, amqp_url, redis_url, celery_env.queue],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_celery_env())
    try:
        client.stdout.readline()
        code, out = celery_env.run_worker(pool, "-A", "celery_interop_tasks", timeout=60)
        assert code == 0, out
        stdout, stderr = client.communicate("go\n", timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, stderr
    assert json.loads(stdout.splitlines()[-1]) == [["SUCCESS", 5], ["FAILURE", "TypeError"]]


def _ran(path, kind):
    lines = path.read_text().splitlines() if path.exists() else []
    return [int(line.split()[1]) for line in lines if line.startswith(kind + " ")]


def test_greenq_and_celery_share_a_queue_both_ways(celery_env, amqp_url, tmp_path):
    """greenq client -> a real Celery worker (values, a countdown, read by
    greenq's AsyncResult from the Celery worker's rpc:// replies); then a
    greenq worker joins the Celery worker on the queue (both declared it: no
    PRECONDITION_FAILED either way) and each message a Celery client sends
    runs once, on one of them."""
    queue = celery_env.queue
    celery_marks = tmp_path / "celery_marks"
    app = celery_env.app("celery_interop_tasks")
    sent = [app.send_task("interop.add", args=[i, i], queue=queue) for i in range(3)]
    sent.append(app.send_task("interop.add", args=[5, 5], queue=queue, countdown=1))
    run_celery(SEND_MARKS, amqp_url, queue, "0", "5")
    celery = celery_worker(tmp_path, amqp_url, queue)
    greenq = None
    done = False
    try:
        if until(lambda: len(_ran(celery_marks, "add")) >= 4 and _ran(celery_marks, "mark"), 40):
            greenq = celery_env.worker("gevent", "-A", "celery_interop_tasks", burst=False)
            run_celery(SEND_MARKS, amqp_url, queue, "5", "40")
            done = until(lambda: celery_env.marker_count("mark") + len(_ran(celery_marks, "mark")) >= 40, 40)
    finally:
        celery.terminate()
        out, _ = celery.communicate(timeout=30)
        if greenq is not None:
            greenq.terminate()
            greenq.communicate(timeout=30)
    assert done, out
    assert sorted(_ran(celery_marks, "add")) == [0, 2, 4, 10], out     # what greenq sent, run by Celery
    assert [r.get(timeout=10) for r in sent] == [0, 2, 4, 10]          # Celery's rpc:// replies, read by greenq
    assert {r.status for r in sent} == {"SUCCESS"}
    by_celery = _ran(celery_marks, "mark")
    assert out.count("succeeded in") == 4 + len(by_celery), out
    mine = celery_env.markers / "mark"
    by_greenq = [json.loads(line) for line in mine.read_text().splitlines()] if mine.exists() else []
    assert sorted(by_celery + by_greenq) == list(range(40)), "each message runs once"
    assert by_celery and by_greenq


CHORD_CLIENT = r"""
import json, sys
from celery import Celery, chord, group, signature
app = Celery("client", broker=sys.argv[1], backend=sys.argv[2])
q = sys.argv[3]
s = lambda name, *a, **o: signature("chords." + name, args=a, queue=q, **o)
ok = chord(group(s("add", i, i) for i in range(5)), s("tsum"))()
failed = chord([s("add", 1, 1), s("boom", 2)], s("tsum", link_error=s("errback")))()
print(json.dumps({"ok": [ok.id, ok.parent.id], "failed": [failed.id, failed.parent.id],
                  "members": [r.id for r in ok.parent.results + failed.parent.results]}), flush=True)
sys.stdin.readline()                     # the greenq worker ran them
failure = failed.get(timeout=15, propagate=False)
print(json.dumps({"ok": ok.get(timeout=15), "failed": [type(failure).__name__, str(failure)]}), flush=True)
"""


def test_a_celery_client_s_chords_on_rabbitmq_with_redis_results(pool, celery_env, amqp_url, redis_url,
                                                                 redis_prefix):
    """A Celery client (RabbitMQ broker, Redis results) sends chords to a
    greenq worker: the members are counted in Redis as on a Redis broker and
    the body, sent on RabbitMQ to the Celery queue, runs once with the values
    in order; a failed member fails the body (ChordError) and calls its errback."""
    from tests.e2e.transport_redis.test_celery_chords_e2e import _cleanup
    celery_env.env.update({"GREENQ_RESULT_BACKEND": redis_url, "GREENQ_KEY_PREFIX": redis_prefix,
                           "GREENQ_RESULT_EXPIRES": "600"})
    client = subprocess.Popen([celery_python(), "-c", CHORD_CLIENT, amqp_url, redis_url, celery_env.queue],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_celery_env())
    ids = None
    try:
        ids = json.loads(client.stdout.readline())
        code, out = celery_env.run_worker(pool, "-A", "celery_chord_tasks", timeout=60)
        assert code == 0, out
        stdout, stderr = client.communicate("go\n", timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        if ids is not None:
            _cleanup(redis_url, [ids["ok"][0], ids["failed"][0], *ids["members"]], [ids["ok"][1], ids["failed"][1]])
    assert client.returncode == 0, stderr
    read = json.loads(stdout.splitlines()[-1])
    assert read["ok"] == 20
    assert read["failed"][0] == "ChordError" and "boom 2" in read["failed"][1], read
    marks = celery_env.markers
    assert [json.loads(x) for x in (marks / "tsum").read_text().splitlines()] == [[0, 2, 4, 6, 8]]   # once
    [(errback_of, errback_id)] = [json.loads(x) for x in (marks / "errback").read_text().splitlines()]
    _cleanup(redis_url, [errback_id], [])
    assert errback_of == ids["failed"][0]
    assert "dead-lettered" in out and ", 0 dead-lettered" in out, out


CHORD_SEND = r"""
import json, sys
from celery import Celery, chord, signature
app = Celery("client", broker=sys.argv[1], backend=sys.argv[2])
q = sys.argv[3]
s = lambda name, *a: signature("chords." + name, args=a, queue=q)
try:
    r = chord([s("add", 1, 1), s("add", 2, 2)], s("tsum"))()
except NotImplementedError as exc:       # Celery's rpc:// backend: no chords
    print(json.dumps({"refused": str(exc)}))
else:
    print(json.dumps({"body": r.id, "group": r.parent.id, "members": [m.id for m in r.parent.results]}))
"""


def test_a_celery_chord_is_dead_lettered_by_a_greenq_worker_with_rpc_results(pool, celery_env, amqp_url,
                                                                             redis_url):
    """Celery's own client refuses a chord with ``rpc://``; one sent with
    another backend (the greenq worker's ``rpc://`` does not match the
    client's) reaches a greenq worker that cannot count it: each member is
    dead-lettered with the reason, not run (its body would never be sent)."""
    from tests.e2e.transport_redis.test_celery_chords_e2e import _cleanup
    refused = json.loads(run_celery(CHORD_SEND, amqp_url, "rpc://", celery_env.queue))
    assert "does not support chords" in refused["refused"]
    ids = json.loads(run_celery(CHORD_SEND, amqp_url, redis_url, celery_env.queue))
    try:
        code, out = celery_env.run_worker(pool, "-A", "celery_chord_tasks", timeout=60)
        assert code == 0, out
        assert "0 succeeded, 0 failed, 0 retried, 2 dead-lettered" in out, out
        assert not (celery_env.markers / "add").exists()
        listed = json.loads(celery_env.admin("dlq", "list", "--json").stdout)
        assert sorted(d["task_id"] for d in listed) == sorted(ids["members"])
        assert all("counts Celery chords on a Redis result backend only" in d["reason"] for d in listed), listed
    finally:
        _cleanup(redis_url, [ids["body"], *ids["members"]], [ids["group"]])
