"""common/presets.py: a named configuration overrides the defaults, every flag after it overrides the preset, and a
preset that leaves a field unclassified is refused."""

from dataclasses import dataclass

import pytest

from common.presets import Preset, check_preset, markdown_table, parse_args


@dataclass
class Args:
    epochs: int = 3
    """passes"""
    lr: float | None = None
    """peak learning rate"""
    stages: tuple[str, ...] = ("a", "b")
    """stages"""
    run_name: str = "demo"
    """run folder"""


PAPER = Preset(
    "a paper's table",
    values={"epochs": (1, "Sec. 4.1"), "lr": (1e-6, "released sft.sh"), "stages": (("a",), "Sec. 3")},
    ablations={"stages": "Table 2"},
    recipe=("run_name",),
)


def test_the_preset_fills_the_defaults_and_flags_override_it():
    assert parse_args(Args, {"paper": PAPER}, []) == Args()
    assert parse_args(Args, {"paper": PAPER}, ["paper"]) == Args(epochs=1, lr=1e-6, stages=("a",))
    assert parse_args(Args, {"paper": PAPER}, ["paper", "--epochs", "2", "--run-name", "x"]) == Args(
        epochs=2, lr=1e-6, stages=("a",), run_name="x"
    )
    assert parse_args(Args, {"paper": PAPER}, ["--epochs", "2"]) == Args(epochs=2)


def test_help_after_the_preset_shows_each_value_with_its_source(capsys):
    with pytest.raises(SystemExit):
        parse_args(Args, {"paper": PAPER}, ["paper", "--help"], prog="script.py")
    out = capsys.readouterr().out
    assert "--epochs 1: Sec. 4.1" in out and "--lr 1e-06: released sft.sh" in out and "(default: 1)" in out


def test_a_field_in_neither_or_both_places_is_refused():
    check_preset(Args, PAPER)
    with pytest.raises(ValueError, match=r"neither a value nor a recipe field: \['run_name'\]"):
        check_preset(Args, Preset("x", values=PAPER.values))
    with pytest.raises(ValueError, match=r"both a value and a recipe field: \['epochs'\]"):
        check_preset(Args, Preset("x", values=PAPER.values, recipe=("run_name", "epochs")))
    with pytest.raises(ValueError, match=r"ablations without a value: \['run_name'\]"):
        check_preset(Args, Preset("x", values=PAPER.values, ablations={"run_name": "T1"}, recipe=("run_name",)))


def test_the_markdown_table_lists_value_source_and_ablation():
    assert markdown_table(PAPER).splitlines()[2:] == [
        "| `--epochs` | `1` | Sec. 4.1 |  |",
        "| `--lr` | `1e-06` | released sft.sh |  |",
        "| `--stages` | `a` | Sec. 3 | Table 2 |",
    ]
