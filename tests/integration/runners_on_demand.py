"""Run by test_runners_on_demand.py as ``python runners_on_demand.py gevent|eventlet``:
a real Worker in a process patched for a green driver, on the memory broker
and backend, whose runners are spawned on demand (greenq/worker/runners.py).

Checks, one after the other in one worker at ``-c 1000``: three tasks in
flight have three runners; a burst of 300 quick tasks spawns more, never
over the concurrency, and the runners left idle go (down to ``keep``) by the
worker's own trim; ``resize`` down retires idle runners and up lets exactly
the new concurrency run; a hard time limit kills a task whose runner was
spawned for it, and that runner goes on.  Prints OK and exits 0 on success.
"""
import sys

DRIVER = sys.argv[1]
if DRIVER == "gevent":
    from gevent import monkey
    monkey.patch_all()
else:
    import eventlet
    eventlet.monkey_patch()

import time  # noqa: E402
import uuid  # noqa: E402

from greenq import GreenQ  # noqa: E402
from greenq.drivers import get_driver  # noqa: E402
from greenq.exceptions import TimeLimitExceeded  # noqa: E402
from greenq.worker.consumer import Worker  # noqa: E402
from tests.conftest import make_config  # noqa: E402

driver = get_driver(DRIVER)
assert driver.is_patched(), f"{DRIVER} did not patch"
tag = uuid.uuid4().hex[:8]
app = GreenQ("ondemand", config=make_config(broker_url=f"memory://ondemand-{tag}",
                                            result_backend=f"memory://ondemand-{tag}", lease_seconds=1))
gate = driver.event()


@app.task(name="od.hold")
def hold():
    gate.wait(30)


@app.task(name="od.quick")
def quick(i):
    time.sleep(0.001)
    return i


@app.task(name="od.stuck", time_limit=0.3)
def stuck():
    time.sleep(30)


def until(check, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        driver.sleep(0.02)
    return True


worker = Worker(app, driver, queues=["default"], concurrency=1000, shutdown_timeout=5.0)
runners = worker.runners
assert runners.on_demand, "a green driver spawns runners on demand"
done = driver.event()


def run():
    try:
        worker.run()
    finally:
        done.set()


driver.spawn(run)
assert until(lambda: runners.target == 1000), "the worker did not start"
assert len(runners.all) == 0 and runners.count == 0, f"{len(runners.all)} runners before any work"

# three tasks in flight: three runners, not 1000
holds = [hold.delay() for _ in range(3)]
assert until(lambda: len(worker.running) == 3), f"running {len(worker.running)}"
assert len(runners.all) == 3 == runners.count, f"{len(runners.all)} runners for 3 tasks in flight"
gate.set()
assert until(lambda: worker.stats.succeeded == 3), worker.stats.as_dict()
gate.clear()

# a burst: more runners, at most the concurrency; they go once idle, down to keep
results = [quick.delay(i) for i in range(300)]
assert until(lambda: worker.stats.succeeded == 303, 60), worker.stats.as_dict()
assert [r.get(timeout=10) for r in results] == list(range(300))
peak = len(runners.all)
assert 3 <= peak <= 1000, peak
runners.keep = 2
runners.idle_seconds = 0.05
assert until(lambda: len(runners.all) == 2 == runners.count == runners.idle), (
    f"{len(runners.all)} runners left, count {runners.count}, idle {runners.idle} (peak {peak})")
runners.keep, runners.idle_seconds = 10, 3600.0

# resize: down retires idle runners; up lets the new concurrency run, no more
worker.resize(1)
assert until(lambda: len(runners.all) == 1 == runners.count), f"{len(runners.all)} runners after resize(1)"
worker.resize(5)
holds = [hold.delay() for _ in range(6)]
assert until(lambda: len(worker.held) == 6 and len(worker.running) == 5), (
    f"held {len(worker.held)}, running {len(worker.running)}")
assert len(runners.all) == 5 == runners.count and worker.runq.qsize() == 1, (
    f"{len(runners.all)} runners, {worker.runq.qsize()} queued at -c 5 with 6 tasks")
gate.set()
assert until(lambda: worker.stats.succeeded == 309), worker.stats.as_dict()
worker.resize(1000)

# a hard time limit fires in a runner spawned for its task; the runner goes on
before = len(runners.all)
killed = stuck.delay()
try:
    killed.get(timeout=10)
except TimeLimitExceeded:
    pass
else:
    raise AssertionError("the stuck task was not killed by its time limit")
assert len(runners.all) == runners.count <= before + 1
assert quick.delay(7).get(timeout=10) == 7

worker.request_stop()
assert done.wait(20), "the worker did not stop"
assert worker.exit_code == 0 and len(runners.all) == 0, (worker.exit_code, len(runners.all))
print("OK")
