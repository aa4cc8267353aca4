"""Malformed control commands written straight into a real broker's control
plane, beside a running ``greenq-worker`` (SQLite, Redis and RabbitMQ).

The commands go in as another program (or a garbled sender) would write them,
in each transport's layout (greenq/transports/sqlite/control.py, redis.py, amqp.py): a
row of ``control_commands``, an entry of the ``P:control`` stream, a message
on the ``P.control`` fanout exchange.  Bodies that are not JSON, not
UTF-8, JSON that is not an object, nested too deep; ``revoke`` commands whose
``args`` is not an object, whose ``ids`` is not a list of ids, whose
``terminate`` is not a boolean, whose ``at`` is ``"NaN"``, NaN, infinite,
negative, too large for a float or a year ahead; unknown commands; a
``destination`` of the wrong type; a ``reply_to`` of the wrong type, too long
for a queue name or not UTF-8; stream entries and rows of the wrong shape;
RabbitMQ properties that are not UTF-8.  They are sent in one batch,
interleaved with well-formed ones, so that a command which broke the control
loop would take the rest of its batch with it.  (Before the fixes that came
with this test, a body nested too deep, a ``destination`` that was a number,
a ``reply_to`` over 255 bytes on RabbitMQ and a property that was not UTF-8
each made the loop reconnect, losing the batch's remaining commands.)

Then: every command that carried our ``reply_to`` got exactly one reply, a
clear error for the refused ones and ``N revoked`` for the accepted ones (an
odd ``at`` is taken as now); the worker still answers ``ping``; a revoke sent
afterwards through ``AsyncResult.revoke``'s path still drops the task; and
the worker's control plane never had to reconnect.
"""
from __future__ import annotations

import json
import signal
import sqlite3
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

import pytest

from greenq.control.client import Control
from tests.e2e import control_raw

pytestmark = pytest.mark.e2e

NAME = "mal"
YEAR = 365 * 24 * 3600.0

# -- raw writers: each broker's control layout, without greenq's transport ----


