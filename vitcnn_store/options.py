"""One option table per command: the fields of a config dataclass say how they are typed.

A config dataclass (``ModelSpec``, ``jobs.config.ExtractConfig``, ...) declares
each option once, with :func:`option`: its flag, help, parser, choices and
bounds. From that one declaration

- :func:`add_arguments` builds the argparse options (choices and metavars
  included),
- :func:`check_options` validates a config however it was made (the CLI, the
  Python API, a test), with one message per problem naming the flag,
- :func:`config_kwargs` turns parsed arguments into the dataclass's keyword
  arguments, and :func:`to_argv` turns a config back into the command line
  that makes it (``vitcnn submit`` sends that line to the cluster).

Argparse only converts text (``"8"`` → 8, ``"auto"`` kept); every range check
lives in :func:`check_options`, so the CLI and the Python API refuse the same
values with the same words.

Examples
--------
>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Demo:
...     size: int = option(8, flag="--size", help="images", parse=int, check="positive")
...     mode: str = option("fast", flag="--mode", help="how", choices=("fast", "slow"))
>>> check_options(Demo(size=0))
Traceback (most recent call last):
...
vitcnn_store.errors.UsageError: --size must be positive, got 0
>>> to_argv(Demo(size=4))
['--size', '4']
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vitcnn_store.errors import UsageError

__all__ = [
    "AUTO",
    "Option",
    "add_arguments",
    "check_options",
    "config_kwargs",
    "option",
    "options_of",
    "parse_auto",
    "resolve_aliases",
    "to_argv",
]

#: The value of an option that the job sizes itself (``--workers auto``).
AUTO = "auto"
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive": (lambda v: v > 0, "must be positive"),
    "non-negative": (lambda v: v >= 0, "must be >= 0"),
    "fraction": (lambda v: 0 < v < 1, "must be in (0, 1)"),
}
_AT_LEAST = "at least "


def _rule(check: str) -> tuple[Callable[[Any], bool], str]:
    """The test and the words of ``check``: a name of ``_CHECKS`` or ``"at least N"``."""
    if check.startswith(_AT_LEAST):
        low = int(check[len(_AT_LEAST) :])
        return (lambda v: v >= low), f"must be >= {low}"
    return _CHECKS[check]


@dataclass(frozen=True)
class Option:
    """How one config field appears on the command line.

    ``action`` is ``"store"`` (a value), ``"true"``/``"false"`` (a flag setting
    the field to True/False), ``"append"`` (repeatable, a tuple) or
    ``"positional"``. ``check`` is ``"positive"``, ``"non-negative"``,
    ``"fraction"`` (in (0, 1)) or ``"at least N"``; a tuple value is checked item
    by item and must not be empty. ``auto`` lets the value ``"auto"`` through.
    ``shown`` is the default as the help states it, where the value itself
    would not read well (``--gather-memory``: "2048 MiB", not the bytes).
    ``exclusive`` names a group of flags of which at most one may be given.
    ``nested`` is a dataclass whose own options stand for this field
    (``--img-size`` for ``model.img_size``). ``aliases`` maps other spellings of
    ``choices`` to the choice each stands for (``mean`` → ``gap``): argparse and
    :func:`resolve_aliases` replace them, so only the choice itself is ever stored.
    """

    flag: str
    help: str = ""
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    check: str | None = None
    auto: bool = False
    action: str = "store"
    metavar: str | None = None
    exclusive: str | None = None
    nested: type | None = None
    note: str = ""  # appended to the message of a failed check (how to fix it)
    collect: Callable[[list[Any]], Any] | None = None  # "append": the list -> the field
    shown: str | None = None
    aliases: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if self.aliases and not set(self.aliases.values()) <= set(self.choices or ()):
            raise ValueError(f"{self.flag}: aliases must stand for choices")
        if self.check is None:
            return
        try:
            _rule(self.check)
        except (KeyError, ValueError):
            raise ValueError(f"unknown check {self.check!r}") from None


def option(default: Any = dataclasses.MISSING, *, flag: str, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field carrying its :class:`Option` (``default_factory=`` is passed on)."""
    factory = kwargs.pop("default_factory", dataclasses.MISSING)
    meta = {"option": Option(flag=flag, help=help, **kwargs)}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def options_of(cls: Any) -> Iterator[tuple[dataclasses.Field[Any], Option]]:
    """Every field of dataclass ``cls`` (or of an instance) that carries an option."""
    for f in dataclasses.fields(cls):
        opt = f.metadata.get("option")
        if isinstance(opt, Option):
            yield f, opt


