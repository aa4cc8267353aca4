"""Celery client -> greenq worker on Redis, end to end (issue 21): an
unmodified Celery client process sends to a queue in ``[greenq]
celery_queues``; a real greenq-worker (``--burst``) runs each task under its
Celery name; a second Celery process reads the results with Celery's own
``AsyncResult``.  Also greenq client -> Celery worker: what greenq sends to
such a queue is a Celery message a real Celery worker runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import until
from tests.e2e.conftest import HERE, Env
from tests.fixtures.celery.clients import celery_python, run_celery

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

SEND = r"""
import datetime, decimal, json, sys, uuid
from celery import Celery, chain, group, signature
app = Celery("client", broker=sys.argv[1], backend=sys.argv[1])
q = sys.argv[2]
add = lambda *a: signature("interop.add", args=a, queue=q)
echo = lambda *a: signature("interop.echo", args=a, queue=q)
members = group(add(100, 1), add(100, 2)).apply_async().results
now = datetime.datetime.now(datetime.timezone.utc)
sent = {
    "plain": app.send_task("interop.add", args=[2, 3], queue=q),
    "countdown": app.send_task("interop.add", args=[10, 20], queue=q, countdown=2),
    "eta": app.send_task("interop.add", args=[1, 2], queue=q, eta=now + datetime.timedelta(seconds=1)),
    "expired": app.send_task("interop.add", args=[1, 1], queue=q, expires=now - datetime.timedelta(seconds=5)),
    "priority": app.send_task("interop.add", args=[7, 7], queue=q, priority=8),
    "retried": app.send_task("interop.flaky", args=[2], queue=q),
    "failed": app.send_task("interop.add", args=["a", 1], queue=q),
    "time_limit": app.send_task("interop.slow", args=[30], queue=q, time_limit=1),
    "ignored": app.send_task("interop.add", args=[4, 4], queue=q, ignore_result=True),
    "typed": app.send_task("interop.echo", queue=q, kwargs={
        "when": datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
        "amount": decimal.Decimal("12.50"), "ref": uuid.UUID(int=5), "data": b"\xff\x00"}),
    "chain": chain(add(1, 10), add(20), add(300)).apply_async(),
    "linked": add(50, 50).apply_async(link=echo("linked")),
    "errback": add("x", 1).apply_async(link_error=echo("errback")),
    "member0": members[0], "member1": members[1],
}
print(json.dumps({k: r.id for k, r in sent.items()}))
print(now.timestamp())
"""

READ = r"""
import json, sys
from celery import Celery
app = Celery("client", broker=sys.argv[1], backend=sys.argv[1])
out = {}
for name, task_id in json.loads(sys.argv[2]).items():
    r = app.AsyncResult(task_id)
    if name == "ignored":
        out[name] = [r.state, None, None]
        continue
    value = r.get(timeout=20, propagate=False)
    out[name] = [r.state, value if r.successful() else type(value).__name__, (r.traceback or "")[-300:]]
