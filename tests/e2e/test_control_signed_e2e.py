"""A worker with ``signing_key`` on Redis and RabbitMQ: control commands
written straight into the real control stream / exchange are acted on only
when signed with one of its keys, recently, once (greenq/control/auth.py).

Forged ``shutdown``, ``pool_grow``, ``rate_limit`` and ``revoke --terminate``
(unsigned, signed with another key, signed but stale) leave the worker
running and unchanged, each refusal logged with the command, its sender and
the transport; an admin without the key gets no answer.  The same commands
signed with the right key work (so the test can fail), once: a replay of the
same body is refused.  Key rotation: an admin signing with the old key is
obeyed.  Ceilings: a revoke of 200,000 ids in one command is refused whole
(the revocations known stay), ``Control.revoke`` splits 2,500 ids into
commands the worker takes; ``pool_grow 100000`` is refused.  A ``reply_to``
outside the app's reply addresses gets no reply and nothing is written there.
"""
from __future__ import annotations

import signal
import sys
import time
import types
import uuid

import pytest

from greenq.control.client import Control
from greenq.validation import MAX_CONCURRENCY, MAX_REVOKE_IDS
from tests.conftest import own_prefix
from tests.e2e.conftest import HERE, Env
from tests.e2e.control_raw import RAW, body, command, replies_to

pytestmark = pytest.mark.e2e

NAME = "signed"
KEYS = "new-key,old-key"        # the worker: signs with new-key, accepts both


@pytest.fixture(params=["redis", "amqp"])
def signed_env(request, tmp_path):
    sys.path.insert(0, str(HERE))
    if request.param == "redis":
        url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
        extra = {}
    else:
        url, prefix = request.getfixturevalue("amqp_url"), own_prefix()
        queue = f"e2e-{uuid.uuid4().hex[:8]}"
        extra = {"GREENQ_DEFAULT_QUEUE": queue, "GREENQ_WORKER_QUEUES": queue}
    extra.update(GREENQ_KEY_PREFIX=prefix, GREENQ_SIGNING_KEY=KEYS)
    env = Env(tmp_path, url, extra)
    env.kind, env.prefix = request.param, prefix
    yield env
    env.cleanup()


def control_with(app, key: str) -> Control:
    """A Control of ``app``'s broker signing with ``key`` ("" for none)."""
    cfg = app.config.copy()
    cfg.set("greenq", "signing_key", key, origin="test")
    return Control(types.SimpleNamespace(config=cfg))


def _ask(control: Control, what: str, args=None, timeout: float = 10):
    replies = control.call(what, args, destination=[NAME], timeout=timeout)
    assert len(replies) == 1, replies
    return replies[0]