def parse_auto(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A parser that keeps ``"auto"`` and converts anything else with ``parse``."""

    def parse_or_auto(text: str) -> Any:
        return AUTO if text == AUTO else parse(text)

    parse_or_auto.__name__ = getattr(parse, "__name__", "value")
    return parse_or_auto


def _argparse_type(opt: Option) -> Callable[[str], Any] | None:
    if opt.aliases:  # argparse converts before it checks the choices
        return _canonical(opt.aliases)
    parse = opt.parse
    if parse is None:
        return None
    if opt.auto:
        parse = parse_auto(parse)
    name = {int: "an integer", float: "a number"}.get(opt.parse, "a value")  # type: ignore[call-overload]

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except (ValueError, TypeError, UsageError) as e:
            extra = " or auto" if opt.auto else ""
            detail = str(e) if isinstance(e, UsageError) else f"expected {name}{extra}"
            raise argparse.ArgumentTypeError(f"{detail}, got {text!r}") from None

    return convert


def _canonical(aliases: Mapping[str, str]) -> Callable[[str], str]:
    def canonical(text: str) -> str:
        return aliases.get(text, text)

    return canonical


def resolve_aliases(config: Any) -> None:
    """Replace each alias in ``config`` by the choice it stands for (:class:`Option`).

    Run on construction (frozen dataclasses included), before validation, so a
    config, its parameters and what it stores are the same whichever spelling
    the user gave.

    Examples
    --------
    >>> @dataclass(frozen=True)
    ... class Demo:
    ...     how: str = option("gap", flag="--how", choices=("gap", "cls"), aliases={"mean": "gap"})
    ...     def __post_init__(self) -> None:
    ...         resolve_aliases(self)
    >>> Demo(how="mean")
    Demo(how='gap')
    """
    for f, opt in options_of(config):
        value = getattr(config, f.name)
        if opt.aliases and isinstance(value, str) and value in opt.aliases:
            object.__setattr__(config, f.name, opt.aliases[value])


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_arguments(
    parser: argparse.ArgumentParser, cls: Any, skip: Sequence[str] = (), prefix: str = ""
) -> None:
    """Add the options of dataclass ``cls`` (and of nested ones) to ``parser``.

    Each argument's ``dest`` is ``prefix + field name``; :func:`config_kwargs`
    reads them back.
    """
    groups: dict[str, Any] = {}
    for f, opt in options_of(cls):
        if f.name in skip or opt.flag in skip:
            continue
        if opt.nested is not None:
            add_arguments(parser, opt.nested, skip, prefix=f"{prefix}{f.name}.")
            continue
        target: Any = parser
        if opt.exclusive:
            # One group per name, made once: an empty group left behind (setdefault's
            # argument is built on every call) crashes argparse's --help.
            if opt.exclusive not in groups:
                groups[opt.exclusive] = parser.add_mutually_exclusive_group()
            target = groups[opt.exclusive]
        default = _default_of(f)
        dest = prefix + f.name
        if opt.action == "positional":
            target.add_argument(
                dest, help=opt.help, metavar=opt.metavar or f.name.upper(), type=_argparse_type(opt)
            )
        elif opt.action in ("true", "false"):
            action = "store_true" if opt.action == "true" else "store_false"
            target.add_argument(opt.flag, dest=dest, help=opt.help, action=action)
        else:
            if opt.shown is not None:
                shown = f" (default: {opt.shown})"
            elif default in (dataclasses.MISSING, None, (), ""):
                shown = ""
            else:
                shown = f" (default: {default})"
            kwargs: dict[str, Any] = {
                "dest": dest,
                "help": opt.help + shown if opt.action != "append" else opt.help,
                "type": _argparse_type(opt),
                # a nested option's dest reads "model.seed": name its value SEED instead
                "metavar": opt.metavar or (f.name.upper() if prefix else None),
            }
            if opt.choices is not None:
                kwargs["choices"] = opt.choices
            if opt.action == "append":
                kwargs.update(action="append", default=[])
            elif default is dataclasses.MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = default
            target.add_argument(opt.flag, **kwargs)


def config_kwargs(cls: Any, args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """Keyword arguments of ``cls`` from arguments parsed by :func:`add_arguments`."""
    out: dict[str, Any] = {}
    values = vars(args)
    for f, opt in options_of(cls):
        dest = prefix + f.name
        if opt.nested is not None:
            if any(k.startswith(dest + ".") for k in values):
                out[f.name] = opt.nested(**config_kwargs(opt.nested, args, prefix=dest + "."))
            continue
        if dest not in values:
            continue
        value = values[dest]
        if opt.action == "append":
            value = opt.collect(value) if opt.collect else tuple(value)
        out[f.name] = value
    return out


def _check_one(opt: Option, value: Any) -> None:
    if value is None or (opt.auto and value == AUTO):
        return
    if opt.choices is not None and value not in opt.choices:
        raise UsageError(f"{opt.flag} must be one of {', '.join(opt.choices)}, got {value!r}")
    if opt.check is None:
        return
    test, words = _rule(opt.check)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        extra = " or auto" if opt.auto else ""
        raise UsageError(f"{opt.flag} must be a number{extra}, got {value!r}")
    if not (math.isfinite(value) and test(value)):  # NaN fails every comparison
        raise UsageError(f"{opt.flag} {words}, got {value}{opt.note}")


def check_options(config: Any) -> None:
    """Refuse choices and bounds that the option table of ``config`` forbids.

    Nested configs are checked by their own ``__post_init__``/validation; a
    mutually exclusive group with two fields set raises :class:`UsageError`.
    """
    given: dict[str, list[str]] = {}
    for f, opt in options_of(config):
        value = getattr(config, f.name)
        if opt.nested is not None:
            continue
        if opt.action == "append":
            for item in value or ():
                _check_one(opt, item)
        elif opt.check is not None and isinstance(value, (tuple, list)):
            if not value:
                raise UsageError(f"{opt.flag} needs at least one value")
            for item in value:
                _check_one(opt, item)
        else:
            _check_one(opt, value)
        if opt.exclusive and value not in (None, False, (), ""):
            given.setdefault(opt.exclusive, []).append(opt.flag)
    for flags in given.values():
        if len(flags) > 1:
            raise UsageError(f"give either {' or '.join(flags)}, not both")


def _as_text(value: Any) -> str:
    return repr(value) if isinstance(value, str) and value == "" else str(value)


def _argv_parts(config: Any, skip: Sequence[str]) -> tuple[list[str], list[str]]:
    positional: list[str] = []
    argv: list[str] = []
    for f, opt in options_of(config):
        if f.name in skip or opt.flag in skip:
            continue
        value = getattr(config, f.name)
        if opt.nested is not None:
            pos, opts = _argv_parts(value, skip)
            positional += pos
            argv += opts
        elif opt.action == "positional":
            positional.append(str(value))
        elif value == _default_of(f):
            continue
        elif opt.action in ("true", "false"):
            argv.append(opt.flag)
        elif opt.action == "append":
            if isinstance(value, Mapping):
                for key, item in value.items():
                    argv += [opt.flag, f"{key}={item!r}"]
            else:
                for item in value:
                    argv += [opt.flag, str(item)]
        else:
            argv += [opt.flag, _as_text(value)]
    return positional, argv


def to_argv(config: Any, skip: Sequence[str] = ()) -> list[str]:
    """The command line that makes ``config``: positionals, then the options that differ
    from their defaults.

    Fields without an option are left out; a nested config contributes its own
    arguments. A mapping (``--model-arg``) becomes one ``KEY=repr(VALUE)`` item
    per key, which its parser reads back. ``skip`` names fields or flags to leave out.
    """
    positional, argv = _argv_parts(config, skip)
    return positional + argv