print(json.dumps(out))
"""


@pytest.fixture
def celery_env(tmp_path, redis_url, redis_prefix):
    sys.path.insert(0, str(HERE))
    queue = f"{redis_prefix}-celery"
    env = Env(tmp_path, redis_url, {"GREENQ_KEY_PREFIX": redis_prefix, "GREENQ_CELERY_QUEUES": queue,
                                    "GREENQ_WORKER_QUEUES": queue, "GREENQ_DEFAULT_QUEUE": queue,
                                    # celery-task-meta-<id> is outside the prefix: let it go soon
                                    "GREENQ_RESULT_EXPIRES": "600"})
    env.queue = queue
    yield env
    env.cleanup()
    _forget_kombu_bindings(redis_url, queue)


def _forget_kombu_bindings(redis_url, queue):
    """Celery's clients and workers record the queue's bindings outside the test's prefix."""
    import redis
    client = redis.Redis.from_url(redis_url)
    client.delete(f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    client.close()


def test_a_celery_client_s_tasks_run_on_a_greenq_worker_and_celery_reads_the_results(pool, celery_env, redis_url):
    queue = celery_env.queue
    ids, sent_at = run_celery(SEND, redis_url, queue).splitlines()
    ids, sent_at = json.loads(ids), float(sent_at)
    code, out = celery_env.run_worker(pool, "-A", "celery_interop_tasks", timeout=120)
    assert code == 0, out
    results = json.loads(run_celery(READ, redis_url, json.dumps(ids)))
    assert results["plain"][:2] == ["SUCCESS", 5]
    assert results["countdown"][:2] == ["SUCCESS", 30] and results["eta"][:2] == ["SUCCESS", 3]
    assert results["priority"][:2] == ["SUCCESS", 14]
    assert results["retried"][:2] == ["SUCCESS", 2]
    assert results["failed"][:2] == ["FAILURE", "TypeError"] and "can only concatenate" in results["failed"][2]
    assert results["time_limit"][0] == "FAILURE" and results["time_limit"][1] == "TimeLimitExceeded"
    assert results["expired"][:2] == ["REVOKED", "TaskRevokedError"]
    assert results["ignored"][0] == "PENDING"                 # ignore_result: no record
    assert results["chain"][:2] == ["SUCCESS", 331] and results["linked"][:2] == ["SUCCESS", 100]
    assert results["errback"][:2] == ["FAILURE", "TypeError"]
    assert [results["member0"][1], results["member1"][1]] == [101, 102]
    marks = celery_env.markers
    adds = [json.loads(line) for line in (marks / "add").read_text().splitlines()]
    by_args = {tuple(a[:2]): a[2] for a in adds}
    assert (1, 1) not in by_args, "the expired task ran"
    assert (4, 4) in by_args and (10, 20) in by_args
    # a countdown of 2 s did not run early (the worker runs what is at most 1 s early: EARLY_TOLERANCE)
    assert by_args[(10, 20)] >= sent_at + 1.0 and by_args[(1, 2)] >= sent_at
    assert [int(x) for x in (marks / "flaky").read_text().split()] == [0, 1, 2]
    echoes = [json.loads(line) for line in (marks / "echo").read_text().splitlines()]
    called = sorted(json.dumps(e["args"]) for e in echoes if e["args"])
    assert called == sorted(json.dumps(a) for a in ([100, "linked"], [ids["errback"], "errback"]))
    [typed] = [e for e in echoes if e["kwargs"]]
    assert typed["kwargs"] == {
        "when": ["datetime", "datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)"],
        "amount": ["Decimal", "Decimal('12.50')"],
        "ref": ["UUID", "UUID('00000000-0000-0000-0000-000000000005')"], "data": ["bytes", "b'\\xff\\x00'"]}
    assert "worker stopped: 15 succeeded, 3 failed, 2 retried, 0 dead-lettered" in out, out


CELERY_WORKER_TASKS = """
from celery import Celery
import os
app = Celery("celery-side", broker=os.environ["CELERY_TEST_URL"], backend=os.environ["CELERY_TEST_URL"])
app.conf.worker_hijack_root_logger = False
app.conf.result_expires = 600

@app.task(name="interop.add")
def add(x, y):
    return x + y


@app.task(name="interop.hold")
def hold(seconds):
    return "celery ran it"


@app.task(name="interop.mark")
def mark(i):
    import time
    time.sleep(0.01)
    with open(os.environ["CELERY_TEST_MARKS"], "a") as fh:
        fh.write(str(i) + chr(10))
    return i
"""

# Each result is read once it is ready (a bounded poll of its record): Celery 5.3's
# AsyncResult.get() can miss a result stored while it subscribes (seen with a
# Celery worker that finished before this process was up)
CELERY_READ = r"""
import json, sys, time
from celery import Celery
app = Celery("client", broker=sys.argv[1], backend=sys.argv[1])
deadline = time.monotonic() + 60
results = [app.AsyncResult(i) for i in sys.argv[2:]]
while not all(r.ready() for r in results) and time.monotonic() < deadline:
    time.sleep(0.05)
print(json.dumps([r.get(timeout=1) for r in results]))
"""


def celery_worker(tmp_path, redis_url, queue):
    """A real Celery worker (solo pool) on ``queue``, its tasks in tmp_path/celery_side.py."""
    (tmp_path / "celery_side.py").write_text(CELERY_WORKER_TASKS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GREENQ_", "CELERY_"))}
    env.pop("PYTHONPATH", None)
    env.update(CELERY_TEST_URL=redis_url, PYTHONPATH=str(tmp_path), CELERY_TEST_MARKS=str(tmp_path / "celery_marks"))
    return subprocess.Popen([celery_python(), "-m", "celery", "-A", "celery_side", "worker", "--pool", "solo",
                             "-Q", queue, "--without-heartbeat", "--without-gossip", "--without-mingle", "-l", "INFO"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_what_greenq_sends_to_a_celery_queue_a_celery_worker_runs(celery_env, redis_url, tmp_path):
    queue = celery_env.queue
    app = celery_env.app("celery_interop_tasks")
    sent = [app.send_task("interop.add", args=[i, i], queue=queue) for i in range(3)]
    sent.append(app.send_task("interop.add", args=[5, 5], queue=queue, countdown=1))
    worker = celery_worker(tmp_path, redis_url, queue)
    values = None
    try:
        values = json.loads(run_celery(CELERY_READ, redis_url, *[r.id for r in sent], timeout=90))
    finally:
        worker.terminate()
        out, _ = worker.communicate(timeout=30)
        assert values == [0, 2, 4, 10], out
    assert out.count("succeeded in") == 4, out


def _unacked_of(client, task_id):
    """(tag, score) of every entry of kombu's unacked hash holding ``task_id``."""
    out = []
    for tag, raw in client.hscan_iter("unacked", count=1000):
        payload = json.loads(raw)[0]
        if payload["headers"].get("id") == task_id:
            out.append((tag, client.zscore("unacked_index", tag)))
    return out


def test_a_celery_worker_restores_what_a_killed_greenq_worker_held(celery_env, redis_url, tmp_path):
    import redis
    queue = celery_env.queue
    [task_id] = json.loads(run_celery(
        "import json, sys\nfrom celery import Celery\napp = Celery('c', broker=sys.argv[1])\n"
        "print(json.dumps([app.send_task('interop.hold', args=[60], queue=sys.argv[2]).id]))", redis_url, queue))
    celery_env.env["GREENQ_LEASE_SECONDS"] = "1"
    greenq = celery_env.worker("gevent", "-A", "celery_interop_tasks", burst=False)
    celery_env.wait_marker("hold")                    # the greenq worker runs it ...
    greenq.kill()                                     # ... and is killed -9 mid-task
    greenq.wait()
    client = redis.Redis.from_url(redis_url)
    try:
        [(tag, score)] = _unacked_of(client, task_id)  # held in kombu's unacked, as a Celery worker would
        assert client.llen(queue) == 0
        # its lease runs out: by kombu's own rule (score < now - visibility_timeout) it is due back
        assert until(lambda: client.zscore("unacked_index", tag) < time.time() - 3600, 10)
        worker = celery_worker(tmp_path, redis_url, queue)
        try:
            values = json.loads(run_celery(CELERY_READ, redis_url, task_id, timeout=90))
        finally:
            worker.terminate()
            out, _ = worker.communicate(timeout=30)
        assert values == ["celery ran it"], out
        assert _unacked_of(client, task_id) == [] and client.llen(queue) == 0
    finally:
        for tag, _ in _unacked_of(client, task_id):
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)
        client.close()


def test_malformed_celery_messages_are_dead_lettered_by_the_worker_with_a_reason(celery_env, redis_url):
    import base64
    import redis

    from greenq.celery import protocol
    queue = celery_env.queue

    def element(headers, body, content_type="application/json"):
        return json.dumps({"body": base64.b64encode(body).decode(), "content-type": content_type,
                           "content-encoding": "utf-8", "headers": headers,
                           "properties": {"body_encoding": "base64", "delivery_tag": f"{queue}-{headers['id']}"}})
    bad = {
        element({"task": "interop.add", "id": "bad-shape"}, b"[[1, 2], {}]"): "[args, kwargs, embed]",
        element({"task": "interop.add", "id": "bad-pickle"}, b"\x80\x04K\x01.", "application/x-python-serialize"):
            "accept_content has no 'pickle'",
        element({"task": "no.such.task", "id": "bad-name"}, b"[[], {}, {}]"): "unknown task 'no.such.task'",
        b"\x00 not json": "not a kombu message",
    }
    client = redis.Redis.from_url(redis_url)
    for item in bad:
        client.lpush(queue, item)
    client.lpush(queue, protocol.encode_redis(protocol.CeleryMessage("interop.add", [20, 22], {}, id="good-one",
                                                                     queue=queue)))
    client.close()
    code, out = celery_env.run_worker("gevent", "-A", "celery_interop_tasks")
    assert code == 0, out
    assert "worker stopped: 1 succeeded, 0 failed, 0 retried, 3 dead-lettered" in out, out
    app = celery_env.app("celery_interop_tasks")
    dead = [d for d in app.broker.dlq_list(100) if d.queue == queue]
    assert len(dead) == len(bad), [d.reason for d in dead]
    for item, why in bad.items():
        [letter] = [d for d in dead if d.body == (item if isinstance(item, bytes) else item.encode())]
        assert why in letter.reason, (why, letter.reason)
    assert app.AsyncResult("good-one").get(timeout=10) == 42


def _wait_for_line(proc, text, timeout=60):
    """Read ``proc``'s output until a line containing ``text``; the lines read."""
    import selectors
    seen, deadline = [], time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if text in line:
                return seen
    raise AssertionError(f"never said {text!r}:\n{''.join(seen)}")


def test_a_shared_queue_runs_each_message_once_on_celery_and_greenq_workers(celery_env, redis_url, tmp_path):
    queue, n = celery_env.queue, 200
    celery = celery_worker(tmp_path, redis_url, queue)
    greenq = celery_env.worker("gevent", "-A", "celery_interop_tasks", burst=False)
    try:
        _wait_for_line(celery, "ready.")
        _wait_for_line(greenq, "worker ready")
        values = json.loads(run_celery(
            "import json, sys\nfrom celery import Celery\n"
            "app = Celery('c', broker=sys.argv[1], backend=sys.argv[1])\n"
            "rs = [app.send_task('interop.mark', args=[i], queue=sys.argv[2]) for i in range(int(sys.argv[3]))]\n"
            "print(json.dumps([r.get(timeout=120) for r in rs]))", redis_url, queue, str(n), timeout=180))
    finally:
        for proc in (celery, greenq):
            proc.terminate()
        celery.communicate(timeout=30)
        greenq.communicate(timeout=60)
    assert values == list(range(n))
    on_celery = [int(x) for x in (tmp_path / "celery_marks").read_text().split()] \
        if (tmp_path / "celery_marks").exists() else []
    on_greenq = [json.loads(x) for x in (celery_env.markers / "mark").read_text().split()] \
        if (celery_env.markers / "mark").exists() else []
    assert sorted(on_celery + on_greenq) == list(range(n)), "each message ran exactly once"
    assert on_celery and on_greenq, (len(on_celery), len(on_greenq))
