"""Does RSO's planner training move the conversation on real data? Random against SFT against RL planner on INSPIRED.

One rso.py run on INSPIRED: the Planner's SFT on the strategy labels, its entropy-regularized policy gradient on the
RL dialogues, then the uniform-random, SFT and RL planners each play the same 16 first test dialogues (those that
name a film of the KG) with the same experts, user and evaluator. Per dialogue, Conv-SR (the evaluator's reward
passed tau) and Rec-SR (a system turn named the target); each pair of planners compared on the same dialogues, with
the 95% paired bootstrap interval of the difference (common.metrics.paired_bootstrap). Every value is rso.py's
default but the sizes below (with the reward fixes docs/rso.md describes: the ema baseline, the acceptance credit).
Nothing is tuned on the test split.

    python benchmark/rso_effects.py                                   # docs/benchmarks.md has its time and result
    python benchmark/rso_effects.py --num-test 4 --rl-episodes 4 --run-name rso-effects-quick   # a quick look

The run is an ordinary rso.py run under runs/ (resumable: a rerun continues it); W&B and compare see it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tyro
from effects import paired_table, run_script

SCRIPT = "rso.py"
PLANNERS = {"random": "eval_random.jsonl", "SFT": "eval_sft.jsonl", "RL": "eval_rl.jsonl"}
METRICS = {"Conv-SR": "accepted", "Rec-SR": "success"}


@dataclass
class Args:
    num_test: int = 16
    """test dialogues each planner plays (INSPIRED's test split has 84 that can be played)"""
    rl_episodes: int = 16
    """RL episodes in all (rso.py's default 6; the paper's 1,000)"""
    num_envs: int = 8
    """episodes per policy-gradient update (rso.py's default 1, the paper's 1: 8 keeps the updates on-policy and
    the hour's budget)"""
    max_turns: int = 3
    """system turns per episode (rso.py's default; the paper's 10)"""
    sft_epochs: int = 1
    """the Planner's SFT epochs over the labelled INSPIRED turns it trains on (rso.py's default 5, the paper's 10:
    94 steps of about 13 s on one thread here, where 5 epochs, 470 steps, would take 1 h 40 min)"""
    data_dir: str = "../shared/data"
    """where INSPIRED is (docs/data.md)"""
    run_name: str = "rso-effects"
    """the run, under runs/"""


def per_dialogue(path: Path) -> dict[str, dict[str, float]]:
    """{test dialogue: its Conv-SR and Rec-SR outcome, 0 or 1}."""
    episodes = [json.loads(line) for line in path.read_text().splitlines()]
    return {e["key"]: {name: float(e[field]) for name, field in METRICS.items()} for e in episodes}


def flags(args: Args) -> list[str]:
    """rso.py's flags for this comparison."""
    return ["--dataset", "inspired", "--eval-split", "test", "--data-dir", args.data_dir,
            "--num-test", str(args.num_test), "--rl-episodes", str(args.rl_episodes),
            "--num-envs", str(args.num_envs), "--max-turns", str(args.max_turns), "--sft-epochs", str(args.sft_epochs),
            "--run-name", args.run_name]  # fmt: skip


def main(args: Args) -> None:
    run_dir = run_script(SCRIPT, flags(args))
    found = {name: per_dialogue(run_dir / file) for name, file in PLANNERS.items()}
    print(f"\nINSPIRED test dialogues ({run_dir})")
    print(paired_table(found, [("SFT", "random"), ("RL", "SFT"), ("RL", "random")], "dialogue"))


if __name__ == "__main__":
    main(tyro.cli(Args))
