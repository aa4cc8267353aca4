"""Typed tasks (CONTRACT section 13, docs/workflows.md "Typed tasks"):
``@app.task`` keeps the function's signature, so that a type checker
rejects ``add.delay(1, "x")`` and reads ``add.delay(1, 2).get()`` as an int.

typed_calls.py holds right and wrong calls; each wrong one names, in an
``# expect:`` marker, the error code mypy and pyright report on its line.
mypy (--strict, the repository's setup.cfg) and pyright (its default,
"standard" mode) run on that one file, and the errors they find must be
exactly the ones marked: each wrong call caught, no right call flagged.

Both checkers are in the ``test`` extra (pyright's PyPI package carries the
checker and runs it with the machine's node); without one its test skips,
or fails under GREENQ_TEST_REQUIRE_SERVICES=1 (CI)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

from greenq import AsyncResult, GreenQ, GroupResult, Signature, Task, chain, chord, group
from greenq.result import EagerResult

ROOT = Path(__file__).resolve().parents[2]
CALLS = Path(__file__).with_name("typed_calls.py")
MARKER = re.compile(r"#\s*expect:(?P<codes>(?:\s*\w+\[[\w,-]+\])+)\s*$")
CHECKER_CODES = re.compile(r"(\w+)\[([\w,-]+)\]")

Found = Set[Tuple[int, str]]


def _need(module: str, *, program: str = "") -> None:
    missing = importlib.util.find_spec(module) is None
    reason = f"{module} is not installed (pip install -e .[test])"
    if not missing and program and shutil.which(program) is None:
        missing, reason = True, f"{program} is not on PATH ({module} runs its checker with it)"
    if missing:
        if os.environ.get("GREENQ_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(f"GREENQ_TEST_REQUIRE_SERVICES=1 but {reason}")
        pytest.skip(reason)


def _comments() -> List[Tuple[int, str]]:
    """(line, text) of each comment of typed_calls.py (not its docstring)."""
    with CALLS.open() as source:
        return [(token.start[0], token.string) for token in tokenize.generate_tokens(source.readline)
                if token.type == tokenize.COMMENT]


def expected() -> Dict[str, Found]:
    """{checker: {(line, code)}} from the file's ``# expect:`` markers."""
    found: Dict[str, Found] = {"mypy": set(), "pyright": set()}
    for number, comment in _comments():
        mark = MARKER.search(comment)
        if mark is None:
            assert "expect" not in comment, f"typed_calls.py:{number}: unreadable marker"
            continue
        for checker, codes in CHECKER_CODES.findall(mark.group("codes")):
            found[checker].update((number, code) for code in codes.split(","))
    return found


def test_the_markers_are_read() -> None:
    """The parser sees every marker (a marker it skipped would hide an error
    a checker misses): one per wrong call, for both checkers."""
    marks = expected()
    lines = [n for n, comment in _comments() if "expect" in comment]
    assert len(lines) >= 20
    for checker in ("mypy", "pyright"):
        assert {n for n, _ in marks[checker]} == set(lines), checker


def test_mypy_reports_exactly_the_marked_errors(tmp_path: Path) -> None:
    _need("mypy")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-pretty",
         "--show-error-codes", "--no-error-summary", "--cache-dir", str(tmp_path / "mypy-cache"),
         str(CALLS.relative_to(ROOT))],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    output = done.stdout + done.stderr
    found: Found = set()
    error = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: .*?(?:\s\s\[(?P<code>[\w-]+)\])?$")
    for line in output.splitlines():
        match = error.match(line)
        if match is None:
            assert ": note: " in line, f"unexpected mypy output: {line}"
            continue
        assert Path(match["path"]).name == CALLS.name, line      # nothing from greenq itself
        found.add((int(match["line"]), match["code"] or "?"))
    assert done.returncode == 1, output
    _same(found, expected()["mypy"], output)


def test_pyright_reports_exactly_the_marked_errors() -> None:
    _need("pyright", program="node")
    done = subprocess.run(
        [sys.executable, "-m", "pyright", "--outputjson", "--pythonpath", sys.executable,
         str(CALLS.relative_to(ROOT))],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    report = json.loads(done.stdout)
    found: Found = set()
    for diagnostic in report["generalDiagnostics"]:
        assert Path(diagnostic["file"]).name == CALLS.name, diagnostic
        if diagnostic["severity"] in ("error", "warning"):
            found.add((diagnostic["range"]["start"]["line"] + 1, diagnostic.get("rule", "?")))
    assert report["summary"]["filesAnalyzed"] == 1, report["summary"]
    _same(found, expected()["pyright"], json.dumps(report["generalDiagnostics"], indent=1))


def _same(found: Found, wanted: Found, output: str) -> None:
    missed = sorted(wanted - found)
    extra = sorted(found - wanted)
    assert not missed and not extra, f"marked but not reported: {missed}\nreported but not marked: " \
                                     f"{extra}\n{output}"


def test_the_generics_are_subscriptable_at_run_time() -> None:
    """Annotations evaluated at run time (``typing.get_type_hints``, pydantic,
    FastAPI) can name the generic types; being generic changes nothing else."""
    for alias in (AsyncResult[int], EagerResult[int], Signature[int], GroupResult[int], chain[int],
                  group[int], chord[int], Task[[int, str], int], Task[..., int]):
        assert alias.__origin__ in (AsyncResult, EagerResult, Signature, GroupResult, chain, group, chord,
                                    Task)
    assert len(Task.__parameters__) == 2


def test_typed_tasks_run_as_before() -> None:
    """The generic classes make the same objects: an eager app's calls."""
    app = GreenQ("typed", broker="memory://", backend="memory://", eager=True, config_file=False)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    assert type(add) is Task and add(1, 2) == 3
    result = add.delay(1, 2)
    assert type(result) is EagerResult and isinstance(result, AsyncResult)
    assert result.get() == 3 and result.get(propagate=False) == 3
    assert type(add.s(1)) is Signature and add.s(1).delay(2).get() == 3
    assert (add.s(1, 2) | add.s(10)).delay().get() == 13
    assert group(add.s(1, 1), add.s(2, 2)).delay().get() == [2, 4]
