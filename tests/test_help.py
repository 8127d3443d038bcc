"""Every command's ``--help``: it exits 0, reads as plain text and states its defaults.

The commands are found by walking the parser that ``vitcnn`` builds, so a new
command or subcommand is covered without a line here.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from vitcnn_store.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple]:
    """``(argv prefix, parser)`` of ``parser`` and of every subcommand below it."""
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*path, name))
    return found


COMMANDS = _commands(build_parser())
IDS = [" ".join(path) or "vitcnn" for path, _ in COMMANDS]
# reST roles and literals, Markdown code spans: the terminal shows them raw.
MARKUP = re.compile(r"``|`[^`]+`|:(func|class|mod|meth|data|attr):")


def test_the_walk_finds_every_command() -> None:
    paths = {" ".join(path) for path, _ in COMMANDS}
    expected = {
        "extract",
        "submit",
        "submit extract",
        "layers",
        "ls",
        "show",
        "verify",
        "query",
        "report",
        "demo",
        "analyze",
        *(f"analyze {a}" for a in ("cka", "attention", "localization", "skip", "probe")),
    }
    assert expected | {""} <= paths, sorted(paths)


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=IDS)
def test_help_exits_0_in_plain_text(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:
        main([*path, "--help"])
    assert exit.value.code == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: vitcnn") and err == ""
    assert not MARKUP.search(out), MARKUP.search(out)


@pytest.mark.parametrize(("path", "parser"), COMMANDS, ids=IDS)
def test_help_states_every_default(path: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
    """An option that has a value when not given says which (a flag's False needs no words)."""
    for action in parser._actions:
        if not action.option_strings or isinstance(action.default, bool):
            continue
        if action.default in (None, argparse.SUPPRESS, [], ()) or action.help is None:
            continue
        assert "default" in action.help, (path, action.option_strings, action.help)


def test_help_as_a_new_user_types_it() -> None:
    """One real process, as from a shell: the crash of issue 16 was in --help of extract."""
    result = subprocess.run(
        [sys.executable, "-m", "vitcnn_store.cli", "extract", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "--resume | --overwrite" in result.stdout and "--pretrained | --checkpoint" in result.stdout
    )
