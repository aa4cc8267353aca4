"""The cost of one chord member's completion on Redis: storing its result,
counting it in its chord and deciding whether it completes the chord, as the
worker's settler does it (``ResultBackend.chord_members_done``, one script:
greenq/transports/redis/scripts/chord_done.lua).

    python tests/bench/chord_completion.py [--n 5000] [--size 100] [--batch 1] [--url redis://127.0.0.1:6379/13]

Runs ``--n`` member completions (chords of ``--size`` members, reported
``--batch`` members per call, as a settler batch would) against a real Redis
under a key prefix of its own (deleted after) and prints the cost per member
in µs and the round trips per call (counted on the client's connections).
With ``--signed`` a signing key is set: a member that fills its chord then
takes the checked path (its set's tags read and verified).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from greenq.backends import make_backend  # noqa: E402
from greenq.backends.base import ChordCount, Record  # noqa: E402
from tests.conftest import make_config  # noqa: E402
from tests.integration.redis_round_trips import RoundTrips  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="member completions (default 5000)")
    parser.add_argument("--size", type=int, default=100, help="members per chord (default 100)")
    parser.add_argument("--batch", type=int, default=1, help="members per call (default 1)")
    parser.add_argument("--url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--signed", action="store_true", help="with a signing key")
    opts = parser.parse_args()
    prefix = f"chordbench-{uuid.uuid4().hex[:8]}"
    settings = {"signing_key": "bench-key"} if opts.signed else {}
    backend = make_backend(opts.url, make_config(broker_url=opts.url, key_prefix=prefix, **settings))
    data = b"x" * 64
    try:
        counts = []
        for i in range(opts.n):
            group, member = f"g{i // opts.size}", f"m{i}"
            counts.append(ChordCount(group, member, opts.size, Record(member, data)))
        backend.chord_members_done([ChordCount("warm", "w", 1, Record("w", data))])   # scripts loaded
        completers = 0
        with RoundTrips(backend.client) as trips:
            start = time.perf_counter()
            for k in range(0, len(counts), opts.batch):
                completers += sum(backend.chord_members_done(counts[k:k + opts.batch]))
            elapsed = time.perf_counter() - start
        calls = (len(counts) + opts.batch - 1) // opts.batch
        print(f"redis chord completion: {opts.n} members, chords of {opts.size}, {opts.batch} per call"
              f"{', signed' if opts.signed else ''}")
        print(f"  {elapsed / opts.n * 1e6:.1f} µs per member, {trips.count / calls:.2f} round trips per call "
              f"({trips.count} in all), {completers} completers (expected {(opts.n + opts.size - 1) // opts.size})")
    finally:
        keys = list(backend.client.scan_iter(f"{prefix}:*", count=1000))
        for k in range(0, len(keys), 500):
            backend.client.delete(*keys[k:k + 500])
        backend.close()


if __name__ == "__main__":
    main()
