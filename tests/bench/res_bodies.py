"""Task bodies of the resource-permit benchmarks, shared by greenq and Celery
(tests/bench/resources_*.py).  Each task appends one record to the Redis list
``$RESBENCH_PREFIX:rec`` (see resbench.py); the connection to PostgreSQL is
pg8000, pure Python, so cooperative under a gevent-patched worker.
"""
import contextlib
import os
import threading
import time

PREFIX = os.environ.get("RESBENCH_PREFIX", "resbench")
_redis = None


def _client():
    global _redis
    if _redis is None:
        import redis
        # Blocking and sized: redis-py's own pool refuses a 101st connection
        # ("Too many connections"), and 500 green threads record at once.
        pool = redis.BlockingConnectionPool.from_url(os.environ["RESBENCH_REDIS_URL"],
                                                     max_connections=64, timeout=120)
        _redis = redis.Redis(connection_pool=pool)
    return _redis


def record(i, enq, start, end, err="", key="rec"):
    _client().rpush(f"{PREFIX}:{key}", f"{i} {enq:.6f} {start:.6f} {end:.6f} {err}")


def classify(exc):
    text = str(exc)
    if "too many clients" in text or "53300" in text:
        return "toomany"
    return type(exc).__name__


def pg_connect():
    import pg8000.native
    return pg8000.native.Connection("postgres", host="127.0.0.1",
                                    port=int(os.environ["RESBENCH_PG_PORT"]),
                                    database="postgres", timeout=60,
                                    ssl_context=False)   # None tries TLS: a default context per connect


class Pool:
    """Connections of one worker process.

    ``blocking`` (Celery's hand-tuned setup): at most ``size`` connections;
    a green thread waits for a free one while holding its task slot.
    Otherwise (greenq's tasks): a task takes an idle connection or opens one,
    and on return at most ``size`` stay idle, the rest are closed.  Under
    permits that keeps the server's connections at most `limit` + processes x
    ``size`` (the recipe: a pool sized from the permit), without it, nothing
    bounds them."""

    def __init__(self, size, blocking):
        self.size = size
        self.slots = threading.BoundedSemaphore(size) if blocking else None   # gevent-patched
        self.idle = []

    def get(self):
        if self.slots is not None:
            self.slots.acquire()
        try:
            return self.idle.pop() if self.idle else pg_connect()
        except BaseException:
            if self.slots is not None:
                self.slots.release()
            raise

    def put(self, conn, broken=False):
        if broken or len(self.idle) >= self.size:
            try:
                conn.close()
            except Exception:
                pass
        else:
            self.idle.append(conn)
        if self.slots is not None:
            self.slots.release()


    @contextlib.contextmanager
    def connection(self):
        conn = self.get()
        try:
            yield conn
        except BaseException:
            self.put(conn, broken=True)
            raise
        self.put(conn)


_pool = None
_pool_lock = threading.Lock()
#: kind -> a function making the process's pool (res_greenq_tasks adds "permit":
#: app.resource_pool, connections that keep their permit while open)
POOLS = {}


def _make_pool():
    kind, _, size = (os.environ.get("RESBENCH_POOL") or "idle:2").partition(":")
    if kind in POOLS:
        return POOLS[kind]()
    return Pool(int(size), kind == "blocking")


def pg_query(i, enq, sleep):
    """One `SELECT pg_sleep(sleep)` on a connection from the process's pool:
    $RESBENCH_POOL = ``blocking:N``, ``idle:N`` (see Pool) or ``permit``
    (greenq's app.resource_pool)."""
    global _pool
    start = time.time()
    err = ""
    try:
        if _pool is None:
            with _pool_lock:
                if _pool is None:
                    _pool = _make_pool()
        with _pool.connection() as conn:
            conn.run(f"SELECT pg_sleep({float(sleep)})")
    except Exception as exc:
        err = classify(exc)
        raise
    finally:
        record(i, enq, start, time.time(), err)


def hold_task(i, enq, sleep, first=0.0):
    """pg_query holding its connection `first` seconds the first time task i
    runs (a redelivery after its worker was killed runs `sleep`)."""
    if first and _client().set(f"{PREFIX}:once:{i}", 1, nx=True):
        sleep = first
    pg_query(i, enq, sleep)


def sleep_task(i, enq, sleep):
    start = time.time()
    time.sleep(sleep)
    record(i, enq, start, time.time())


def free_task(i, enq):
    now = time.time()
    record(i, enq, now, now, key="free")


class Overloaded(Exception):
    """The benchmark service (resources_halve.py) refused a call: its queue
    was longer than its capacity."""


def call_service(i, enq, app=None, name="svc"):
    """One call to the local service on $RESBENCH_SVC_PORT; records the call,
    and the limit in force and permits in use of `name` in this process."""
    import socket
    start = time.time()
    err = ""
    try:
        with socket.create_connection(("127.0.0.1", int(os.environ["RESBENCH_SVC_PORT"])), timeout=60) as s:
            s.sendall(b"GO\n")
            answer = s.makefile("rb").readline()
        if answer != b"OK\n":
            raise Overloaded(answer.decode().strip() or "closed")
    except Exception as exc:
        err = type(exc).__name__
        raise
    finally:
        end = time.time()
        record(i, enq, start, end, err)
        if app is not None:
            permits = app.permits()
            pool = permits.pool(name)
            adaptive = permits.adaptive.get(name)
            probing = int(adaptive is not None and adaptive.probing)
            _client().rpush(f"{PREFIX}:trace", f"{end:.3f} {pool.limit} {pool.in_use()} {probing}")
