"""Run by test_permit_pools.py as ``python permit_holder.py SCOPE URL
KEY_PREFIX APP_KEY RESOURCE LIMIT COUNT LEASE_SECONDS``: takes COUNT permits
of RESOURCE in a pool of SCOPE (host or cluster), prints HOLDING, and renews
them every lease_seconds / 4 until it is killed (with SIGKILL: it never
releases)."""
import sys
import time

from greenq.resources.base import pool_class
from tests.conftest import make_config

scope, url, prefix, app_key, resource = sys.argv[1:6]
limit, count, lease = int(sys.argv[6]), int(sys.argv[7]), float(sys.argv[8])
config = make_config(broker_url=url, key_prefix=prefix, lease_seconds=lease)
pool = pool_class(scope)(resource, limit, app_key=app_key, config=config)
deadline = time.monotonic() + 10
for n in range(count):
    while not pool.try_acquire(f"killed-{n}"):
        if time.monotonic() > deadline:
            sys.exit("no permit came free")
        time.sleep(0.05)
print("HOLDING", flush=True)
while True:
    time.sleep(lease / 4)
    pool.renew()
    if pool.in_use() != count:
        sys.exit("lost a permit")
