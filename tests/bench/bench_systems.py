"""Driver side of the benchmark: isolated broker namespaces, the three
systems' worker command lines, and worker processes with peak-RSS sampling.

Namespaces (each system gets a fresh one before and after every measurement):
- Redis: database 14, reserved for benchmarks, FLUSHDB'd; no other database
  is ever touched.
- RabbitMQ: a vhost of the run's own (``greenq-bench-<pid>``), deleted and
  re-created with rabbitmqctl, deleted at the end.  dramatiq's results (it has
  no AMQP result backend) go to Redis db 14.
- SQLite (greenq only): a new database file in the run's temporary folder.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote, urlsplit, urlunsplit

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SYSTEMS = ("greenq", "celery", "dramatiq")
#: where greenq's code is imported from: this checkout, or an exported revision
#: (``greenq-bench --greenq-ref``), put first on the workers' and clients' sys.path
GREENQ_SRC = REPO
BENCH_REDIS_DB = 14


class BenchError(RuntimeError):
    """A measurement could not be made; the message says why."""


# -- namespaces ----------------------------------------------------------------

class RedisSpace:
    """Redis db 14, flushed around every measurement."""
    kind = "redis"

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.path.strip("/") not in ("", str(BENCH_REDIS_DB)):
            raise BenchError(f"--redis-url {url}: the benchmark only uses (and flushes) db "
                             f"{BENCH_REDIS_DB}; give a URL without a db or with /{BENCH_REDIS_DB}")
        self.url = urlunsplit(parts._replace(path=f"/{BENCH_REDIS_DB}"))
        import redis  # the bench environment has it
        self._client = redis.Redis.from_url(self.url)
        self._client.ping()

    def broker_url(self, system: str) -> str:
        return self.url

    def backend_url(self, system: str) -> str:
        return "" if system == "greenq" else self.url  # greenq derives it from the broker

    def body_redis_url(self) -> str:
        """Where the limit scenario's task body does its INCR and SETNX (keys under
        ``bench-body:``, beside the broker's, flushed with them)."""
        return self.url

    def body_calls(self) -> int:
        return int(self._client.get("bench-body:calls") or 0)

    def reset(self) -> None:
        self._client.flushdb()

    def commands(self) -> int:
        """Commands the server has run so far (INFO stats; every client's,
        so meaningful on a server of the run's own: bin/greenq-netem-bench)."""
        return int(self._client.info("stats")["total_commands_processed"])

    def close(self) -> None:
        self.reset()
        self._client.close()


class AmqpSpace:
    """A RabbitMQ vhost of this run's own; results of the peers as documented."""
    kind = "amqp"

    def __init__(self, url: str, redis_space: Optional[RedisSpace]) -> None:
        parts = urlsplit(url)
        self._base = parts
        self._user = parts.username or "guest"
        self.vhost = f"greenq-bench-{os.getpid()}"
        self._redis = redis_space
        self._ctl("add_vhost", self.vhost, ok_codes=(0, 65, 70))
        self._ctl("set_permissions", "-p", self.vhost, self._user, ".*", ".*", ".*")

    def _ctl(self, *args: str, ok_codes=(0,)) -> None:
        try:
            done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=120)
        except OSError as exc:
            raise BenchError(f"rabbitmqctl {' '.join(args)}: {exc}") from None
        if done.returncode not in ok_codes:
            raise BenchError(f"rabbitmqctl {' '.join(args)} exited {done.returncode}: "
                             f"{(done.stderr or done.stdout).strip()[-400:]}")

    def broker_url(self, system: str) -> str:
        return urlunsplit(self._base._replace(path="/" + quote(self.vhost, safe="")))

    def backend_url(self, system: str) -> str:
        if system == "celery":
            return "rpc://"
        if system == "dramatiq":
            if self._redis is None:
                raise BenchError("dramatiq on RabbitMQ keeps its results in Redis: Redis is not answering")
            return self._redis.url
        return ""

    def body_redis_url(self) -> str:
        if self._redis is None:
            raise BenchError("the limit scenario's task body uses Redis: Redis is not answering")
        return self._redis.url

    def body_calls(self) -> int:
        return self._redis.body_calls() if self._redis is not None else 0

    def reset(self) -> None:
        self._ctl("delete_vhost", self.vhost, ok_codes=(0, 1, 2, 70))
        self._ctl("add_vhost", self.vhost)
        self._ctl("set_permissions", "-p", self.vhost, self._user, ".*", ".*", ".*")
        if self._redis is not None:
            self._redis.reset()

    def close(self) -> None:
        self._ctl("delete_vhost", self.vhost, ok_codes=(0, 1, 2, 70))
        if self._redis is not None:
            self._redis.close()


