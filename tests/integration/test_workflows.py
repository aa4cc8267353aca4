"""Workflows (CONTRACT section 6, issue 11) with an in-process worker on every
result backend that stores results: chains, groups, chords, callbacks,
lineage, progress.  Real worker processes: tests/e2e/test_workflows_e2e.py."""
from __future__ import annotations

import threading

import pytest

from greenq import ChordError, ConfigError, GreenQ, GroupResult, chain, chord, group
from greenq.drivers import get_driver
from greenq.worker.consumer import Worker

GATES = {}      # name -> (stored, release): events the progress task and its test share


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def app(request, tmp_path):
    """An app with the tasks of these tests on each backend; ``app.calls``
    records every call of ``note`` (the callbacks' target)."""
    settings = {}
    if request.param == "memory":
        url = f"memory://wf-{id(request)}"
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/wf.sqlite3"
    else:
        url = request.getfixturevalue("redis_url")
        settings["key_prefix"] = request.getfixturevalue("redis_prefix")
    app = GreenQ("wf", broker=url, **settings)
    app.calls = []
    lock = threading.Lock()

    @app.task(name="wf.add")
    def add(x, y):
        return x + y

    @app.task(name="wf.tsum")
    def tsum(values):
        return sum(values)

    @app.task(name="wf.boom")
    def boom(x):
        raise ValueError(f"boom {x}")

    @app.task(name="wf.note")
    def note(*args):
        with lock:
            app.calls.append(args)
        return list(args)

    @app.task(name="wf.lineage", bind=True)
    def lineage(self, *_):
        return [self.request.id, self.request.parent_id, self.request.root_id]

    @app.task(name="wf.flaky", bind=True, max_retries=3)
    def flaky(self, x):
        if self.request.retries < 1:
            raise self.retry(countdown=0.05)
        return x

    @app.task(name="wf.wait")
    def wait(name):
        GATES[name].wait(10)
        return name

    @app.task(name="wf.progress", bind=True)
    def progress(self, gate):
        stored, release = GATES[gate]
        self.update_state(state="PROGRESS", meta={"done": 1, "total": 2})
        stored.set()
        release.wait(10)                            # the caller reads the progress meanwhile
        return "finished"
    yield app
    app.close()


def work(app, concurrency: int = 4) -> None:
    # fetch_timeout: how long the burst's last, empty fetch waits before it
    # looks whether anything is left (held, or delayed and due soon) and stops
    assert Worker(app, get_driver("threads"), queues=["default"], concurrency=concurrency, burst=True,
                  fetch_timeout=0.1).run() == 0


def task(app, name):
    return app.tasks[f"wf.{name}"]


def test_chain_passes_each_result_on_and_links_parents(app):
    add = task(app, "add")
    r = chain(add.s(1, 2), add.s(3), add.s(10)).delay()
    piped = (add.s(1, 1) | add.s(1) | add.si(5, 5)).delay()
    work(app)
    assert r.get(timeout=5) == 16
    assert r.parent.get(timeout=1) == 6 and r.parent.parent.get(timeout=1) == 3
    assert r.parent_id == r.parent.id and r.root_id == r.parent.parent.id
    assert r.parent.parent.parent_id is None and r.parent.parent.root_id == r.parent.parent.id
    assert piped.get(timeout=5) == 10                         # .si ignored the parent's 3


def test_signature_by_name_and_lineage_in_the_request(app):
    r = (app.signature("wf.add", args=(2, 2)) | app.signature("wf.lineage")).delay()
    work(app)
    own, parent, root = r.get(timeout=5)
    assert own == r.id and parent == root == r.parent.id


def test_failure_stops_the_chain_and_its_result_says_why(app):
    add, boom = task(app, "add"), task(app, "boom")
    r = chain(add.s(1, 2), boom.s(), task(app, "note").s("never")).delay()
    work(app)
    with pytest.raises(ValueError, match="boom 3"):
        r.get(timeout=5)
    assert r.parent.failed() and app.calls == []


def test_group_results_in_order_and_restored_by_id(app):
    add = task(app, "add")
    g = group(add.s(i, i) for i in range(10)).delay()
    assert isinstance(g, GroupResult) and len(g.results) == 10
    work(app)
    assert g.get(timeout=5) == [2 * i for i in range(10)]
    assert g.ready() and g.completed_count() == 10 and g.successful()
    again = app.GroupResult(g.id)
    assert again.id == g.id and [r.id for r in again.results] == [r.id for r in g.results]
    assert again.get(timeout=1) == [2 * i for i in range(10)]


def test_group_with_a_failure(app):
    add, boom = task(app, "add"), task(app, "boom")
    g = group(add.s(1, 1), boom.s(7)).delay()
    work(app)
    assert g.ready() and g.failed() and g.completed_count() == 1
    with pytest.raises(ValueError, match="boom 7"):
        g.get(timeout=5)
    assert isinstance(g.get(timeout=5, propagate=False)[1], ValueError)


def test_chord_callback_gets_the_list_once(app):
    add, note = task(app, "add"), task(app, "note")
    r = chord(group(add.s(i, i) for i in range(20)), note.s()).delay()
    total = chord([add.s(i, 1) for i in range(5)])(task(app, "tsum").s()).delay()
    work(app)
    assert r.get(timeout=5) == [[2 * i for i in range(20)]]
    assert app.calls == [([2 * i for i in range(20)],)]
    assert total.get(timeout=5) == 15
    assert isinstance(r.parent, GroupResult) and r.parent.get(timeout=1)[3] == 6


