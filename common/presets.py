"""A script's named configurations: the paper's settings in one place, each value beside its source, selected by the
first word of the command line, every flag after it overriding one value.

    python <script>.py --epochs 2                          # the script's own defaults (the CPU demo)
    python <script>.py paper --user-model <8B> ...         # the paper's settings; the command states model, data, scale
    python <script>.py paper --help                        # every flag, the paper's values as defaults, their sources

In a script:

    PAPER = Preset(
        "the paper's Table 3 setting",
        values={"epochs": (1, "Sec. 4.1 'one epoch'; released script/train/sft.sh"), ...},
        ablations={"search": "Table 6", ...},          # fields a table's rows change, each with its table
        recipe=("run_name", "dataset", "user_model", ...),  # what a recipe states: model, data, scale, bookkeeping
    )
    PRESETS = {"paper": PAPER}
    ...
    main(parse_args(Args, PRESETS))

A preset names every field of ``Args``, either among its ``values`` (a hyper-parameter, with its source) or in
``recipe`` (``check_preset`` refuses a field in neither or both), so a new hyper-parameter cannot go without its
paper's value. tests/test_recipes.py parses every command of benchmark/*_table*.sh into the script's ``Args`` with
``parse_args`` and checks every value of the preset the command selected: a recipe may change only its ``recipe``
fields and, for a table's rows, the ``ablations``. docs/<method>.md shows ``markdown_table``.

This is tyro's documented way of choosing between default configurations (``tyro.cli(Args, default=...)``, the
choice made from the first word of the command line), rather than tyro's subcommands: a subcommand union with a
default refuses flags given without a subcommand, and every script's commands without a preset (``python <script>.py
--epochs 2``) keep working as they did.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import tyro


@dataclass(frozen=True)
class Preset:
    """A named configuration: ``values`` maps each hyper-parameter to (value, source: the paper's section, table or
    equation, or the released file that settles what the paper leaves open); ``ablations`` maps the fields that a
    table's rows change to that table; ``recipe`` lists the fields a command states (model, data, scale, run
    bookkeeping), which the preset leaves at the script's defaults."""

    description: str
    values: dict[str, tuple[Any, str]]
    ablations: dict[str, str] = field(default_factory=dict)
    recipe: tuple[str, ...] = ()

    def apply(self, args):
        """``args`` with the preset's values."""
        return dataclasses.replace(args, **{name: value for name, (value, _) in self.values.items()})

    def help(self) -> str:
        """What ``--help`` shows after the preset's name: its description and every value with its source."""
        rows = [
            f"  --{name.replace('_', '-')} {format_value(value)}: {source}"
            for name, (value, source) in self.values.items()
        ]
        return f"{self.description}\n\nThe preset's values (any flag overrides one):\n" + "\n".join(rows)


def format_value(value) -> str:
    """A value as a command line would write it: a tuple as its items, a bool as True/False."""
    if isinstance(value, tuple):
        return " ".join(map(str, value)) if value else "(empty)"
    return str(value)


def check_preset(args_type, preset: Preset) -> None:
    """Every field of ``args_type`` is either a preset value or a recipe field, never both, and every ablation is a
    preset value; raises ValueError naming the fields otherwise."""
    fields = {f.name for f in dataclasses.fields(args_type)}
    values, recipe = set(preset.values), set(preset.recipe)
    problems = []
    if fields - values - recipe:
        problems.append(f"neither a value nor a recipe field: {sorted(fields - values - recipe)}")
    if values & recipe:
        problems.append(f"both a value and a recipe field: {sorted(values & recipe)}")
    if (values | recipe) - fields:
        problems.append(f"not fields of {args_type.__name__}: {sorted((values | recipe) - fields)}")
    if set(preset.ablations) - values:
        problems.append(f"ablations without a value: {sorted(set(preset.ablations) - values)}")
    if problems:
        raise ValueError(f"preset {preset.description!r}: " + "; ".join(problems))


def parse_args(args_type, presets: dict[str, Preset], args: Sequence[str] | None = None, prog: str | None = None):
    """``tyro.cli(args_type)``, or, where the first word of the command line names a preset, the same with the
    preset's values as the defaults that the flags after it override."""
    argv = list(sys.argv[1:] if args is None else args)
    prog = prog or (sys.argv[0].rsplit("/", 1)[-1] if args is None else None)
    if argv and argv[0] in presets:
        name, preset = argv[0], presets[argv[0]]
        return tyro.cli(
            args_type,
            args=argv[1:],
            default=preset.apply(args_type()),
            prog=f"{prog} {name}" if prog else None,
            description=preset.help(),
        )
    named = "\n".join(f"  {prog or 'script'} {name}: {p.description}" for name, p in presets.items())
    return tyro.cli(args_type, args=argv, prog=prog, description=f"Named configurations:\n{named}" if presets else None)


def markdown_table(preset: Preset) -> str:
    """The preset as the Markdown table docs/<method>.md shows: flag, value, source, and the table an ablation
    changes it in."""
    rows = ["| flag | value | source | varied in |", "|---|---|---|---|"]
    for name, (value, source) in preset.values.items():
        rows.append(
            f"| `--{name.replace('_', '-')}` | `{format_value(value)}` | {source} | {preset.ablations.get(name, '')} |"
        )
    return "\n".join(rows)
