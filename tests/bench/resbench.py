"""Shared parts of the resource-permit benchmarks (tests/bench/resources_*.py,
docs/performance.md "Resource permits").

* Redis database 10 is theirs: it is flushed before and after each run, and
  one of them runs at a time on a machine (/tmp/greenq-resbench.lock).
* Each task appends one record to the Redis list ``<prefix>:rec``:
  ``index enqueued started ended error`` (wall-clock seconds; error is empty,
  ``toomany`` for PostgreSQL's "too many clients", or an exception's name).
  The driver reads them all at the end; the figures come from them alone.
* A private PostgreSQL (``PrivatePostgres``): initdb into a temporary folder
  as the ``postgres`` user (initdb refuses root), listening on 127.0.0.1 on a
  free port, stopped and removed on exit.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
REDIS_URL = os.environ.get("GREENQ_RESBENCH_REDIS_URL", "redis://127.0.0.1:6379/10")
LOCK_PATH = os.path.join(tempfile.gettempdir(), "greenq-resbench.lock")


def take_lock():
    handle = open(LOCK_PATH, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.exit(f"another resource benchmark holds {LOCK_PATH}; wait for it")
    return handle


def exit_on_sigterm():
    """SIGTERM (timeout(1), a CI stop) unwinds like ^C, so every finally
    runs: workers stopped, PostgreSQL stopped and removed."""
    def once(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)     # a second one must not cut the cleanup short
        sys.exit(143)
    signal.signal(signal.SIGTERM, once)


def redis_client():
    import redis
    return redis.Redis.from_url(REDIS_URL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, q):
    """Nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))
    return ordered[min(rank, len(ordered)) - 1]


def greenq_tasks(folder):
    """res_greenq_tasks, configured by folder/greenq.ini (the driver's side:
    it only enqueues)."""
    import res_greenq_tasks as t
    from greenq.config import load
    t.app.close()
    t.app.config = load(path=str(folder / "greenq.ini"), search=False, env={})
    t.app._codec = None
    return t


def read_records(client, prefix, key="rec"):
    out = []
    for raw in client.lrange(f"{prefix}:{key}", 0, -1):
        parts = raw.decode().split(" ")
        out.append((int(parts[0]), float(parts[1]), float(parts[2]), float(parts[3]),
                    parts[4] if len(parts) > 4 else ""))
    return out


def wait_for_records(client, prefix, n, timeout, procs=(), key="rec"):
    """Until n records (or a timeout, or every process in procs gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.llen(f"{prefix}:{key}") >= n:
            return True
        if procs and all(p.poll() is not None for p in procs):
            return client.llen(f"{prefix}:{key}") >= n
        time.sleep(0.1)
    return False


def stop(procs, timeout=30):
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def spawn(cmd, cwd, env, log):
    """A worker in a process group of its own (stop() ends the whole group)."""
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def base_env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GREENQ_", "RESBENCH_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT)])
    env.update(extra or {})
    return env


def greenq_ini(folder: Path, prefix: str, lease_seconds: int = 30, resources: str = "") -> None:
    """res_greenq_tasks names the resources slow and svc: a section the run
    does not set gets limit 1 (a worker refuses tasks naming an unknown one)."""
    for name in ("slow", "svc"):
        if f"[resource:{name}]" not in resources:
            resources += f"\n[resource:{name}]\nlimit = 1\n"
    (folder / "greenq.ini").write_text(
        f"[greenq]\nbroker_url = {REDIS_URL}\nkey_prefix = {prefix}\n"
        f"lease_seconds = {lease_seconds}\n\n{resources}")


class ConnSampler(threading.Thread):
    """The server's client connections, counted two ways, neither with a
    connection of its own (so it takes no slot):

    * ``count()``: the server's processes: the postmaster's children whose
      title names a client (`postgres: USER DB 127.0.0.1(PORT) ...`).  A
      backend whose client has gone (closed, or killed: the kernel closed its
      socket) is still a process for the moment it takes to exit.
    * ``established()``: TCP sockets in state ESTABLISHED (/proc/net/tcp),
      on the server's side (until its backend closes its socket) and on the
      clients' side (until the client closes: the connections clients hold
      open, what the permits bound).

    Keeps the maximum of each (``max``, ``max_established``, ``max_client``),
    and with trace=True every (time, count) sample in ``samples``,
    ``samples_established`` and ``samples_client``."""

    def __init__(self, pg, interval=0.02, trace=False):
        super().__init__(daemon=True)
        import psutil
        pid = int((pg.data / "postmaster.pid").read_text().split()[0])
        self.master = psutil.Process(pid)
        self.port_hex = f":{pg.port:04X}"
        self.interval = interval
        self.max = 0
        self.max_established = 0
        self.max_client = 0
        self.samples = [] if trace else None
        self.samples_established = [] if trace else None
        self.samples_client = [] if trace else None
        self.halt = threading.Event()

    def established(self):
        """(server's side, clients' side): ESTABLISHED sockets whose local
        port is the server's, and those whose remote port is (the clients run
        on this machine; a client's close() moves its side out of ESTABLISHED
        at once, before the server's backend has seen it).  Each counted once
        per connection (its client port): /proc/net/tcp is read in pieces, and
        a socket can be listed twice in one read."""
        server, client = set(), set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as f:
                    next(f)
                    for line in f:
                        fields = line.split(None, 4)
                        if fields[3] != "01":
                            continue
                        if fields[1].endswith(self.port_hex):
                            server.add(fields[2])
                        elif fields[2].endswith(self.port_hex):
                            client.add(fields[1])
            except OSError:
                pass
        return len(server), len(client)

    def count(self):
        n = 0
        for child in self.master.children():
            try:
                if "127.0.0.1(" in " ".join(child.cmdline()):
                    n += 1
            except Exception:
                pass
        return n

    def run(self):
        while not self.halt.is_set():
            n = self.count()
            e, c = self.established()
            now = time.time()
            self.max = max(self.max, n)
            self.max_established = max(self.max_established, e)
            self.max_client = max(self.max_client, c)
            if self.samples is not None:
                self.samples.append((now, n))
                self.samples_established.append((now, e))
                self.samples_client.append((now, c))
            time.sleep(self.interval)


def print_table(headers, rows):
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


class PrivatePostgres:
    """initdb + pg_ctl start on 127.0.0.1:<free port>; removed on stop()."""

    def __init__(self, max_connections=50, settings=""):
        self.max_connections = max_connections
        self.settings = settings
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="greenq-resbench-pg-"))
        self.data = self.dir / "data"
        self.user = None

    def _as_user(self, cmd):
        if os.geteuid() != 0:
            return cmd
        return ["runuser", "-u", self.user, "--"] + cmd

    def start(self):
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                sys.exit("running as root and there is no 'postgres' user for initdb")
            self.user = "postgres"
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        subprocess.run(self._as_user(["initdb", "-D", str(self.data), "-U", "postgres",
                                      "--auth=trust", "-E", "UTF8", "--no-sync"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"max_connections = {self.max_connections}\n"
                       f"unix_socket_directories = '{self.dir}'\nfsync = off\n"
                       "shared_buffers = 32MB\n" + self.settings)
        subprocess.run(self._as_user(["pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"),
                                      "-w", "start"]),
                       check=True, stdout=subprocess.DEVNULL)
        return self

    def stop(self):
        if (self.data / "postmaster.pid").exists():
            subprocess.run(self._as_user(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w",
                                          "stop"]), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)
