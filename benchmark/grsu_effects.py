"""Does GRSU's search with the tuned user beat the CRS's zero-shot ranking on real data? INSPIRED, Recall@10/50.

One grsu.py run on INSPIRED: the generative-reward user is tuned (Yes/No item scoring and attribute critiques) on the
first training turns, then on each test turn the CRS ranks the catalog zero-shot and again after the beam search
with the tuned user's critiques and scores. Per test dialogue (the mean over its turns, each turn the mean over its
labels, grsu.ranking_metrics), Recall@10 and Recall@50 of both rankings of the same turns, and the beam search
against zero-shot with the 95% paired bootstrap interval of the difference (common.metrics.paired_bootstrap). Every
value is grsu.py's default but the sizes below. Nothing is tuned on the test split.

    python benchmark/grsu_effects.py                      # docs/benchmarks.md has its time and result
    python benchmark/grsu_effects.py --num-train-turns 4 --num-test 2 --run-name grsu-quick   # a quick look

The run is an ordinary grsu.py run under runs/ (resumable: a rerun continues it); W&B and compare see it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tyro
from effects import dialogue_means, paired_table, run_script

from grsu import ranking_metrics

SCRIPT = "grsu.py"
RANKINGS = {"zero-shot": "zero_shot", "beam search": "ranked"}
KS = (10, 50)


@dataclass
class Args:
    num_train_turns: int = 16
    """INSPIRED training turns the user is tuned on (grsu.py's default 4; the paper's whole training split)"""
    num_test: int = 12
    """test turns (recommendation turns of the first test dialogues), each ranked both ways (the beam search takes
    about two minutes a turn on the 2-core CPU)"""
    data_dir: str = "../shared/data"
    """where INSPIRED is (docs/data.md)"""
    run_name: str = "grsu-effects"
    """the run, under runs/"""


def per_dialogue(path: Path, field: str) -> dict[str, dict[str, float]]:
    """{test dialogue: Recall@k of the ranking in ``field``}, each the mean over the dialogue's turns."""
    turns = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        scores = ranking_metrics([record], field, ks=KS, prefix="eval")
        turns.append((record["key"], {f"recall@{k}": scores.get(f"eval/recall@{k}", 0.0) for k in KS}))
    return dialogue_means(turns)


def flags(args: Args) -> list[str]:
    """grsu.py's flags for this comparison."""
    return ["--dataset", "inspired", "--eval-split", "test", "--data-dir", args.data_dir,
            "--num-train-turns", str(args.num_train_turns), "--num-test", str(args.num_test),
            "--run-name", args.run_name]  # fmt: skip


def main(args: Args) -> None:
    run_dir = run_script(SCRIPT, flags(args))
    found = {name: per_dialogue(run_dir / "search_beam.jsonl", field) for name, field in RANKINGS.items()}
    print(f"\nINSPIRED test dialogues ({run_dir}), the mean over each dialogue's turns")
    print(paired_table(found, [("beam search", "zero-shot")], "dialogue"))


if __name__ == "__main__":
    main(tyro.cli(Args))
