"""Command-line flags generated from a settings dataclass, and the dataclass read back from the parsed arguments.

One flag per field (`alpha` -> --alpha); a field holding another settings dataclass gets that dataclass's
flags under its name (`pgd.eps` -> --pgd-eps); a field holding one of several settings dataclasses (a union, each
alternative naming itself in a `name` class attribute: the gate) gets a flag choosing one by its name (--gate
knn) and every alternative's fields as flags without a prefix (`KnnGate.max_fpr` -> --max-fpr), one flag where
alternatives share a field; the chosen alternative reads its own. The parser comes from the field's annotation
(int, float, str, bool, `X | None`, `tuple[X, ...]`); what an annotation cannot say (help, choices, a unit, a
parse that must fail as one line) comes from a table of `Flag`s keyed by the argument's dest (`"pgd_eps"`), or
from the field's metadata (`field(metadata={"help": ...})`). Written for any dataclass, so that when settings are
regrouped the flags follow the fields instead of a hand-written copy of them."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Flag:
    """What a field's annotation does not say about its flag."""

    help: str | None = None
    choices: Sequence[Any] | None = None
    # The flag is typed in other units: its value is the field's times `scale` (PGD's budgets in /255 units).
    scale: float = 1.0
    # Turns the parsed value into the field's when the dataclass is built, not when argparse parses: a
    # UserInputError raised here is the CLI's one-line error (exit 2) instead of argparse's usage message.
    convert: Callable[[Any], Any] | None = None
    name: str | None = None  # the flag's name where it is not the field's (without the leading dashes)
    metavar: str | None = None


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_or_none(text: str):
        return None if text.strip().lower() == "none" else parse(text)
    parse_or_none.__name__ = getattr(parse, "__name__", "value")  # argparse names the type in its errors
    return parse_or_none


def _comma_separated(parse: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse_all(text: str) -> tuple:
        return tuple(parse(part) for part in text.split(",") if part.strip())
    parse_all.__name__ = f"comma-separated {getattr(parse, '__name__', 'value')}"
    return parse_all


def _is_dataclass_type(annotation) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def _argument(annotation) -> dict:
    """add_argument's keywords for a field of this (resolved) annotation: its type= or action=."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = tuple(a for a in args if a is not type(None))
        if len(rest) != 1:  # e.g. int | float: left as text, for the table's `convert` to read
            return {}
        if rest[0] is bool:
            return {"action": argparse.BooleanOptionalAction}
        inner = _argument(rest[0])
        return {"type": _optional(inner["type"])} if "type" in inner else inner
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": args}
    if typing.get_origin(annotation) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"type": _comma_separated(args[0])}
    if annotation in (int, float, str) or callable(annotation):
        return {"type": annotation}
    return {}


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _alternatives(annotation) -> dict[str, type] | None:
    """{name: dataclass} of a union of settings dataclasses (each naming itself in `name`), else None."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    members = typing.get_args(annotation)
    if not all(_is_dataclass_type(member) for member in members):
        return None
    return {member.name: member for member in members}


def _settings_fields(cls, prefix: str, skip: Collection[str]):
    """(dest, field, resolved annotation) of every field with a flag: nested settings dataclasses expanded, a union
    of them as its choice (the field itself) and then every alternative's fields, each dest once."""
    hints = typing.get_type_hints(cls)
    seen: dict[str, dataclasses.Field] = {}
    for field in dataclasses.fields(cls):
        dest = prefix + field.name
        if not field.init or dest in skip:
            continue
        annotation = hints[field.name]
        alternatives = _alternatives(annotation)
        if _is_dataclass_type(annotation):
            yield from _settings_fields(annotation, f"{dest}_", skip)
        elif alternatives is not None:
            yield dest, field, annotation
            for member in alternatives.values():
                for inner in _settings_fields(member, prefix, skip):
                    first = seen.setdefault(inner[0], inner[1])
                    if first is inner[1]:
                        yield inner
                    elif _default(first) != _default(inner[1]):  # one flag cannot default to both
                        raise ValueError(f"alternatives of {dest!r} share the field {inner[0]!r} with other defaults")
        else:
            yield dest, field, annotation


def add_settings_flags(parser: argparse.ArgumentParser, cls, table: Mapping[str, Flag] | None = None,
                       skip: Collection[str] = ()) -> None:
    """A flag for every field of the dataclass `cls` (and of the settings dataclasses it holds), its default
    the field's; `skip` names the dests left without a flag (their fields keep the dataclass's default)."""
    table = table or {}
    for dest, field, annotation in _settings_fields(cls, "", skip):
        flag = table.get(dest, Flag())
        default = _default(field)
        alternatives = _alternatives(annotation)
        if alternatives is not None:  # the choice of one: by name, defaulting to the default's
            parser.add_argument(f"--{flag.name or dest.replace('_', '-')}", dest=dest, default=default.name,
                                choices=list(alternatives), help=flag.help or field.metadata.get("help"))
            continue
        if flag.scale != 1.0 and default is not None:
            default = default * flag.scale
        keywords = {} if flag.convert is not None else _argument(annotation)
        if flag.choices is not None:
            keywords["choices"] = flag.choices  # where the field's annotation does not list them (a plain str)
        if flag.metavar is not None:
            keywords["metavar"] = flag.metavar
        name = flag.name or dest.replace("_", "-")
        parser.add_argument(f"--{name}", dest=dest, default=default, help=flag.help or field.metadata.get("help"),
                            **keywords)


def settings_from_args(cls, args: argparse.Namespace, table: Mapping[str, Flag] | None = None,
                       skip: Collection[str] = (), prefix: str = ""):
    """The dataclass `cls` from the arguments `add_settings_flags` added (skipped fields: the defaults)."""
    table = table or {}
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        dest = prefix + field.name
        if not field.init or dest in skip:
            continue
        if _is_dataclass_type(hints[field.name]):
            values[field.name] = settings_from_args(hints[field.name], args, table, skip, f"{dest}_")
            continue
        alternatives = _alternatives(hints[field.name])
        if alternatives is not None:  # the chosen alternative, from its own fields' flags
            values[field.name] = settings_from_args(alternatives[getattr(args, dest)], args, table, skip, prefix)
            continue
        flag = table.get(dest, Flag())
        value = getattr(args, dest)
        if flag.scale != 1.0 and value is not None:
            value = value / flag.scale
        values[field.name] = flag.convert(value) if flag.convert is not None else value
    return cls(**values)


def unknown_entries(cls, table: Mapping[str, Flag]) -> list[str]:
    """The table's keys that name no flag of `cls` (left behind when a field is renamed or moved)."""
    dests = {dest for dest, _, _ in _settings_fields(cls, "", ())}
    return sorted(set(table) - dests)