def test_only_signed_fresh_commands_are_obeyed(signed_env, pool):
    import e2e_tasks
    env = signed_env
    app = env.app()
    worker = env.worker(pool, "-n", NAME, "-c", "2", burst=False)
    control = Control(app)
    raw = RAW[env.kind](env.broker_url, env.prefix)
    try:
        deadline = time.monotonic() + 30
        while not control.call("ping", destination=[NAME], timeout=1):
            assert time.monotonic() < deadline and worker.poll() is None, env.dump()
        real = uuid.uuid4().hex
        app.control_revoke(real)

        # -- forged: unsigned, signed with another key, signed but stale -------------
        forged_id = uuid.uuid4().hex
        forged = [command("shutdown"), command("pool_grow", {"n": 5}),
                  command("rate_limit", {"task": "e2e.add", "rate": "1/m"}),
                  command("revoke", {"ids": [forged_id], "terminate": True, "at": time.time()})]
        raw.publish(*(body(doc) for doc in forged))
        raw.publish(*(body(dict(doc, id=uuid.uuid4().hex), "evil-key") for doc in forged))
        raw.publish(*(body(dict(doc, id=uuid.uuid4().hex, sent=time.time() - 3600), "new-key")
                      for doc in forged))
        # signed with the right key, to a reply address outside the app's: no reply, no write
        victim = f"{env.prefix}-victim-{uuid.uuid4().hex[:6]}"
        if env.kind == "amqp":
            raw.channel.queue_declare(victim, auto_delete=False)
        raw.publish(body(command("ping", reply_to=victim), "new-key"))
        # then a signed ping to our own reply address: the batch before it was read
        ping = command("ping", reply_to=raw.reply_to)
        raw.publish(body(ping, "new-key"))
        assert [r.get("ok") for r in replies_to(raw, ping["id"], "new-key")] == ["pong"], env.dump()

        assert worker.poll() is None, env.dump()
        assert _ask(control, "stats")["ok"]["concurrency"] == 2
        revoked = _ask(control, "revoked")["ok"]
        assert real in revoked and forged_id not in revoked
        assert [e2e_tasks.add.delay(i, 1).get(timeout=20) for i in range(3)] == [1, 2, 3]  # no 1/m limit
        assert control_with(app, "").call("ping", destination=[NAME], timeout=1) == []    # unsigned admin
        if env.kind == "amqp":
            assert raw.depth(victim) == 0
            raw.channel.queue_delete(victim)
        else:
            assert raw.keys(f"{env.prefix}:reply:{victim}") == [] and raw.keys(f"{victim}*") == []

        # -- the same commands signed with the right key work, once --------------------
        grow = command("pool_grow", {"n": 3}, reply_to=raw.reply_to)
        signed = body(grow, "new-key")
        raw.publish(signed)
        assert [r.get("ok") for r in replies_to(raw, grow["id"], "new-key")] == ["pool grown by 3 to 5"]
        raw.publish(signed)                                   # a replay of the captured body
        assert replies_to(raw, grow["id"], "new-key", timeout=2) == []
        assert _ask(control, "stats")["ok"]["concurrency"] == 5

        # -- key rotation: an admin still signing with the old key is obeyed -----------
        old = control_with(app, "old-key,new-key")
        try:
            assert _ask(old, "ping")["ok"] == "pong"
        finally:
            old.close()

        # -- ceilings --------------------------------------------------------------------
        big = _ask(control, "pool_grow", {"n": 100000})
        assert f"ceiling of {MAX_CONCURRENCY}" in big["error"], big
        flood = command("revoke", {"ids": [f"flood-{i}" for i in range(200000)], "terminate": False},
                        reply_to=raw.reply_to)
        raw.publish(body(flood, "new-key"))
        [refused] = replies_to(raw, flood["id"], "new-key", timeout=20)
        assert f"at most {MAX_REVOKE_IDS} per command" in refused["error"], refused
        many = [uuid.uuid4().hex for _ in range(2500)]
        assert control.revoke(many) == 3
        deadline = time.monotonic() + 20
        while not set(many) <= set(revoked := _ask(control, "revoked")["ok"]):
            assert time.monotonic() < deadline, len(set(many) - set(revoked))
        assert real in revoked and not any(t.startswith("flood-") for t in revoked)
        assert _ask(control, "stats")["ok"]["concurrency"] == 5

        # -- a signed shutdown stops it --------------------------------------------------
        raw.publish(body(command("shutdown"), "old-key"))
        out, _ = worker.communicate(timeout=30)
    finally:
        raw.close()
        control.close()
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    assert worker.returncode == 0, out
    transport = "stream" if env.kind == "redis" else "exchange"
    for name in ("shutdown", "pool_grow", "rate_limit", "revoke"):
        assert f"refused '{name}' from forger.1 via" in out, out
    assert f" {transport} {env.prefix}" in out
    assert "unsigned control command refused" in out and "forged control command" in out, out
    assert "stale signed command" in out and "replayed signed command" in out, out
    assert "is not one of this app's reply addresses" in out, out
    assert out.count("control: shutdown -> ok") == 1, out
    assert "Traceback" not in out and "reconnecting" not in out, out
