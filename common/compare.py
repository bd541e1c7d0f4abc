"""Compare runs offline, of one method or several: the shared metric names make their curves overlay.

    python -m common.compare runs/ecpo__demo__1__1796000000 runs/rso__demo__1__1796000100
    python -m common.compare runs/a runs/b --metrics train/loss eval/sr --out runs/comparison

Writes ``<out>.png`` (each metric's curve per run, overlaid; a metric a run logged only once is a marker) and
``<out>.md`` (the runs' final metrics side by side: every eval/ and cost/ metric any of them has), and prints the
table and the metrics each run lacks. The offline counterpart of W&B's run comparison; it reads only
``runs/<run>/metrics.jsonl``, so it works the same with WANDB_MODE=offline.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import tyro

from common.plots import draw_comparison, read_metrics, series

CURVE_PREFIXES = ("train/", "rollout/")
TABLE_PREFIXES = ("eval/", "cost/")


@dataclass
class Args:
    runs: tyro.conf.Positional[list[str]]
    """run folders (each with its metrics.jsonl)"""
    metrics: list[str] = field(default_factory=list)
    """metrics to overlay (default: the train/ and rollout/ curves at least two runs log, at most --most)"""
    most: int = 6
    """how many metrics the default overlays"""
    out: str = "runs/comparison"
    """where the picture (.png) and the table (.md) go"""


def shared_curves(run_dirs: list[str], most: int) -> list[str]:
    """The train/ and rollout/ metrics logged per step by the most runs (at least two, or the one run)."""
    counts = Counter()
    for run_dir in run_dirs:
        rows, _ = read_metrics(run_dir)
        logged = {k for r in rows for k in r if k.startswith(CURVE_PREFIXES) and not k.endswith("/step")}
        counts.update(m for m in logged if len(series(rows, m)[0]) > 1)
    needed = min(2, len(run_dirs))
    return [m for m, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= needed][:most]


def final_table(run_dirs: list[str]) -> tuple[str, dict[str, list[str]]]:
    """A Markdown table of the runs' final eval/ and cost/ metrics, and {run: the table's metrics it lacks}."""
    summaries = {Path(d).name: read_metrics(d)[1] for d in run_dirs}
    # one level of names (eval/sr, not eval/turn2/sr): the per-turn breakdowns stay in each run's own tables
    columns = sorted({k for s in summaries.values() for k in s if k.startswith(TABLE_PREFIXES) and k.count("/") == 1})
    lines = ["| run | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lacking = {}
    for name, summary in summaries.items():
        cells = [f"{summary[c]:.4g}" if isinstance(summary.get(c), (int, float)) else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lacking[name] = [c for c in columns if c not in summary]
    return "\n".join(lines) + "\n", lacking


def main(args: Args) -> None:
    missing = [d for d in args.runs if not (Path(d) / "metrics.jsonl").exists()]
    if missing:
        raise SystemExit(f"error: no metrics.jsonl in {', '.join(missing)}")
    metrics = args.metrics or shared_curves(args.runs, args.most)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table, lacking = final_table(args.runs)
    if metrics:
        for name, absent in draw_comparison(args.runs, metrics, out.with_suffix(".png")).items():
            lacking[name] = absent + lacking.get(name, [])
    out.with_suffix(".md").write_text(table)
    print(table)
    for name, absent in lacking.items():
        if absent:
            print(f"{name} lacks: {', '.join(absent)}")
    print(f"wrote {out.with_suffix('.md')}" + (f" and {out.with_suffix('.png')}" if metrics else ""))


if __name__ == "__main__":
    main(tyro.cli(Args))
