"""common/plots.py and common/compare.py on hand-written metrics.jsonl files."""

import json

import pytest

from common.compare import Args, final_table, main, shared_curves
from common.plots import draw_run, read_metrics


def write_run(folder, steps: list[dict], summary: dict):
    folder.mkdir(parents=True)
    rows = [{"step": k + 1, **row} for k, row in enumerate(steps)] + [{"step": len(steps), **summary}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def two_runs(tmp_path):
    a = write_run(tmp_path / "ecpo__demo__1__1", [{"train/loss": 0.69}, {"train/loss": 0.5}], {"eval/sr": 0.25})
    b = write_run(
        tmp_path / "rso__demo__1__2",
        [{"train/loss": 1.0, "rollout/return": 2.0}, {"train/loss": 0.8, "rollout/return": 2.5}],
        {"eval/sr": 0.5, "eval/wi": 3.0, "eval/turn1/sr": 0.1},
    )
    return a, b


def test_a_run_draws_the_panels_it_has_metrics_for(two_runs):
    a, _ = two_runs
    curves = {"loss": ["train/loss"], "never logged": ["train/other"]}
    assert draw_run(a, curves, {"SR": ["eval/sr"]}) == a / "curves.png"
    assert (a / "curves.png").stat().st_size > 0
    assert draw_run(a, {"never logged": ["train/other"]}, {}) is None  # nothing to draw: no picture
    steps, summary = read_metrics(a)
    assert len(steps) == 2 and summary["eval/sr"] == 0.25


def test_the_comparison_overlays_shared_curves_and_names_what_each_run_lacks(two_runs, tmp_path, capsys):
    a, b = map(str, two_runs)
    assert shared_curves([a, b], most=6) == ["train/loss"]  # rollout/return: one run only
    table, lacking = final_table([a, b])
    assert "| ecpo__demo__1__1 | 0.25 | - |" in table and "eval/turn1/sr" not in table
    assert lacking == {"ecpo__demo__1__1": ["eval/wi"], "rso__demo__1__2": []}
    main(Args(runs=[a, b], metrics=["train/loss", "rollout/return"], out=str(tmp_path / "cmp" / "comparison")))
    assert (tmp_path / "cmp" / "comparison.png").exists() and (tmp_path / "cmp" / "comparison.md").read_text() == table
    assert "ecpo__demo__1__1 lacks: rollout/return, eval/wi" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        main(Args(runs=[a, str(tmp_path / "nowhere")]))
