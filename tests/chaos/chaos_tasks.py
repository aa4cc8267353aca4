"""The chaos runs' task, imported by real workers (``-A chaos_tasks``).

Each execution appends ``s <n> <pid> <time>`` as it starts and ``d <n> <pid>
<time>`` when it is done to the file named by ``$CHAOS_LOG``, opened with
O_APPEND: one ``write`` of a short line is atomic, so lines of concurrent
workers never interleave and the scenario counts completions, duplicates and
executions cut short by a kill exactly.
"""
import os
import time

from greenq import GreenQ

app = GreenQ.from_config(name="chaos")


def _log(event: str, n: int) -> None:
    fd = os.open(os.environ["CHAOS_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{event} {n} {os.getpid()} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)


@app.task(name="chaos.record", ignore_result=True)
def record(n: int, pause: float) -> None:
    """Record the start, work for ``pause`` seconds (so faults find tasks in
    flight), record the end."""
    _log("s", n)
    time.sleep(pause)
    _log("d", n)
