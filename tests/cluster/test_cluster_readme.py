"""Every command ``cluster/README.md`` shows exists: each ``vitcnn ...`` line of its
shell blocks parses with the CLI's own parser, each ``python cluster/...py`` line with
that script's parser, each ``vitcnn ...`` in the prose names real subcommands and
options, and every ``cluster/...`` path it names is in the repository."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from tests.cluster.common import CLUSTER, ROOT

README = CLUSTER / "README.md"
SEPARATORS = {"&&", "||", ";", "|", "&"}


def shell_lines(markdown: str) -> Iterator[str]:
    """Logical lines of the ```bash/```sh blocks: continuations joined, comments cut."""
    for block in re.findall(r"^```(?:bash|sh|console)\n(.*?)^```", markdown, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                yield shlex.join(words)


def commands(line: str) -> Iterator[list[str]]:
    """The simple commands of one line, environment assignments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;")
    lexer.whitespace_split = True
    current: list[str] = []
    for token in [*lexer, ";"]:
        if token in SEPARATORS:
            while current and re.fullmatch(r"[A-Za-z_]\w*=.*", current[0]):
                current.pop(0)
            if current:
                yield current
            current = []
        else:
            current.append(token)


def readme_commands() -> list[list[str]]:
    return [cmd for line in shell_lines(README.read_text()) for cmd in commands(line)]


@cache
def vitcnn_parser() -> argparse.ArgumentParser:
    from vitcnn_store.cli import build_parser

    return build_parser()


def parse_error(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """None if ``argv`` parses, else what argparse said."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            return err.getvalue().strip() or f"exit {e.code}"
    return None


def script_parser(path: Path) -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location(f"_readme_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def test_readme_shows_the_commands_of_each_path() -> None:
    cmds = readme_commands()
    vitcnn = [c for c in cmds if c[0] == "vitcnn"]
    assert len(vitcnn) >= 6, vitcnn  # local, KubeRay, ray up, dask, object storage
    heads = {tuple(c[:2]) for c in cmds}
    for path in [
        ("python", "cluster/local_cluster.py"),
        ("ray", "up"),
        ("kubectl", "apply"),
        ("python", "cluster/dask/local_cluster.py"),
    ]:
        assert path in heads, f"no `{' '.join(path)}` in the README"


def test_every_vitcnn_command_parses() -> None:
    failures = []
    for cmd in readme_commands():
        if cmd[0] == "vitcnn" and (error := parse_error(vitcnn_parser(), cmd[1:])):
            failures.append(f"{shlex.join(cmd)}\n    {error}")
    assert not failures, "\n".join(failures)


def test_the_check_fails_on_a_wrong_command() -> None:
    bad = "vitcnn submit extract resnet50 --images builtin:photos --store s --run r --wiat"
    (cmd,) = commands(bad)
    assert "--wiat" in (parse_error(vitcnn_parser(), cmd[1:]) or "")
    assert parse_error(vitcnn_parser(), ["analyze", "kca", "s", "r"])


def test_every_helper_script_command_parses() -> None:
    seen = 0
    for cmd in readme_commands():
        if cmd[0] == "python" and cmd[1].startswith("cluster/"):
            error = parse_error(script_parser(ROOT / cmd[1]), cmd[2:])
            assert error is None, f"{shlex.join(cmd)}: {error}"
            seen += 1
    assert seen >= 2


def test_every_repository_path_exists() -> None:
    text = README.read_text()
    paths = set(re.findall(r"(?<![\w/.])(cluster/[\w./-]+)", text))
    file_table = text[: text.index("\n## ")]  # the table of this folder's files
    paths |= {f"cluster/{p}" for p in re.findall(r"^\| `([\w./-]+)` \|", file_table, re.M)}
    built = {"cluster/docker/dist", "cluster/aws/env/cluster.env"}  # made by the steps shown
    missing = [
        p
        for p in sorted(paths)
        if p.rstrip(".") not in built and not (ROOT / p.rstrip(".")).exists()
    ]
    assert not missing, missing


def inline_vitcnn(markdown: str) -> list[list[str]]:
    """`vitcnn ...` code spans of the prose (outside the shell blocks)."""
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    return [shlex.split(span) for span in re.findall(r"`(vitcnn(?: [^`]+)?)`", prose)]


def inline_problems(words: list[str]) -> list[str]:
    """Subcommands and ``--options`` of a partial ``vitcnn`` command that do not exist
    (``...`` stands for any subcommand: the option must exist in one of them)."""
    parsers, rest = [vitcnn_parser()], words[1:]
    while rest and not rest[0].startswith("-"):
        subs = [sub for p in parsers for sub in _subcommands(p).items()]
        if not subs:
            break
        if rest[0] == "...":
            parsers = _all_below(parsers)
        elif rest[0] in dict(subs):
            parsers = [dict(subs)[rest[0]]]
        else:
            return [f"`{shlex.join(words)}`: no subcommand {rest[0]}"]
        rest = rest[1:]
    known = {opt for p in parsers for action in p._actions for opt in action.option_strings}
    return [
        f"`{shlex.join(words)}`: no option {word}"
        for word in rest
        if word.startswith("--") and word.split("=")[0] not in known
    ]


def _all_below(parsers: list[argparse.ArgumentParser]) -> list[argparse.ArgumentParser]:
    out = []
    for parser in parsers:
        subs = list(_subcommands(parser).values())
        out += _all_below(subs) if subs else [parser]
    return out


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_inline_commands_name_real_subcommands_and_options() -> None:
    spans = inline_vitcnn(README.read_text())
    assert len(spans) >= 4, spans
    problems = [p for words in spans for p in inline_problems(words)]
    assert not problems, "\n".join(problems)


def test_inline_check_fails_on_wrong_words() -> None:
    assert inline_problems(["vitcnn", "submitt", "extract"])
    assert inline_problems(["vitcnn", "extract", "--gpu"])
    assert inline_problems(["vitcnn", "analyze", "cka", "--dask-adress"])
    assert not inline_problems(["vitcnn", "analyze", "cka", "--dask-address"])
    assert not inline_problems(["vitcnn", "analyze", "...", "--dask-address"])
    assert inline_problems(["vitcnn", "...", "--no-such-option"])
