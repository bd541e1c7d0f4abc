"""Does AILO's expectation confirmation tell a good CRA from a bad one?

Two ailo_sim.py runs on the same ECPO Book tasks, the simulated users and seeds alike, differing only in the CRA:
one scripted to recommend each conversation's target every turn (--cra names-target), one scripted to recommend
another item of the catalog every turn (--cra never-names). Per conversation, the mean of the user's EC ratings
r_t (and of E[r_t] under the rating's answer distribution); the two CRAs compared on the same conversations, with the
95% paired bootstrap interval of the difference (common.metrics.paired_bootstrap). The tasks come from the training
split, past those the other scripts' default runs read: nothing is tuned here, and the held-out test split is left
to the final evaluations.

    python benchmark/ailo_ec_separation.py                  # 16 tasks, 3 turns (docs/benchmarks.md has the time)
    python benchmark/ailo_ec_separation.py --num-tasks 4    # a quick look

The runs are ordinary ailo_sim.py runs under runs/ (resumable: a rerun continues them); W&B and compare see them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tyro
from effects import paired_table, run_script

SCRIPT = "ailo_sim.py"


@dataclass
class Args:
    num_tasks: int = 16
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


def flags(args: Args, cra: str = "names-target") -> list[str]:
    """ailo_sim.py's flags for the run of ``cra``."""
    return ["--dataset", "book", "--split", "train", "--task-offset", str(args.task_offset),
            "--num-tasks", str(args.num_tasks), "--max-turns", str(args.max_turns), "--user-llm", args.user_llm,
            "--data-dir", args.data_dir, "--cra", cra, "--no-print-conversations",
            "--run-name", f"{args.run_prefix}-{cra}"]  # fmt: skip


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
    found = {cra: per_conversation(run_script(SCRIPT, flags(args, cra))) for cra in ("names-target", "never-names")}
    print(f"\nBook training tasks from {args.task_offset}, the conversations kept under both CRAs")
    print(paired_table(found, [("names-target", "never-names")], "conversation"))


if __name__ == "__main__":
    main(tyro.cli(Args))
