"""docs/frameworks.md quotes the test projects (tests/e2e/contrib_projects/):
each of its code blocks is in one of their files, as written."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_code_block_is_in_a_test_project():
    doc = (ROOT / "docs" / "frameworks.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert len(blocks) >= 6
    sources = [p.read_text() for p in (ROOT / "tests" / "e2e" / "contrib_projects").rglob("*.py")]
    for block in blocks:
        assert any(block in text for text in sources), f"docs/frameworks.md quotes no test project:\n{block}"
