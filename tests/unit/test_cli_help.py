"""The CLI explains itself: every option has a help line, defaults are shown,
nothing internal leaks into the listing, and a bare command prints usage."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from daemon.cli import build_parser
from tests.helpers import run_cli

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


def every_parser(parser, path=("campaignd",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                if name != "child":  # the supervisor's entry point, unlisted
                    yield from every_parser(child, (*path, name))


def test_every_option_and_argument_has_a_help_line():
    missing = [
        f"{' '.join(path)} {action.option_strings or action.dest}"
        for path, parser in every_parser(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction)
        and action.dest not in ("help", "version")
        and not action.help
    ]
    assert missing == []


def campaignd(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=30)


def test_help_shows_examples_exit_codes_and_defaults():
    top = campaignd("--help")
    assert top.returncode == 0
    assert "SUPPRESS" not in top.stdout and "child" not in top.stdout
    assert "examples:" in top.stdout and "exit codes:" in top.stdout
    create = campaignd("campaign", "create", "--help").stdout
    assert "--region REGION" in create and "(default: FR)" in create
    assert "{column}" in create


@pytest.mark.parametrize("argv", [(), ("campaign",), ("contacts",), ("events",)])
def test_a_bare_command_prints_what_can_follow(argv):
    done = campaignd(*argv)
    assert done.returncode == 2
    assert done.stderr.startswith("usage: campaignd")
    assert "positional arguments" in done.stderr
