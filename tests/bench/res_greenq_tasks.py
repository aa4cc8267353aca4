"""greenq side of the resource-permit benchmarks (tests/bench/resources_*.py).
Configured by the greenq.ini the driver writes into the worker's folder;
$RESBENCH_PERMITS=1 gives `resbench.pg` its `resources={"pg": 1}`."""
import os

import res_bodies as bodies
from greenq import GreenQ

app = GreenQ.from_config(name="resbench")
_pg = {"resources": {"pg": 1}} if os.environ.get("RESBENCH_PERMITS") == "1" else {}
# $RESBENCH_POOL=permit (set for the workers only): connections that keep their
# permit while open; made at import, before the worker takes any permit
if os.environ.get("RESBENCH_POOL") == "permit":
    _permit_pool = app.resource_pool("pg", open=bodies.pg_connect)
    bodies.POOLS["permit"] = lambda: _permit_pool

pg = app.task(name="resbench.pg", ignore_result=True, **_pg)(bodies.pg_query)
hold = app.task(name="resbench.hold", ignore_result=True, **_pg)(bodies.hold_task)
slow = app.task(name="resbench.slow", ignore_result=True, resources={"slow": 1})(bodies.sleep_task)
free = app.task(name="resbench.free", ignore_result=True)(bodies.free_task)


@app.task(name="resbench.naive", ignore_result=True)
def naive(i, enq, sleep):
    """What a task does without the admission step: it takes its slot, then
    waits for the permit inside its body (app.resource holds the slot)."""
    with app.resource("slow"):
        bodies.sleep_task(i, enq, sleep)


@app.task(name="resbench.call", ignore_result=True, resources={"svc": 1})
def call(i, enq):
    bodies.call_service(i, enq, app)
