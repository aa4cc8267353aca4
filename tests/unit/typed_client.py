"""Not a test module and never run: a small program using greenq's public API
the way an application does, which tests/unit/test_types.py type-checks with
``mypy --strict``.  Each ``assert_type`` is what a user's checker must see; an
export that reads as Any (greenq's lazy ``__getattr__``), an untyped decorator
or a wrong return type fails that test."""
from __future__ import annotations

from typing import Any, List

from typing_extensions import assert_type

import greenq
from greenq import (AsyncResult, GreenQ, GreenQError, GroupResult, Signature, Task, TimeoutError,
                    chain, chord, group)

app = GreenQ("typed", broker="memory://", backend="memory://")
assert_type(app, GreenQ)
assert_type(GreenQ.from_config(None), GreenQ)


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="typed.mul", queue="math", bind=True)
def mul(self: Task, x: int, y: int) -> int:
    return x * y


assert_type(add(2, 3), int)         # the signature is kept (tests/unit/test_typing.py)
assert_type(mul(2, 3), int)         # bind=True: without self

result = add.delay(2, 3)
assert_type(result, AsyncResult[int])
assert_type(result.id, str)
assert_type(result.state, str)
assert_type(result.ready(), bool)
assert_type(result.get(timeout=1), int)     # what the task returns
assert_type(add.apply_async((2, 3), countdown=1), AsyncResult[int])
assert_type(app.send_task("add", (2, 3)), AsyncResult[Any])   # by name: not known
assert_type(app.AsyncResult(result.id), AsyncResult[Any])

signature = add.s(2)
assert_type(signature, Signature[int])
assert_type(signature | mul.s(4), chain[int])
assert_type(chain(add.s(1, 2), mul.s(3)).delay(), AsyncResult[int])
members = group(add.s(1, 2), add.s(3, 4)).delay()
assert_type(members, GroupResult[int])
assert_type(members.get(timeout=1), List[int])
assert_type(list(members), List[AsyncResult[int]])
assert_type(app.GroupResult(members.id), GroupResult[Any])
assert_type(chord([add.s(1, 2)], mul.s(2)).delay(), AsyncResult[int])

assert_type(greenq.SUCCESS, str)
try:
    result.get(timeout=0.1)
except TimeoutError as exc:
    assert_type(exc, TimeoutError)
except GreenQError as exc:
    assert_type(exc, GreenQError)



@app.on("task_failure")
def alert(*args: Any) -> int:
    return len(args)


assert_type(alert(1, 2), int)       # a hook subscriber keeps its own type
assert_type(app.on("task_success", alert)(), int)
