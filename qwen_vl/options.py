"""How a setting is declared: once, as a field of a frozen settings dataclass.

    @dataclass(frozen=True)
    class ApiSettings:
        request_timeout: float = option(600.0, "deadline of one generation request in seconds")

The field gives the name, the type (its annotation) and the default; `option` adds the help and,
where they differ from the name, the flag and its variable. From these fields come the argparse
flags (`add_options`), their `QWEN_VL_<FLAG>` environment variables (`apply_environment`, which
covers vLLM's own engine flags too) and the typed settings object (`from_namespace`). Adding a
setting is adding one field.

The flag is `--` + the field's name with dashes unless `flag` says otherwise; the variable is
`QWEN_VL_` + the flag in capitals, dashes as underscores. By type: `bool` is a switch (`--x`
turns it on; with `negated`, a `--no-x` flag turns it off; with a default of True and no
`negated`, `--x/--no-x`); `tuple[...]` is repeatable (the variable: space-separated); `X | None`
takes an X and is None when not given."""

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable
from typing import Any

ENV_PREFIX = "QWEN_VL_"


@dataclasses.dataclass(frozen=True)
class Option:
    help: str
    group: str
    flag: str | None = None  # default: "--" + the field's name with dashes
    metavar: str | None = None
    negated: bool = False  # a bool whose flag turns it off (--no-playground -> playground False)
    minimum: float | None = None  # refused below, naming the flag
    below_minimum: str | None = None  # what to say then (default "at least <minimum>")


def option(default: Any, help: str, *, group: str = "qwen-vl server", **details) -> Any:
    """A settings field declared as a flag (see the module's docstring)."""
    return dataclasses.field(default=default, metadata={"option": Option(help, group, **details)})


def env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def _options(cls: type) -> list[tuple[dataclasses.Field, Option, type, str]]:
    """(field, its Option, its value type with None taken out, the argparse dest) per declared flag."""
    hints = typing.get_type_hints(cls)
    found = []
    for field in dataclasses.fields(cls):
        declared = field.metadata.get("option")
        if declared is None:
            continue
        kind = hints[field.name]
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        flag = declared.flag or "--" + field.name.replace("_", "-")
        found.append((field, declared, kind, flag[2:].replace("-", "_")))
    return found


class Repeated(argparse._AppendAction):
    """A repeatable flag whose uses replace its default (its variable's values) rather than add
    to it, as every other flag beats its variable; argparse's own append would add."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is self.default:
            setattr(namespace, self.dest, None)
        super().__call__(parser, namespace, values, option_string)


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """The flags of `cls`'s declared fields, each in its option's group."""
    groups = {group.title: group for group in parser._action_groups}
    for field, declared, kind, dest in _options(cls):
        if declared.group not in groups:
            groups[declared.group] = parser.add_argument_group(declared.group)
        flag = "--" + dest.replace("_", "-")
        details: dict[str, Any] = {"dest": dest, "help": declared.help}
        if kind is bool:
            if declared.negated:
                details.update(action="store_true", default=False)
            elif field.default:
                details.update(action=argparse.BooleanOptionalAction, default=True)
            else:
                details.update(action="store_true", default=False)
        elif typing.get_origin(kind) is tuple:
            details.update(action=Repeated, default=None, type=typing.get_args(kind)[0])
        else:
            details.update(type=kind, default=field.default, metavar=declared.metavar)
        groups[declared.group].add_argument(flag, **details)


def check_minimums(parser: argparse.ArgumentParser, args: argparse.Namespace, cls: type) -> None:
    """parser.error (exit status 2, one line) for a value below its option's minimum."""
    for _, declared, _, dest in _options(cls):
        value = getattr(args, dest)
        if declared.minimum is not None and value is not None and value < declared.minimum:
            flag = "--" + dest.replace("_", "-")
            parser.error(f"{flag}: {declared.below_minimum or f'at least {declared.minimum:g}'}")


def from_namespace(cls: type, args: argparse.Namespace, **others):
    """`cls` from parsed arguments: each declared field from its flag, the rest from `others`."""
    values = dict(others)
    for field, declared, kind, dest in _options(cls):
        value = getattr(args, dest)
        if declared.negated:
            value = not value
        elif typing.get_origin(kind) is tuple:
            value = tuple(value or ())
        values[field.name] = value
    return cls(**values)


def _truthy(value: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def apply_environment(parser: argparse.ArgumentParser) -> None:
    """Let `QWEN_VL_<DEST>` set each option's default, ours and vLLM's, and say so in --help."""
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", argparse.SUPPRESS):
            continue
        name = env_name(action.dest)
        if action.help != argparse.SUPPRESS:
            action.help = f"{action.help or ''} [env {name}]".strip()
        raw = os.environ.get(name)
        if raw is None:
            continue
        parser.set_defaults(**{action.dest: _from_environment(action, raw)})


def _from_environment(action: argparse.Action, raw: str):
    convert: Callable = action.type if callable(action.type) else str
    if action.nargs == 0:  # store_true / store_false / BooleanOptionalAction
        value = _truthy(raw)
        return not value if isinstance(action, argparse._StoreFalseAction) else value
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
        return [convert(v) for v in raw.split()]
    return convert(raw)

