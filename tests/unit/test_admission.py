"""The admission step (greenq/worker/admission.py): RUN, WAIT and DEFER, waiters
in arrival order, release after the task, and the rate limiter on it (a task
waiting for its turn holds no runner slot)."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace as NS

from greenq import GreenQ
from greenq.drivers import get_driver
from greenq.worker.admission import RUN, Admission, AdmissionStep, RateLimit, defer, wait
from greenq.worker.consumer import Worker
from greenq.worker.jobs import Job

FETCH_TIMEOUT = 0.1


def job(task="t", n=0):
    j = Job(NS(message_id=f"m{n}", body=b"", queue="default"))
    j.msg = NS(task=task, id=f"id{n}", eta=None)
    j.task = NS(name=task, option=lambda key: None)
    return j


class Gate(AdmissionStep):
    """A step with one permit per key: WAIT while it is taken; release frees it
    and wakes the next waiter."""
    name = "gate"

    def __init__(self):
        super().__init__()
        self.taken = set()
        self.asked = []
        self.released = []

    def key(self, job):
        return job.msg.task

    def admit(self, job):
        self.asked.append(job.msg.id)
        if job.msg.task in self.taken:
            return wait()
        self.taken.add(job.msg.task)
        return RUN

    def release(self, job):
        self.released.append(job.msg.id)
        self.taken.discard(job.msg.task)
        self.wake(job.msg.task)


def make(steps=()):
    ran, deferred = [], []
    admission = Admission(get_driver("threads"), run=ran.append, defer=lambda j, eta: deferred.append((j, eta)),
                          steps=steps)
    return admission, ran, deferred


def test_run_wait_and_wake_in_arrival_order():
    gate = Gate()
    admission, ran, _ = make([gate])
    a, b, c, other = job(n=1), job(n=2), job(n=3), job("u", n=4)
    for j in (a, b, c, other):
        admission.offer(j)
    assert ran == [a, other]                 # b and c wait; another key is not held up
    assert admission.parked == 2
    assert gate.asked == ["id1", "id2", "id4"]   # c parked behind b without asking the step
    admission.release(a)
    assert gate.released == ["id1"] and a.admitted is None
    admission.serve()                        # the admission loop's turn
    assert ran == [a, other, b] and admission.parked == 1
    admission.release(b)
    admission.serve()
    assert ran == [a, other, b, c] and admission.parked == 0
    admission.release(a)                     # released once only
    assert gate.released == ["id1", "id2"]


def test_wait_until_a_time_and_the_loop_offers_again():
    class Later(AdmissionStep):
        name = "later"

        def __init__(self):
            super().__init__()
            self.until = time.monotonic() + 0.2

        def key(self, job):
            return "k"

        def admit(self, job):
            return RUN if time.monotonic() >= self.until else wait(until=self.until)
    start = time.monotonic()             # before the step sets its time (a loaded machine may pause between)
    admission, ran, _ = make([Later()])
    loop = threading.Thread(target=admission.loop)
    loop.start()
    try:
        admission.offer(job())
        assert ran == []
        deadline = time.monotonic() + 5
        while not ran and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(ran) == 1 and time.monotonic() - start >= 0.19
    finally:
        assert admission.close() == []
        loop.join(5)
    assert not loop.is_alive()


def test_defer_releases_what_earlier_steps_hold_and_skips_later_steps():
    gate = Gate()

    class Later(AdmissionStep):
        name = "defer"

        def key(self, job):
            return "k"

        def admit(self, job):
            return defer(eta=1234.5)
    never = Gate()
    admission, ran, deferred = make([gate, Later(), never])
    j = job()
    admission.offer(j)
    assert ran == [] and deferred == [(j, 1234.5)]
    assert gate.released == ["id0"] and never.asked == []


def test_steps_that_do_not_concern_a_job_are_passed_without_admit():
    class NotMine(Gate):
        def key(self, job):
            return None
    step = NotMine()
    admission, ran, _ = make([step])
    j = job()
    admission.offer(j)
    assert ran == [j] and step.asked == [] and j.admitted is None


def test_close_returns_the_parked_jobs():
    gate = Gate()
    admission, ran, _ = make([gate])
    a, b = job(n=1), job(n=2)
    admission.offer(a)
    admission.offer(b)
    assert admission.close() == [b]


def test_rate_limit_spaces_starts_and_declares_its_options():
    now = [100.0]
    step = RateLimit(clock=lambda: now[0])
    j = job()
    j.task = NS(name="t", option=lambda key: "2/s" if key == "rate_limit" else None)
    assert step.key(j) == "t" and step.task_options == ("rate_limit",) and step.ini_keys == ("rate_limit",)
    assert step.admit(j) is RUN
    second = step.admit(j)
    assert second.kind == "wait" and second.until == 100.5
    now[0] = 100.5
    assert step.admit(j) is RUN
    step.set("t", None)                                     # greenq control rate-limit t 0
    assert step.key(j) is None
    step.set("t", "1/s")
    assert step.admit(j) is RUN and step.admit(j).until == 101.5


def test_a_rate_limited_task_waits_without_a_slot():
    """One runner, three tasks at 2/s and five others: the others run while
    the limited ones wait for their turn (they used to sleep in the only
    runner); the limited ones start at least 0.5 s apart, in arrival order.
    (The waiting ones are held: they count against prefetch, hence 10.)"""
    app = GreenQ("adm", broker=f"memory://adm-{time.monotonic_ns()}")
    events = []

    @app.task(rate_limit="2/s")
    def limited(n):
        events.append(("limited", n, time.monotonic()))

    @app.task
    def quick(n):
        events.append(("quick", n, time.monotonic()))
    for n in range(3):
        limited.delay(n)
    for n in range(5):
        quick.delay(n)
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=1, prefetch=10, burst=True,
                    fetch_timeout=FETCH_TIMEOUT)
    assert worker.admission.step("rate_limit") is not None
    assert worker.run() == 0
    assert worker.stats.succeeded == 8
    starts = [t for kind, _, t in events if kind == "limited"]
    assert [n for kind, n, _ in events if kind == "limited"] == [0, 1, 2]
    assert all(b - a >= 0.49 for a, b in zip(starts, starts[1:])), starts
    last_quick = max(t for kind, _, t in events if kind == "quick")
    assert last_quick < starts[1], events          # the quick ones did not wait behind limited 1


def test_control_rate_limit_sets_a_first_limit_on_a_running_worker():
    """``set_rate_limit`` adds the step to a worker started without one."""
    app = GreenQ("adm2", broker=f"memory://adm2-{time.monotonic_ns()}")

    @app.task
    def tick():
        return time.monotonic()
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=3, burst=True,
                    fetch_timeout=FETCH_TIMEOUT)
    assert not worker.admission
    worker.set_rate_limit(tick.name, "5/s")
    results = [tick.delay() for _ in range(3)]
    began = time.monotonic()
    assert worker.run() == 0
    starts = sorted(r.get(timeout=5) for r in results)
    # the third admission comes 2 x 0.2 s after the first, which is after began;
    # (between two starts the spacing can look shorter when the first start was late)
    assert starts[-1] - began >= 0.39, (began, starts)
    try:
        worker.set_rate_limit(tick.name, "fast")
    except Exception as exc:
        assert "N/s" in str(exc)
    else:
        raise AssertionError("a bad rate was accepted")


def test_a_deferred_task_comes_back_from_the_broker_and_runs():
    app = GreenQ("adm3", broker=f"memory://adm3-{time.monotonic_ns()}")

    @app.task
    def once():
        return "ran"

    class Once(AdmissionStep):
        name = "once"
        seen = []

        def key(self, job):
            return "k"

        def admit(self, job):
            self.seen.append(job.msg.eta)
            return defer(time.time() + 0.3) if len(self.seen) == 1 else RUN
    result = once.delay()
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=1, burst=True,
                    fetch_timeout=FETCH_TIMEOUT)
    worker.add_admission_step(Once())
    assert worker.run() == 0
    assert result.get(timeout=5) == "ran"
    assert len(Once.seen) == 2 and Once.seen[0] is None and Once.seen[1] is not None
    assert worker.stats.succeeded == 1


def test_each_steps_declared_options_and_ini_keys_are_checked_settings():
    """What a step declares it reads is a task option the decorator checks
    (validation.TASK_OPTION_RULES) and, for INI keys, a [task:NAME] key."""
    from greenq import validation
    from greenq.config import CODE_ONLY_TASK_OPTIONS, TASK_SETTINGS
    from greenq.resources.step import Permits
    for step in (RateLimit, Permits):
        assert step.task_options, step
        for option in step.task_options:
            assert option in validation.TASK_OPTION_RULES, (step, option)
            assert option in TASK_SETTINGS or option in CODE_ONLY_TASK_OPTIONS, (step, option)
        for key in step.ini_keys:
            assert key in TASK_SETTINGS and key in step.task_options, (step, key)


def test_a_wait_until_a_time_said_in_a_runner_wakes_the_loop():
    """A step that ``reserves_runner`` is asked in a free runner (``take``);
    when it says WAIT until a time (a host or cluster permit: ask again in
    10-75 ms), the admission loop, asleep for up to IDLE_WAIT (1 s) with
    nothing due, must be woken to look at that time.  It was not: a refused
    host-scope waiter was asked again a second later, not at its poll, and
    a permit of limit 1 shared by two worker processes stood idle most of
    the time."""
    class Remote(AdmissionStep):
        name = "remote"
        reserves_runner = True

        def key(self, job):
            return "k"

        def admit(self, job):
            return wait(until=time.monotonic() + 0.05)
    admission, ran, _ = make([Remote()])
    admission.pull = True
    admission.offer(job())
    assert len(ran) == 1 and ran[0] is not None      # a TAKE for a free runner
    admission._event.clear()                         # the loop went to sleep with nothing due
    assert admission.take(token=True) is None        # the runner asked: not yet, until a time
    assert admission._event.is_set()                 # ... and the loop is told to look at it
    assert admission.parked == 1
