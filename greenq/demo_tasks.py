"""Tasks of ``greenq demo``: I/O-bound work, simulated by a 0.1 s network wait."""
import os
import socket
import time

from greenq import GreenQ

app = GreenQ.from_config(name="demo")


@app.task(name="demo.fetch_page")
def fetch_page(n: int) -> dict:
    """Pretend to fetch page ``n``: wait 0.1 s as a slow HTTP call would."""
    time.sleep(0.1)  # cooperative in a patched worker: thousands run at once
    return {"page": n, "bytes": 512 + (n * 37) % 4096, "worker_pid": os.getpid(),
            "host": socket.gethostname()}
