"""Concurrent publishers with confirms: ``delay()`` msg/s from 1 thread and from 50.

    python tests/bench/amqp_confirms.py [--amqp-url amqp://guest:guest@127.0.0.1:5672]
                                        [--n 400] [--threads 1,50] [--repeat 3]
                                        [--greenq-ref 10ff7e6] [--ceiling] [--json FILE]
    python tests/bench/amqp_confirms.py --lone 1500     # a lone caller, old path against new

With ``[amqp] confirm_publish = true`` (the default) each ``delay()`` returns
once RabbitMQ confirmed its message.  Each measurement is a fresh process
(plain threads, no monkey-patching) in which ``T`` threads each call
``task.delay()`` ``N`` times at once, after one untimed ``delay()`` that
connects and declares; the figure is ``T * N`` over the time from the start
signal to the last thread's end; beside it the process's CPU time per message (user +
system, all threads), which other work on the machine moves less.  ``--greenq-ref`` also measures greenq at that
commit (``git archive`` into a temporary directory), alternating with this
tree run by run, so a busy moment of the shared machine touches both alike.
The run makes a vhost of its own with ``rabbitmqctl`` and deletes it at the end.
The last line printed is one JSON object with every figure.

``--ceiling`` also measures, once a repeat, what RabbitMQ gives callers
that cost nothing: one thread of this tree writes as many ready publishes as
the largest thread count at once on a confirmed publisher of its own and
waits for all their confirms, again and again (``T * N`` messages): the most
the threads could reach on this machine at that moment, beside the lone
caller's rate (the ratio a perfect client would show).

``--lone N`` times instead a lone caller in this tree, in one process: N
times, alternately, one confirmed publish through a publisher of the pool of
its own (``pool.run``: the path every ``delay()`` took before, still the one
of a first publish to a queue) and one through the shared publisher
(``ChannelPool.publish_confirmed``); prints p50, p90 and mean of each.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Dict, List
from urllib.parse import quote

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def child(url: str, threads: int, n: int) -> None:
    """One measurement, in this process: print msg/s."""
    from greenq import GreenQ
    app = GreenQ("confirms", broker=url, key_prefix="gqconf", config_file=False)
    task = app.task(name="confirms.noop", ignore_result=True)(lambda: None)
    task.delay()      # connects, declares (untimed)
    go = threading.Event()
    errors: List[BaseException] = []

    def run() -> None:
        go.wait()
        try:
            for _ in range(n):
                task.delay()
        except BaseException as exc:   # reported below
            errors.append(exc)

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    time.sleep(0.2)    # every thread waiting on the event
    cpu = time.process_time()
    start = time.perf_counter()
    go.set()
    for t in pool:
        t.join()
    took = time.perf_counter() - start
    cpu = time.process_time() - cpu
    app.close()
    if errors:
        raise SystemExit(f"{len(errors)} thread(s) failed: {errors[0]!r}")
    print(json.dumps({"msg_s": threads * n / took, "cpu_us": cpu / (threads * n) * 1e6}))


def lockstep(url: str, batch: int, n: int) -> None:
    """The ``--ceiling`` measurement, in this process: one thread, no
    ``delay()``, ``batch`` ready publishes written at once on a confirmed
    publisher of its own, then every confirm of them awaited, ``n`` in all:
    what RabbitMQ gives ``batch`` callers that cost nothing and always
    publish together.  Prints msg/s."""
    from greenq.brokers import Outgoing, make_broker
    from greenq.transports.amqp.publish import encode_outgoing
    from tests.conftest import make_config
    broker: Any = make_broker(url, make_config(broker_url=url, amqp__confirm_publish=True, key_prefix="gqconf"))
    broker.publish(Outgoing("ceiling", b"x", "warm", 0, None))     # declares (untimed)
    calls = [encode_outgoing(Outgoing("ceiling", b"x" * 60, uuid.uuid4().hex, 0, None), 0.0, broker.settings)
             for _ in range(batch)]

    def run(pub: Any) -> None:
        for call in calls:
            pub.publish_raw(*call)
        nacked, returned = pub.wait_confirms()
        if nacked or returned:
            raise SystemExit("a lockstep batch was not confirmed")
    done = 0
    start = time.perf_counter()
    while done < n:
        broker.pool.run(run)
        done += batch
    took = time.perf_counter() - start
    broker.close()
    print(json.dumps({"msg_s": done / took}))


def lone(url: str, n: int) -> None:
    """The ``--lone`` comparison (this tree, one process, one thread)."""
    import statistics
    sys.path.insert(0, ROOT)
    from greenq.brokers import Outgoing, make_broker
    from tests.conftest import make_config
    broker: Any = make_broker(url, make_config(broker_url=url, amqp__confirm_publish=True))
    broker.publish(Outgoing("lone", b"x", "warm", 0, None))     # declares (untimed)
    old: List[float] = []
    new: List[float] = []
    for _ in range(n):
        m = Outgoing("lone", b"x" * 60, uuid.uuid4().hex, 0, None)
        t0 = time.perf_counter()
        broker.pool.run(broker._publish, [m])
        t1 = time.perf_counter()
        broker._publish_shared(m)
        new.append(time.perf_counter() - t1)
        old.append(t1 - t0)
    figures = {}
    for name, xs in (("own publisher (before)", old), ("shared publisher (after)", new)):
        xs.sort()
        figures[name] = {"p50_us": round(xs[len(xs) // 2] * 1e6), "p90_us": round(xs[int(len(xs) * 0.9)] * 1e6),
                         "mean_us": round(statistics.mean(xs) * 1e6)}
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in figures[name].items()))
    broker.close()
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(json.dumps({"lone": figures, "n": n, "loadavg": [round(x, 2) for x in load]}))


def measure(src: str, url: str, threads: int, n: int) -> Dict[str, float]:
    env = dict(os.environ, PYTHONPATH=src, GREENQ_AMQP_CONFIRM_PUBLISH="true")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", url, str(threads), str(n)],
                         env=env, cwd=src, capture_output=True, text=True, timeout=170)
    if out.returncode:
        raise SystemExit(f"measurement failed ({src}, {threads} threads): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_ceiling(url: str, batch: int, n: int) -> float:
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--ceiling-child", url, str(batch), str(n)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=170)
    if out.returncode:
        raise SystemExit(f"the lockstep measurement failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["msg_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672")
    p.add_argument("--n", type=int, default=400, help="delay() calls per thread")
    p.add_argument("--threads", default="1,50")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--greenq-ref", default=None, help="also measure greenq at this commit")
    p.add_argument("--json", default=None)
    p.add_argument("--lone", type=int, default=0, metavar="N", help="time a lone caller instead (see above)")
    p.add_argument("--ceiling", action="store_true",
                   help="also measure, each repeat, the lockstep ceiling: batches of the largest thread "
                        "count written at once and confirmed, from one thread of this tree (see above)")
    args = p.parse_args()
    vhost = f"greenq-confirms-{os.getpid()}"
    subprocess.run(["rabbitmqctl", "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
                   check=True, capture_output=True)
    url = f"{args.amqp_url.rstrip('/')}/{quote(vhost, safe='')}"
    tmp = None
    sides: Dict[str, str] = {"this tree": ROOT}
    try:
        if args.lone:
            lone(url, args.lone)
            return
        if args.greenq_ref:
            tmp = tempfile.mkdtemp(prefix="greenq-ref-")
            archive = subprocess.run(["git", "-C", ROOT, "archive", args.greenq_ref], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            sides = {args.greenq_ref: tmp, "this tree": ROOT}
        counts = [int(t) for t in args.threads.split(",")]
        figures: Dict[str, Dict[str, List[float]]] = {s: {str(t): [] for t in counts} for s in sides}
        cpu: Dict[str, Dict[str, List[float]]] = {s: {str(t): [] for t in counts} for s in sides}
        ceiling: List[int] = []
        for _ in range(args.repeat):
            for name, src in sides.items():
                for threads in counts:
                    got = measure(src, url, threads, args.n)
                    figures[name][str(threads)].append(round(got["msg_s"]))
                    cpu[name][str(threads)].append(round(got["cpu_us"]))
            if args.ceiling:
                ceiling.append(round(measure_ceiling(url, max(counts), max(counts) * args.n)))
        load = os.getloadavg()
        for name in sides:
            line = ", ".join(f"{t} thread(s) {figures[name][str(t)]} msg/s" for t in counts)
            if len(counts) == 2:
                ratios = [b / a for a, b in zip(figures[name][str(counts[0])], figures[name][str(counts[1])])]
                line += f"; {counts[1]}/{counts[0]}: " + ", ".join(f"{r:.1f}x" for r in ratios)
            print(f"{name}: {line}")
            print("    client CPU per message, us: " + ", ".join(f"{t} thread(s) {cpu[name][str(t)]}"
                                                             for t in counts))
        if ceiling:
            print(f"lockstep ceiling, batches of {max(counts)} from one thread: {ceiling} msg/s; over "
                  f"{counts[0]} thread(s) of this tree: " + ", ".join(
                      f"{c / a:.1f}x" for c, a in zip(ceiling, figures["this tree"][str(counts[0])])))
        result = {"figures": figures, "cpu_us": cpu, "n": args.n, "loadavg": [round(x, 2) for x in load],
                  "id": uuid.uuid4().hex[:8], "lockstep_ceiling": ceiling}
        print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        print(json.dumps(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True)
        if tmp:
            subprocess.run(["rm", "-rf", tmp])


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) == 5 and sys.argv[1] == "--ceiling-child":
        sys.path.insert(0, ROOT)
        lockstep(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
