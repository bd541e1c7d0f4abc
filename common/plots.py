"""Pictures of runs from their ``metrics.jsonl``: a run's learning signal per step beside its evaluation
(``curves.png``), and the same metric overlaid across runs of any methods (``compare.py``)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def read_metrics(run_dir: str | Path) -> tuple[list[dict], dict]:
    """(the per-step rows, the summary row) of a run: the summary is the last line of metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows[:-1], (rows[-1] if rows else {})


def series(rows: list[dict], metric: str) -> tuple[list[int], list[float]]:
    """``metric`` per step of its family (``train/step`` for ``train/loss``, as ``Run.log_step`` logs it; in a run
    logged before those axes, the metric's own count), over the rows that hold it as a finite number."""
    axis = metric.split("/")[0] + "/step"
    rows = [r for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    return [r.get(axis, k) for k, r in enumerate(rows, 1)], [r[metric] for r in rows]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_run(run_dir: str | Path, curves: dict[str, list[str]], bars: dict[str, list[str]]) -> Path | None:
    """``runs/<run>/curves.png``: one panel per entry of ``curves`` (title -> metrics drawn per step), then one per
    entry of ``bars`` (title -> summary metrics drawn as bars, the method beside its baselines). Panels whose
    metrics the run never logged are left out; None when nothing is left to draw."""
    rows, summary = read_metrics(run_dir)
    panels = [("curve", title, [m for m in names if series(rows, m)[0]]) for title, names in curves.items()]
    numbers = {k for k, v in summary.items() if isinstance(v, (int, float))}
    panels += [("bar", title, [m for m in names if m in numbers]) for title, names in bars.items()]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for axis, (kind, title, names) in zip(axes[0], panels):
        if kind == "curve":
            for name in names:
                steps, values = series(rows, name)
                axis.plot(steps, values, marker="." if len(steps) < 30 else None, label=name)
            axis.set_xlabel(names[0].split("/")[0] + "/step")
        else:
            values = [summary[name] for name in names]
            axis.bar(range(len(names)), values, color=[f"C{k}" for k in range(len(names))])
            axis.set_xticks(range(len(names)), [n.replace("/", "/\n", 1) for n in names], fontsize=7)
            for k, value in enumerate(values):
                axis.annotate(f"{value:.3g}", (k, value), ha="center", va="bottom", fontsize=7)
        axis.set_title(title, fontsize=9)
        if kind == "curve":
            axis.legend(fontsize=7)
    figure.suptitle(Path(run_dir).name, fontsize=9)
    figure.tight_layout()
    path = Path(run_dir) / "curves.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def draw_comparison(run_dirs: list[str | Path], metrics: list[str], path: str | Path) -> dict[str, list[str]]:
    """One panel per metric, each run's curve overlaid (a metric a run logged only in its summary is a
    horizontal marker at the run's last step). Returns {run: the metrics it lacks}."""
    plt = _pyplot()
    runs = {Path(d).name: read_metrics(d) for d in run_dirs}
    lacking = {name: [] for name in runs}
    columns = min(4, len(metrics))
    lines = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.4 * lines), squeeze=False)
    for axis in axes.flat[len(metrics) :]:
        axis.set_visible(False)
    for axis, metric in zip(axes.flat, metrics):
        curves = {name: series(rows, metric) for name, (rows, _) in runs.items()}
        if any(len(steps) > 1 for steps, _ in curves.values()):  # a curve, not one value per run
            for k, (name, (steps, values)) in enumerate(curves.items()):
                if steps:
                    axis.plot(steps, values, color=f"C{k}", label=name)
                else:
                    lacking[name].append(metric)
            axis.set_xlabel(metric.split("/")[0] + "/step")
            axis.legend(fontsize=6)
        else:  # logged once per run (an evaluation): one bar per run
            for k, (name, (_, summary)) in enumerate(runs.items()):
                if isinstance(summary.get(metric), (int, float)):
                    axis.bar(k, summary[metric], color=f"C{k}")
                    axis.annotate(f"{summary[metric]:.3g}", (k, summary[metric]), ha="center", va="bottom", fontsize=7)
                else:
                    lacking[name].append(metric)
            axis.set_xticks(range(len(runs)), list(runs), fontsize=6, rotation=20, ha="right")
        axis.set_title(metric, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return lacking
