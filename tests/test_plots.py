"""common/plots.py on a hand-written metrics.jsonl file."""

from common.plots import draw_run, read_metrics


def test_a_run_draws_the_panels_it_has_metrics_for(two_runs):
    a, _ = two_runs
    curves = {"loss": ["train/loss"], "never logged": ["train/other"]}
    assert draw_run(a, curves, {"SR": ["eval/sr"]}) == a / "curves.png"
    assert (a / "curves.png").stat().st_size > 0
    assert draw_run(a, {"never logged": ["train/other"]}, {}) is None  # nothing to draw: no picture
    steps, summary = read_metrics(a)
    assert len(steps) == 2 and summary["eval/sr"] == 0.25
