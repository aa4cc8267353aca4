"""The workflow fields of the envelope (docs/protocol.md): carried, signed,
checked when present, and costing nothing when absent."""
from __future__ import annotations

import json

import pytest

from greenq import ConfigError, GreenQ, MessageError
from greenq.message import Codec, TaskMessage

LINK = [{"task": "t.cb", "args": [], "kwargs": {}, "options": {"task_id": "cb-1"}, "immutable": False}]


def workflow_message() -> TaskMessage:
    return TaskMessage(task="t.add", args=[1], id="a", parent_id="p", group_id="g", chord_size=3,
                       link=LINK, link_error=LINK, chain=LINK, root_id="r")


def test_workflow_fields_round_trip_and_are_absent_otherwise():
    codec = Codec()
    back = codec.decode(codec.encode(workflow_message()))
    assert (back.parent_id, back.group_id, back.chord_size) == ("p", "g", 3)
    assert back.link == back.link_error == back.chain == LINK
    plain = json.loads(codec.encode(TaskMessage(task="t.add")))
    assert not {"parent_id", "group_id", "chord_size", "link", "link_error", "chain"} & set(plain)


@pytest.mark.parametrize("field, value", [("link", {"task": "x"}), ("chain", [1]), ("link_error", [{"no": 1}]),
                                          ("chord_size", -1), ("chord_size", "3"), ("parent_id", 5)])
def test_malformed_workflow_fields_are_refused(field, value):
    codec = Codec()
    env = json.loads(codec.encode(TaskMessage(task="t.add")))
    env[field] = value
    with pytest.raises(MessageError, match=field):
        codec.decode(json.dumps(env).encode())


def test_workflow_fields_are_signed():
    codec = Codec(signing_key="k")
    env = json.loads(codec.encode(workflow_message()))
    env["link"][0]["task"] = "evil.task"
    with pytest.raises(MessageError, match="forged"):
        codec.decode(json.dumps(env).encode())


def test_a_schedule_section_without_task_or_period_fails_the_config_check(tmp_path):
    ini = tmp_path / "greenq.ini"
    ini.write_text("[schedule:x]\ntask = t\n")
    with pytest.raises(ConfigError, match=r"\[schedule:x\].*exactly one of every"):
        GreenQ.from_config(str(ini))
