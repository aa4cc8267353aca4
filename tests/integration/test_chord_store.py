"""A chord member's own result goes to the result backend with its count
(``ResultBackend.chord_members_done``: on Redis one script with the count and
the completer's decision).  What happens when the backend refuses that
record for good, on every backend that stores groups: the member's small
FAILURE is stored in its place, it is still counted, and the chord fails with
ChordError instead of waiting forever; the worker goes on."""
from __future__ import annotations

import pytest

from greenq import GreenQ, chord
from greenq.drivers import get_driver
from greenq.worker.consumer import Worker


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def app(request, tmp_path):
    settings = {}
    if request.param == "memory":
        url = f"memory://chord-store-{id(request)}"
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/cs.sqlite3"
    else:
        url = request.getfixturevalue("redis_url")
        settings["key_prefix"] = request.getfixturevalue("redis_prefix")
    app = GreenQ("cs", broker=url, **settings)
    app.calls = []

    @app.task(name="cs.add")
    def add(x, y):
        return x + y

    @app.task(name="cs.note")
    def note(*args):
        app.calls.append(args)
        return list(args)
    yield app
    app.close()


def test_a_chord_member_whose_record_is_refused_fails_the_chord(app, monkeypatch):
    add, note = app.tasks["cs.add"], app.tasks["cs.note"]
    r = chord([add.s(i, i) for i in range(4)], note.s()).delay()
    poisoned = r.parent.results[2].id
    backend_class = type(app.backend)
    real_store, real_count = backend_class.store_many, backend_class.chord_members_done
    refused = []

    def refuse(records):
        if any(rec is not None and rec.task_id == poisoned and b"SUCCESS" in rec.data for rec in records):
            refused.append(1)
            raise ValueError("record too large for this backend")

    def store_many(self, records):
        refuse(records)
        return real_store(self, records)

    def chord_members_done(self, members):
        refuse([m.record for m in members])
        return real_count(self, members)
    monkeypatch.setattr(backend_class, "store_many", store_many)
    monkeypatch.setattr(backend_class, "chord_members_done", chord_members_done)
    assert Worker(app, get_driver("threads"), queues=["default"], concurrency=2, burst=True,
                  fetch_timeout=0.1).run() == 0
    assert refused
    member = app.AsyncResult(poisoned)
    assert member.state == "FAILURE" and "could not be stored" in str(member.get(timeout=1, propagate=False))
    assert r.state == "FAILURE" and "ChordError" in type(r.get(timeout=5, propagate=False)).__name__
    assert app.calls == []                                   # the callback never ran
    assert [m.state for i, m in enumerate(r.parent.results) if i != 2] == ["SUCCESS"] * 3
