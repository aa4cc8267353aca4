"""The worker's reading of control commands with ``signing_key`` set
(greenq/control/auth.py, agent.py): a property test feeding arbitrary JSON
documents to ``ControlAgent.handle`` (the code that parses and dispatches
commands), and the age, replay, rotation and reply-address rules."""
from __future__ import annotations

import json
import time
import uuid

import pytest

from greenq import GreenQ
from greenq.config import load
from greenq.control import commands
from greenq.control.agent import ControlAgent
from greenq.transports.amqp.control import AMQPTransport
from greenq.control.auth import MAX_AGE, CommandReader, read_reply, sign_command, sign_reply
from greenq.transports.memory.control import MemoryTransport
from greenq.drivers import get_driver
from greenq.signing import Signer
from greenq.worker.consumer import Worker

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

KEYS = "new-key,old-key"
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=20)
NAMES = st.sampled_from(sorted(commands.COMMANDS)) | st.text(max_size=12)
COMMANDS = st.fixed_dictionaries(
    {"command": NAMES, "args": JSON, "id": st.text(max_size=40) | JSON, "reply_to": JSON,
     "destination": st.none() | st.lists(st.text(max_size=8), max_size=2) | JSON, "sent": JSON},
    optional={"sender": JSON})
DOCUMENTS = COMMANDS | JSON


@pytest.fixture(scope="module")
def agent():
    url = f"memory://trust-{uuid.uuid4().hex[:6]}"
    cfg = load(search=False, env={"GREENQ_BROKER_URL": url, "GREENQ_SIGNING_KEY": KEYS})
    app = GreenQ("trust", config=cfg)
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=2, name="prop")
    yield ControlAgent(worker, "prop"), MemoryTransport(url, cfg)
    app.close()


@pytest.fixture
def acted(monkeypatch):
    """Every command handler replaced by one that records its call."""
    calls: list = []
    for name in list(commands.COMMANDS):
        monkeypatch.setitem(commands.COMMANDS, name, lambda agent, _n=name, **kw: calls.append(_n) or "done")
    return calls


def _bodies(doc) -> list:
    """The document as a forger could write it: plain JSON, signed with a
    key the worker does not hold, signed by us with the right key but for
    another domain, and its bytes."""
    text = json.dumps(doc)
    return [text, text.encode(), Signer("evil-key").wrap("control", text.encode()),
            Signer(KEYS).wrap("control-reply", text.encode()), b"s1:" + b"0" * 64 + b":" + text.encode()]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=DOCUMENTS)
def test_no_unsigned_document_is_acted_on_and_none_raises(agent, acted, doc):
    control, transport = agent
    for body in _bodies(doc):
        control.handle(transport, body, "test")
    assert acted == []
    assert not transport.bus.replies


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=COMMANDS)
def test_signed_documents_never_raise(agent, acted, doc):
    """With the right key the same documents are read (and, when fresh and
    named right, acted on: the test above could fail)."""
    control, transport = agent
    acted.clear()                     # (the fixture lives across examples)
    doc = dict(doc, id=uuid.uuid4().hex, sent=time.time(), destination=None)
    control.handle(transport, Signer(KEYS).wrap("control", json.dumps(doc).encode()), "test")
    if doc["command"] in commands.COMMANDS and (doc["args"] is None or isinstance(doc["args"], dict)):
        assert acted == [doc["command"]]
    else:
        assert acted == []
    transport.bus.replies.clear()


def _doc(**extra):
    doc = {"id": uuid.uuid4().hex, "command": "ping", "args": {}, "destination": None,
           "reply_to": None, "sent": time.time(), "sender": "t.1"}
    doc.update(extra)
    return doc


def test_age_replay_and_rotation(caplog):
    reader = CommandReader(Signer(KEYS))
    fresh = _doc()
    assert reader.read(sign_command(Signer(KEYS), fresh), "here") == fresh
    assert reader.read(sign_command(Signer(KEYS), fresh), "here") is None          # replayed
    rotated = _doc()
    assert reader.read(sign_command(Signer("old-key"), rotated), "here") == rotated  # the second key verifies
    for sent in (time.time() - MAX_AGE - 5, time.time() + MAX_AGE + 5, None, "now", float("inf")):
        assert reader.read(sign_command(Signer(KEYS), _doc(sent=sent)), "here") is None
    assert reader.read(json.dumps(_doc(command="shutdown")), "redis stream x:control") is None
    text = caplog.text
    assert "replayed signed command" in text and "stale signed command: sent 65 s ago" in text
    assert "refused 'shutdown' from t.1 via redis stream x:control: unsigned control command refused" in text
    # without a key: plain JSON is read, as before signing
    assert CommandReader(Signer("")).read(json.dumps(fresh), "here") == fresh


def test_replies_signed_and_checked(caplog):
    reply = {"worker": "w", "id": "x", "ok": "pong"}
    assert read_reply(Signer(KEYS), sign_reply(Signer("old-key"), reply), "q") == reply
    assert read_reply(Signer(KEYS), json.dumps(reply), "q") is None
    assert read_reply(Signer(KEYS), sign_command(Signer(KEYS), reply), "q") is None   # a command is no reply
    assert read_reply(Signer(""), json.dumps(reply), "q") == reply
    assert "dropped a reply via q: unsigned control reply refused" in caplog.text


def test_reply_addresses_are_the_apps_own():
    cfg = load(search=False, env={"GREENQ_BROKER_URL": "amqp://localhost//", "GREENQ_KEY_PREFIX": "app-a"})
    amqp = AMQPTransport(cfg.broker_url, cfg)
    token = uuid.uuid4().hex
    assert amqp.owns_reply(f"app-a.control-reply.{token}")
    for other in (token, f"app-b.control-reply.{token}", f"app-a.reply.{token}", "default",   # (rpc:// replies)
                  f"app-a.control-reply.{token}x", "app-a.control-reply.", 5, None):
        assert not amqp.owns_reply(other), other
    memory = MemoryTransport("memory://x", cfg)
    assert memory.owns_reply(token) and not memory.owns_reply("../" + token) and not memory.owns_reply("a" * 300)
