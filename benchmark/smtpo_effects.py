"""Does SMTPO's training move its recommender on real data? Zero-shot against SFT against SFT + GRPO on INSPIRED.

One smtpo.py run on INSPIRED (its 63 first training turns, its 12 first test dialogues), whose evaluation plays the
same test contexts with the three recommenders and the same simulator. Per test dialogue (the mean over its
contexts), Recall@10 and NDCG@10 at each turn and the share of the recommender's outputs that name one of its 20
candidates; SFT against zero-shot and SFT + GRPO against SFT on the same dialogues, with the 95% paired bootstrap
interval of the difference (common.metrics.paired_bootstrap). Nothing is tuned on the test split: every value is
smtpo.py's default but the sizes below, the shorter SFT and the untrained simulator that fit the CPU.

    python benchmark/smtpo_effects.py                          # docs/benchmarks.md has its time and result
    python benchmark/smtpo_effects.py --num-train 8 --num-test 2 --run-name smtpo-effects-quick   # a quick look

The run is an ordinary smtpo.py run under runs/ (resumable: a rerun continues it); W&B and compare see it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tyro
from effects import dialogue_means, paired_table, run_script

from smtpo import turn_scores

SCRIPT = "smtpo.py"
UNTRAINED = ["--untrained-simulator", "--stages", "retriever", "sft", "grpo", "eval"]  # no simulator stage
RECOMMENDERS = {"zero-shot": "eval_zeroshot.jsonl", "SFT": "eval_sft.jsonl", "SFT + GRPO": "eval_smtpo.jsonl"}


@dataclass
class Args:
    num_train: int = 70
    """training turns read (a tenth goes to the retriever's early stopping: 63 are trained on)"""
    num_test: int = 12
    """test dialogues, each of their recommendation contexts played for --max-turns turns"""
    max_turns: int = 2
    """recommendation turns per context (smtpo.py's default; the paper's 5)"""
    sft_epochs: int = 1
    """the recommender's SFT epochs (smtpo.py's default 8, the paper's 8: one, 18 steps of about a minute here,
    to fit about an hour)"""
    untrained_simulator: bool = True
    """the base model gives the feedback, untuned (smtpo.py's ablation; its simulator SFT, 70 steps of 19 s here,
    did not fit the hour): the same simulator for the three recommenders"""
    grpo_steps: int = 3
    """GRPO steps (smtpo.py's default)"""
    data_dir: str = "../shared/data"
    """where INSPIRED is (docs/data.md)"""
    run_name: str = "smtpo-effects"
    """the run, under runs/"""


def per_dialogue(path: Path, max_turns: int) -> dict[str, dict[str, float]]:
    """{test dialogue: Recall@10 and NDCG@10 at each turn, and the share of outputs naming a candidate}, each the
    mean over the dialogue's contexts."""
    contexts = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        values = {}
        for t in range(1, max_turns + 1):
            scores = turn_scores([record], t)
            values |= {f"turn{t}/recall@10": scores["recall@10"], f"turn{t}/ndcg@10": scores["ndcg@10"]}
        turns = record["turns"]
        values["names_a_candidate"] = sum(not turn["fallback"] for turn in turns) / len(turns) if turns else 0.0
        contexts.append((record["key"], values))
    return dialogue_means(contexts)


def flags(args: Args) -> list[str]:
    """smtpo.py's flags for this comparison."""
    return ["--dataset", "inspired", "--eval-split", "test", "--data-dir", args.data_dir,
            "--num-train", str(args.num_train), "--num-test", str(args.num_test), "--max-turns", str(args.max_turns),
            "--sft-epochs", str(args.sft_epochs), *(UNTRAINED if args.untrained_simulator else []),
            "--grpo-steps", str(args.grpo_steps), "--run-name", args.run_name]  # fmt: skip


def main(args: Args) -> None:
    run_dir = run_script(SCRIPT, flags(args))
    found = {name: per_dialogue(run_dir / file, args.max_turns) for name, file in RECOMMENDERS.items()}
    print(f"\nINSPIRED test dialogues ({run_dir}), the mean over each dialogue's contexts")
    print(paired_table(found, [("SFT", "zero-shot"), ("SFT + GRPO", "SFT")], "dialogue"))


if __name__ == "__main__":
    main(tyro.cli(Args))
