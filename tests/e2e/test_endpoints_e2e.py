"""The HTTP endpoints under attack, with real processes: a worker's --http, a
``--processes 2`` supervisor's endpoint and ``greenq dashboard`` keep
answering within 1 s while 1,000 idle and half-open connections are held
open against them; the dashboard's answers are strict JSON, it refuses a
foreign Host or Origin, checks its query parameters and reads dead letters
as bounded previews (written straight into the real Redis)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Dict, List, Optional, Tuple

import pytest

from .conftest import HERE, Env

pytestmark = pytest.mark.e2e

HELD = 1000
HALF_OPEN_EVERY = 10          # one held connection in ten has sent part of a request line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, path: str, method: str = "GET", headers: Optional[Dict[str, str]] = None,
            body: bytes = b"", timeout: float = 5) -> Tuple[int, bytes]:
    """(status, body) of one request; an HTTP error status is returned, not raised."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body if method == "POST" else None,
                                 method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_answering(port: int, path: str, proc: subprocess.Popen, env: Env, ok=(200,)) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if request(port, path, timeout=2)[0] in ok:
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{path} never answered:\n{env.dump()}")
        time.sleep(0.1)


def hold(port: int, count: int = HELD) -> List[socket.socket]:
    """``count`` connections to ``port``, every tenth with half a request line sent."""
    held = []
    for i in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if i % HALF_OPEN_EVERY == 0:
            sock.sendall(b"GET /healthz HT")
        held.append(sock)
    return held


def assert_answers_while_held(port: int, path: str, pid: Optional[int] = None) -> None:
    """``path`` answers within 1 s, five times, while HELD connections are
    open; with ``pid``, that process keeps a bounded number of threads."""
    held = hold(port)
    try:
        if pid is not None:
            assert len(os.listdir(f"/proc/{pid}/task")) < 50        # not a thread per connection
        for _ in range(5):
            started = time.monotonic()
            status, _ = request(port, path, timeout=1)
            assert status == 200
            assert time.monotonic() - started < 1.0
    finally:
        for sock in held:
            sock.close()


def start_dashboard(env: Env, *extra: str) -> Tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "greenq.cli", "dashboard", "--http", f"127.0.0.1:{port}", *extra],
                            cwd=env.tmp, env=env.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    env.procs.append(proc)
    wait_answering(port, "/api/workers", proc, env)
    return proc, port


def test_worker_endpoint_answers_while_1000_connections_are_held(pool, sqlite_env):
    port = _free_port()
    proc = sqlite_env.worker(pool, "--http", f"127.0.0.1:{port}", burst=False)
    wait_answering(port, "/healthz", proc, sqlite_env)
    assert_answers_while_held(port, "/healthz")
    assert_answers_while_held(port, "/metrics")


def _few_descriptors() -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def test_past_the_connection_ceiling_the_oldest_idle_connection_makes_room(pool, sqlite_env):
    """512 descriptors: a ceiling of 256 connections, so 1,000 held ones are
    evicted oldest first and /healthz is still served at once."""
    port = _free_port()
    proc = sqlite_env.worker(pool, "--http", f"127.0.0.1:{port}", burst=False, preexec_fn=_few_descriptors)
    wait_answering(port, "/healthz", proc, sqlite_env)
    assert_answers_while_held(port, "/healthz")
    assert proc.poll() is None


def test_supervisor_endpoint_answers_while_1000_connections_are_held(pool, sqlite_env):
    port = _free_port()
    proc = sqlite_env.worker(pool, "--processes", "2", "-c", "2", "--http", f"127.0.0.1:{port}", burst=False)
    try:
        wait_answering(port, "/healthz", proc, sqlite_env)
        assert_answers_while_held(port, "/healthz")
    finally:          # SIGTERM, not the fixture's SIGKILL: the supervisor stops its children
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_dashboard_answers_while_1000_connections_are_held(sqlite_env):
    proc, port = start_dashboard(sqlite_env)
    assert_answers_while_held(port, "/api/workers", pid=proc.pid)
    assert_answers_while_held(port, "/")


def test_an_unfinished_request_is_closed_after_the_read_timeout(pool, sqlite_env):
    """A worker under ``pool`` (a greenlet per connection, or the selector
    thread) and the dashboard (the selector thread), at the same time."""
    from greenq.httpserve import READ_TIMEOUT
    worker_port = _free_port()
    worker = sqlite_env.worker(pool, "--http", f"127.0.0.1:{worker_port}", burst=False)
    wait_answering(worker_port, "/healthz", worker, sqlite_env)
    _, dashboard_port = start_dashboard(sqlite_env)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT + 5)
             for port in (worker_port, dashboard_port)]
    started = time.monotonic()
    for sock in socks:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")       # never finished
    for sock in socks:
        assert sock.recv(1024).startswith(b"HTTP/1.1 408")
        sock.close()
    assert time.monotonic() - started < READ_TIMEOUT + 2


