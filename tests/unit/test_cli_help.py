"""Every option of both command-line tools has help text, and every listing
command takes --json (CONTRACT.md §2)."""
from __future__ import annotations

import argparse

import pytest

from greenq.cli import admin, worker


def _parsers(parser: argparse.ArgumentParser, path: str = ""):
    yield path or parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path or parser.prog} {name}")


@pytest.mark.parametrize("build", [admin.build_parser, worker.build_parser], ids=["greenq", "greenq-worker"])
def test_every_option_and_command_has_help(build):
    missing = []
    for path, parser in _parsers(build()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if action.help is None:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if not choice.help:
                        missing.append(f"{path} {choice.dest} (command)")
    assert not missing, f"options without help: {missing}"


@pytest.mark.parametrize("command", [["queues"], ["dlq", "list"], ["config", "show"], ["result", "ID"]])
def test_listing_commands_take_json(command):
    assert admin.build_parser().parse_args([*command, "--json"]).json is True


def test_call_wait_has_a_default_timeout():
    args = admin.build_parser().parse_args(["call", "shop.tasks.add", "--wait"])
    assert args.timeout == admin.WAIT_TIMEOUT and 0 < args.timeout <= 300