class SqliteSpace:
    """A fresh SQLite database file per measurement (greenq only)."""
    kind = "sqlite"

    def __init__(self, folder: str) -> None:
        self._folder = folder
        self._serial = 0

    def _path(self) -> str:
        return os.path.join(self._folder, f"bench-{self._serial}.sqlite3")

    def broker_url(self, system: str) -> str:
        return f"sqlite:///{self._path()}"

    def backend_url(self, system: str) -> str:
        return ""

    def body_redis_url(self) -> str:
        raise BenchError("the limit scenario runs on Redis or RabbitMQ (its task body uses Redis db 14)")

    def reset(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.remove(self._path() + suffix)
            except FileNotFoundError:
                pass
        self._serial += 1

    def close(self) -> None:
        self.reset()


# -- systems --------------------------------------------------------------------

def _bin(name: str) -> str:
    """A console script installed beside this interpreter."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        raise BenchError(f"{name} is not installed beside {sys.executable}; run bin/greenq-bench --setup")
    return path


def worker_argv(system: str, broker_url: str, backend_url: str, concurrency: int,
                pool: str = "gevent", loglevel: str = "WARNING",
                greenq_args: Sequence[str] = ()) -> List[str]:
    """The worker command line of ``system``: one worker process, ``concurrency``
    green threads, ``pool`` (greenq only; the peers run gevent)."""
    py = sys.executable
    if system == "greenq":
        argv = [py, os.path.join(GREENQ_SRC, "bin", "greenq-worker"), "-A", "bench_greenq_tasks",
                "--pool", pool, "-c", str(concurrency), "--broker", broker_url,
                "--loglevel", loglevel]
        if backend_url:
            argv += ["--backend", backend_url]
        return argv + list(greenq_args)
    if system == "celery":
        return [py, "-m", "celery", "-A", "bench_celery_tasks", "worker", "-P", "gevent",
                "-c", str(concurrency), "--loglevel", loglevel, "-n", f"bench{os.getpid()}@%h",
                "--without-gossip", "--without-mingle", "--without-heartbeat"]
    if system == "dramatiq":
        return [py, _bin("dramatiq-gevent"), "bench_dramatiq_tasks", "--processes", "1",
                "--threads", str(concurrency)]
    raise BenchError(f"unknown system {system!r}")


def system_env(system: str, broker_url: str, backend_url: str, *, confirm: Optional[bool] = None,
               probe_file: str = "", expect: int = 0, concurrency: int = 0,
               celery_acks: str = "late", results: bool = False) -> Dict[str, str]:
    """Environment of a worker or client process of ``system``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GREENQ_", "BENCH_"))
           or k in ("GREENQ_SIGNING_KEY", "GREENQ_TRACING")}   # kept: measure signed or traced runs
    env.update(BENCH_BROKER_URL=broker_url, BENCH_BACKEND_URL=backend_url,
               BENCH_PROBE_FILE=probe_file, BENCH_PROBE_EXPECT=str(expect),
               BENCH_CONCURRENCY=str(concurrency or ""), BENCH_CELERY_ACKS=celery_acks,
               BENCH_RESULTS="1" if results else "0",
               PYTHONPATH=os.pathsep.join(p for p in (HERE, GREENQ_SRC, env.get("PYTHONPATH")) if p),
               PYTHONUNBUFFERED="1")
    if confirm is not None:
        env["BENCH_CONFIRM"] = "1" if confirm else "0"
        env["GREENQ_AMQP_CONFIRM_PUBLISH"] = "true" if confirm else "false"
    return env


def export_revision(ref: str) -> Tuple[str, str]:
    """Export greenq at git revision ``ref`` to .bench/src/<sha> (once); (path, sha)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"git {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout.strip()
    sha = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    dest = os.path.join(REPO, ".bench", "src", sha[:12])
    if not os.path.isdir(dest):
        tmp = dest + f".tmp{os.getpid()}"
        os.makedirs(tmp)
        archive = subprocess.run(["git", "-C", REPO, "archive", sha], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        os.replace(tmp, dest)
    return dest, sha


def describe_checkout() -> str:
    """HEAD's sha of this checkout, and whether greenq/ has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "greenq", "bin"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{sha[:12]}" + (" + uncommitted changes" if dirty else "")


def _package_of(frame: str) -> str:
    """'fn (greenq/worker/consumer.py:12)' -> 'greenq'; frames without a file
    (a process's or thread's root: native code, the idle loop) -> '(native)'."""
    if not frame.endswith(")") or " (" not in frame:
        return "(native)"
    path = frame.rsplit(" (", 1)[1][:-1].rsplit(":", 1)[0]
    if path.startswith("<"):
        return "(python internals)"
    return path.split("/", 1)[0] if "/" in path else "(stdlib)"


def summarize_profile(raw_path: str, top: int = 25) -> str:
    """The hottest functions of a py-spy raw (collapsed stacks) file: own time
    and time including callees, as percentages of the samples."""
    own: Dict[str, int] = {}
    inclusive: Dict[str, int] = {}
    total = 0
    with open(raw_path) as raw:
        for line in raw:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + n
    if not total:
        return "no samples\n"
    by_package: Dict[str, int] = {}
    for frame, n in own.items():
        package = _package_of(frame)
        by_package[package] = by_package.get(package, 0) + n
    lines = [f"{total} samples", "", "own time by package:"]
    for package, n in sorted(by_package.items(), key=lambda kv: -kv[1]):
        lines.append(f"{100.0 * n / total:5.1f}%  {package}")
    lines += ["", "own time:"]
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100.0 * n / total:5.1f}%  {frame}")
    lines += ["", "including callees:"]
    for frame, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top * 2]:
        lines.append(f"{100.0 * n / total:5.1f}%  {frame}")
    return "\n".join(lines) + "\n"


