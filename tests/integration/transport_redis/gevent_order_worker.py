"""A gevent worker (tests only) that records, in one list and in the order
sent, the round trips of its broker and result-backend clients, and marks
where ``fetch`` handed messages out.  Run by test_redis_round_trip_count.py:

    python -m tests.integration.transport_redis.gevent_order_worker URL PREFIX QUEUE

It prints ``ready`` once its blocking read is under way, then, once a result
is stored and the next fetch began, the JSON list of (command, argument)
pairs, and exits."""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402

from greenq import GreenQ  # noqa: E402
from greenq.drivers import get_driver  # noqa: E402
from greenq.transports.redis.results import STORE  # noqa: E402
from greenq.worker.consumer import Worker  # noqa: E402
from tests.conftest import make_config  # noqa: E402
from tests.integration.redis_round_trips import RoundTrips  # noqa: E402


def main() -> int:
    url, prefix, queue = sys.argv[1:4]
    app = GreenQ("rt", config=make_config(broker_url=url, key_prefix=prefix, default_queue=queue))

    @app.task(name="rt.echo")
    def echo(x):
        return x

    import hashlib
    store_sha = hashlib.sha1(STORE.encode()).hexdigest()
    worker = Worker(app, get_driver("gevent"), queues=[queue], concurrency=4, burst=False,
                    fetch_timeout=5.0)
    broker = worker.broker              # the worker's own (its consumer name)
    with RoundTrips(broker.client) as fetches, RoundTrips(worker.app.backend.client) as stores:
        stores.commands = fetches.commands          # one list: the order sent
        fetch = broker.fetch

        def marked(*args, **kwargs):
            out = fetch(*args, **kwargs)
            if out:
                fetches.commands.append(("HANDED-OUT", str(len(out))))
            return out
        broker.fetch = marked
        runner = gevent.spawn(worker.run)
        calls = fetches.commands
        while not any(c[0] == "XREADGROUP" for c in calls):
            gevent.sleep(0.01)
        print("ready", flush=True)
        deadline = 60 / 0.01
        while deadline > 0:
            done = [i for i, c in enumerate(calls) if c == ("EVALSHA", store_sha)]
            if done and any(c[0] in ("XREADGROUP", "EVALSHA") and i > done[0]
                            for i, c in enumerate(calls[:len(calls)]) if c[1] != store_sha):
                break
            gevent.sleep(0.01)
            deadline -= 1
        print(json.dumps(list(calls)), flush=True)
        worker.request_stop()
        runner.join(30)
    app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