class RawSQLite:
    """Rows of control_commands; replies read from control_replies."""

    def __init__(self, env) -> None:
        self.db = sqlite3.connect(env.broker_url[len("sqlite:///"):], timeout=10, isolation_level=None)
        self.reply_to = uuid.uuid4().hex
        self._last = 0

    def publish(self, bodies: List[Any]) -> None:
        self.db.execute("BEGIN IMMEDIATE")          # one transaction: the worker reads one batch
        self.db.executemany("INSERT INTO control_commands (created, body) VALUES (?, ?)",
                            [(time.time(), body) for body in bodies])
        self.db.execute("COMMIT")

    def replies(self, timeout: float) -> List[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.db.execute("SELECT id, body FROM control_replies WHERE reply_to = ? AND id > ? "
                                   "ORDER BY id", (self.reply_to, self._last)).fetchall()
            if rows or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if rows:
            self._last = rows[-1][0]
        return [body for _, body in rows]

    def close(self) -> None:
        self.db.close()


class RawRedis:
    """Entries of the P:control stream (field ``e``); replies BLPOPped from P:reply:<reply_to>."""

    def __init__(self, env) -> None:
        import redis
        self.client = redis.Redis.from_url(env.broker_url)
        self.prefix = env.env["GREENQ_KEY_PREFIX"]
        self.reply_to = uuid.uuid4().hex

    def publish(self, bodies: List[Any]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for body in bodies:
            pipe.xadd(f"{self.prefix}:control", body if isinstance(body, dict) else {"e": body})
        pipe.execute()

    def replies(self, timeout: float) -> List[bytes]:
        # short waits: redis-py 8 reads with a 5 s socket timeout by default
        found = self.client.blpop([f"{self.prefix}:reply:{self.reply_to}"], timeout=min(2.0, max(0.01, timeout)))
        return [found[1]] if found else []

    def close(self) -> None:
        self.client.close()


class RawAMQP(control_raw.RawAMQP):
    """Messages on the P.control fanout exchange (P: the env's key_prefix); replies
    consumed from a queue of our own, named as the app's reply queues are
    (``P.control-reply.<hex>``).  A body may come with its message properties."""

    def __init__(self, env) -> None:
        super().__init__(env.broker_url, env.env["GREENQ_KEY_PREFIX"])

    def publish(self, bodies: List[Any]) -> None:   # type: ignore[override]
        for body in bodies:
            body, props = body if isinstance(body, tuple) else (body, {})
            self.channel.basic_publish(self.amqp.Message(body, **props), exchange=f"{self.prefix}.control",
                                       routing_key="")


RAW = {"sqlite": RawSQLite, "redis": RawRedis, "amqp": RawAMQP}


# -- the commands ---------------------------------------------------------------

def _command(cmd_id: str, reply_to: Any, command: Any = "revoke", args: Any = None, **extra: Any) -> bytes:
    doc = {"id": cmd_id, "command": command, "args": args, "destination": None,
           "reply_to": reply_to, "sent": time.time()}
    doc.update(extra)
    return json.dumps(doc).encode()


def _with_raw_at(cmd_id: str, reply_to: str, task_id: str, at_json: str) -> bytes:
    """A revoke whose ``at`` is written as raw JSON text (NaN, Infinity, a
    400-digit number: what json.dumps would not write)."""
    return (f'{{"id": "{cmd_id}", "command": "revoke", "args": {{"ids": ["{task_id}"], '
            f'"terminate": false, "at": {at_json}}}, "destination": null, '
            f'"reply_to": "{reply_to}", "sent": {time.time()}}}').encode()


def _batch(kind: str, reply_to: str) -> Tuple[List[Any], Dict[str, Tuple[str, str]], List[str], List[str]]:
    """(bodies, expected replies {command id: ("ok"|"error", text in it)},
    the task ids the worker must now know as revoked, those it must not)."""
    bodies: List[Any] = []
    expected: Dict[str, Tuple[str, str]] = {}
    accepted: List[str] = []
    refused: List[str] = []

    def tid(label: str) -> str:
        return f"{label}-{uuid.uuid4().hex[:8]}"

    def refuse(label: str, text: str, command: Any = "revoke", args: Any = None, **extra: Any) -> None:
        expected[label] = ("error", text)
        bodies.append(_command(label, reply_to, command, args, **extra))

    def accept(label: str, at: Any) -> None:
        task_id = tid(label)
        accepted.append(task_id)
        expected[label] = ("ok", "1 revoked")
        if isinstance(at, str) and at.startswith("raw:"):
            bodies.append(_with_raw_at(label, reply_to, task_id, at[4:]))
        else:
            bodies.append(_command(label, reply_to, "revoke", {"ids": [task_id], "at": at}))

    # bodies no reply can come for: not JSON, not UTF-8, not an object, too deep
    no_reply = [b"{not json", b"\xff\xfe\x00\x80", b"", b"[1, 2]", b'"revoke"', b"null", b"42",
                b"[" * 100000 + b"]" * 100000,
                b'{"command": "revoke", "args": ' + b'{"a": ' * 50000 + b"1" + b"}" * 50001]
    if kind == "redis":
        no_reply += [{"x": b"1"}, {"e": b"1", "f": b"2"}]                   # no e field; an unknown one
    if kind == "sqlite":
        no_reply += [42, 1.5]                                               # a row whose body is a number
    silent = tid("no-reply")                                        # the real format of a revoke: no reply_to
    no_reply.append(_command("silent", None, "revoke", {"ids": [silent], "terminate": False, "at": time.time()}))
    accepted.append(silent)
    if kind == "amqp":                                              # odd properties around good commands
        props_ok = tid("props")
        accepted.append(props_ok)
        no_reply.append((_command("props", None, "revoke", {"ids": [props_ok]}),
                         {"content_type": "text/plain", "content_encoding": "latin-1",
                          "application_headers": {"x": [1, {"y": None}]}}))
        bad_props = tid("bad-props")                                # property bytes that are not UTF-8
        accepted.append(bad_props)
        no_reply.append((_command("bad-props", None, "revoke", {"ids": [bad_props]}),
                         {"content_type": b"\x80\xff", "message_id": b"\xc3\x28"}))
    sent_after = iter(no_reply)

    refuse("args-list", "args must be an object", args=["x"])
    refuse("args-string", "args must be an object", args="ids")
    refuse("args-empty-list", "args must be an object", args=[])
    bodies.append(next(sent_after))
    refuse("ids-string", "ids must be a list of task ids", args={"ids": "abc"})
    refuse("ids-absent", "ids must be a list of task ids", args={})
    refuse("ids-object", "ids must be a list of task ids", args={"ids": {"a": 1}})
    bodies.append(next(sent_after))
    refuse("id-number", "ids must be a list of task ids", args={"ids": [1]})
    refuse("id-empty", "ids must be a list of task ids", args={"ids": [""]})
    refuse("id-null", "ids must be a list of task ids", args={"ids": [None, "x"]})
    terminate_id = tid("terminate-string")
    refused.append(terminate_id)
    refuse("terminate-string", "terminate must be true or false", args={"ids": [terminate_id], "terminate": "yes"})
    unknown_id = tid("unknown-arg")
    refused.append(unknown_id)
    refuse("unknown-arg", "unexpected keyword argument 'bogus'", args={"ids": [unknown_id], "bogus": 1})
    bodies.append(next(sent_after))
    surrogate = tid("surrogate") + "\udc80"                    # JSON "\udc80": a str, not UTF-8 encodable
    accepted.append(surrogate)
    expected["id-surrogate"] = ("ok", "1 revoked")
    bodies.append(_command("id-surrogate", reply_to, "revoke", {"ids": [surrogate]}))
    refuse("unknown-command", "unknown command 'self-destruct'", command="self-destruct", args={"ids": ["x"]})
    refuse("command-number", "unknown command 42", command=42)
    refuse("command-null", "unknown command None", command=None)
    destination_id = tid("destination-number")
    refused.append(destination_id)
    refuse("destination-number", "destination must be a list of worker names",
           args={"ids": [destination_id]}, destination=5)
    elsewhere = tid("destination-other")                         # meant for another worker: ignored
    refused.append(elsewhere)
    bodies.append(_command("destination-other", reply_to, "revoke", {"ids": [elsewhere]},
                           destination=["someone-else", 5, None]))
    destination_str = tid("destination-string")                  # "mal" in "animal": not a list
    refused.append(destination_str)
    refuse("destination-string", "destination must be a list of worker names",
           args={"ids": [destination_str]}, destination="animal")
    bodies.append(next(sent_after))

    for label, at in [("at-nan-string", "NaN"), ("at-nan", "raw:NaN"), ("at-infinity", "raw:Infinity"),
                      ("at-negative", -1), ("at-huge-float", 1e308), ("at-huge-int", "raw:" + "9" * 400),
                      ("at-string", "soon"), ("at-bool", True), ("at-null", None),
                      ("at-year-ahead", time.time() + YEAR)]:
        accept(label, at)
        bodies.append(next(sent_after, b"{}"))

    # reply_to of the wrong type or one nobody reads: no reply to us, and the loop goes on
    for label, reply in [("reply-number", 5), ("reply-object", {"q": 1}), ("reply-empty", ""),
                         ("reply-long", "r" * 300), ("reply-surrogate", "r\ud800")]:
        task_id = tid(label)
        accepted.append(task_id)
        bodies.append(_command(label, reply, "revoke", {"ids": [task_id]}))
    bodies.extend(sent_after)
    expected["ping-last"] = ("ok", "pong")                      # last of the batch: the loop got this far
    bodies.append(_command("ping-last", reply_to, "ping", {}))
    return bodies, expected, accepted, refused


# -- the test -------------------------------------------------------------------

def _until(what: str, check, env, seconds: float = 20) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never happened\n{env.dump()}")


def _revoked(control: Control) -> Optional[List[str]]:
    replies = control.call("revoked", destination=[NAME], timeout=5)
    return replies[0]["ok"] if replies and "ok" in replies[0] else None


def test_malformed_commands_in_the_control_plane(any_env, pool):
    import e2e_tasks
    env = any_env
    app = env.app()
    worker = env.worker(pool, "-n", NAME, "-c", "2", burst=False)
    control = Control(app)
    raw = RAW[env.kind](env)
    try:
        _until("ping", lambda: control.call("ping", destination=[NAME], timeout=1), env, 30)
        bodies, expected, accepted, refused = _batch(env.kind, raw.reply_to)
        started = time.monotonic()
        raw.publish(bodies)

        replies: Dict[str, List[Dict[str, Any]]] = {}
        deadline = time.monotonic() + 20
        while set(expected) - set(replies) and time.monotonic() < deadline:
            for body in raw.replies(deadline - time.monotonic()):
                reply = json.loads(body)
                replies.setdefault(reply["id"], []).append(reply)
        missing = sorted(set(expected) - set(replies))
        assert not missing, f"no reply to {missing}; got {replies}\n{env.dump()}"
        for body in iter(lambda: raw.replies(0.2), []):     # (ping-last was last: the others came before)
            reply = json.loads(body[0])
            replies.setdefault(reply["id"], []).append(reply)
        assert set(replies) == set(expected), sorted(set(replies) - set(expected))
        for label, (key, text) in expected.items():
            [reply] = replies[label]             # one reply each
            assert reply["worker"] == NAME, reply
            assert key in reply and text in str(reply[key]), (label, reply)
        answered = time.monotonic() - started

        # the worker still answers, and knows exactly the ids of the accepted revokes
        assert [r.get("ok") for r in control.call("ping", destination=[NAME], timeout=5)] == ["pong"]
        known = set(_revoked(control) or ())
        assert set(accepted) <= known, sorted(set(accepted) - known)
        assert not set(refused) & known, sorted(set(refused) & known)

        # a revoke sent afterwards, as AsyncResult.revoke sends it, still drops the task
        later = uuid.uuid4().hex
        app.control_revoke(later)
        _until("the later revoke", lambda: later in (_revoked(control) or ()), env)
        dropped = e2e_tasks.add.apply_async((1, 1), task_id=later)
        ran = e2e_tasks.add.delay(2, 3)
        assert ran.get(timeout=20) == 5
        with pytest.raises(Exception) as info:
            dropped.get(timeout=20)
        assert type(info.value).__name__ == "TaskRevokedError" and dropped.state == "REVOKED"
    finally:
        raw.close()
        control.close()
    worker.send_signal(signal.SIGTERM)
    out, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0, out
    assert "reconnecting" not in out and "Traceback" not in out, out      # the control loop never broke
    assert "ahead of this worker's clock; taken as now" in out, out
    assert answered < 10, f"the batch took {answered:.1f} s"
