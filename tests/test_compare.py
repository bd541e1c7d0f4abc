"""common/compare.py on hand-written metrics.jsonl files: the table of final metrics and the curves shown by default."""

import json

import pytest

from common.compare import Args, default_curves, final_table, main, signal_curves
from tests.conftest import write_run


def test_the_comparison_table_is_one_metric_a_row_and_names_what_each_run_lacks(two_runs, tmp_path, capsys):
    a, b = map(str, two_runs)
    table, lacking = final_table([a, b])
    lines = table.splitlines()
    assert lines[0] == "| metric | ecpo__demo__1__1 | rso__demo__1__2 |"
    assert lines[2] == "| eval/sr | 0.25 | 0.5 |"  # shared by both runs: first
    assert lines[3] == "| eval/wi | - | 3 |" and "eval/turn1/sr" not in table
    assert lacking == {"ecpo__demo__1__1": ["eval/wi"], "rso__demo__1__2": []}
    main(Args(runs=[a, b], metrics=["train/loss", "rollout/return"], out=str(tmp_path / "cmp" / "comparison")))
    assert (tmp_path / "cmp" / "comparison.png").exists() and (tmp_path / "cmp" / "comparison.md").read_text() == table
    assert "ecpo__demo__1__1 lacks: rollout/return, eval/wi" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        main(Args(runs=[a, str(tmp_path / "nowhere")]))


def test_without_flags_each_run_shows_its_signal_before_the_bookkeeping_they_all_log(tmp_path):
    """Five methods all log train/grad_norm, train/loss, train/lr and train/epoch; the default picture must show
    what each one's update moves (the curves its own curves.png draws, a margin or a return before a loss)."""
    bookkeeping = [
        {"train/grad_norm": 1.0 + k, "train/lr": 1e-5, "train/epoch": k, "train/loss": 1.0 - k / 10} for k in range(3)
    ]
    ecpo = write_run(
        tmp_path / "ecpo",
        [r | {"train/rewards/margins": 0.1 * k, "train_sft/loss": 2.0} for k, r in enumerate(bookkeeping)],
        {"eval/sr": 0.2, "eval/wr": 0.5, "cost/seconds": 10.0},
    )
    rso = write_run(
        tmp_path / "rso", [r | {"rollout/return": float(k)} for k, r in enumerate(bookkeeping)], {"eval/sr": 0.1}
    )
    smtpo = write_run(tmp_path / "smtpo", bookkeeping, {"eval/recall@10": 0.3, "cost/seconds": 5.0})
    (ecpo / "panels.json").write_text(
        json.dumps(
            {
                "curves": {"SGPT": ["train_sft/loss"], "ECPO": ["train/loss"], "implicit": ["train/rewards/margins"]},
                "bars": {"WR": ["eval/wr"]},
            }
        )
    )
    # its own panels only (not the bookkeeping), the margin before the two losses
    assert signal_curves(ecpo) == ["train/rewards/margins", "train_sft/loss", "train/loss"]
    assert signal_curves(rso)[0] == "rollout/return" and signal_curves(rso)[-1] in (
        "train/epoch",
        "train/grad_norm",
        "train/lr",
    )
    assert default_curves([str(ecpo), str(rso), str(smtpo)], most=4) == [
        "train/rewards/margins",
        "rollout/return",
        "train/loss",
        "train_sft/loss",
    ]
    table, _ = final_table([str(ecpo), str(rso), str(smtpo)])
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]]
    # shared by two first (eval before cost), then the headline a run drew, then the rest
    assert rows == ["eval/sr", "cost/seconds", "eval/wr", "eval/recall@10"]
