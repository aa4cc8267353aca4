"""Figures for docs/clusters.md: ``python -m tests.clusters.bench [--trials N]``.

1. No-op drain throughput of one worker process: queues on the three masters
   of a private Redis Cluster against one private Redis server, same run.
2. Publish throughput with ``[redis] min_replicas`` 0 and 1 (Sentinel: a
   master and one replica): one task per round trip, and batches of 100.
3. Failover (master SIGKILLed mid-drain, tasks published during the kill):
   sent, refused, completed, lost, duplicated, resume time, for Sentinel
   (two replicas) with min_replicas 0 and 1, the same with both replicas
   frozen (SIGSTOP) for a second before the master dies (a lagging
   replication link: what asynchronous replication loses), and for Cluster.
4. With ``--only rabbitmq``: a worker on a three-node RabbitMQ cluster whose
   node dies mid-drain.

Every server is private (free ports, temporary directories); 6379 is never
touched.  Takes a couple of minutes; not part of the test suite.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, List

from . import failover
from .servers import RedisCluster, RedisSentinel, Servers, free_ports


LAG = 1.0    # seconds the replicas lag behind in the "sentinel-lagging" runs


def _app(url: str, prefix: str, extra: Dict[str, str]):
    from greenq.config import load
    sys.path.insert(0, str(failover.HERE))
    import cluster_tasks
    app = cluster_tasks.app
    app.close()
    env = failover.worker_env(url, prefix, Path("/dev/null"), extra)
    app.config = load(search=False, env={k: v for k, v in env.items() if k.startswith("GREENQ_")})
    app._codec = None
    return app


def record():
    """The task object (imported late: cluster_tasks builds its app at import)."""
    import cluster_tasks
    return cluster_tasks.record


def drain_rate(url: str, queues: List[str], total: int, concurrency: int = 100) -> float:
    """Tasks/s one gevent worker process runs, first to last start."""
    tmp = Path(tempfile.mkdtemp())
    prefix = f"b{uuid.uuid4().hex[:6]}"
    app = _app(url, prefix, {})
    for start in range(0, total, 1000):
        app.enqueue_many([record().s(n, 0.0).set(queue=queues[n % len(queues)])
                          for n in range(start, min(total, start + 1000))])
    app.close()
    env = failover.worker_env(url, prefix, tmp / "completed.log", {})
    subprocess.run([sys.executable, "-m", "greenq.worker", "-A", "cluster_tasks", "--pool", "gevent",
                    "-c", str(concurrency), "-Q", ",".join(queues), "--burst"],
                   cwd=tmp, env=env, check=True, capture_output=True, timeout=300)
    times = sorted(t for _, t in failover.read_log(tmp / "completed.log"))
    assert len(times) == total, f"{len(times)} of {total} ran"
    return total / (times[-1] - times[0])


def publish_rate(url: str, min_replicas: int, singles: int, batches: int) -> Dict[str, float]:
    app = _app(url, f"p{uuid.uuid4().hex[:6]}", {"GREENQ_REDIS_MIN_REPLICAS": str(min_replicas)})
    app.send_task("clusters.record", args=(0,), queue="p")        # connect, register
    began = time.perf_counter()
    for n in range(singles):
        app.send_task("clusters.record", args=(n,), queue="p")
    single = singles / (time.perf_counter() - began)
    began = time.perf_counter()
    for b in range(batches):
        app.enqueue_many([record().s(n).set(queue="p") for n in range(100)])
    batched = batches * 100 / (time.perf_counter() - began)
    app.close()
    return {"one per call": single, "batches of 100": batched}


def failover_row(kind: str, min_replicas: int, trial: int) -> failover.Outcome:
    tmp = Path(tempfile.mkdtemp())
    extra = {"GREENQ_REDIS_MIN_REPLICAS": str(min_replicas)}
    if kind.startswith("sentinel"):
        dep = RedisSentinel(replicas=2)       # one is left to WAIT for after the failover
        url, queues, prefix = dep.url(), ["s"], f"fs{trial}"

        def kill() -> None:
            """Lagging: the replicas stop reading for LAG s, then the master
            dies, so the writes of those LAG s exist on the master only."""
            lagging = dep.replicas if kind == "sentinel-lagging" else []
            for port in lagging:
                dep.freeze(port)
            time.sleep(LAG if lagging else 0)
            dep.kill(dep.master)
            for port in lagging:
                dep.freeze(port, False)
    else:
        dep = RedisCluster()
        prefix = f"fc{trial}"
        from .test_redis_cluster import queues_on_masters
        queues, masters = queues_on_masters(dep, prefix)
        url = dep.url

        def kill() -> None:
            dep.kill(masters[0])
    try:
        # A backlog still waiting at the kill (so that resume_s is the worker's
        # stall), tasks published during the kill; 20 kB ballast in the
        # lagging runs, more than the kernel's socket buffers hold, so what the
        # frozen replicas had not read dies with the master.
        if kind == "sentinel-lagging":    # still publishing when the replicas freeze
            shape = dict(total=1500, backlog=600, kill_at=300, pad=20000)
        else:
            shape = dict(total=3000, backlog=2400, kill_at=800)
        outcome, _ = failover.run(url, queues, kill, tmp, rate=300, pause=0.05, concurrency=20,
                                  extra_env=extra, prefix=prefix, deadline=90, settle=10, **shape)
        return outcome
    finally:
        dep.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--only", help="run one part only", choices=(
        "throughput", "sentinel", "sentinel-lagging", "cluster", "rabbitmq"))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))     # run the finally blocks: stop the servers

    if args.only in (None, "throughput"):
        throughput(args.tasks)
    # a cluster of 3 masters + 3 replicas has no replica left for the failed
    # shard: min_replicas = 1 refuses its publishes after the failover
    for kind, settings in (("sentinel", (0, 1)), ("sentinel-lagging", (0, 1)), ("cluster", (0,))):
        if args.only not in (None, kind):
            continue
        for n in settings:
            for trial in range(args.trials):
                print(f"failover {kind} min_replicas={n} #{trial + 1}: {failover_row(kind, n, trial).line()}",
                      flush=True)
    if args.only == "rabbitmq":            # not by default: it starts three RabbitMQ nodes
        print(f"failover rabbitmq worker: {rabbitmq_worker_row().line()}", flush=True)


def rabbitmq_worker_row() -> failover.Outcome:
    """A greenq-worker on a three-node RabbitMQ cluster (quorum queues), its
    node SIGKILLed mid-drain (the scenario of test_rabbit_cluster.py)."""
    from .rabbit import RabbitCluster
    tmp = Path(tempfile.mkdtemp())
    cluster = RabbitCluster()
    try:
        outcome, _ = failover.run(cluster.url(), ["rq"], lambda: cluster.kill(0), tmp, total=700,
                                  backlog=600, rate=100, pause=0.1, kill_at=150, settle=6,
                                  extra_env={"GREENQ_AMQP_QUEUE_TYPE": "quorum"})
        return outcome
    finally:
        cluster.stop()


def throughput(tasks: int) -> None:
    single = Servers()
    port = free_ports(1)[0]
    single.start(port)
    cluster = RedisCluster()
    try:
        from .test_redis_cluster import queues_on_masters
        queues, _ = queues_on_masters(cluster, "tp")
        one = drain_rate(f"redis://127.0.0.1:{port}/0", queues, tasks)
        three = drain_rate(cluster.url, queues, tasks)
        print(f"no-op drain, 1 worker process, c=100, {tasks} tasks over 3 queues: "
              f"one Redis {one:.0f}/s, Redis Cluster (3 masters) {three:.0f}/s")
    finally:
        single.stop()
        cluster.stop()

    sentinel = RedisSentinel()
    try:
        runs: Dict[int, List[Dict[str, float]]] = {0: [], 1: []}
        for _ in range(3):                     # alternated, median of 3: the machine is shared
            for n in (0, 1):
                runs[n].append(publish_rate(sentinel.url(), n, 2000, 50))
        for n, rows in runs.items():
            print(f"publish, min_replicas={n} (median of 3): " +
                  ", ".join(f"{k} {sorted(r[k] for r in rows)[1]:.0f}/s" for k in rows[0]))
    finally:
        sentinel.stop()


if __name__ == "__main__":
    main()
