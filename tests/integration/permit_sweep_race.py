"""Run by test_permit_pools.py as ``python permit_sweep_race.py ROLE APP_KEY
SWEEPS INSIDE``, in $GREENQ_PERMITS_DIR:

* ``holder``: takes the one permit of resource ``db`` of app APP_KEY (host
  scope) again and again until the sweeper is done; while it holds it, it
  creates the file INSIDE exclusively (O_EXCL) and removes it before
  releasing: finding it there means another process held the same permit at
  the same time, and it exits with ``OVERLAP``.  Prints how many times it
  held the permit.
* ``sweeper``: sweeps the permit directory without an age limit, over and
  over, until it has removed SWEEPS lock files; then creates ``INSIDE.done``
  and prints how many it removed.

Each gives up after 60 s."""
import os
import sys
import time

from greenq.resources import host
from tests.conftest import make_config

role, app_key, sweeps, inside = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
done = inside + ".done"
deadline = time.monotonic() + 60
count = 0
if role == "sweeper":
    while count < sweeps and time.monotonic() < deadline:
        count += host.sweep(older_than=0)
    open(done, "w").close()
else:
    pool = host.HostPool("db", 1, app_key=app_key, config=make_config())
    while not os.path.exists(done) and time.monotonic() < deadline:
        if not pool.try_acquire("me"):
            continue
        try:
            fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            sys.exit("OVERLAP")
        os.close(fd)
        time.sleep(0.0002)
        os.unlink(inside)
        pool.release("me")
        count += 1
print(count, flush=True)