def test_chord_with_a_chain_as_body_and_a_group_in_a_chain(app):
    add, tsum = task(app, "add"), task(app, "tsum")
    r = chord([add.s(1, 1), add.s(2, 2)], tsum.s() | add.s(100)).delay()
    upgraded = (group(add.s(i, 0) for i in range(4)) | tsum.s()).delay()
    work(app)
    assert r.get(timeout=5) == 106 and r.parent.get(timeout=1) == 6
    assert isinstance(r.parent.parent, GroupResult) and r.parent.parent.get(timeout=1) == [2, 4]
    assert upgraded.get(timeout=5) == 6


def test_chains_as_members_and_retried_members(app):
    add, tsum, flaky = task(app, "add"), task(app, "tsum"), task(app, "flaky")
    r = chord([add.s(1, 1) | add.s(1), flaky.s(10), add.s(2, 2) | flaky.s()], tsum.s()).delay()
    c = chain(add.s(1, 1), flaky.s(), add.s(1)).delay()
    work(app)
    assert r.get(timeout=10) == 3 + 10 + 4                   # counted when final, not at the retry
    assert c.get(timeout=10) == 3 and c.parent.retries == 1


def test_failed_member_makes_the_chord_fail_naming_it(app):
    add, boom = task(app, "add"), task(app, "boom")
    header = group(add.s(1, 1), boom.s("x"), add.s(2, 2))
    r = chord(header, task(app, "note").s()).delay()
    member = r.parent.results[1].id
    work(app)
    with pytest.raises(ChordError) as info:
        r.get(timeout=5)
    assert "member 1" in str(info.value) and member in str(info.value) and "boom x" in str(info.value)
    assert app.calls == []                                    # the callback never ran


def test_empty_chord_runs_the_body_with_an_empty_list(app):
    r = chord([], task(app, "note").s()).delay()
    work(app)
    assert r.get(timeout=5) == [[]]


def test_link_and_link_error(app):
    add, boom, note = task(app, "add"), task(app, "boom"), task(app, "note")
    ok = add.apply_async((1, 2), link=note.s("after"), link_error=note.s("error"))
    bad = boom.apply_async((1,), link=note.s("after"), link_error=[note.s("error")])
    sig = add.s(5, 5)
    sig.link(note.si("immutable"))
    linked = sig.delay()
    work(app)
    assert ok.get(timeout=5) == 3 and linked.get(timeout=5) == 10
    with pytest.raises(ValueError):
        bad.get(timeout=5)
    assert sorted(app.calls, key=repr) == sorted([(3, "after"), (bad.id, "error"), ("immutable",)], key=repr)


def test_progress_is_read_as_state_and_info(app):
    stored, release = threading.Event(), threading.Event()
    GATES["p"] = (stored, release)
    r = task(app, "progress").delay("p")
    worker = threading.Thread(target=work, args=(app,))
    worker.start()
    try:
        assert stored.wait(10)                  # update_state returned: the state is stored
        assert r.state == "PROGRESS" and r.info == {"done": 1, "total": 2} and not r.ready()
    finally:
        release.set()
        worker.join(10)
    assert r.get(timeout=5) == "finished" and r.state == "SUCCESS" and r.info == "finished"


def test_chord_needs_a_backend_that_stores_results():
    app = GreenQ("wf", broker="amqp://guest:guest@127.0.0.1:1//", backend="rpc://")
    add = app.task(name="wf.add")(lambda x, y: x + y)
    with pytest.raises(ConfigError, match="chord needs a result backend"):
        chord([add.s(1, 1)], add.s(1)).delay()


def test_chord_callback_sent_once_when_sending_it_fails_first(app, monkeypatch):
    """The completer's first attempt to send the callback fails (a broker
    outage): the settler tries again, is told again that this member
    completed the chord, and the callback is sent once."""
    add, note = task(app, "add"), task(app, "note")
    r = chord([add.s(i, i) for i in range(6)], note.s()).delay()
    broker_class = type(app.broker)         # the worker makes its own broker instance
    real, failures = broker_class.publish_many, []

    def flaky(self, outgoing):
        if any(o.message_id == r.id for o in outgoing) and not failures:
            failures.append(1)
            raise ConnectionError("broker away")
        return real(self, outgoing)
    monkeypatch.setattr(broker_class, "publish_many", flaky)
    work(app)
    assert failures and r.get(timeout=5) == [[0, 2, 4, 6, 8, 10]]
    assert app.calls == [([0, 2, 4, 6, 8, 10],)]


def test_shapes_refused_before_anything_is_sent(app):
    add = task(app, "add")
    with pytest.raises(TypeError, match="first step of a chain"):
        chain(add.s(1, 1), group(add.s(1, 1)))
    with pytest.raises(TypeError, match="body must be a signature"):
        chord([add.s(1, 1)], group(add.s(1, 1))).delay()
    with pytest.raises(TypeError, match="unknown option"):
        add.s(1, 1).set(countdwn=3)
    assert app.broker.queue_stats(["default"])[0].ready == 0


def test_a_failed_member_fails_the_chord_before_the_others_finish(app):
    boom, note = task(app, "boom"), task(app, "note")
    GATES["slow"] = threading.Event()
    r = chord([task(app, "wait").s("slow"), boom.s("early")], note.s()).apply_async(
        link_error=note.si("errback"))
    worker = threading.Thread(target=work, args=(app,))
    worker.start()
    try:
        with pytest.raises(ChordError, match=r"member 1 wf.boom.*boom early"):
            r.get(timeout=10)                       # while member 0 still runs
        assert not r.parent.results[0].ready()
    finally:
        GATES["slow"].set()
        worker.join(10)
    assert r.parent.results[0].get(timeout=5) == "slow"
    assert isinstance(r.get(timeout=5, propagate=False), ChordError)
    assert app.calls == [("errback",)]              # the body never ran; its errback once
