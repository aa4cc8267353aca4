"""One stop of a ``--processes 2`` worker, the way a deploy or an operator
sends it (issue 18, item 1): 4 tasks of ``--seconds`` each run (two per
child), then the worker is stopped and the script prints how many finished,
their states, and the log's shutdown lines.

    python tests/bench/warm_stop_demo.py group|ctrl-c|supervisor [--seconds 8] [--root DIR]

``group``: ``kill -TERM -<pgid>``, what systemd's KillMode=control-group
does; ``ctrl-c``: Ctrl-C in a real terminal (tmux send-keys C-c);
``supervisor``: SIGTERM to the supervisor alone (KillMode=mixed).  The
broker is a fresh SQLite file.  ``--root`` runs the greenq found there (an
older checkout, to compare).
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = 4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("how", choices=["group", "ctrl-c", "supervisor"])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--root", default=str(HERE.parent.parent))
    args = parser.parse_args()
    root, e2e = Path(args.root).resolve(), HERE.parent / "e2e"
    tmp = Path(tempfile.mkdtemp(prefix="warm-stop-"))
    markers, log = tmp / "markers", tmp / "worker.log"
    markers.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREENQ_")}
    env.update(GREENQ_BROKER_URL=f"sqlite:///{tmp / 'broker.sqlite3'}", GREENQ_WORKER_LOGLEVEL="INFO",
               PYTHONPATH=f"{e2e}{os.pathsep}{root}", E2E_MARKERS=str(markers))
    os.environ.update({k: v for k, v in env.items() if k.startswith("GREENQ_")})
    sys.path[:0] = [str(e2e), str(root)]
    import e2e_tasks
    results = [e2e_tasks.slow.delay(f"t{i}", args.seconds) for i in range(TASKS)]
    cmd = [sys.executable, "-m", "greenq.worker", "-A", "e2e_tasks", "--processes", "2", "-c", "2",
           "--prefetch", "2"]
    session = f"warm-stop-{os.getpid()}"
    if args.how == "ctrl-c":
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()
                           if k.startswith(("GREENQ_", "E2E_")) or k == "PYTHONPATH")
        line = f"cd {tmp} && env {exports} {shlex.join(cmd)} > {log} 2>&1; echo $? > {tmp / 'exit'}"
        subprocess.run(["tmux", "new-session", "-d", "-s", session], check=True)
        subprocess.run(["tmux", "send-keys", "-t", session, line, "Enter"], check=True)
    else:
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    deadline = time.monotonic() + 60
    while sum((markers / f"t{i}.started").exists() for i in range(TASKS)) < TASKS:
        if time.monotonic() > deadline:
            print(log.read_text())
            return 1
        time.sleep(0.05)
    time.sleep(1.0)                          # every task is well into its run
    if args.how == "ctrl-c":
        print("tmux send-keys C-c")
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        while not (tmp / "exit").exists():
            time.sleep(0.1)
        code = (tmp / "exit").read_text().strip()
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    else:
        if args.how == "group":
            print(f"kill -TERM -{os.getpgid(proc.pid)}")
            os.killpg(os.getpgid(proc.pid), signal.SIGTERM)
        else:
            print(f"kill -TERM {proc.pid}")
            proc.send_signal(signal.SIGTERM)
        code = str(proc.wait(120))
    text = log.read_text()
    finished = sum((markers / f"t{i}.finished").exists() for i in range(TASKS))
    cold = sum("cold" in line for line in text.splitlines())
    print(f"exit {code}; finished {finished} of {TASKS}; states {[r.state for r in results]}; "
          f"lines saying 'cold': {cold}")
    print("\n".join(line for line in text.splitlines()
                    if any(word in line for word in ("shutdown", "cold", "stopped", "stop signal"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
