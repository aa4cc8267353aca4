"""greenq is typed: ``python -m mypy greenq`` passes with the settings in
setup.cfg ([mypy]: the whole package; the seams strict), a program using the
public API sees its real types (not the Any of greenq's lazy ``__getattr__``),
and the wheel ships ``greenq/py.typed`` so that its users' checkers read them.

mypy is in the ``test`` extra (tox installs it); without it these tests skip,
or fail under GREENQ_TEST_REQUIRE_SERVICES=1 (CI)."""
from __future__ import annotations

import configparser
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

import greenq

ROOT = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).with_name("typed_client.py")


def _mypy(tmp_path: Path, *targets: str) -> "subprocess.CompletedProcess[str]":
    """``python -m mypy TARGETS`` from the repository root (so that it reads
    setup.cfg), with a cold cache of its own: no stale result from an older
    tree, nothing written into the checkout.  A cold run of the package takes
    a few seconds."""
    if importlib.util.find_spec("mypy") is None:
        reason = "mypy is not installed (pip install -e .[test])"
        if os.environ.get("GREENQ_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(f"GREENQ_TEST_REQUIRE_SERVICES=1 but {reason}")
        pytest.skip(reason)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy-cache"), *targets],
        cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_mypy_passes_on_the_package(tmp_path: Path) -> None:
    done = _mypy(tmp_path, "greenq")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Success: no issues found" in output, output


def test_the_public_api_has_its_types(tmp_path: Path) -> None:
    """typed_client.py asserts (typing.assert_type) the types a user's checker
    sees for the exports and the calls of a typical program; a name resolved
    to Any, or a wrong return type, is an error."""
    done = _mypy(tmp_path, "--strict", "--follow-imports=silent", str(CLIENT))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Success: no issues found in 1 source file" in output, output


def test_the_type_checking_imports_match_the_lazy_exports() -> None:
    """greenq/__init__.py names each export twice: in _EXPORTS (resolved at
    run time) and under TYPE_CHECKING (read by checkers); the two agree."""
    source = (ROOT / "greenq" / "__init__.py").read_text()
    block = source.split("if TYPE_CHECKING:", 1)[1].split("\n\n", 1)[0]
    typed: List[str] = []
    for statement in block.replace("\\\n", " ").splitlines():
        statement = statement.strip()
        if statement.startswith("from "):
            module, names = statement[len("from "):].split(" import ")
            for item in names.split(","):
                name, alias = (part.strip() for part in item.split(" as "))
                assert name == alias, f"{item.strip()}: re-export it as itself"
                assert greenq._EXPORTS.get(name) == module, f"{name} from {module}"
                typed.append(name)
    assert sorted(typed) == greenq.__all__


def test_py_typed_is_in_the_package_data() -> None:
    assert (ROOT / "greenq" / "py.typed").is_file()
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert "py.typed" in cfg["options.package_data"]["greenq"].split()
