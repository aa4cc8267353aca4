"""Cross-process wake-ups of the SQLite transport (greenq/transports/sqlite/wakeup.py):
a publish wakes a fetch waiting in another process, a final result wakes a
client waiting in another, long before the fallback poll; a waiter killed
with SIGKILL leaves a socket that the next sender deletes; a wake-up
directory that cannot be made falls back to polling, logged once.

The children set the fallback to 60 s: without a wake-up they would return
after a minute, so "well under 10 s" tells a wake-up from a poll without
depending on the machine's load."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from greenq.backends import make_backend
from greenq.backends.base import Record
from greenq.brokers import Outgoing, make_broker
from greenq.transports.sqlite import wakeup
from tests.conftest import make_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
BOUND = 10.0      # seconds: a wake-up arrives in milliseconds, the (patched) fallback after 60 s

CHILD = r"""
import sys
driver_name = sys.argv[3] if len(sys.argv) > 3 else ""
if driver_name == "gevent":
    import gevent.monkey
    gevent.monkey.patch_all()
elif driver_name == "eventlet":
    import eventlet
    eventlet.monkey_patch()
import json, time
import greenq.transports.sqlite.broker as broker_mod
import greenq.transports.sqlite.results as results_mod
broker_mod.FALLBACK = results_mod.FALLBACK = 60.0
broker_mod.POLL_MIN = broker_mod.POLL_MAX = 60.0
from greenq.backends import make_backend
from greenq.brokers import make_broker
from tests.conftest import make_config
from greenq.drivers import get_driver
url, what = sys.argv[1], sys.argv[2]
driver = get_driver(driver_name) if driver_name else None
if what == "fetch":
    broker = make_broker(url, make_config(), driver)
    if driver is not None and driver.green:      # the hub keeps running while the fetch waits
        ticks = []
        def tick():
            while True:
                ticks.append(time.monotonic())
                driver.sleep(0.01)
        driver.spawn(tick)
    out = broker.fetch(["q"], 1, 120.0)
    if driver is not None and driver.green:
        assert len(ticks) > 5, ticks
    print(json.dumps({"at": time.time(), "got": [d.message_id for d in out]}), flush=True)
else:
    backend = make_backend(url, make_config(), driver)
    data = backend.wait("t1", 120.0)
    print(json.dumps({"at": time.time(), "got": data.decode() if data else None}), flush=True)
