"""Compare runs offline, of one method or several: the shared metric names make their curves overlay.

    python -m common.compare runs/<method>__demo__1__<time> runs/<other method>__demo__1__<time>
    python -m common.compare runs/a runs/b --metrics train/loss eval/sr --out runs/comparison

Writes ``<out>.png`` (each metric's curve per run, overlaid; a metric a run logged only once is a bar) and
``<out>.md`` (the runs' final metrics, one metric a row and one run a column), and prints the table and the
metrics each run lacks. The offline counterpart of W&B's run comparison; it reads only ``runs/<run>/``
(``metrics.jsonl``, and ``panels.json`` where the run wrote one), so it works the same with WANDB_MODE=offline.

Without ``--metrics`` the picture shows what each run's update moves first: the curves its own ``curves.png`` draws
(``panels.json``), a reward or margin before a loss, and bookkeeping (grad norm, lr, epoch) last; the runs take
turns, so every run has its signal in the picture. The table leads with the metrics the runs share, and among them
the ones a run reports as its headline (its ``curves.png`` bars).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import tyro

from common.plots import draw_comparison, read_metrics, series

CURVE_PREFIXES = ("train", "rollout")
TABLE_PREFIXES = ("eval", "cost")
BOOKKEEPING = ("grad_norm", "lr", "epoch", "step", "seconds")


@dataclass
class Args:
    runs: tyro.conf.Positional[list[str]]
    """run folders (each with its metrics.jsonl)"""
    metrics: list[str] = field(default_factory=list)
    """metrics to overlay (default: each run's learning signal, the runs taking turns, at most --most)"""
    most: int = 8
    """how many metrics the default overlays"""
    out: str = "runs/comparison"
    """where the picture (.png) and the table (.md) go"""


def run_panels(run_dir: str | Path) -> dict[str, dict[str, list[str]]]:
    """The panels the run drew in its curves.png ({"curves": ..., "bars": ...}), or {} for a run that predates them."""
    path = Path(run_dir) / "panels.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _signal_first(metric: str) -> int:
    """0 for what an update moves (a reward, a return, a margin), 1 for a loss, 2 for bookkeeping."""
    last = metric.rsplit("/", 1)[-1]
    return 2 if last in BOOKKEEPING else 1 if "loss" in last else 0


def signal_curves(run_dir: str | Path) -> list[str]:
    """The run's per-step metrics that show it learning, its signal first: its curves.png's curves where it drew
    them, else every train/ and rollout/ metric it logged more than once."""
    rows, _ = read_metrics(run_dir)
    drawn = [m for names in run_panels(run_dir).get("curves", {}).values() for m in names]
    logged = sorted({k for r in rows for k in r if k.split("/")[0].startswith(CURVE_PREFIXES)})
    candidates = list(dict.fromkeys(drawn or logged))
    return sorted((m for m in candidates if len(series(rows, m)[0]) > 1), key=_signal_first)


def default_curves(run_dirs: list[str], most: int) -> list[str]:
    """Each run's signal curves, the runs taking turns (the first of every run, then the second, ...), at most
    ``most``: five methods' comparison shows five signals, not the grad norm and lr they all log."""
    queues = [signal_curves(d) for d in run_dirs]
    chosen: list[str] = []
    while len(chosen) < most and any(queues):
        for queue in queues:
            while queue and queue[0] in chosen:
                queue.pop(0)
            if queue and len(chosen) < most:
                chosen.append(queue.pop(0))
    return chosen


def final_table(run_dirs: list[str]) -> tuple[str, dict[str, list[str]]]:
    """A Markdown table of the runs' final eval and cost metrics, one metric a row and one run a column: the
    metrics most runs share first, a run's headline (its bars) before the rest; and {run: the rows it lacks}."""
    summaries = {Path(d).name: read_metrics(d)[1] for d in run_dirs}
    headline = {m for d in run_dirs for names in run_panels(d).get("bars", {}).values() for m in names}
    # one level of names (eval/sr, eval_sft/sr; not eval/turn2/sr): per-turn breakdowns stay in each run's own tables
    shared = Counter(
        k
        for s in summaries.values()
        for k, v in s.items()
        if k.split("/")[0].startswith(TABLE_PREFIXES) and k.count("/") == 1 and isinstance(v, (int, float))
    )
    rows = sorted(shared, key=lambda m: (-shared[m], m not in headline, not m.startswith("eval"), m))
    lines = ["| metric | " + " | ".join(summaries) + " |", "|---|" + "---|" * len(summaries)]
    for metric in rows:
        cells = [f"{s[metric]:.4g}" if isinstance(s.get(metric), (int, float)) else "-" for s in summaries.values()]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lacking = {name: [m for m in rows if m not in s] for name, s in summaries.items()}
    return "\n".join(lines) + "\n", lacking


def main(args: Args) -> None:
    missing = [d for d in args.runs if not (Path(d) / "metrics.jsonl").exists()]
    if missing:
        raise SystemExit(f"error: no metrics.jsonl in {', '.join(missing)}")
    metrics = args.metrics or default_curves(args.runs, args.most)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table, lacking = final_table(args.runs)
    if metrics:
        for name, absent in draw_comparison(args.runs, metrics, out.with_suffix(".png")).items():
            lacking[name] = absent + lacking.get(name, [])
    out.with_suffix(".md").write_text(table)
    print(table)
    for name, absent in lacking.items():
        # runs of different methods lack most of each other's rows: past a few, the count says enough
        if absent:
            print(f"{name} lacks: {', '.join(absent)}" if len(absent) <= 8 else f"{name} lacks {len(absent)} of them")
    print(f"wrote {out.with_suffix('.md')}" + (f" and {out.with_suffix('.png')}" if metrics else ""))


if __name__ == "__main__":
    main(tyro.cli(Args))
