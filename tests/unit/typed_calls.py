"""Not a test module and never run: calls of typed tasks, right and wrong,
which tests/unit/test_typing.py type-checks with mypy (--strict) and pyright.

A line that must be an error says so at its end::

    add.delay(1, "x")  # expect: mypy[arg-type] pyright[reportArgumentType]

naming the error code each checker reports there; every other line must
have no error.  ``assert_type`` lines state what a checker must infer (a
mismatch is an error on a line that expects none).  Keep each call on one
line: the markers go by line."""
from __future__ import annotations

from typing import Any, List, Union

from typing_extensions import assert_type

from greenq import AsyncResult, GreenQ, GroupResult, Signature, Task, chain, chord, group
from greenq.result import EagerResult

app = GreenQ("typed", broker="memory://", backend="memory://")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="typed.label", queue="text")
def label(value: int, prefix: str = "#") -> str:
    return f"{prefix}{value}"


@app.task(bind=True, max_retries=3)
def bound(self: Task, x: int) -> float:
    return x / 2


@app.task
def total(values: List[int]) -> int:
    return sum(values)


def plain(x: int, y: int) -> int:
    return x * y


def with_self(self: Task, x: int) -> int:
    return x


def no_parameter() -> None:
    pass


# -- the decorator keeps the signature: calling the task here ---------------------------
assert_type(add(1, 2), int)
assert_type(label(1), str)
assert_type(bound(2), float)                      # bind=True: self is not one of its parameters
assert_type(app.task(plain)(1, 2), int)
assert_type(app.task(plain, name="typed.plain")(1, 2), int)
assert_type(app.task(name="typed.plain2")(plain)(1, 2), int)
add(1, "x")  # expect: mypy[arg-type] pyright[reportArgumentType]
app.task(plain)(1, "x")  # expect: mypy[arg-type] pyright[reportArgumentType]
bound(1, 2)  # expect: mypy[call-arg] pyright[reportCallIssue]
assert_type(app.task(bind=bool(app.name))(plain), Task)   # bind not a literal: not followed
assert_type(app.task(bind=True)(with_self).delay(1), AsyncResult[int])
app.task(bind=True)(with_self).delay("1")  # expect: mypy[arg-type] pyright[reportArgumentType]
app.task(bind=True)(no_parameter)  # expect: mypy[arg-type] pyright[reportArgumentType]
# (app.task(with_self, bind=True) is a Task[Any, Any] to mypy: with Any in with_self's
# signature, here its self: Task, the bind=True overload and the bind: bool one both match)

# -- delay ------------------------------------------------------------------------
assert_type(add.delay(1, 2), AsyncResult[int])
assert_type(add.delay(1, y=2), AsyncResult[int])
assert_type(label.delay(7), AsyncResult[str])
assert_type(bound.delay(4), AsyncResult[float])
add.delay(1, "x")  # expect: mypy[arg-type] pyright[reportArgumentType]
add.delay(1)  # expect: mypy[call-arg] pyright[reportCallIssue]
add.delay(1, 2, 3)  # expect: mypy[call-arg] pyright[reportCallIssue]
add.delay(1, 2, z=3)  # expect: mypy[call-arg] pyright[reportCallIssue]
label.delay(7, prefix=3)  # expect: mypy[arg-type] pyright[reportArgumentType]
bound.delay("4")  # expect: mypy[arg-type] pyright[reportArgumentType]

# -- AsyncResult[R].get ------------------------------------------------------------
result = add.delay(1, 2)
assert_type(result.get(), int)
assert_type(result.get(timeout=10), int)
assert_type(result.get(10, True), int)
assert_type(result.wait(timeout=10), int)
assert_type(result.get(timeout=10, propagate=False), Union[int, BaseException])
assert_type(result.get(10, False), Union[int, BaseException])
assert_type(result.get(propagate=bool(app.name)), Union[int, BaseException])
assert_type(label.delay(1).get(), str)
assert_type(add.delay(1, 2).get() + 1, int)
_ = add.delay(1, 2).get().upper()  # expect: mypy[attr-defined] pyright[reportAttributeAccessIssue]
_ = label.delay(1).get() + 1  # expect: mypy[operator] pyright[reportOperatorIssue]
assert_type(app.AsyncResult("some-id").get(), Any)      # found by id: its type is unknown
assert_type(app.send_task("typed.add", (1, 2)).get(), Any)
found: AsyncResult[int] = app.AsyncResult("some-id")
assert_type(found.get(), int)

