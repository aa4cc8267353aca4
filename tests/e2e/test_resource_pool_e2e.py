"""app.resource_pool in real workers (greenq/resources/connections.py): two
gevent worker processes share `[resource:conn] limit = 4, scope = cluster` on
the SQLite broker; each task sends one line over a TCP connection from the
pool.  The downstream is a local TCP server in this process that counts, from
its side, the connections open at once and the connections ever accepted:
never more open than the limit, and far fewer accepted than tasks (the
connections were kept between tasks with their permits); none left open
once the workers stopped."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.e2e.test_docs_resources import run_example

pytestmark = pytest.mark.e2e

LIMIT = 4
TASKS = 200

TASKS_PY = '''
import os
import socket

from greenq import GreenQ

app = GreenQ.from_config(name="rpool")


def connect():
    return socket.create_connection(("127.0.0.1", int(os.environ["RPOOL_PORT"])), timeout=30)


conns = app.resource_pool("conn", open=connect)


@app.task(resources={"conn": 1})
def echo(n):
    with conns.connection() as s:
        s.sendall(f"{n}\\n".encode())
        answer = b""
        while not answer.endswith(b"\\n"):
            chunk = s.recv(64)
            if not chunk:
                raise ConnectionError("closed")
            answer += chunk
        return int(answer)
'''

EXAMPLE = f'''
from tasks import echo
pending = [echo.delay(n) for n in range({TASKS})]
assert [r.get(timeout=120) for r in pending] == list(range({TASKS}))
'''


class Server:
    def __init__(self):
        self.lock = threading.Condition()
        self.open = self.most = self.accepted = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.open += 1
                self.accepted += 1
                self.most = max(self.most, self.open)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        try:
            reader = conn.makefile("rb")
            for line in reader:
                time.sleep(0.01)
                conn.sendall(line)
        except OSError:
            pass
        finally:
            conn.close()
            with self.lock:
                self.open -= 1
                self.lock.notify_all()


def test_connections_keep_their_permits_across_two_workers(tmp_path):
    server = Server()
    (tmp_path / "greenq.ini").write_text(f"[resource:conn]\nlimit = {LIMIT}\nscope = cluster\n")
    (tmp_path / "tasks.py").write_text(TASKS_PY)
    said = run_example(tmp_path, EXAMPLE, {"RPOOL_PORT": str(server.port)}, workers=2)
    assert 1 <= server.most <= LIMIT, (server.most, said)
    assert server.accepted <= TASKS // 4, f"{server.accepted} connections for {TASKS} tasks: not kept"
    with server.lock:                                       # the server's threads see the EOFs
        assert server.lock.wait_for(lambda: server.open == 0, timeout=10), \
            f"a stopped worker left {server.open} connections open"
    server.sock.close()
