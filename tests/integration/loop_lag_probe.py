"""Run by test_loop_lag.py as ``python loop_lag_probe.py``: the loop-lag meter
(greenq/resources/lag.py) in a gevent-patched process, against the truth.

A child process is the downstream: per connection it reads a byte, holds it
``DELAY`` seconds, and answers with the moment (``time.monotonic``, one clock
for every process of the machine) it sent the answer.  Sampler green threads
each send, wait for the answer and note when they got it: the truth of their
lag is that moment less the server's.  Beside them, burner green threads take
the CPU in slices (``--burn`` ms, then a yield: a sleep(0), a timer, or a
socket's readiness), as a CPU-bound worker's other tasks do.  The meter's
reading of each sample (``LoopLag.begin``/``end``, as the resource pool's
connections take it) is compared with the truth.  Prints one JSON line per
scenario.
"""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import greenlet  # noqa: E402
from gevent.socket import wait_read  # noqa: E402

from greenq.resources.lag import LoopLag  # noqa: E402

DELAY = 0.005
SERVER = r"""
import socket, struct, sys, threading, time
delay = float(sys.argv[1])
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(64)
print(srv.getsockname()[1], flush=True)
def serve(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while conn.recv(1):
        time.sleep(delay)
        conn.sendall(struct.pack("!d", time.monotonic()))
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def scenario(port, meter, name, burners, burn_ms, yield_by, samplers, seconds):
    stop = time.monotonic() + seconds
    out = []

    def burner():
        a, b = socket.socketpair()
        while time.monotonic() < stop:
            until = time.perf_counter() + burn_ms / 1000.0
            while time.perf_counter() < until:
                pass
            if yield_by == "callback":
                gevent.sleep(0)
            elif yield_by == "timer":
                gevent.sleep(0.0005)
            else:
                b.send(b"x")
                wait_read(a.fileno())
                a.recv(1)
        a.close()
        b.close()

    def sampler():
        conn = socket.create_connection(("127.0.0.1", port))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while time.monotonic() < stop:
            mark = meter.begin()
            began = time.monotonic()
            conn.sendall(b"x")
            answer = conn.recv(8)
            back = time.monotonic()
            lag, low, high = meter.end_bounds(mark)
            sent, = struct.unpack("!d", answer)
            out.append((back - began, back - sent, lag, low, high))
        conn.close()

    gevent.joinall([gevent.spawn(burner) for _ in range(burners)]
                   + [gevent.spawn(sampler) for _ in range(samplers)])
    mean = statistics.mean
    slack = 0.0003      # the answer's trip through loopback, the clock reads
    return {
        "scenario": name, "samples": len(out),
        "latency_ms": mean(o[0] for o in out) * 1000,
        "truth_ms": mean(o[1] for o in out) * 1000,
        "meter_ms": mean(o[2] for o in out) * 1000,
        "low_ms": mean(o[3] for o in out) * 1000,
        "high_ms": mean(o[4] for o in out) * 1000,
        "within_bounds": sum(1 for o in out if o[3] - slack <= o[1] <= o[4] + slack) / len(out),
    }


def main():
    seconds = float(os.environ.get("LOOP_LAG_SECONDS", "2"))
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(DELAY)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        before = greenlet.gettrace()
        meter = LoopLag(gevent.get_hub())
        for args in (("pure I/O", 0, 0.0, "callback", 4),
                     ("burn, yield by sleep(0)", 8, 0.5, "callback", 4),
                     ("burn, yield by a timer", 8, 0.5, "timer", 4),
                     ("burn, yield by a socket", 8, 0.5, "socket", 4),
                     ("many, yield by a socket", 30, 0.1, "socket", 20)):
            print(json.dumps(scenario(port, meter, *args, seconds)), flush=True)
        meter.close()
        print(json.dumps({"trace_restored": greenlet.gettrace() is before}), flush=True)
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
