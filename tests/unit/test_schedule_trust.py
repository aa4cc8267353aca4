"""The scheduler's record readers never raise and return only finite epoch
seconds, whatever bytes or JSON a broker hands back (issue 17, item 18;
hypothesis)."""
from __future__ import annotations

import json
import math

from hypothesis import given, settings, strategies as st

from greenq import validation
from greenq.leadership import decode_slot, encode_slot
from greenq.transports.amqp.leadership import AMQPLeadership
from greenq.signing import Signer
from tests.conftest import make_config

SIGNERS = [Signer(""), Signer("k1,k2")]
JSON = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
                    max_leaves=20)


def sane(slot) -> bool:
    return slot is None or (isinstance(slot, float) and math.isfinite(slot) and 0 <= slot <= validation.MAX_EPOCH)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SIGNERS), st.text(max_size=20), st.one_of(st.binary(max_size=120), st.text(max_size=40),
                                                                  st.floats(), st.integers()))
def test_decode_slot_returns_a_slot_or_none_for_any_value(signer, entry, raw):
    assert sane(decode_slot(signer, entry, raw))


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=20), st.floats(min_value=0, max_value=validation.MAX_EPOCH))
def test_a_signed_record_reads_back_for_its_entry_only(entry, slot):
    signer = SIGNERS[1]
    stored = encode_slot(signer, entry, slot)
    assert decode_slot(signer, entry, stored) == slot
    assert decode_slot(signer, entry + "x", stored) is None          # copied onto another entry
    assert decode_slot(Signer("other"), entry, stored) is None       # forged
    assert decode_slot(signer, entry, repr(slot)) is None            # unsigned


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SIGNERS), st.one_of(st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode())))
def test_the_rabbitmq_state_reader_returns_only_valid_slots(signer, body):
    lease = AMQPLeadership("amqp://guest:guest@127.0.0.1:5672/", make_config(), 5.0)   # no connection made
    lease.signer = signer
    runs = lease._read_state(body)
    assert isinstance(runs, dict) and all(isinstance(k, str) and sane(v) for k, v in runs.items())
    if not signer:
        doc = json.loads(body) if body[:1] == b"{" and _json(body) else None
        if isinstance(doc, dict):
            assert set(runs) <= set(doc)


def _json(body: bytes) -> bool:
    try:
        json.loads(body)
        return True
    except ValueError:
        return False