"""


def _child(url: str, what: str, driver: str = "") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, url, what] + ([driver] if driver else []), cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": ROOT})


def _wait_for_socket(directory: str, kind: str, proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """The name of the socket ``proc`` bound in ``directory`` (it is waiting then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the child exited before it waited"
        try:
            names = [n for n in os.listdir(directory) if n.startswith(kind + ".") and f".{proc.pid}." in n]
        except FileNotFoundError:
            names = []
        if names:
            return names[0]
        time.sleep(0.01)
    raise AssertionError(f"no {kind} socket of pid {proc.pid} in {directory} after {timeout} s")


def _answer(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


def test_publish_wakes_a_fetch_in_another_process(tmp_path):
    url = f"sqlite:///{tmp_path}/wake.sqlite3"
    broker = make_broker(url, make_config())
    broker.declare(["q"])
    child = _child(url, "fetch")
    try:
        _wait_for_socket(f"{tmp_path}/wake.sqlite3.wake", "m", child)
        time.sleep(0.2)       # let it reach its wait: a publish before that is found by its read anyway
        broker.publish(Outgoing("other", b"x", "not-mine"))   # another queue: no fetch for it
        broker.publish(Outgoing("q", b"x", "m1"))
        sent = time.time()
        answer = _answer(child)
    finally:
        child.kill()
        child.wait()
        broker.close()
    assert answer["got"] == ["m1"]
    assert answer["at"] - sent < BOUND


def test_final_result_wakes_a_wait_in_another_process(tmp_path):
    url = f"sqlite:///{tmp_path}/wake.sqlite3"
    backend = make_backend(url, make_config())
    backend.get("t0")                 # makes the schema
    child = _child(url, "wait")
    try:
        _wait_for_socket(f"{tmp_path}/wake.sqlite3.wake", "r", child)
        time.sleep(0.2)
        backend.store_many([Record("t0", b"other", True), Record("t1", b"started", False)])
        backend.store_many([Record("t1", b"done", True)])
        sent = time.time()
        answer = _answer(child)
    finally:
        child.kill()
        child.wait()
        backend.close()
    assert answer["got"] == "done"
    assert answer["at"] - sent < BOUND


def test_killed_waiter_leaves_a_socket_the_next_sender_deletes(tmp_path):
    url = f"sqlite:///{tmp_path}/wake.sqlite3"
    directory = f"{tmp_path}/wake.sqlite3.wake"
    broker = make_broker(url, make_config())
    broker.declare(["q"])
    killed = _child(url, "fetch")
    name = _wait_for_socket(directory, "m", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert name in os.listdir(directory)          # nobody cleaned up after a SIGKILL
    live = _child(url, "fetch")
    try:
        _wait_for_socket(directory, "m", live)
        time.sleep(0.2)
        broker.publish(Outgoing("q", b"x", "m1"))
        sent = time.time()
        answer = _answer(live)
    finally:
        live.kill()
        live.wait()
        broker.close()
    assert name not in os.listdir(directory)      # the publish found it refused and deleted it
    assert answer["got"] == ["m1"] and answer["at"] - sent < BOUND


def test_unusable_wakeup_directory_falls_back_to_polling(tmp_path, caplog):
    """``<file>.wake`` taken by a plain file (as a read-only directory would
    refuse it): fetches and result waits poll, and say so once."""
    url = f"sqlite:///{tmp_path}/ro.sqlite3"
    (tmp_path / "ro.sqlite3.wake").write_text("not a directory")
    wakeup._warned.clear()
    broker, other = make_broker(url, make_config()), make_broker(url, make_config())
    backend = make_backend(url, make_config())
    broker.declare(["q"])
    caplog.set_level(logging.WARNING, logger="greenq.transports.sqlite.wakeup")

    def later() -> None:
        time.sleep(0.1)
        other.publish(Outgoing("q", b"x", "m1"))
        backend.store_many([Record("t1", b"done", True)])

    try:
        thread = threading.Thread(target=later)
        thread.start()
        started = time.monotonic()
        got = broker.fetch(["q"], 1, 30.0)
        assert [d.message_id for d in got] == ["m1"]
        assert backend.wait("t1", 30.0) == b"done"
        assert time.monotonic() - started < BOUND    # the 5-100 ms poll, not a 1 s fallback loop
        assert broker.fetch(["q"], 1, 0.05) == []    # a second wait: no second warning
        thread.join()
    finally:
        broker.close()
        other.close()
        backend.close()
    warnings = [r for r in caplog.records if "wake-ups are off" in r.getMessage()]
    assert len(warnings) == 1
    assert (tmp_path / "ro.sqlite3.wake").read_text() == "not a directory"


def test_interrupt_ends_a_waiting_fetch_at_once(tmp_path):
    url = f"sqlite:///{tmp_path}/int.sqlite3"
    broker = make_broker(url, make_config())
    broker.declare(["q"])
    timer = threading.Timer(0.2, broker.interrupt)
    timer.start()
    started = time.monotonic()
    try:
        assert broker.fetch(["q"], 1, 60.0) == []
    finally:
        timer.cancel()
        broker.close()
    assert time.monotonic() - started < BOUND
    assert not os.listdir(f"{tmp_path}/int.sqlite3.wake")     # close() removed its socket


def test_delayed_message_is_fetched_when_due_not_at_the_fallback(tmp_path, monkeypatch):
    import greenq.transports.sqlite.broker as broker_mod
    monkeypatch.setattr(broker_mod, "FALLBACK", 60.0)
    url = f"sqlite:///{tmp_path}/eta.sqlite3"
    broker = make_broker(url, make_config())
    eta = time.time() + 0.3
    broker.publish(Outgoing("q", b"x", "later", eta=eta))
    started = time.monotonic()
    try:
        got = broker.fetch(["q"], 1, 60.0)
        returned = time.time()
    finally:
        broker.close()
    assert [d.message_id for d in got] == ["later"]
    assert returned >= eta                          # not before it was due
    assert time.monotonic() - started < BOUND       # and not at the (patched, 60 s) fallback


def test_long_database_path_binds_through_the_directory_descriptor(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    url = f"sqlite:///{deep}/long.sqlite3"
    waiter_broker, sender = make_broker(url, make_config()), make_broker(url, make_config())
    waiter_broker.declare(["q"])
    timer = threading.Timer(0.2, lambda: sender.publish(Outgoing("q", b"x", "m1")))
    timer.start()
    started = time.monotonic()
    try:
        got = waiter_broker.fetch(["q"], 1, 60.0)
        names = os.listdir(f"{deep}/long.sqlite3.wake")
    finally:
        timer.cancel()
        waiter_broker.close()
        sender.close()
    assert [d.message_id for d in got] == ["m1"]
    assert time.monotonic() - started < BOUND
    assert len(names) == 1 and names[0].startswith("m.")


def test_payload_names_the_queues():
    assert wakeup.relevant([wakeup.queues_payload(["a", "b"])], ["b"])
    assert not wakeup.relevant([wakeup.queues_payload(["a", "b"])], ["c"])
    assert wakeup.relevant([wakeup.queues_payload(["x" * 2000])], ["c"])      # too long: wakes all
    assert wakeup.relevant([wakeup.ALL], ["c"])
    assert not wakeup.relevant([], ["c"])


@pytest.mark.parametrize("driver_name", ["threads", "gevent", "eventlet"])
def test_wake_ups_under_each_driver(tmp_path, driver_name):
    """A patched process (gevent, eventlet) waits on the hub: its other
    greenlets keep running (the child checks) and a publish, then a result,
    wake it."""
    url = f"sqlite:///{tmp_path}/drv.sqlite3"
    directory = f"{tmp_path}/drv.sqlite3.wake"
    broker = make_broker(url, make_config())
    backend = make_backend(url, make_config())
    broker.declare(["q"])
    backend.get("t0")
    fetcher, waiter = _child(url, "fetch", driver_name), _child(url, "wait", driver_name)
    try:
        _wait_for_socket(directory, "m", fetcher)
        _wait_for_socket(directory, "r", waiter)
        time.sleep(0.2)
        broker.publish(Outgoing("q", b"x", "m1"))
        backend.store_many([Record("t1", b"done", True)])
        sent = time.time()
        fetched, waited = _answer(fetcher), _answer(waiter)
    finally:
        for child in (fetcher, waiter):
            child.kill()
            child.wait()
        broker.close()
        backend.close()
    assert fetched["got"] == ["m1"] and fetched["at"] - sent < BOUND
    assert waited["got"] == "done" and waited["at"] - sent < BOUND


def test_forked_child_binds_its_own_socket_and_leaves_the_parents(tmp_path):
    url = f"sqlite:///{tmp_path}/fork.sqlite3"
    directory = f"{tmp_path}/fork.sqlite3.wake"
    broker = make_broker(url, make_config())
    broker.declare(["q"])
    assert broker.fetch(["q"], 1, 0.05) == []
    (mine,) = os.listdir(directory)
    pid = os.fork()
    if pid == 0:      # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            broker.fetch(["q"], 1, 0.05)
            names = os.listdir(directory)
            ok = mine in names and any(f".{os.getpid()}." in n for n in names)
            broker.close()
            code = 0 if ok and os.listdir(directory) == [mine] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    try:
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.listdir(directory) == [mine]
        timer = threading.Timer(0.2, lambda: make_broker(url, make_config()).publish(Outgoing("q", b"x", "m1")))
        timer.start()
        assert [d.message_id for d in broker.fetch(["q"], 1, 60.0)] == ["m1"]    # still woken after the fork
    finally:
        broker.close()
