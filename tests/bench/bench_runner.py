"""The benchmark's scenarios and report; ``bin/greenq-bench`` parses the
command line and calls :func:`run`.  docs/performance.md says what each line
measures and why it is measured that way.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import bench_systems as bs
from bench_systems import BenchError

SCENARIOS = ("noop", "sleep", "roundtrip", "enqueue", "issue2", "celeryq", "limit", "processes")
POLL = 0.01  # seconds between looks for the probe file


class Bench:
    """One run: a broker namespace, a temporary folder, the options."""

    def __init__(self, opts, space, folder: str) -> None:
        self.opts, self.space, self.folder = opts, space, folder
        self._serial = 0
        self.scenario = ""

    def _file(self, stem: str, suffix: str) -> str:
        self._serial += 1
        return os.path.join(self.folder, f"{self._serial:03d}-{stem}{suffix}")

    def say(self, text: str) -> None:
        if not self.opts.quiet:
            print(text, file=sys.stderr, flush=True)

    # -- building blocks ------------------------------------------------------
    def client(self, system: str, *args: str, confirm: Optional[bool] = None,
               results: bool = False) -> Dict[str, Any]:
        """Run bench_client.py for ``system`` in a plain process; its JSON answer."""
        env = bs.system_env(system, self.space.broker_url(system), self.space.backend_url(system),
                            confirm=confirm, celery_acks=self.opts.celery_acks, results=results)
        argv = [sys.executable, os.path.join(bs.HERE, "bench_client.py"), system, *args]
        done = subprocess.run(argv, env=env, cwd=bs.HERE, capture_output=True, text=True,
                              timeout=self.opts.timeout)
        if done.returncode != 0:
            raise BenchError(f"{system} client {' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stderr.strip()[-2000:]}")
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        if answer.get("patched"):
            raise BenchError(f"{system} client ran monkey-patched; it must be a plain process")
        return answer

    def worker(self, system: str, concurrency: int, pool: str = "gevent", *,
               probe_file: str = "", expect: int = 0, results: bool = False,
               confirm: Optional[bool] = None, extra_env: Optional[Dict[str, str]] = None,
               extra_args: Sequence[str] = ()) -> bs.Worker:
        broker, backend = self.space.broker_url(system), self.space.backend_url(system)
        argv = bs.worker_argv(system, broker, backend, concurrency, pool,
                              greenq_args=shlex.split(self.opts.greenq_args or "") + list(extra_args))
        env = bs.system_env(system, broker, backend, probe_file=probe_file, expect=expect,
                            concurrency=concurrency, celery_acks=self.opts.celery_acks,
                            results=results, confirm=confirm)
        env.update(extra_env or {})
        if self.opts.instructions and system == "greenq":   # counting starts at the first task
            argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                    "--callgrind-out-file=" + self._file(f"{system}-{pool}-callgrind", ".out")] + argv
            env["BENCH_CALLGRIND"] = "1"
        profile = ""
        if self.opts.profile:
            os.makedirs(self.opts.profile, exist_ok=True)
            self._serial += 1
            profile = os.path.join(self.opts.profile, f"{self._serial:03d}-{self.space.kind}-"
                                                      f"{system}-{pool}-{self.scenario}.txt")
        return bs.Worker(argv, env, self._file(f"{system}-{pool}-worker", ".log"),
                         profile_path=profile).start()

    def finish_profile(self, worker: bs.Worker) -> None:
        """Write the summary of a profiled worker beside its raw stacks."""
        path = worker.profile_path
        if path and os.path.exists(path):
            with open(path[:-4] + ".top.txt", "w") as out:
                out.write(bs.summarize_profile(path))
            self.say(f"  profile: {path[:-4]}.top.txt")

    def wait_probe(self, worker: bs.Worker, probe_file: str, what: str,
                   timeout: float) -> Dict[str, Any]:
        """Wait (polling a local file, not the broker) for the probe's report."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(probe_file):
            if not worker.alive():
                raise BenchError(f"{what}: the worker exited {worker.proc.returncode} before the "
                                 f"tasks were done; its log ends:\n{worker.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: not done after {timeout:.0f} s (--timeout); "
                                 f"the worker's log ends:\n{worker.log_tail()}")
            time.sleep(POLL)
        with open(probe_file) as report:
            return json.load(report)

    def wait_split(self, worker: bs.Worker, probe_file: str, expect: int, what: str,
                   timeout: float) -> Dict[str, Any]:
        """Wait for the per-process slots of a split probe (a worker of several
        processes) to add up to ``expect`` tasks; the report of :meth:`wait_probe`,
        with the CPU time of every process that ran tasks, summed."""
        deadline = time.monotonic() + timeout
        while True:
            slots = bs.read_slots(probe_file)
            if sum(slot[1] for slot in slots) >= expect:
                break
            if not worker.alive():
                raise BenchError(f"{what}: the worker exited {worker.proc.returncode} before the "
                                 f"tasks were done; its log ends:\n{worker.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: not done after {timeout:.0f} s (--timeout); "
                                 f"the worker's log ends:\n{worker.log_tail()}")
            time.sleep(POLL)
        cpu = 0.0
        for pid, _done, _start, first_cpu, _end in slots:   # the processes idle from here on
            now = bs.process_cpu_seconds(pid)
            if now is None:
                raise BenchError(f"{what}: worker process {pid} exited before its CPU time was read")
            cpu += now - first_cpu
        slots = bs.read_slots(probe_file)
        return {"first_start": min(slot[2] for slot in slots), "last_end": max(slot[4] for slot in slots),
                "cpu_seconds": cpu, "done": sum(slot[1] for slot in slots),
                "processes_with_tasks": len(slots), "per_process_done": sorted(slot[1] for slot in slots)}

    # -- scenarios ------------------------------------------------------------
    def drain(self, system: str, kind: str, n: int, concurrency: int, sleep: float,
              pool: str = "gevent", celery_queue: bool = False, processes: int = 0) -> Dict[str, Any]:
        """Fill the queue with ``n`` tasks, then start one worker and time the drain
        from the first task's start to the last task's end.  ``celery_queue``: a
        Celery client fills Celery's queue (``celery``), whichever system drains
        it; a greenq worker consumes it as a queue in ``celery_queues``.  ``processes``
        (greenq): ``--processes`` of the worker, its tasks counted by the split probe
        and its CPU time summed over the processes that ran them."""
        what = f"{system} {kind} n={n} c={concurrency} pool={pool}" + (" on a Celery queue" if celery_queue else "") \
            + (f" processes={processes}" if processes else "")
        filler = "celery" if celery_queue else system
        extra = {"GREENQ_CELERY_QUEUES": "celery", "GREENQ_WORKER_QUEUES": "celery"} \
            if celery_queue and system == "greenq" else {}
        extra_args: List[str] = []
        if kind == "incr":
            extra["BENCH_BODY_REDIS_URL"] = self.space.body_redis_url()
        if processes:
            if system != "greenq":
                raise BenchError(f"{what}: only greenq's worker is run with several processes here")
            extra["BENCH_PROBE_SPLIT"] = "1"
            extra_args = ["--processes", str(processes)]
        load = os.getloadavg()[0]  # other work on the machine skews every figure: recorded
        self.space.reset()
        fill_args = ["fill", kind, str(n), "--sleep", str(sleep)]
        if filler == "greenq":
            fill_args.append("--bulk")
        fill = self.client(filler, *fill_args)
        queued = self.client(filler, "left")["left"]
        if queued < n:
            raise BenchError(f"{what}: {n} tasks were enqueued but the broker holds {queued}; "
                             "is something else using the benchmark's namespace?")
        probe = self._file(f"{system}-{kind}-probe", ".json")
        count = os.environ.get("GREENQ_BENCH_COUNT_COMMANDS") == "1" and hasattr(self.space, "commands")
        commands_before = self.space.commands() if count else 0
        worker = self.worker(system, concurrency, pool, probe_file=probe, expect=n, extra_env=extra,
                             extra_args=extra_args)
        try:
            # generous: 10x the ideal time, 5 ms a task, a minute to start; at most --timeout
            timeout = min(self.opts.timeout, 60 + 10 * n * sleep / concurrency + 0.005 * n)
            if processes:
                report = self.wait_split(worker, probe, n, what, timeout)
            else:
                report = self.wait_probe(worker, probe, what, timeout)
            # the broker's commands from the worker's start to the last task's end, per task
            # (GREENQ_BENCH_COUNT_COMMANDS=1, on a Redis server of the run's own)
            commands = (self.space.commands() - commands_before - 1) / n if count else None
            time.sleep(2 * worker.interval)  # one more sample after the last task
        finally:
            code = worker.stop()
            self.finish_profile(worker)
        left = self.client(filler, "left")["left"]
        body_calls = self.space.body_calls() if kind == "incr" else None
        self.space.reset()
        span = report["last_end"] - report["first_start"]
        tree_cpu, machine_cpu = worker.cpu_between(report["first_start"], report["last_end"])
        worker_cpu = report.get("cpu_seconds")  # the task-running process's own, exact
        result = {"system": system, "kind": kind, "pool": pool, "n": n, "concurrency": concurrency,
                  "sleep": sleep, "seconds": span, "rate": n / span if span > 0 else None,
                  "startup_seconds": report["first_start"] - worker.spawned_at,
                  "wall_seconds": report["last_end"] - worker.spawned_at,
                  "done": report["done"], "peak_rss_mib": worker.peak_rss / 2**20,
                  "worker_exit": code, "left_in_broker": left, "fill": fill,
                  "greenq_imported_from": report.get("greenq_file"),
                  "worker_cpu_seconds": worker_cpu,
                  "worker_cpu_us_per_task": worker_cpu * 1e6 / n if worker_cpu is not None else None,
                  "machine_busy_cores": machine_cpu / span if machine_cpu is not None and span > 0 else None,
                  "loadavg_1min_before": load, "broker_commands_per_task": commands,
                  # the whole process tree's (supervisor included), from 50 ms samples
                  "worker_tree_cpu_us_per_task": tree_cpu * 1e6 / n if tree_cpu is not None else None}
        if processes:
            result.update(processes=processes, processes_with_tasks=report["processes_with_tasks"],
                          per_process_done=report["per_process_done"])
        if kind == "incr":
            result["body_calls"] = body_calls
            if body_calls != n:
                raise BenchError(f"{what}: the body counted {body_calls} calls in Redis, not {n}")
        if report.get("counted"):
            result["worker_instructions_per_task"] = _instructions(worker.log_path) / report["counted"]
        elif self.opts.instructions and system == "greenq":
            raise BenchError(f"--instructions: {what}: every task ran while callgrind was being switched "
                             "on, so none was counted; send more tasks (--noop-n)")
        if left:
            self.say(f"  warning: {what}: {left} messages were still in the broker after the "
                     "worker stopped (not acknowledged, or dead-lettered)")
        self.say(f"  {what}: {span:.2f} s ({result['rate']:.0f}/s), startup "
                 f"{result['startup_seconds']:.2f} s, peak RSS {result['peak_rss_mib']:.0f} MiB, "
                 f"worker CPU {_fmt(result['worker_cpu_us_per_task'])} us/task, machine busy "
                 f"{_fmt(result['machine_busy_cores'], 2)} cores")
        return result

    def repeated_drain(self, *args, **kwargs) -> Dict[str, Any]:
        """The median run of ``--repeat`` drains (by seconds); all runs kept."""
        runs = [self.drain(*args, **kwargs) for _ in range(self.opts.repeat)]
        runs.sort(key=lambda r: r["seconds"])
        best = dict(runs[len(runs) // 2])
        best["runs_seconds"] = [r["seconds"] for r in runs]
        return best

    def limit_alone(self, n: int, concurrency: int) -> Dict[str, Any]:
        """The limit: the ``incr`` body alone, ``n`` calls by ``concurrency`` greenlets in
        a process of its own (bench_limit.py), no queue; calls/s and CPU per call."""
        load = os.getloadavg()[0]
        self.space.reset()
        env = bs.system_env("greenq", "", "", concurrency=concurrency)
        env["BENCH_BODY_REDIS_URL"] = self.space.body_redis_url()
        argv = [sys.executable, os.path.join(bs.HERE, "bench_limit.py"), str(n), str(concurrency)]
        done = subprocess.run(argv, env=env, cwd=bs.HERE, capture_output=True, text=True,
                              timeout=self.opts.timeout)
        if done.returncode != 0:
            raise BenchError(f"the limit (bench_limit.py) exited {done.returncode}:\n{done.stderr.strip()[-2000:]}")
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        calls = self.space.body_calls()
        self.space.reset()
        if calls != n:
            raise BenchError(f"the limit: the body counted {calls} calls in Redis, not {n}")
        answer.update(system="limit", kind="incr", done=calls, body_calls=calls,
                      worker_cpu_us_per_task=answer["cpu_us_per_call"], loadavg_1min_before=load)
        self.say(f"  limit (the body alone, {concurrency} greenlets): {answer['seconds']:.2f} s "
                 f"({answer['rate']:.0f}/s), CPU {answer['cpu_us_per_call']:.0f} us/call, load {load:.2f}")
        return answer

    def limit(self, systems: Sequence[str], out: Dict[str, Any]) -> Dict[str, Any]:
        """The ``limit`` scenario: per round, the limit, then each system's drain of
        the same number of ``incr`` tasks at the same concurrency (so a round's
        figures share the machine's load); the median of ``--repeat`` rounds, and
        each system's rate as a percentage of the limit's median rate."""
        n, concurrency = self.opts.limit_n, self.opts.limit_concurrency
        runs: Dict[str, List[Dict[str, Any]]] = {}
        for _ in range(self.opts.repeat):
            self.scenario = "limit"
            try:
                runs.setdefault("limit", []).append(self.limit_alone(n, concurrency))
            except BenchError as exc:
                out["errors"].append(f"limit limit: {exc}")
                print(f"error: limit: {exc}", file=sys.stderr)
                self.space.reset()
            for system in systems:
                try:
                    runs.setdefault(system, []).append(self.drain(system, "incr", n, concurrency, 0.0))
                except BenchError as exc:
                    out["errors"].append(f"limit {system}: {exc}")
                    print(f"error: limit {system}: {exc}", file=sys.stderr)
                    self.space.reset()
        result: Dict[str, Any] = {}
        base = runs.get("limit", [])
        for name, got in runs.items():
            # the same round's limit and drain ran under the same load: their ratio, round by round
            rounds = [100.0 * r["rate"] / l["rate"] for r, l in zip(got, base)] \
                if len(got) == len(base) else []
            got = sorted(got, key=lambda r: r["seconds"])
            best = dict(got[len(got) // 2])
            best["runs_seconds"] = [r["seconds"] for r in got]
            best["runs_rate"] = [r["rate"] for r in got]
            best["runs_loadavg"] = [r["loadavg_1min_before"] for r in got]
            best["pct_of_limit_rounds"] = rounds
            result[name] = best
        limit = result.get("limit")
        for name, best in result.items():
            if limit and limit.get("rate"):
                best["pct_of_limit"] = 100.0 * best["rate"] / limit["rate"]
                best["limit_rate"] = limit["rate"]
            if limit and best.get("worker_cpu_us_per_task"):
                # both CPU-bound on one core each: the rate the CPU per task allows, which
                # the machine's load moves much less than the rates
                best["pct_of_limit_by_cpu"] = 100.0 * limit["worker_cpu_us_per_task"] / best["worker_cpu_us_per_task"]
        return result

    def roundtrip(self, system: str) -> Dict[str, Any]:
        """``delay().get()`` latency from a plain client, one worker running, with
        each system's default settings; on RabbitMQ greenq also with publisher
        confirms off (the peers' default), in worker and client alike."""
        result = self._roundtrip(system, None)
        if system == "greenq" and self.space.kind == "amqp":
            off = self._roundtrip(system, False)
            result.update({f"{key}_noconfirm": off[key] for key in ("p50_ms", "p99_ms", "mean_ms", "max_ms")})
        return result

    def _roundtrip(self, system: str, confirm: Optional[bool]) -> Dict[str, Any]:
        self.space.reset()
        worker = self.worker(system, self.opts.noop_concurrency, results=True, confirm=confirm)
        try:
            answer = self.client(system, "roundtrip", str(self.opts.roundtrips), results=True,
                                 confirm=confirm)
        finally:
            worker.stop()
            self.finish_profile(worker)
        self.space.reset()
        lat = sorted(answer["latencies_ms"])
        result = {"system": system, "n": len(lat), "p50_ms": _percentile(lat, 50),
                  "p99_ms": _percentile(lat, 99), "mean_ms": statistics.fmean(lat),
                  "max_ms": lat[-1]}
        note = "" if confirm is None else f" (confirms {'on' if confirm else 'off'})"
        self.say(f"  {system} round trip{note}: p50 {result['p50_ms']:.2f} ms, "
                 f"p99 {result['p99_ms']:.2f} ms")
        return result

    def enqueue(self, system: str) -> Dict[str, Any]:
        """The client's enqueue rate, no worker running; on RabbitMQ with publisher
        confirms off and on; greenq's ``enqueue_many`` as well."""
        n = str(self.opts.enqueue_n)
        confirms = (False, True) if self.space.kind == "amqp" else (None,)
        result: Dict[str, Any] = {"system": system}
        for confirm in confirms:
            suffix = "" if confirm is None else ("_confirm" if confirm else "_noconfirm")
            for bulk in ((False, True) if system == "greenq" else (False,)):
                self.space.reset()
                answer = self.client(system, "enqueue", n, *(["--bulk"] if bulk else []), confirm=confirm)
                key = ("bulk" if bulk else "single") + suffix
                result[key] = answer["rate"]
                self.say(f"  {system} enqueue {key}: {answer['rate']:.0f}/s")
        self.space.reset()
        return result


def _percentile(ordered: List[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, int(round(pct / 100.0 * len(ordered) + 0.4999)))
    return ordered[min(rank, len(ordered)) - 1]


# -- the run -------------------------------------------------------------------

def make_space(opts, folder: str):
    if opts.broker == "sqlite":
        return bs.SqliteSpace(folder)
    redis_space = None
    try:
        redis_space = bs.RedisSpace(opts.redis_url)
    except Exception as exc:  # noqa: BLE001 - reported when needed
        if opts.broker == "redis":
            raise BenchError(f"Redis at {opts.redis_url}: {exc}") from None
    if opts.broker == "redis":
        return redis_space
    return bs.AmqpSpace(opts.amqp_url, redis_space)


LOCK_PATH = os.path.join(tempfile.gettempdir(), "greenq-bench.lock")


def take_lock():
    """One benchmark on shared brokers at a time on this machine: two runs
    would flush each other's Redis db 14 and share the CPU."""
    import fcntl
    handle = open(LOCK_PATH, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise BenchError(f"another greenq-bench (pid {holder}) is running on this machine "
                         f"({LOCK_PATH}); wait for it to finish") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def machine() -> Dict[str, Any]:
    info = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "host": socket.gethostname(),
            "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as cpu:
            names = [line.split(":", 1)[1].strip() for line in cpu if line.startswith("model name")]
        info["cpu"] = names[0] if names else ""
    except OSError:
        pass
    from importlib import metadata
    for dist in ("greenq", "celery", "kombu", "dramatiq", "gevent", "eventlet", "redis", "amqp", "pika"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return info


def run(opts) -> Dict[str, Any]:
    """Run the scenarios of ``opts`` and return every figure (also printed)."""
    systems = opts.systems
    if opts.broker == "sqlite" and set(systems) - {"greenq"}:
        print("note: celery and dramatiq have no SQLite broker; running greenq only", file=sys.stderr)
        systems = ["greenq"]
    if opts.greenq_ref:
        bs.GREENQ_SRC, sha = bs.export_revision(opts.greenq_ref)
        greenq_code = f"{sha[:12]} ({opts.greenq_ref}, exported to {bs.GREENQ_SRC})"
    else:
        greenq_code = f"working tree {bs.REPO} at {bs.describe_checkout()}"
    if opts.instructions:
        missing = [tool for tool in ("valgrind", "callgrind_control") if not shutil.which(tool)]
        if missing:
            raise BenchError(f"--instructions needs {' and '.join(missing)} (apt-get install valgrind)")
    lock = None if opts.broker == "sqlite" else take_lock()
    folder = tempfile.mkdtemp(prefix="greenq-bench-")
    space = make_space(opts, folder)
    bench = Bench(opts, space, folder)
    out: Dict[str, Any] = {"machine": machine(), "greenq_code": greenq_code,
                           "broker": opts.broker, "systems": systems,
                           "options": {k: v for k, v in vars(opts).items() if k != "json"},
                           "results": {}, "errors": []}
    results = out["results"]

    def attempt(key: str, system: str, fn, *args, **kwargs) -> None:
        try:
            results.setdefault(key, {})[system] = fn(*args, **kwargs)
        except BenchError as exc:
            out["errors"].append(f"{key} {system}: {exc}")
            print(f"error: {key} {system}: {exc}", file=sys.stderr)
            try:
                space.reset()
            except Exception:  # noqa: BLE001 - the first error is the one to read
                pass

    try:
        for scenario in opts.only:
            bench.say(f"== {scenario} on {opts.broker}")
            bench.scenario = scenario
            if scenario == "limit":
                if opts.broker not in ("redis", "amqp"):
                    raise BenchError("--only limit: the task body uses Redis; run it with --broker redis "
                                     "or amqp")
                results["limit"] = bench.limit(systems, out)
                continue
            if scenario == "processes":
                if "greenq" in systems:
                    runs: Dict[int, List[Dict[str, Any]]] = {}
                    for _ in range(opts.repeat):   # interleaved: a round's figures share the load
                        for procs in opts.worker_processes:
                            try:
                                runs.setdefault(procs, []).append(bench.drain(
                                    "greenq", "noop", opts.noop_n, opts.noop_concurrency, 0.0,
                                    processes=procs))
                            except BenchError as exc:
                                out["errors"].append(f"processes {procs}: {exc}")
                                print(f"error: processes {procs}: {exc}", file=sys.stderr)
                                space.reset()
                    for procs, got in runs.items():
                        got.sort(key=lambda r: r["seconds"])
                        best = dict(got[len(got) // 2])
                        best["runs_seconds"] = [r["seconds"] for r in got]
                        best["runs_cpu_us_per_task"] = [r["worker_cpu_us_per_task"] for r in got]
                        best["median_cpu_us_per_task"] = statistics.median(best["runs_cpu_us_per_task"])
                        results.setdefault("processes", {})[str(procs)] = best
                continue
            for system in systems:
                if scenario == "noop":
                    attempt("noop", system, bench.repeated_drain, system, "noop", opts.noop_n,
                            opts.noop_concurrency, 0.0)
                elif scenario == "sleep":
                    attempt("sleep", system, bench.repeated_drain, system, "sleep", opts.n,
                            opts.concurrency, opts.sleep)
                elif scenario == "roundtrip":
                    attempt("roundtrip", system, bench.roundtrip, system)
                elif scenario == "enqueue":
                    attempt("enqueue", system, bench.enqueue, system)
                elif scenario == "celeryq" and system in ("greenq", "celery"):
                    if opts.broker not in ("redis", "amqp"):
                        raise BenchError("--only celeryq: Celery has no SQLite broker")
                    attempt("celeryq_noop", system, bench.repeated_drain, system, "noop", opts.noop_n,
                            opts.noop_concurrency, 0.0, celery_queue=True)
                    attempt("celeryq_sleep", system, bench.repeated_drain, system, "sleep", opts.n,
                            opts.concurrency, opts.sleep, celery_queue=True)
                elif scenario == "issue2" and system == "greenq":
                    for pool in opts.pools:
                        attempt("issue2", pool, bench.repeated_drain, "greenq", "sleep", opts.issue2_n,
                                opts.issue2_concurrency, opts.issue2_sleep, pool)
    finally:
        space.close()
        if lock is not None:
            lock.close()
        if not opts.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"logs kept in {folder}", file=sys.stderr)
    print(render(out, opts))
    if opts.json:
        with open(opts.json, "w") as dump:
            json.dump(out, dump, indent=2)
    return out


# -- the report -----------------------------------------------------------------

def _fmt(value: Optional[float], digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _instructions(valgrind_log: str) -> float:
    """What callgrind counted in a worker (its summary line in the worker's log)."""
    with open(valgrind_log, errors="replace") as log:
        found = re.findall(r"Collected : ([\d,]+)", log.read())
    if not found:
        raise BenchError(f"--instructions: no callgrind summary in {valgrind_log}")
    return float(found[-1].replace(",", ""))


def render(out: Dict[str, Any], opts) -> str:
    """The markdown tables of a run."""
    systems, res = out["systems"], out["results"]
    labels = {"greenq": "greenq", "celery": "Celery 5 -P gevent", "dramatiq": "dramatiq-gevent"}
    rows: List[List[str]] = []

    def row(label: str, key: str, field: str, digits: int = 0) -> None:
        if key in res:
            rows.append([label] + [_fmt(res[key].get(s, {}).get(field), digits) for s in systems])

    ideal = opts.n * opts.sleep / opts.concurrency
    row(f"no-op drain, tasks/s ({opts.noop_n:,} tasks, -c {opts.noop_concurrency})", "noop", "rate")
    row("no-op: worker CPU per task, us", "noop", "worker_cpu_us_per_task")
    row("no-op: worker instructions per task (callgrind)", "noop", "worker_instructions_per_task")
    row("no-op: worker start to first task, s", "noop", "startup_seconds", 2)
    row(f"{opts.n:,} x {opts.sleep:g} s sleep at -c {opts.concurrency}, s (ideal {ideal:.2f})",
        "sleep", "seconds", 2)
    row("sleep: peak worker RSS, MiB", "sleep", "peak_rss_mib")
    row(f"Celery's queue, sent by a Celery client: no-op drain, tasks/s ({opts.noop_n:,} tasks, "
        f"-c {opts.noop_concurrency})", "celeryq_noop", "rate")
    row("Celery's queue: no-op, worker CPU per task, us", "celeryq_noop", "worker_cpu_us_per_task")
    row(f"Celery's queue: {opts.n:,} x {opts.sleep:g} s sleep at -c {opts.concurrency}, s (ideal {ideal:.2f})",
        "celeryq_sleep", "seconds", 2)
    row("Celery's queue: sleep, peak worker RSS, MiB", "celeryq_sleep", "peak_rss_mib")
    row(f"delay().get() p50, ms ({opts.roundtrips} sequential)", "roundtrip", "p50_ms", 2)
    row("delay().get() p99, ms", "roundtrip", "p99_ms", 2)
    if out["broker"] == "amqp":
        row("delay().get() p50, ms, greenq with confirms off", "roundtrip", "p50_ms_noconfirm", 2)
        row("delay().get() p99, ms, greenq with confirms off", "roundtrip", "p99_ms_noconfirm", 2)
    if "enqueue" in res:
        suffixes = [("_noconfirm", ", confirms off"), ("_confirm", ", confirms on")] \
            if out["broker"] == "amqp" else [("", "")]
        for suffix, note in suffixes:
            row(f"enqueue, delay() per message, msg/s{note}", "enqueue", "single" + suffix)
            row(f"enqueue, greenq enqueue_many, msg/s{note}", "enqueue", "bulk" + suffix)
    lines = [f"### {out['broker']} — {out['machine']['date']}, {out['machine']['cores']} cores", "",
             f"greenq: {out['greenq_code']}", ""]
    if rows:
        lines.append("| measure | " + " | ".join(labels[s] for s in systems) + " |")
        lines.append("|---|" + "---|" * len(systems))
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    if "limit" in res:
        lim = res["limit"]
        names = [s for s in ["limit"] + list(systems) if s in lim]
        head = {"limit": "the body alone (no queue)"}
        lines += ["", f"Against the limit: {opts.limit_n:,} tasks of one INCR + one SETNX on Redis, "
                  f"concurrency {opts.limit_concurrency}; the limit is the body alone run by "
                  f"{opts.limit_concurrency} greenlets in a process of its own (median of "
                  f"{opts.repeat}):", "",
                  "| measure | " + " | ".join(head.get(s, labels.get(s, s)) for s in names) + " |",
                  "|---|" + "---|" * len(names)]
        for label, field, digits in (("calls or tasks/s", "rate", 0), ("% of the limit", "pct_of_limit", 1),
                                     ("CPU per task (the process running it), us", "worker_cpu_us_per_task", 0),
                                     ("% of the limit by CPU per task (limit's CPU / this CPU)",
                                      "pct_of_limit_by_cpu", 1),
                                     ("load average (1 min) before, median run", "loadavg_1min_before", 2)):
            lines.append(f"| {label} | " + " | ".join(_fmt(lim[s].get(field), digits) for s in names) + " |")
        lines.append("| runs, per second | " + " | ".join(
            " / ".join(_fmt(r) for r in lim[s]["runs_rate"]) for s in names) + " |")
        lines.append("| % of the limit, round by round | " + " | ".join(
            " / ".join(_fmt(r, 1) for r in lim[s]["pct_of_limit_rounds"]) or "—" for s in names) + " |")
    if "processes" in res:
        lines += ["", f"greenq, {opts.noop_n:,} no-op tasks at -c {opts.noop_concurrency} per process, "
                  f"--processes P (median of {opts.repeat}; CPU summed over the processes that ran tasks):",
                  "", "| --processes | tasks/s | CPU per task, us (median run) | CPU per task, us (median) "
                  "| whole tree CPU per task, us | tasks per process | load average before |",
                  "|---|---|---|---|---|---|---|"]
        for procs, r in res["processes"].items():
            lines.append(f"| {procs} | {_fmt(r['rate'])} | {_fmt(r['worker_cpu_us_per_task'], 1)} | "
                         f"{_fmt(r['median_cpu_us_per_task'], 1)} | {_fmt(r['worker_tree_cpu_us_per_task'], 1)} | "
                         f"{' + '.join(str(d) for d in r['per_process_done'])} | "
                         f"{_fmt(r['loadavg_1min_before'], 2)} |")
    if "issue2" in res:
        ideal2 = opts.issue2_n * opts.issue2_sleep / opts.issue2_concurrency
        lines += ["", f"greenq, {opts.issue2_n:,} tasks x {opts.issue2_sleep:g} s at -c "
                  f"{opts.issue2_concurrency} on {out['broker']} (ideal {ideal2:.2f} s):", "",
                  "| pool | seconds | worker start to first task, s | peak RSS, MiB |", "|---|---|---|---|"]
        for pool, r in res["issue2"].items():
            lines.append(f"| {pool} | {_fmt(r['seconds'], 2)} | {_fmt(r['startup_seconds'], 2)} | "
                         f"{_fmt(r['peak_rss_mib'])} |")
    if out["errors"]:
        lines += ["", "Errors:"] + [f"- {e.splitlines()[0]}" for e in out["errors"]]
    return "\n".join(lines)