# -- the dashboard on a real Redis broker ---------------------------------------------
@pytest.fixture
def redis_env(tmp_path, redis_url, redis_prefix):
    sys.path.insert(0, str(HERE))
    env = Env(tmp_path, redis_url, {"GREENQ_KEY_PREFIX": redis_prefix})
    env.prefix = redis_prefix
    yield env
    env.cleanup()


def _redis(env: Env):
    import redis
    return redis.Redis.from_url(env.broker_url)


def write_dead_letter(env: Env, body: bytes, failed_at: bytes = b"1700000000.5") -> str:
    """A dead letter written straight into the broker's dead stream, as a worker would."""
    client = _redis(env)
    try:
        entry = client.xadd(f"{env.prefix}:dead", {"q": "default", "b": body, "r": "test", "m": "m-1",
                                                   "t": failed_at, "p": "0"})
        client.hincrby(f"{env.prefix}:dead:count", "default", 1)
        return entry.decode()
    finally:
        client.close()


def strict_json(data: bytes):
    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")
    return json.loads(data, parse_constant=refuse)


def test_dlq_with_nan_is_strict_json(redis_env):
    write_dead_letter(redis_env, b'{"v":1,"id":"nan-1","task":NaN,"args":[NaN,Infinity],"kwargs":{}}',
                      failed_at=b"nan")
    write_dead_letter(redis_env, b'{"v":1,"id":"ok-1","task":"e2e_tasks.add","args":[1e999],"kwargs":{}}')
    _, port = start_dashboard(redis_env)
    status, body = request(port, "/api/dlq")
    assert status == 200
    letters = strict_json(body)
    assert [d["task"] for d in letters] == [None, "e2e_tasks.add"]
    assert letters[0]["failed_at"] is None


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))


def test_dlq_lists_bounded_previews_of_big_dead_letters(redis_env):
    """Three dead letters of 30 MiB: the dashboard's peak RSS grows by less
    than one of them (it read them whole before: 3 x 30 MiB and their JSON)."""
    from greenq.dashboard.server import DLQ_PREVIEW_BYTES
    big = b'{"v":1,"id":"big-1","task":"e2e_tasks.add","args":["' + b"x" * (30 << 20) + b'"],"kwargs":{}}'
    for _ in range(3):
        write_dead_letter(redis_env, big)
    proc, port = start_dashboard(redis_env)
    before = _peak_rss_mib(proc.pid)
    status, body = request(port, "/api/dlq", timeout=30)
    assert status == 200
    assert _peak_rss_mib(proc.pid) - before < 30
    letters = strict_json(body)
    assert [d["task"] for d in letters] == ["e2e_tasks.add"] * 3
    assert all(d["truncated"] and len(d["preview"].encode()) == DLQ_PREVIEW_BYTES for d in letters)
    assert len(body) < 4 * DLQ_PREVIEW_BYTES


def test_a_foreign_host_or_origin_is_refused_and_purges_nothing(redis_env):
    write_dead_letter(redis_env, b'{"v":1,"id":"keep-1","task":"e2e_tasks.add","args":[],"kwargs":{}}')
    _, port = start_dashboard(redis_env)
    purge = {"X-GreenQ": "1", "Content-Type": "application/json"}
    status, _ = request(port, "/api/tasks", headers={"Host": "evil.example"})
    assert status == 403
    status, _ = request(port, "/api/dlq/purge", "POST", dict(purge, Host=f"evil.example:{port}"), b"{}")
    assert status == 403
    status, _ = request(port, "/api/dlq/purge", "POST", dict(purge, Origin="http://evil.example"), b"{}")
    assert status == 403
    assert len(strict_json(request(port, "/api/dlq")[1])) == 1          # nothing purged
    status, body = request(port, "/api/dlq/purge", "POST", dict(purge, Origin=f"http://127.0.0.1:{port}"), b"{}")
    assert (status, strict_json(body)) == (200, {"purged": 1})


def test_allowed_hosts_lets_a_named_host_in(sqlite_env):
    name = f"dash-{uuid.uuid4().hex[:6]}.example"
    sqlite_env.env["GREENQ_DASHBOARD_ALLOWED_HOSTS"] = name
    _, port = start_dashboard(sqlite_env)
    assert request(port, "/api/workers", headers={"Host": f"{name}:{port}"})[0] == 200
    assert request(port, "/api/workers", headers={"Host": "other.example"})[0] == 403


def test_a_bad_limit_is_a_400_with_a_message_and_a_huge_one_is_clamped(sqlite_env):
    _, port = start_dashboard(sqlite_env)
    for path in ("/api/tasks", "/api/failures"):
        for value in ("abc", "-1", "0", "1.5", "%C2%B2"):
            status, body = request(port, f"{path}?limit={value}")
            assert status == 400, (path, value)
            assert "limit" in strict_json(body)["error"]
        status, body = request(port, f"{path}?limit=99999999999999999999")
        assert status == 200 and strict_json(body) == []
