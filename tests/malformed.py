"""Malformed task message bodies, for tests that write bad input straight into
a broker.  Every body made here must be refused by the worker's decoder (and so
dead-lettered): none is a valid envelope of a registered task.

``bad_bodies(n, seed)`` mixes every kind below; ``KINDS`` names them so a test
can report what it injected.
"""
from __future__ import annotations

import json
import random
import uuid
from typing import Callable, Dict, List, Tuple

#: the registered task the mutated envelopes name (tests/e2e/e2e_tasks.py), so that
#: the mutation alone is what makes each one bad
TASK = "e2e.add"
#: values of the wrong type for some envelope field, and odd JSON in general
ODD_VALUES = ["abc", "", "soon", [], [1, 2], {}, {"a": 1}, True, False, None, -1, -1.5,
              10 ** 30, 1e308, "NaN", "\u0000", "\ud800", 3.5, 2 ** 63, -(2 ** 63), 0]
#: fields whose wrong-typed values must be refused
FIELDS = ("task", "id", "queue", "priority", "eta", "expires", "retries", "created",
          "time_limit", "soft_time_limit", "ct", "args", "kwargs", "v", "root_id", "reply_to")
#: a value that is acceptable in each field (so a mutation of one field is what breaks it)
ACCEPTED = {"task": {str}, "id": {str}, "queue": {str}, "root_id": {str, type(None)},
            "reply_to": {str, type(None)}}


def good_envelope(task: str, rng: random.Random) -> Dict:
    return {"v": 1, "ct": "json", "id": str(uuid.UUID(int=rng.getrandbits(128))), "task": task,
            "queue": "default", "priority": 0, "retries": 0, "created": 1.7e9,
            "args": [rng.randint(0, 9), rng.randint(0, 9)], "kwargs": {}}


def _wrong_type(rng: random.Random) -> bytes:
    env = good_envelope(TASK, rng)
    field = rng.choice(FIELDS)
    while True:
        value = rng.choice(ODD_VALUES)
        if field in ("task", "id", "queue") and isinstance(value, str) and value and value.isprintable():
            continue          # a plain string would be valid there (an unknown task is refused anyway)
        if value is None and field not in ("task", "id", "args", "kwargs", "v", "ct", "expires"):
            continue          # null is read as "absent" where the field has a default
        if field in ("root_id", "reply_to") and isinstance(value, str):
            continue
        if field in ("priority",) and type(value) is int and 0 <= value <= 9:
            continue
        if field in ("retries",) and type(value) is int and 0 <= value <= 2 ** 31:
            continue
        if field in ("eta", "expires", "created") and type(value) in (int, float) and \
                0 <= value <= 253402300799 and field != "expires":
            continue
        if field in ("time_limit", "soft_time_limit") and (value is None or (
                type(value) in (int, float) and 0 <= value <= 3.2e9)):
            continue
        if field == "args" and isinstance(value, list):
            continue
        if field == "kwargs" and isinstance(value, dict):
            continue
        if field == "expires" and (value is None or type(value) in (int, float)):
            value = "soon" if value is None else -1e308 * 10   # already expired is valid: use a bad one
        break
    env[field] = value
    return json.dumps(env, allow_nan=True).encode("utf-8", "surrogatepass")


def _deep(rng: random.Random) -> bytes:
    env = good_envelope(TASK, rng)
    depth = rng.choice([150, 1000, 5000, 100000])
    return (json.dumps(env)[:-1] + ', "args": [' + "[" * depth + "]" * depth + "]}").encode()


def _not_json(rng: random.Random) -> bytes:
    return rng.choice([b"", b"{", b"not json", b"\x80\x81\xfe\xff", b"{\"v\": 1, \"task\": \"x\"",
                       bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))])


def _not_object(rng: random.Random) -> bytes:
    return json.dumps(rng.choice([[], [1, 2], "text", 42, None, True, [{"task": "x"}]])).encode()


def _non_utf8(rng: random.Random) -> bytes:
    env = json.dumps(good_envelope(TASK, rng)).encode()
    cut = rng.randint(1, len(env) - 1)
    return env[:cut] + b"\xc3\x28\xff" + env[cut:]


def _huge_number(rng: random.Random) -> bytes:
    env = json.dumps(good_envelope(TASK, rng))
    field = rng.choice(["priority", "retries", "eta", "created"])
    return env.replace(f'"{field}": ', f'"{field}": 9{"9" * 5000}, "x{field}": ', 1).encode() \
        if f'"{field}": ' in env else (env[:-1] + f', "{field}": 1{"0" * 5000}}}').encode()


def _bad_version(rng: random.Random) -> bytes:
    env = good_envelope(TASK, rng)
    env["v"] = rng.choice([0, 2, "1", 1.5, None, True])
    return json.dumps(env).encode()


def _unknown_task(rng: random.Random) -> bytes:
    return json.dumps(good_envelope(f"no.such.task{rng.randint(0, 999)}", rng)).encode()


def _missing(rng: random.Random) -> bytes:
    env = good_envelope(TASK, rng)
    del env[rng.choice(["task", "id"])]
    return json.dumps(env).encode()


KINDS: Dict[str, Callable[[random.Random], bytes]] = {
    "wrong_type": _wrong_type, "deep": _deep, "not_json": _not_json, "not_object": _not_object,
    "non_utf8": _non_utf8, "huge_number": _huge_number, "bad_version": _bad_version,
    "unknown_task": _unknown_task, "missing_field": _missing,
}


def bad_bodies(n: int, seed: int) -> List[Tuple[str, bytes]]:
    """``n`` (kind, body) pairs, reproducible from ``seed``."""
    rng = random.Random(seed)
    kinds = sorted(KINDS)
    return [(kind, KINDS[kind](rng)) for kind in (rng.choice(kinds) for _ in range(n))]
