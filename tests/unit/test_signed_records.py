"""Issue 17: the signing of task messages (any of the keys verifies, the
first signs) and of stored records, in the Codec alone; the records written
into real stores are in tests/integration/test_signed_records.py."""
from __future__ import annotations

import pytest

from greenq import ConfigError, MessageError, TaskError
from greenq.message import GROUP, Codec, TaskMessage
from greenq.result import make_meta, rebuild_exception


def test_task_messages_verify_with_any_key_and_sign_with_the_first():
    old, rotating, new = Codec(signing_key="old"), Codec(signing_key="new, old"), Codec(signing_key="new")
    from_old = old.encode(TaskMessage(task="t", args=[1]))
    assert rotating.decode(from_old).args == [1]                       # step 2 still reads step 1's
    from_rotating = rotating.encode(TaskMessage(task="t", args=[2]))
    assert new.decode(from_rotating).args == [2]                       # ...and signs with its first key
    with pytest.raises(MessageError, match="forged"):
        old.decode(from_rotating)
    with pytest.raises(MessageError, match="forged"):
        new.decode(from_old)


def test_records_are_bound_to_their_kind_and_id():
    codec = Codec(signing_key="k")
    data = codec.encode_result(make_meta("a", "SUCCESS", result=1))
    assert data.startswith(b"s1:") and codec.decode_result(data, "a")["result"] == 1
    with pytest.raises(MessageError, match="forged result record of b"):
        codec.decode_result(data, "b")
    with pytest.raises(MessageError, match="forged group record of a"):
        codec.decode_result(data, "a", GROUP)
    with pytest.raises(MessageError, match="unsigned result record of a"):
        codec.decode_result(Codec().encode_result(make_meta("a", "SUCCESS", result=1)), "a")
    with pytest.raises(MessageError, match="not bytes"):
        codec.decode_result("s1:text", "a")
    # a reader without a key strips the tag unchecked (docs/reliability.md, Trust)
    assert Codec().decode_result(data, "a")["result"] == 1


def test_pickle_without_a_key_is_a_config_error():
    for serializer, accept in (("pickle", ["pickle"]), ("json", ["json", "pickle"])):
        with pytest.raises(ConfigError, match="signing_key"):
            Codec(serializer, accept)
        assert Codec(serializer, accept, signing_key="k").signed


@pytest.mark.parametrize("name", ["SystemExit", "KeyboardInterrupt", "GeneratorExit", "BaseException"])
def test_a_base_exception_is_never_rebuilt(name):
    exc = rebuild_exception({"type": f"builtins.{name}", "args": [0], "message": "bye"}, "tb")
    assert isinstance(exc, TaskError) and exc.type_name == f"builtins.{name}" and exc.remote_traceback == "tb"
    assert isinstance(rebuild_exception({"type": "builtins.KeyError", "args": ["k"]}, None), KeyError)
