"""Run in a process patched for gevent or eventlet (argv: driver, database
file): a fetch that dead-letters an oversized row while this green thread
holds every logging handler's lock.  The fetch runs its query in another OS
thread; if that thread logged, it would wait on a green lock it cannot wait
for (eventlet: "Cannot switch to a different thread", and the fetch never
returns).  Prints the fetched ids and the dead letters, then the log."""
import sys

driver, path = sys.argv[1], sys.argv[2]
if driver == "eventlet":
    import eventlet
    eventlet.monkey_patch()
else:
    from gevent import monkey
    monkey.patch_all()

import io        # noqa: E402
import logging   # noqa: E402
import sqlite3   # noqa: E402
import time      # noqa: E402

from greenq import GreenQ   # noqa: E402
from greenq.drivers import get_driver   # noqa: E402

stream = io.StringIO()
handler = logging.StreamHandler(stream)
logging.getLogger("greenq").addHandler(handler)
app = GreenQ("t", broker=f"sqlite:///{path}", backend=f"sqlite:///{path}")
app.config.set("greenq", "max_message_size", 65536, "the test")
broker = app.broker
broker.driver = get_driver(driver)
broker.declare(["default"])
with sqlite3.connect(path) as db:
    db.execute("INSERT INTO messages (queue, priority, visible_at, message_id, body) VALUES (?, 0, ?, ?, ?)",
               ("default", time.time(), "big-0", b"x" * (1 << 20)))
handler.acquire()            # held while the fetch runs in the database's thread
try:
    got = broker.fetch(["default"], 5, 0.1)
finally:
    handler.release()
print("fetched", [d.message_id for d in got])
print("dead", [d.message_id for d in broker.dlq_list()])
print("log", stream.getvalue().strip())
