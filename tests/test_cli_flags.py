"""Flags generated from settings dataclasses (cli/flags.py): one per field with the field's default, parsed by
the field's type, nested settings under their field's name, and read back into the same dataclass; `fit`'s
flags are FitSettings' fields, its defaults FitSettings' defaults, and the flags it had before are all there."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from mllmeraser import cli
from mllmeraser.cli import fit as fit_command
from mllmeraser.cli import serve as serve_command
from mllmeraser.cli.flags import Flag, add_settings_flags, settings_from_args, unknown_entries
from mllmeraser.core.settings import FitSettings, KnnGate, PaperGate, PGDSettings, RidgeGate
from mllmeraser.errors import UserInputError
from mllmeraser.serve.settings import Limits


@dataclass(frozen=True)
class Inner:
    budget: float = 0.5
    steps: int | None = None


@dataclass(frozen=True)
class Outer:
    name: str = "knn"
    count: int = 3
    rate: float | None = 0.1
    layers: tuple[int, ...] | None = None
    switch: bool = False
    maybe: bool | None = None
    inner: Inner = field(default_factory=Inner)
    depth: int | float = 0.25


def parse(argv: list[str], table=None, skip=()) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, Outer, table, skip)
    return parser.parse_args(argv)


def test_every_field_gets_a_flag_with_its_default_and_type():
    assert settings_from_args(Outer, parse([])) == Outer()
    args = parse(["--name", "ridge", "--count", "7", "--rate", "none", "--layers", "1,3", "--switch", "--no-maybe",
                  "--inner-budget", "2", "--inner-steps", "4", "--depth", "2"])
    assert settings_from_args(Outer, args) == Outer("ridge", 7, None, (1, 3), True, False, Inner(2.0, 4), "2")
    with pytest.raises(SystemExit):  # argparse: exit 2 with its usage line
        parse(["--count", "many"])


def test_the_table_adds_help_choices_units_names_and_a_one_line_parse():
    def depth(value):
        if value == "deep":
            raise UserInputError(None, "--depth takes a number")
        return float(value)

    table = {"name": Flag(choices=("knn", "ridge"), help="the gate"), "inner_budget": Flag(scale=255),
             "count": Flag(name="how-many"), "depth": Flag(convert=depth)}
    args = parse(["--how-many", "5", "--inner-budget", "51"], table)
    assert settings_from_args(Outer, args, table) == Outer(count=5, inner=Inner(budget=51 / 255), depth=0.25)
    assert parse([], table).inner_budget == 0.5 * 255  # the default, in the flag's units
    with pytest.raises(SystemExit):
        parse(["--name", "other"], table)
    with pytest.raises(UserInputError, match="--depth"):
        settings_from_args(Outer, parse(["--depth", "deep"], table), table)
    skipped = parse([], table, skip=("switch", "inner_steps"))
    assert not hasattr(skipped, "switch") and not hasattr(skipped, "inner_steps")
    assert settings_from_args(Outer, skipped, table, skip=("switch", "inner_steps")) == Outer()
    assert unknown_entries(Outer, {**table, "gone": Flag()}) == ["gone"]


@dataclass(frozen=True)
class Near:
    name: ClassVar[str] = "near"
    count: int = 1
    rate: float = 0.1


@dataclass(frozen=True)
class Far:
    name: ClassVar[str] = "far"
    width: float = 2.0
    rate: float = 0.1


@dataclass(frozen=True)
class Chooser:
    kind: Near | Far = field(default_factory=Near)
    depth: int = 3


@dataclass(frozen=True)
class Other:
    name: ClassVar[str] = "other"
    rate: float = 0.3  # shares Near's field with another default: one flag cannot hold both


@dataclass(frozen=True)
class Clash:
    kind: Near | Other = field(default_factory=Near)


def test_a_union_of_settings_is_a_choice_and_each_alternative_reads_its_own_flags():
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, Chooser, {"kind": Flag(name="gate")})
    assert settings_from_args(Chooser, parser.parse_args([])) == Chooser()
    args = parser.parse_args(["--gate", "far", "--width", "4", "--rate", "0.5", "--count", "9"])
    assert settings_from_args(Chooser, args) == Chooser(Far(width=4.0, rate=0.5))  # --count is Near's: unread
    assert settings_from_args(Chooser, parser.parse_args(["--rate", "0.2"])) == Chooser(Near(rate=0.2))
    with pytest.raises(SystemExit):
        parser.parse_args(["--gate", "other"])
    assert unknown_entries(Chooser, {"kind": Flag(), "count": Flag(), "width": Flag(), "rate": Flag()}) == []
    with pytest.raises(ValueError, match="rate"):
        add_settings_flags(argparse.ArgumentParser(), Clash)


def test_a_gate_is_its_own_dataclass_not_a_name():
    with pytest.raises(UserInputError, match=r"gate=PaperGate\(\)"):
        FitSettings(gate="paper")
    with pytest.raises(UserInputError, match="max_fpr"):
        RidgeGate(max_fpr=1.0)
    assert FitSettings().gate == KnnGate() and FitSettings().record()["gate"] == {
        "name": "knn", "neighbours": 1, "max_fpr": 0.01, "min_ratio": 2.0}


def test_fit_flags_are_fitsettings_fields_and_default_to_its_defaults():
    assert unknown_entries(FitSettings, fit_command.fit_flags()) == []
    assert unknown_entries(Limits, serve_command.LIMIT_FLAGS) == []
    parser = cli.build_parser()
    args = parser.parse_args(["fit", "--model", "m", "--forget", "f", "--out", "o"])
    assert cli.fit_settings(args) == FitSettings()
    args = parser.parse_args(["fit", "--model", "m", "--forget", "f", "--out", "o", "--gate", "ridge", "--layers",
                              "1,2", "--decision-layer", "2", "--pgd-eps", "4", "--pgd-stop-nll", "none",
                              "--no-pgd-checkpointing", "--floor", "0", "--max-fpr", "0.05"])
    settings = cli.fit_settings(args)
    assert settings.gate == RidgeGate(max_fpr=0.05) and settings.layers == (1, 2) and settings.decision_layer == 2
    assert settings.pgd == PGDSettings(eps=4 / 255, stop_nll=None, checkpointing=False)
    args = parser.parse_args(["fit", "--model", "m", "--forget", "f", "--out", "o", "--gate", "paper", "--floor", "0",
                              "--ratio", "0.5", "--normalise-gate", "--max-fpr", "0.05", "--neighbours", "3"])
    settings = cli.fit_settings(args)  # each gate reads its own flags; the others' are left as they are
    assert settings.gate == PaperGate(ratio=0.5, floor=0.0, cap=math.inf, normalise_gate=True)
    assert cli.fit_settings(parser.parse_args(["fit", "--model", "m", "--forget", "f", "--out", "o", "--neighbours",
                                               "3", "--min-ratio", "1.5"])).gate == KnnGate(neighbours=3, min_ratio=1.5)


def test_the_flags_fit_and_serve_had_are_all_there():
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    options = {name: {s for action in commands[name]._actions for s in action.option_strings} for name in commands}
    assert {"--gate", "--pooling", "--decision-layer", "--neighbours", "--max-fpr", "--min-ratio", "--occlusion",
            "--alpha", "--ratio", "--gamma", "--beta", "--lam", "--floor", "--cap", "--layers", "--layers-path",
            "--mode", "--pgd-eps", "--pgd-step", "--pgd-steps", "--pgd-batch-size", "--pgd-checkpointing",
            "--no-pgd-checkpointing", "--pgd-stop-nll", "--cache-dir", "--no-cache", "--forget-ratio"} <= options["fit"]
    assert {"--max-tokens-limit", "--max-prompt-chars", "--max-prompt-tokens", "--max-image-bytes",
            "--max-image-pixels", "--max-batch", "--max-wait-ms"} <= options["serve"]
    assert list(commands) == ["testbed", "eval", "fit", "cache", "generate", "serve", "serve-log", "attack",
                              "compare", "demo"]


def test_a_bad_fit_setting_is_one_line_and_exit_2(capsys):
    assert cli.main(["fit", "--model", "m", "--forget", "f.jsonl", "--out", "o", "--max-fpr", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_fpr" in err
