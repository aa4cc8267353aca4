"""Tasks of tests/e2e/test_resources_handoff_e2e.py, imported by a real
green worker (``-A handoff_tasks``) and by the unpatched client side.

``res.hand`` holds the one permit of ``[resource:hand]`` (process scope) and
a connection of ``app.resource_pool("hand")`` (made in the worker: a client
process has no ``[resource:hand]`` section to check it against), so the
permit is parked with the idle connection when the task ends and taken by
the next task.  Each task returns how many greenlet switches the worker
process had made when its body began and when it ended
(``greenlet.settrace``): between one task's end and the next one's start,
0 switches means the permit went on without a pass of the hub."""
import time

from greenq import GreenQ

app = GreenQ.from_config(name="handoff")
SWITCHES = [0]
POOL = []


def _count(event, args):
    if event in ("switch", "throw"):
        SWITCHES[0] += 1


@app.on("worker_process_init")
def _setup(worker):
    import greenlet
    greenlet.settrace(_count)
    POOL.append(app.resource_pool("hand", open=object, close=lambda conn: None))


@app.task(name="res.hand", resources={"hand": 1}, acks_late=True)
def hand(n):
    """(n, switches at its start, at its end, monotonic start, end)."""
    began, at = SWITCHES[0], time.monotonic()
    with POOL[0].connection():
        time.sleep(0.002)            # the downstream's time: the hub runs the others meanwhile
    return n, began, SWITCHES[0], at, time.monotonic()


@app.task(name="res.busy")
def busy(seconds):
    """Keep the hub busy: about 1 ms of CPU, then let the others run, for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        deadline = time.monotonic() + 0.001
        while time.monotonic() < deadline:
            pass
        time.sleep(0)
    return seconds


@app.task(name="res.handoffs")
def handoffs():
    """(parked permits the next holder took, their mean seconds parked)."""
    return POOL[0].handoffs()
