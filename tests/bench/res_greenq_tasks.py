"""greenq side of the resource-permit benchmarks (tests/bench/resources_*.py).
Configured by the greenq.ini the driver writes into the worker's folder;
$RESBENCH_PERMITS=1 gives `resbench.pg` its `resources={"pg": 1}`."""
import os
import time

import res_bodies as bodies
from greenq import GreenQ

app = GreenQ.from_config(name="resbench")
_pg = {"resources": {"pg": 1}} if os.environ.get("RESBENCH_PERMITS") == "1" else {}
# $RESBENCH_POOL=permit (set for the workers only): connections that keep their
# permit while open; made at import, before the worker takes any permit
if os.environ.get("RESBENCH_POOL") == "permit":
    _permit_pool = app.resource_pool("pg", open=bodies.pg_connect)
    bodies.POOLS["permit"] = lambda: _permit_pool



def _traced(i, enq, sleep):
    """pg_query, and every 10th task the adaptive limit's state in this
    process ($RESBENCH_TRACE=1: resources_pg.py --trace)."""
    try:
        bodies.pg_query(i, enq, sleep)
    finally:
        if i % 10 == 0:
            permits = app.permits()
            pool = permits.pool("pg")
            adaptive = permits.adaptive.get("pg")
            state = ("-", "-", "-", "-") if adaptive is None else (
                f"{adaptive._estimate:.1f}", f"{(adaptive.rtt_noload or 0) * 1000:.2f}", int(adaptive.probing),
                "/".join(f"{x:.4g}" for x in adaptive.last_window))
            parked = pool.parked() if hasattr(pool, "parked") else 0
            decisions = "" if adaptive is None else ",".join(f"{k}={v}" for k, v in sorted(adaptive.decisions.items()))
            meter = permits.lag
            if meter is not None and meter.resumes:   # the loop lag met per resume: mean ms (low/estimate/high)
                decisions += (f" lag_ms={meter.total_low / meter.resumes * 1000:.2f}/"
                              f"{meter.total / meter.resumes * 1000:.2f}/{meter.total_high / meter.resumes * 1000:.2f}"
                              f",resumes={meter.resumes}")
            if hasattr(pool, "handoffs"):       # parked permits taken, and their mean ms parked
                reused, mean = pool.handoffs()
                decisions += f" parked_taken={reused},mean_parked_ms={mean * 1000:.2f}"
            bodies._client().rpush(f"{bodies.PREFIX}:trace", " ".join(map(str, (
                f"{time.time():.3f}", os.getpid(), pool.limit, pool.in_use(), parked) + state + (decisions,))))


pg = app.task(name="resbench.pg", ignore_result=True, **_pg)(
    _traced if os.environ.get("RESBENCH_TRACE") == "1" else bodies.pg_query)
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
