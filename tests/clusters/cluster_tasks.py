"""The task the failover runs drain, imported by real greenq-worker processes
(``-A cluster_tasks``): it appends ``<n> <start time>`` to $CLUSTER_LOG, so
completions are counted outside the broker being failed over."""
import os
import time

from greenq import GreenQ

app = GreenQ.from_config(name="clusters")


@app.task(name="clusters.record", ignore_result=True, acks_late=True)
def record(n, pause=0.0, pad=""):
    """``pad``: ballast, to make messages as large as a run wants."""
    started = time.time()
    if pause:
        time.sleep(pause)
    fd = os.open(os.environ["CLUSTER_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{n} {started:.4f}\n".encode())
    finally:
        os.close(fd)
