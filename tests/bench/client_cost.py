"""The caller's cost: one ``delay()`` against the raw client call of the same bytes.

    python tests/bench/client_cost.py [--broker redis://127.0.0.1:6379/15] [--n 5000]
                                      [--batches 10] [--instructions] [--json FILE]

In one plain (unpatched) process, against one server, it measures per call:

a. ``task.delay(1, "two", x=3.0)`` of a registered task with default options
   (``delay``), and of one with ``ignore_result=True`` (``delay ignore_result``);
b. the raw call that writes the same bytes: on Redis redis-py's ``xadd`` of
   the same fields (``b`` = the body greenq encodes, ``m`` = a task id) to the
   stream greenq writes (``P:q:default:0``); on RabbitMQ py-amqp's
   ``basic_publish`` of the same body and properties (message_id,
   delivery_mode 2) to the same queue, publisher confirms off on both sides;
c. ``app.enqueue_many`` of 1000 signatures (making them included: what a
   caller writes) against 1000 raw calls pipelined (redis-py
   ``pipeline(transaction=False)``; py-amqp: 1000 ``basic_publish``), per
   message;
d. with ``--instructions``: the instructions one ``delay()`` (and one raw
   call; with ``--instr-kinds`` also the parts of delay(), and enqueue_many
   and the raw pipeline per message) executes, counted by callgrind
   (valgrind); it prints ``client: instructions per delay()``, the figure
   tests/bench/test_client_cost_smoke.py tracks.  The script runs itself
   twice under ``valgrind --tool=callgrind --instr-atstart=no``, switches
   counting on around ``N`` calls with ``callgrind_control`` (as
   ``greenq-bench --instructions`` does in its workers) and takes the
   difference of two runs of different ``N`` divided by the difference of
   ``N``: what the switching costs cancels out.  A figure that other work on
   the machine does not move (the times above do: the machine is shared).

Timings alternate: ``--batches`` rounds, each timing a slice of every kind of
call, so a busy moment of the machine touches all of them alike.  The first
calls (connections, script loads, queue declarations) are made untimed.  What
the run wrote (keys, queues) is deleted at the end.  The last line printed is
one JSON object with every figure; docs/performance.md ("The caller's cost")
quotes them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ARGS, KWARGS = (1, "two"), {"x": 3.0}          # the small payload of every call
BULK = 1000                                   # messages per enqueue_many
COUNTED_BULK = 50                             # ... and per one counted with --instructions
PER_CALL = {"enqueue_many": COUNTED_BULK, "raw_pipelined": COUNTED_BULK}   # messages per counted call
KINDS = ("delay", "raw", "message", "publish", "enqueue_many", "raw_pipelined")


class Side:
    """The greenq app and the raw client of one broker, writing to the same place."""

    def __init__(self, url: str, prefix: str = "") -> None:
        os.environ.setdefault("GREENQ_AMQP_CONFIRM_PUBLISH", "false")   # confirms off on both sides
        from greenq import GreenQ
        self.url = url
        self.prefix = prefix or "gqcost-" + uuid.uuid4().hex[:8]
        self.app = GreenQ("cost", broker=url, key_prefix=self.prefix, config_file=False)
        self.task = self.app.task(name="cost.add")(_add)
        self.quiet = self.app.task(name="cost.add_quiet", ignore_result=True)(_add)
        self.amqp = url.startswith(("amqp", "pyamqp"))
        self.task.delay(*ARGS, **KWARGS)            # connects, registers the queue (untimed)
        msg = self.app.build_message(self.task.name, ARGS, KWARGS)
        self.body = self.app.codec.encode(msg)
        self.mid = msg.id
        if self.amqp:
            import amqp
            from greenq.transports.amqp.common import connection_params
            self.conn = amqp.Connection(**connection_params(url))
            self.conn.connect()
            self.channel = self.conn.channel()
            self.routing_key = self.app.broker.settings.queue_name("default")
            self.message = amqp.Message(self.body, message_id=self.mid, delivery_mode=2)
            self.raw = self._amqp_raw
            self.raw_many = self._amqp_raw_many
        else:
            import redis
            self.client = redis.Redis.from_url(url)
            self.stream = self.app.broker.streams("default")[9]     # priority 0
            self.fields = {"b": self.body, "m": self.mid}
            self.raw = self._redis_raw
            self.raw_many = self._redis_raw_many
        self.raw()

    def _redis_raw(self) -> None:
        self.client.xadd(self.stream, self.fields)

    def _redis_raw_many(self, count: int = BULK) -> None:
        pipe = self.client.pipeline(transaction=False)
        stream, fields = self.stream, self.fields
        for _ in range(count):
            pipe.xadd(stream, fields)
        pipe.execute()

    def _amqp_raw(self) -> None:
        self.channel.basic_publish(self.message, exchange="", routing_key=self.routing_key)

    def _amqp_raw_many(self, count: int = BULK) -> None:
        publish, message, key = self.channel.basic_publish, self.message, self.routing_key
        for _ in range(count):
            publish(message, exchange="", routing_key=key)

    def calls(self) -> Dict[str, Callable[[], None]]:
        """What ``--instructions`` can count: delay() and the raw call, the
        parts of delay() (building and encoding its message, no I/O; the
        broker's publish of the encoded message), and ``enqueue_many`` and the
        raw pipeline of COUNTED_BULK messages (``PER_CALL``: counted per message)."""
        app, task = self.app, self.task
        out = app.codec.outgoing(app.build_message(task.name, ARGS, KWARGS))
        return {"delay": self.delay, "raw": self.raw,
                "message": lambda: app.codec.outgoing(app.build_message(task.name, ARGS, KWARGS)),
                "publish": lambda: app.broker.publish(out),
                "enqueue_many": lambda: app.enqueue_many([task.s(*ARGS, **KWARGS) for _ in range(COUNTED_BULK)]),
                "raw_pipelined": lambda: self.raw_many(COUNTED_BULK)}

    def delay(self) -> None:
        self.task.delay(*ARGS, **KWARGS)

    def delay_quiet(self) -> None:
        self.quiet.delay(*ARGS, **KWARGS)

    def enqueue_many(self) -> None:
        task = self.task
        self.app.enqueue_many([task.s(*ARGS, **KWARGS) for _ in range(BULK)])

    def empty(self) -> None:
        """Drop what was written so far (between bulk rounds; untimed)."""
        if self.amqp:
            self.channel.queue_purge(self.routing_key)
        else:
            self.client.delete(*self.app.broker.streams("default"))

    def close(self) -> None:
        try:
            if self.amqp:
                self.conn.close()
            self.app.close()
        finally:
            sys.path.insert(0, HERE)
            from call_path import _clean
            _clean(self.url, self.prefix)


def _add(a: int, b: str, x: float = 0.0) -> str:
    return f"{a}{b}{x}"


def _stats(ns: List[int], per: int = 1) -> Dict[str, float]:
    us = [t / 1000.0 / per for t in ns]
    return {"mean_us": statistics.fmean(us), "median_us": statistics.median(us), "calls": len(us) * per}


def measure(side: Side, n: int, batches: int) -> Dict[str, Any]:
    singles: Dict[str, Callable[[], None]] = {"delay": side.delay, "delay ignore_result": side.delay_quiet,
                                              "raw": side.raw}
    bulks: Dict[str, Callable[[], None]] = {"enqueue_many": side.enqueue_many, "raw pipelined": side.raw_many}
    times: Dict[str, List[int]] = {k: [] for k in [*singles, *bulks]}
    clock = time.perf_counter_ns
    per_batch = max(1, n // batches)
    for _ in range(batches):
        for name, call in singles.items():
            out = times[name]
            for _ in range(per_batch):
                start = clock()
                call()
                out.append(clock() - start)
        side.empty()
        for name, call in bulks.items():
            start = clock()
            call()
            times[name].append(clock() - start)
            side.empty()
    result: Dict[str, Any] = {k: _stats(times[k]) for k in singles}
    result.update({k: _stats(times[k], BULK) for k in bulks})
    raw = result["raw"]
    for k in ("delay", "delay ignore_result"):
        result[k]["over_raw_us"] = result[k]["median_us"] - raw["median_us"]
        result[k]["raw_over_delay"] = raw["median_us"] / result[k]["median_us"]
    result["enqueue_many"]["raw_over_enqueue_many"] = \
        result["raw pipelined"]["median_us"] / result["enqueue_many"]["median_us"]
    return result


# -- instructions (callgrind) ------------------------------------------------------

def _callgrind(state: str) -> None:
    subprocess.run(["callgrind_control", f"--instr={state}", str(os.getpid())],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def count_child(url: str, kind: str, calls: int, prefix: str = "") -> None:
    """Under callgrind: ``calls`` calls of ``kind`` with counting on."""
    side = Side(url, prefix)
    try:
        call = side.calls()[kind]
        for _ in range(20):
            call()
        _callgrind("on")
        for _ in range(calls):
            call()
        _callgrind("off")
    finally:
        side.close()


def instructions(url: str, kind: str, low: int, high: int, prefix: str = "") -> float:
    """Instructions per call of ``kind``: (count(high) - count(low)) / (high - low)."""
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        raise SystemExit("--instructions needs valgrind and callgrind_control (apt-get install valgrind)")
    if kind in PER_CALL:                 # a call is COUNTED_BULK messages: a tenth of the calls
        low, high = max(1, low // 10), max(3, high // 10)
    counted = []
    folder = tempfile.mkdtemp(prefix="greenq-cost-")
    try:
        for calls in (low, high):
            out = os.path.join(folder, f"{kind}-{calls}.out")
            done = subprocess.run(
                ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                 sys.executable, os.path.abspath(__file__), "--broker", url,
                 "--count-child", kind, "--n", str(calls), *(["--prefix", prefix] if prefix else [])],
                capture_output=True, text=True, timeout=1800)
            found = re.findall(r"Collected : ([\d,]+)", done.stderr)
            if done.returncode != 0 or not found:
                raise SystemExit(f"callgrind run of {kind} x {calls} failed:\n{done.stderr[-2000:]}")
            counted.append(float(found[-1].replace(",", "")))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return (counted[1] - counted[0]) / (high - low) / PER_CALL.get(kind, 1)


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/15",
                        help="redis://... or pyamqp://... (amqp://...)")
    parser.add_argument("--n", type=int, default=5000, help="timed calls of each kind of single call")
    parser.add_argument("--batches", type=int, default=10,
                        help="rounds; each times n/batches single calls and one bulk of each kind")
    parser.add_argument("--instructions", action="store_true",
                        help="also count instructions per delay() and per raw call with callgrind")
    parser.add_argument("--instr-calls", type=int, default=200,
                        help="with --instructions: the counted runs make N and 3N calls")
    parser.add_argument("--instr-kinds", default="delay,raw",
                        help="with --instructions: what to count, of delay, raw, message (building "
                             "and encoding delay()'s message, no I/O), publish (the broker's "
                             "publish of an encoded message), enqueue_many and raw_pipelined (per "
                             f"message, {COUNTED_BULK} a call)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    parser.add_argument("--prefix", default="",
                        help="key prefix (Redis) or queue name prefix of what the run writes "
                             "(default: gqcost-<random>); deleted at the end")
    parser.add_argument("--count-child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.count_child:
        count_child(args.broker, args.count_child, args.n, args.prefix)
        return 0

    side = Side(args.broker, args.prefix)
    try:
        load = os.getloadavg()[0]
        out: Dict[str, Any] = {"broker": re.sub(r"//[^@/]*@", "//", args.broker), "n": args.n,
                               "loadavg_1min_before": load, "host": socket.gethostname(),
                               "python": sys.version.split()[0],
                               "greenq_file": sys.modules["greenq"].__file__,
                               "body_bytes": len(side.body), "results": measure(side, args.n, args.batches)}
    finally:
        side.close()
    if args.instructions:
        kinds = args.instr_kinds.split(",")
        for kind in kinds:
            if kind not in KINDS:
                parser.error(f"--instr-kinds: unknown {kind!r}; expected some of {', '.join(KINDS)}")
        out["instructions_per_call"] = ins = {
            kind: instructions(args.broker, kind, args.instr_calls, 3 * args.instr_calls, args.prefix)
            for kind in kinds}
        if "delay" in ins and "raw" in ins:
            ins["delay_over_raw"] = ins["delay"] - ins["raw"]
    res = out["results"]
    raw_name = "py-amqp basic_publish" if args.broker.startswith(("amqp", "pyamqp")) else "redis-py xadd"
    print(f"# {out['broker']}, body {out['body_bytes']} bytes, load {load:.2f}, greenq {out['greenq_file']}")
    print(f"{'call':<44} {'median us':>10} {'mean us':>10}")
    for key, label in (("delay", "delay()"), ("delay ignore_result", "delay(), ignore_result"),
                       ("raw", raw_name), ("enqueue_many", f"enqueue_many({BULK}), per msg"),
                       ("raw pipelined", f"{raw_name} x{BULK} pipelined, per msg")):
        print(f"{label:<44} {res[key]['median_us']:>10.1f} {res[key]['mean_us']:>10.1f}")
    print(f"delay() over the raw call: {res['delay']['over_raw_us']:+.1f} us (median); "
          f"ignore_result {res['delay ignore_result']['over_raw_us']:+.1f} us; "
          f"enqueue_many at {100 * res['enqueue_many']['raw_over_enqueue_many']:.0f} % of the raw pipeline")
    if args.instructions:
        ins = out["instructions_per_call"]
        print("instructions per call (callgrind): " + ", ".join(f"{k} {v:,.0f}" for k, v in ins.items()))
        if "delay_over_raw" in ins:     # the figure tracked (tests/bench/test_client_cost_smoke.py)
            print(f"client: instructions per delay() (callgrind) {ins['delay']:,.0f}, "
                  f"{ins['delay_over_raw']:+,.0f} over the raw call")
    if args.json:
        with open(args.json, "w") as dump:
            json.dump(out, dump, indent=2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
