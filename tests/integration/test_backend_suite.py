"""The result backend contract (greenq/backends/base.py), run against every backend.

Results are stored by a "worker" instance and read by a "client" instance,
as in production.  Everything is stored with ``reply_to=client.reply_to()``,
so rpc:// (which delivers a result only to the process that published the
task) runs the tests about waiting; tests that read a result from any
instance (``get``, ``forget``, revocations, expiry) need a shared store and
are skipped for rpc://.
"""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from greenq.backends.base import Record


def tid() -> str:
    return str(uuid.uuid4())


def need_shared(env) -> None:
    if not env.shared:
        pytest.skip(f"not applicable to {env.backend_url}: results reach only the caller's process, "
                    "and only by waiting")


def test_store_then_get_from_another_instance(backend_env):
    need_shared(backend_env)
    client, worker = backend_env.backend(), backend_env.backend()
    task_id = tid()
    worker.store(task_id, b'json:{"state":"SUCCESS"}' + bytes(range(256)))
    assert client.get(task_id) == b'json:{"state":"SUCCESS"}' + bytes(range(256))
    assert client.get(tid()) is None


def test_wait_returns_quickly_once_stored_from_another_thread(backend_env):
    client, worker = backend_env.backend(), backend_env.backend()
    task_id = tid()
    stored = []

    def store_later():
        time.sleep(0.3)
        worker.store(task_id, b"done", reply_to=client.reply_to())
        stored.append(time.monotonic())

    thread = threading.Thread(target=store_later)
    thread.start()
    assert client.wait(task_id, 10.0) == b"done"
    returned = time.monotonic()
    thread.join()
    assert returned - stored[0] < 5.0   # woke on the store, not at its 10 s timeout


def test_wait_times_out_with_none_without_spinning(backend_env):
    client = backend_env.backend()
    start, cpu = time.monotonic(), time.process_time()
    assert client.wait(tid(), 0.6) is None
    elapsed = time.monotonic() - start
    assert 0.55 <= elapsed < 5.0   # its timeout is the floor; the ceiling only catches a hang
    assert time.process_time() - cpu < 0.3, "wait burned CPU while nothing happened"


def test_non_final_record_does_not_wake_wait(backend_env):
    client, worker = backend_env.backend(), backend_env.backend()
    task_id = tid()
    worker.store(task_id, b"retry", final=False, reply_to=client.reply_to())
    assert client.wait(task_id, 0.4) is None
    if backend_env.shared:
        assert client.get(task_id) == b"retry"
    worker.store(task_id, b"success", final=True, reply_to=client.reply_to())
    assert client.wait(task_id, 5.0) == b"success"
    if backend_env.shared:
        assert client.get(task_id) == b"success"


def test_store_many(backend_env):
    client, worker = backend_env.backend(), backend_env.backend()
    task_ids = [tid() for _ in range(5)]
    worker.store_many([Record(t, t.encode(), True, client.reply_to()) for t in task_ids])
    worker.store_many([])
    for t in reversed(task_ids):
        assert client.wait(t, 5.0) == t.encode()


def test_forget(backend_env):
    need_shared(backend_env)
    client, worker = backend_env.backend(), backend_env.backend()
    task_id = tid()
    worker.store(task_id, b"data")
    client.forget(task_id)
    assert client.get(task_id) is None and worker.get(task_id) is None
    client.forget(tid())  # unknown id: harmless


def test_revoke_and_revoked_with_terminate_flag(backend_env):
    client, worker = backend_env.backend(), backend_env.backend()
    plain, terminate, other = tid(), tid(), tid()
    client.revoke(plain)
    client.revoke(terminate, terminate=True)
    assert worker.revoked([plain, terminate, other]) == {plain: False, terminate: True}
    assert worker.revoked([other]) == {}
    assert worker.revoked([]) == {}


def test_revocations_since_for_a_worker_started_later(backend_env):
    """What a worker loads at start (since=0) and re-reads (since=a time):
    every live revocation with its flag and time, oldest first."""
    client = backend_env.backend()
    before = time.time()
    first, second = tid(), tid()
    client.revoke(first)
    time.sleep(0.05)
    middle = time.time()
    time.sleep(0.05)
    client.revoke(second, terminate=True)
    later = backend_env.backend()            # a worker started after the revokes
    found = [r for r in later.revocations() if r.task_id in (first, second)]
    assert [(r.task_id, r.terminate) for r in found] == [(first, False), (second, True)]
    assert before - 1 <= found[0].at <= found[1].at <= time.time() + 1
    newer = {r.task_id for r in later.revocations(since=middle)}
    assert second in newer and first not in newer
    assert {r.task_id for r in later.revocations(since=time.time() + 60)}.isdisjoint({first, second})


def test_a_far_future_broadcast_does_not_make_the_worker_skip_later_revocations(backend_env):
    """A worker's copy (greenq/worker/revocations.py) on the real backend: a
    ``revoke`` broadcast whose ``at`` is a year ahead (a sender with a wrong
    clock, a garbled command) used to move the re-read cursor a year ahead,
    and the re-reads then skipped every revocation recorded after it."""
    from greenq.drivers import get_driver
    from greenq.worker.revocations import Revocations
    driver, config, backend = get_driver("threads"), backend_env.config(), backend_env.backend()
    rev = Revocations(driver, lambda: backend, lambda: config.result_expires, lambda ids: None, driver.event())
    rev.first_load()
    assert rev.loaded
    far = tid()
    rev.received([far], False, time.time() + 365 * 24 * 3600)
    assert far in rev
    missed = tid()                        # revoked by a client whose broadcast never arrived
    backend_env.backend().revoke(missed)
    deadline = time.monotonic() + 5       # rpc://: the stream reader catches up
    rev.sync()
    while missed not in rev and time.monotonic() < deadline:
        time.sleep(0.05)
        rev.sync()
    assert missed in rev, "the re-read skipped a revocation recorded after a far-future broadcast"
    assert 0 < rev.newest <= time.time()
    assert rev.ids[far][1] <= time.time()         # its ``at`` was taken as now: it still expires


def test_results_and_revocations_expire(backend_env):
    need_shared(backend_env)
    backend = backend_env.backend(result_expires=1)
    task_id = tid()
    backend.store(task_id, b"short-lived")
    backend.revoke(task_id)
    assert backend.get(task_id) == b"short-lived"
    assert backend.revoked([task_id]) == {task_id: False}
    deadline = time.monotonic() + 3.0
    while (backend.get(task_id) is not None or backend.revoked([task_id])) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert backend.get(task_id) is None
    assert backend.wait(task_id, 0.1) is None
    assert backend.revoked([task_id]) == {}
    assert task_id not in {r.task_id for r in backend.revocations()}
