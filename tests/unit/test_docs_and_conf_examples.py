"""Production day one, the small things (issue 18, item 14) that files can
show: docs name no file outside the repo, the example INI files say what the
code does."""
from __future__ import annotations

import configparser
import re
from pathlib import Path

from greenq import config

ROOT = Path(__file__).resolve().parents[2]


def test_docs_name_no_file_outside_the_repo():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for ref in re.findall(r"(?:\.\./)+[\w./-]*\w", doc.read_text()):
            target = (doc.parent / ref).resolve()
            assert ROOT in target.parents and target.exists(), f"{doc.name} names {ref}, not in the repo"


def test_rabbitmq_example_says_what_prefetch_0_is():
    text = (ROOT / "conf" / "rabbitmq.ini").read_text()
    ini = configparser.ConfigParser(inline_comment_prefixes=(";",))
    ini.read_string(text)
    concurrency = ini.getint("worker", "concurrency")
    said = re.search(r"prefetch; 0 = .*\((\d+) for (\d+)\)", text)
    assert said, "conf/rabbitmq.ini: the prefetch comment gives no example"
    assert int(said.group(2)) == concurrency
    assert int(said.group(1)) == config.effective_prefetch(concurrency, 0)


def test_greenq_example_lists_every_task_key():
    text = (ROOT / "conf" / "greenq.ini").read_text()
    listed = text[text.index("; Per-task overrides"):text.index(";[task:")]
    keys = set(re.findall(r"\w+", listed.split("keys:", 1)[1].replace(";", " ")))
    assert set(config.TASK_SETTINGS) <= keys, set(config.TASK_SETTINGS) - keys
