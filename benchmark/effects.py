"""What the ``*_effects.py`` benchmarks and ``ailo_ec_separation.py`` share: run a script as an ordinary run under
runs/, and print systems measured on the same dialogues or tasks side by side, each difference with its 95% paired
bootstrap interval (common.metrics.paired_bootstrap)."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.metrics import paired_bootstrap  # noqa: E402


def run_script(script: str, flags: list[str]) -> Path:
    """``python <script> <flags>`` from the current folder, stopping with an error if it fails; its run folder (the
    flags' ``--run-name``)."""
    if subprocess.run([sys.executable, str(ROOT / script), *flags]).returncode != 0:
        raise SystemExit(f"error: the {script} run failed (see above)")
    return Path("runs") / flags[flags.index("--run-name") + 1]


def dialogue_means(per_context: list[tuple[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """{dialogue: the mean of each metric over its contexts} from (context key, metrics) pairs, a context's key
    being its dialogue's and its turn's, "<dialogue>:<turn>" (the keys of the INSPIRED and ReDial loaders)."""
    grouped = defaultdict(list)
    for key, values in per_context:
        grouped[key.rsplit(":", 1)[0]].append(values)
    return {d: {k: sum(c[k] for c in cs) / len(cs) for k in cs[0]} for d, cs in grouped.items()}


def paired_table(found: dict[str, dict[str, dict[str, float]]], pairs: list[tuple[str, str]], unit: str) -> str:
    """A markdown table of ``found`` ({system: {dialogue or task: {metric: value}}}), over the units every system
    has: one metric a row, each system's mean, then each (a, b) of ``pairs`` as a - b [95% paired interval]."""
    systems = list(found)
    units = sorted(set.intersection(*(set(per_unit) for per_unit in found.values())))
    if not units:
        raise SystemExit(f"error: no {unit} was measured for all of {', '.join(systems)}")
    metrics = list(found[systems[0]][units[0]])
    lines = [f"{len(units)} {unit}s measured for all of: {', '.join(systems)}", ""]
    lines.append(f"| per {unit} | " + " | ".join(systems + [f"{a} - {b} [95% CI]" for a, b in pairs]) + " |")
    lines.append("|---" * (1 + len(systems) + len(pairs)) + "|")
    for metric in metrics:
        columns = {system: [found[system][u][metric] for u in units] for system in systems}
        cells = [f"{sum(values) / len(values):.3f}" for values in columns.values()]
        for a, b in pairs:
            difference, low, high = paired_bootstrap(columns[a], columns[b])
            cells.append(f"{difference:+.3f} [{low:+.3f}, {high:+.3f}]")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
