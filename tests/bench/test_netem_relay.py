"""bin/greenq-netem-bench's delaying relay (``--relay``, the part that needs
no root): it forwards both ways in order, holds each chunk half the asked
delay each way, and counts per peer the chunks each way and the round trips
(the RabbitMQ rows' "worker round trips per task").  On 127.0.0.1 only, in
front of an echo server of the test's own."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "bin", "greenq-netem-bench")

pytestmark = [pytest.mark.bench, pytest.mark.timeout(60)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Echo:
    """Answers every chunk with ``re:`` + the chunk."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    @staticmethod
    def answer(conn):
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(b"re:" + data)


def exchange(sock, data):
    sock.sendall(data)
    want, got = len(data) + 3, b""
    while len(got) < want:
        chunk = sock.recv(65536)
        assert chunk, "the relay closed the connection"
        got += chunk
    return got


@pytest.mark.parametrize("delay_ms", [0, 40])
def test_the_relay_forwards_delays_and_counts_round_trips(tmp_path, delay_ms):
    echo = Echo()
    port, counts = free_port(), tmp_path / "counts.json"
    relay = subprocess.Popen([sys.executable, SCRIPT, "--relay", f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}",
                              str(delay_ms), "--relay-counts", str(counts)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), 1)
                break
            except OSError:
                assert relay.poll() is None, relay.stdout.read()
                assert time.monotonic() < deadline, "the relay did not listen"
                time.sleep(0.05)
        with sock:
            took = []
            for i in range(3):
                start = time.monotonic()
                assert exchange(sock, f"ping{i}".encode()) == f"re:ping{i}".encode()
                took.append(time.monotonic() - start)
        # never faster than asked (half the delay each way; its timers only add)
        assert min(took) >= delay_ms / 1000.0
        deadline = time.monotonic() + 10
        while True:       # written every 0.2 s
            seen = json.loads(counts.read_text()) if counts.exists() else {}
            if seen.get("127.0.0.1", [0])[0] >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        up, down, round_trips, methods_up, methods_down = seen["127.0.0.1"]
        assert (up, down, round_trips) == (3, 3, 3)
        assert (methods_up, methods_down) == (0, 0)      # not asked to read AMQP
    finally:
        relay.terminate()
        relay.wait(10)
        echo.sock.close()


def method(channel, payload):
    return bytes([1]) + channel.to_bytes(2, "big") + len(payload).to_bytes(4, "big") + payload + b"\xce"


def test_the_relay_counts_amqp_method_frames_each_way():
    """``--relay-amqp``: the method frames from the peer (after its protocol
    header) and to it, whichever way TCP cut them; content frames not counted."""
    from importlib.machinery import SourceFileLoader
    import types
    loader = SourceFileLoader("netem_bench", SCRIPT)
    netem = types.ModuleType(loader.name)
    netem.__file__ = SCRIPT
    loader.exec_module(netem)
    header = bytes([2]) + (1).to_bytes(2, "big") + (14).to_bytes(4, "big") + bytes(14) + b"\xce"
    stream = b"AMQP\x00\x00\x09\x01" + method(0, b"\x00\x0a\x00\x0b" + b"x" * 30) + method(1, b"\x00\x3c\x00\x50" + bytes(9)) \
        + header + method(1, b"\x00\x3c\x00\x28" + bytes(20))
    for cut in (1, 3, 7, 11, len(stream)):                # every split of the stream counts the same
        counter, found = netem.AmqpMethods(8), 0
        for i in range(0, len(stream), cut):
            found += counter.feed(stream[i:i + cut])
        assert found == 3, cut
    broken = netem.AmqpMethods(0)
    assert broken.feed(b"GET / HTTP/1.1\r\n\r\n") == 0 and not broken.ok    # not AMQP: stops counting
