"""Does AILO's expectation confirmation tell a good CRA from a bad one?

Two ailo_sim.py runs on the same ECPO Book tasks, the simulated users and seeds alike, differing only in the CRA:
one scripted to recommend each conversation's target every turn (--cra names-target), one scripted to recommend
another item of the catalog every turn (--cra never-names). Per conversation, the mean of the user's EC ratings
r_t (and of E[r_t] under the rating's answer distribution); the two CRAs compared on the same conversations, with the
95% paired bootstrap interval of the difference (common.metrics.paired_bootstrap). The tasks come from the training
split, past those the other scripts' default runs read: nothing is tuned here, and the held-out test split is left
to the final evaluations.

    python benchmark/ailo_ec_separation.py                  # 64 tasks, 3 turns (docs/benchmarks.md has the time)
    python benchmark/ailo_ec_separation.py --num-tasks 4    # a quick look

The runs are ordinary ailo_sim.py runs under runs/ (resumable: a rerun continues them); W&B and compare see them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.metrics import paired_bootstrap  # noqa: E402


@dataclass
class Args:
    num_tasks: int = 64
    """conversations per CRA"""
    task_offset: int = 1000
    """the first Book training task used (the default runs of ecpo.py and ailo_sim.py read the first ones)"""
    max_turns: int = 3
    """CRA responses per conversation (ailo_sim.py's default; the paper uses 5)"""
    user_llm: str = "hf:smollm2-135m"
    """the simulated user's backend"""
    data_dir: str = "../shared/data"
    """where the ECPO Book files are"""
    run_prefix: str = "ec-separation"
    """the two runs are <run_prefix>-names-target and <run_prefix>-never-names"""


def simulate(args: Args, cra: str) -> Path:
    run_name = f"{args.run_prefix}-{cra}"
    command = [sys.executable, str(ROOT / "ailo_sim.py"), "--dataset", "book", "--split", "train",
               "--task-offset", str(args.task_offset), "--num-tasks", str(args.num_tasks),
               "--max-turns", str(args.max_turns), "--user-llm", args.user_llm, "--data-dir", args.data_dir,
               "--cra", cra, "--no-print-conversations", "--run-name", run_name]  # fmt: skip
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"error: the {cra} run failed (see above)")
    return Path("runs") / run_name


def per_conversation(run_dir: Path) -> dict[str, dict[str, float]]:
    """{task key: the conversation's mean EC rating, mean E[r_t] and success} over the conversations kept."""
    values = {}
    for line in (run_dir / "episodes.jsonl").read_text().splitlines():
        episode = json.loads(line)
        ratings = [t["ec_rating"] for t in episode["turns"] if t["ec_rating"] is not None]
        expected = [t["ec_expected"] for t in episode["turns"] if t.get("ec_expected") is not None]
        if episode.get("dropped") or not ratings:
            continue
        values[episode["key"]] = {
            "ec_rating": sum(ratings) / len(ratings),
            "ec_expected": sum(expected) / len(expected) if expected else float("nan"),
            "sr": float(episode["success"]),
        }
    return values


def main(args: Args) -> None:
    good, bad = (per_conversation(simulate(args, cra)) for cra in ("names-target", "never-names"))
    keys = sorted(good.keys() & bad.keys())
    print(f"\n{len(keys)} conversations rated under both CRAs ({len(good)} and {len(bad)} kept)")
    print("| per conversation | names-target | never-names | difference | 95% paired bootstrap interval |")
    print("| --- | --- | --- | --- | --- |")
    for metric in ("ec_rating", "ec_expected", "sr"):
        a, b = [good[k][metric] for k in keys], [bad[k][metric] for k in keys]
        difference, low, high = paired_bootstrap(a, b)
        print(f"| {metric} | {sum(a) / len(a):.3f} | {sum(b) / len(b):.3f} | {difference:+.3f} | "
              f"[{low:+.3f}, {high:+.3f}] |")  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(Args))