# -- apply_async: the result is typed, args and kwargs are not checked --------------
assert_type(add.apply_async((1, 2), countdown=5), AsyncResult[int])
assert_type(add.apply_async(kwargs={"x": 1, "y": 2}).get(), int)
add.apply_async((1, "x"))                                # not caught: a tuple is not matched with P
add.apply_async(1)  # expect: mypy[arg-type] pyright[reportArgumentType]
assert_type(add.apply((1, 2)), EagerResult[int])
assert_type(add.si(1, 2).apply_async(countdown=5), AsyncResult[int])     # checked, with options
add.si(1, "x").apply_async(countdown=5)  # expect: mypy[arg-type] pyright[reportArgumentType]

# -- signatures -------------------------------------------------------------------
assert_type(add.s(1, 2), Signature[int])
assert_type(add.s(1), Signature[int])                   # the parent's result will be x
assert_type(add.s(y=1), Signature[int])
assert_type(total.s(), Signature[int])                  # a chord's body: the list comes first
assert_type(add.signature(1, 2), Signature[int])
assert_type(add.si(1, 2), Signature[int])
assert_type(add.s(1, 2).set(queue="q"), Signature[int])
assert_type(add.s(1, 2).delay(), AsyncResult[int])
assert_type(add.s(1).apply_async((2,)).get(), int)
add.s(1, "x")  # expect: mypy[call-overload] pyright[reportArgumentType]
add.s()  # expect: mypy[call-overload] pyright[reportCallIssue]
add.s(x=1)  # expect: mypy[call-overload] pyright[reportCallIssue]
add.s(1, 2, 3)  # expect: mypy[call-overload] pyright[reportCallIssue]
add.si(1)  # expect: mypy[call-arg] pyright[reportCallIssue]
add.si(1, "x")  # expect: mypy[arg-type] pyright[reportArgumentType]
assert_type(app.signature("typed.add", (1, 2)), Signature[Any])
assert_type(add.s(1, 2).link(label.s()), Signature[str])
add.s(1).delay("x")                                     # not caught: a signature's own arguments
# runs (both arguments come with delay), but s() is reported: it allows one argument for later
add.s().delay(1, 2)  # expect: mypy[call-overload] pyright[reportCallIssue]
assert_type(app.signature(add.name).delay(1, 2), AsyncResult[Any])

# -- chains: the last step's result ---------------------------------------------------
assert_type(add.s(1, 2) | label.s(), chain[str])
assert_type(add.s(1, 2) | label.s() | add.s(1), chain[int])
assert_type(chain(add.s(1, 2), label.s()), chain[str])
assert_type(chain(add.s(1, 2), add.s(3), label.s("$")), chain[str])
assert_type(chain(add.s(1, 2)), chain[int])
assert_type(chain([add.s(1, 2), label.s()]), chain[Any])    # from a list: not followed
assert_type((add.s(1, 2) | label.s()).delay().get(), str)
assert_type(chain(add.s(1, 2), label.s()).apply_async(countdown=1), AsyncResult[str])
_ = add.s(1, 2) | group(add.s(1), add.s(2))  # expect: mypy[operator] pyright[reportOperatorIssue]
_ = add.s(1, 2) | 3  # expect: mypy[operator] pyright[reportOperatorIssue]

# -- groups: one type for the members (their join) ------------------------------------
members = group(add.s(1, 2), add.s(3, 4))
assert_type(members, group[int])
assert_type(group([add.s(i, i) for i in range(3)]), group[int])
assert_type(group(add.s(i, i) for i in range(3)), group[int])
outcome = members.delay()
assert_type(outcome, GroupResult[int])
assert_type(outcome.get(timeout=10), List[int])
assert_type(outcome.get(timeout=10, propagate=False), List[Union[int, BaseException]])
assert_type(outcome[0], AsyncResult[int])
assert_type(list(outcome), List[AsyncResult[int]])
assert_type(app.GroupResult("some-id").get(), List[Any])
group(add.s(1, 2), 3)  # expect: mypy[call-overload] pyright[reportArgumentType]

# -- chords: the body's result ----------------------------------------------------------
assert_type(chord([add.s(1, 2), add.s(3, 4)], total.s()), chord[int])
assert_type(chord(members)(total.s()), chord[int])
assert_type(members | total.s(), chord[int])
assert_type(chord(members, total.s()).delay().get(), int)
assert_type(chord(members, total.s() | label.s()).delay().get(), str)
assert_type((chord(members, total.s()) | label.s()).delay(), AsyncResult[str])
chord(members, 3)  # expect: mypy[call-overload] pyright[reportCallIssue,reportArgumentType]
chord(members, label.s())                       # not caught: label takes an int, not the list