# -- worker processes -----------------------------------------------------------

def process_cpu_seconds(pid: int) -> Optional[float]:
    """CPU time of process ``pid`` so far, every thread of it, in seconds: the
    sum of its threads' ``/proc/<pid>/task/*/schedstat`` run times (what
    ``time.process_time`` reads inside the process, to the nanosecond; psutil's
    figures are in 10 ms ticks).  None when the process is gone."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                total += int(stat.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def read_slots(base: str) -> List[Tuple[int, int, float, float, float]]:
    """The per-process probe slots of a split probe (bench_bodies ``BENCH_PROBE_SPLIT``):
    (pid, done, first start, first CPU, last end) for each process that ran a task."""
    import glob
    import struct
    layout = struct.Struct("<qddd")
    slots = []
    for path in glob.glob(glob.escape(base) + ".*.slot"):
        try:
            with open(path, "rb") as f:
                raw = f.read(layout.size)
            pid = int(path[len(base) + 1:-len(".slot")])
        except (OSError, ValueError):
            continue
        if len(raw) == layout.size:
            slots.append((pid,) + layout.unpack(raw))
    return slots


def tree_usage(proc) -> Tuple[int, float]:
    """(resident bytes, CPU seconds) of ``proc`` and all its descendants."""
    import psutil
    rss, cpu = 0, 0.0
    try:
        members = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0, 0.0
    for member in members:
        try:
            with member.oneshot():
                rss += member.memory_info().rss
                times = member.cpu_times()
                cpu += times.user + times.system
        except psutil.Error:
            pass
    return rss, cpu


class Worker:
    """A worker subprocess in its own session, with its tree's RSS and CPU time
    sampled every ``interval`` seconds until it stops, and the machine's CPU
    time beside it (other work on the machine shows there)."""

    def __init__(self, argv: List[str], env: Dict[str, str], log_path: str,
                 interval: float = 0.05, profile_path: str = "") -> None:
        self.argv, self.env, self.log_path, self.interval = argv, env, log_path, interval
        self.profile_path = profile_path
        self.profiler: Optional[subprocess.Popen] = None
        self.proc: Optional[subprocess.Popen] = None
        self.spawned_at = 0.0
        self.peak_rss = 0
        self.samples: List[Tuple[float, float, float]] = []  # (monotonic, worker CPU s, machine busy CPU s)
        self._stop = threading.Event()
        self._sampler: Optional[threading.Thread] = None

    def start(self) -> "Worker":
        spy = _bin("py-spy") if self.profile_path else ""   # before the worker: a missing tool strands nothing
        log = open(self.log_path, "ab")
        self.spawned_at = time.monotonic()
        # bin/greenq-netem-bench: workers run in a network namespace of their own
        netns = os.environ.get("GREENQ_BENCH_WORKER_NETNS", "")
        argv = ["ip", "netns", "exec", netns] + self.argv if netns else self.argv
        self.proc = subprocess.Popen(argv, env=self.env, cwd=HERE, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        if self.profile_path:
            self.profiler = subprocess.Popen(
                [spy, "record", "--pid", str(self.proc.pid), "--subprocesses",
                 "--nonblocking", "--rate", "500", "--format", "raw", "--output", self.profile_path],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        import psutil
        try:
            root = psutil.Process(self.proc.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            rss, cpu = tree_usage(root)
            machine = psutil.cpu_times()
            busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
            self.peak_rss = max(self.peak_rss, rss)
            self.samples.append((time.monotonic(), cpu, busy))
            self._stop.wait(self.interval)

    def cpu_between(self, start: float, end: float) -> Tuple[Optional[float], Optional[float]]:
        """(worker CPU seconds, machine busy CPU seconds) from ``start`` to ``end``,
        read from the nearest samples; None when the span is too short for the
        sampling interval to give a meaningful figure."""
        if end - start < 20 * self.interval:
            return None, None
        before = [s for s in self.samples if s[0] <= start]
        after = [s for s in self.samples if s[0] >= end]
        if not before or not after:
            return None, None
        return after[0][1] - before[-1][1], after[0][2] - before[-1][2]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """Warm shutdown (SIGTERM), then SIGKILL of its process group after ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                self.proc.wait(10)
        self._kill_group()  # leftovers of a parent that exited first
        if self.profiler is not None:  # py-spy writes its file when the process is gone
            try:
                self.profiler.wait(30)
            except subprocess.TimeoutExpired:
                self.profiler.send_signal(signal.SIGINT)
                self.profiler.wait(10)
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(5)
        return self.proc.returncode

    def _kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session we started: ours only
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as log:
                return b"\n".join(log.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""
