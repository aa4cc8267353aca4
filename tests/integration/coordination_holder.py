"""Run by test_coordination_suite.py as ``python coordination_holder.py URL
KEY_PREFIX LEASE LIMIT TTL``: takes a place of LEASE, prints HOLDING, and
renews it every ttl / 3 seconds until it is killed (with SIGKILL: it never
releases)."""
import sys
import time

from greenq.coordination import make_coordination
from tests.conftest import make_config

url, prefix, lease, limit, ttl = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
coordination = make_coordination(url, make_config(broker_url=url, key_prefix=prefix))
deadline = time.monotonic() + 10
while not coordination.acquire(lease, "killed-holder", limit, ttl):
    if time.monotonic() > deadline:
        sys.exit("no place came free")
    time.sleep(0.05)
print("HOLDING", flush=True)
while True:
    time.sleep(ttl / 3)
    if not coordination.renew(lease, "killed-holder", ttl):
        sys.exit("lost the place")
