"""Does ECPO's preference stage move the CRA on real data? +SGPT against +ECPO (DPO) on ECPO's Book test tasks.

One ecpo.py run on Book: the teacher plays D_sft's tasks and pi_sft is taught on them (SGPT), pi_sft plays D_pre's
tasks, the AILO user rates each turn and the rewriter fixes the turns it rates low, DPO on the rewritten turns
(ECPO); then the Expert CRA, pi_sft and the ECPO policy play the same first test tasks, greedy, and the judge compares
each policy's conversation with the Expert CRA's in both position orders. Per task: SR, R and the win rate against
the Expert CRA; ECPO against SGPT on the same tasks, with the 95% paired bootstrap interval of the difference
(common.metrics.paired_bootstrap). Every value is ecpo.py's default (the DPO stage at the paper's lr 1e-6, beta 0.1,
batch 32, 8 epochs) but the sizes below. Nothing is tuned on the test tasks.

    python benchmark/ecpo_effects.py                          # docs/benchmarks.md has its time and result
    python benchmark/ecpo_effects.py --num-sft-tasks 4 --num-pre-tasks 4 --num-test-tasks 2 --run-name ecpo-quick

The run is an ordinary ecpo.py run under runs/ (resumable: a rerun continues it); W&B and compare see it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import tyro
from effects import paired_table, run_script

from ecpo import win_rate

SCRIPT = "ecpo.py"
POLICIES = {"+SGPT": ("eval_sft", "eval_sft.jsonl"), "+ECPO": ("eval", "eval_ecpo.jsonl")}


@dataclass
class Args:
    num_sft_tasks: int = 8
    """D_sft: Book training tasks the teacher plays (ecpo.py's default 2; the paper's 1,000)"""
    num_pre_tasks: int = 24
    """D_pre: further training tasks pi_sft plays (ecpo.py's default 2; the paper's 500)"""
    num_test_tasks: int = 16
    """the first Book test tasks, played by every CRA (the paper's 100)"""
    judge_max_tokens: int = 64
    """tokens of each of the judge's reasons (ecpo.py's default 256: cut to fit the hour; the verdicts are read
    from the answer distribution after them either way)"""
    data_dir: str = "../shared/data"
    """where the ECPO Book files are (docs/data.md)"""
    run_name: str = "ecpo-effects"
    """the run, under runs/"""


def per_task(run_dir: Path, label: str, file: str) -> dict[str, dict[str, float]]:
    """{test task: SR, R (0 or 1) and the win rate against the Expert CRA over its two position orders}, for the
    tasks the judge scored."""
    verdicts = defaultdict(lambda: {"ab": [], "ba": []})  # task -> the final verdicts in each position order
    for line in (run_dir / "judgements.jsonl").read_text().splitlines():
        judgement = json.loads(line)
        if judgement["label"] == label and "final" in (judgement["scores"] or {}):
            verdicts[judgement["key"].split("|")[1]][judgement["order"]].append(judgement["scores"]["final"])
    found = {}
    for line in (run_dir / file).read_text().splitlines():
        episode = json.loads(line)
        if episode["key"] in verdicts:
            wr = win_rate(verdicts[episode["key"]]["ab"], verdicts[episode["key"]]["ba"])
            found[episode["key"]] = {"SR": float(episode["success"]), "R": float(episode["recall"]), "win rate": wr}
    return found


def flags(args: Args) -> list[str]:
    """ecpo.py's flags for this comparison."""
    return ["--dataset", "book", "--data-dir", args.data_dir, "--num-sft-tasks", str(args.num_sft_tasks),
            "--num-pre-tasks", str(args.num_pre_tasks), "--num-test-tasks", str(args.num_test_tasks),
            "--judge-max-tokens", str(args.judge_max_tokens), "--run-name", args.run_name]  # fmt: skip


def main(args: Args) -> None:
    run_dir = run_script(SCRIPT, flags(args))
    found = {name: per_task(run_dir, label, file) for name, (label, file) in POLICIES.items()}
    print(f"\nBook test tasks ({run_dir}), the win rate against the Expert CRA in both position orders")
    print(paired_table(found, [("+ECPO", "+SGPT")], "task"))


if __name__ == "__main__":
    main(tyro.cli(Args))
