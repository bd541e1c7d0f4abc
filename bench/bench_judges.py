"""Judge scoring on the CPU: the paper's sampled scores against the expectation read in one pass (common/judging.py).

    python bench/bench_judges.py --rso-run runs/<an rso.py run> --ecpo-run runs/<an ecpo.py run>
    python bench/bench_judges.py --rso-run runs/<run> --items 8 --repeats 3 --threads 2
    python bench/bench_judges.py --rso-run runs/<run> --ecpo-run runs/<run> --modes expected   # the reading alone

Two judges, on real states of a default run:
  * RSO's rewarder (Eq. 9): the conversation after each turn of ``rl_episodes.jsonl``, scored 1-5. Sampled: the mean
    of K = 10 scores drawn at temperature 1 (``rso.judge_scores``, --judge-scoring sampled); expected: E[s] over
    the scores 1-5 written in full after "Score:" (with or without the space).
  * ECPO's win-rate judge (Fig. 11): an evaluated pair (``eval_sft.jsonl`` against ``eval_expert.jsonl``) judged
    with the candidate as A. Sampled: the mean final verdict of K = 10 judgements drawn at temperature 1 (those that
    parse); expected: ``ecpo.expected_judgements``, P(1) - P(-1) after each pre-filled reason, each verdict written
    in full (" -1" is " -" and "1").

Per judge and mode: LLM calls and seconds per judged item, the standard deviation of an item's score across
--repeats runs (each with another seed; averaged over the items), and the share of samples that gave no score (the
expectation: the mean probability outside the allowed scores).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ecpo  # noqa: E402
import rso  # noqa: E402
from common.conversations import render_history  # noqa: E402
from common.llm import make_llm  # noqa: E402
from common.parsing import ParseStats  # noqa: E402


@dataclass
class Args:
    rso_run: str | None = None
    """an rso.py run folder: its rl_episodes.jsonl gives the rewarder's states"""
    ecpo_run: str | None = None
    """an ecpo.py run folder: its eval_sft.jsonl and eval_expert.jsonl give the judged pairs"""
    judge: str = "hf:smollm2-135m"
    """the judge's backend (both scripts' default)"""
    items: int = 8
    """judged items per judge"""
    samples: int = 10
    """K, the sampled scores per item (RSO's paper value)"""
    repeats: int = 3
    """runs of each mode over the same items, each with another seed"""
    judge_max_tokens: int = 96
    """ECPO judge: max new tokens of a judgement (sampled) or of each dimension's reason (expected)"""
    threads: int = 2
    """torch threads"""
    modes: tuple[str, ...] = ("sampled", "expected")
    """which scorings to measure (the same script runs on an older checkout, for a before/after of one reading)"""


def rewarder_prompts(path: Path, items: int) -> list[str]:
    """The rewarder's prompt after each recorded turn: s_t, the Actor's reply a_t and the user's answer."""
    episodes = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    history = [
        turn["state"]
        + "\n"
        + render_history([{"role": "assistant", "content": turn["system"]}, {"role": "user", "content": turn["user"]}])
        for episode in episodes
        for turn in episode["turns"]
    ]
    return [rso.REWARD_PROMPT.format(history=h) for h in history[:items]]


def judge_prompts(folder: Path, items: int) -> list[str]:
    def read(name):
        return {r["key"]: r for r in map(json.loads, (folder / name).read_text().splitlines()) if r}

    candidate, expert = read("eval_sft.jsonl"), read("eval_expert.jsonl")
    pairs = [(candidate[k], expert[k]) for k in candidate if k in expert]
    prompts = [
        ecpo.JUDGE_PROMPT.format(domain="movie", a=ecpo.render_episode(a), b=ecpo.render_episode(b)) for a, b in pairs
    ]
    return (prompts * items)[:items]  # a small default run has fewer pairs than items: each is judged again


def measure(score, llm, prompts: list[str], repeats: int) -> dict[str, float]:
    """Run ``score(prompts, seed) -> [(value or None, unscored share)]`` ``repeats`` times."""
    runs, seconds, calls = [], 0.0, 0
    for seed in tqdm(range(repeats), desc="runs", leave=False):
        torch.manual_seed(seed)
        before, started = llm.usage.calls, time.time()
        runs.append(score(prompts, seed))
        seconds, calls = seconds + time.time() - started, calls + llm.usage.calls - before
    spreads = []
    for k in range(len(prompts)):
        values = [run[k][0] for run in runs if run[k][0] is not None]
        if len(values) > 1:
            spreads.append(statistics.pstdev(values))
    return {
        "calls per item": calls / (repeats * len(prompts)),
        "seconds per item": seconds / (repeats * len(prompts)),
        "std across runs": statistics.mean(spreads) if spreads else float("nan"),
        "unscored": statistics.mean(u for run in runs for _, u in run),
        "mean score": statistics.mean(v for run in runs for v, _ in run if v is not None),
    }


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    llm = make_llm(args.judge, batch_size=16)
    rows = []
    if args.rso_run:
        prompts = rewarder_prompts(Path(args.rso_run) / "rl_episodes.jsonl", args.items)
        for mode in [m for m in ("sampled", "expected") if m in args.modes]:
            settings = rso.Args(judge_scoring=mode)

            def score(batch, seed, settings=settings, mode=mode):
                read = rso.judge_scores(llm, batch, args.samples, 1.0, settings, ParseStats())
                return [
                    (r["score"], r["mass_outside"] if mode == "expected" else 1 - len(r["scores"]) / args.samples)
                    for r in read
                ]

            rows.append(("RSO rewarder (1-5)", mode, measure(score, llm, prompts, args.repeats)))
    if args.ecpo_run:
        prompts = judge_prompts(Path(args.ecpo_run), args.items)
        conversations = [[{"role": "user", "content": p}] for p in prompts]

        def sampled(batch, seed):
            drawn = llm.chat(conversations, n=args.samples, temperature=1.0, max_tokens=args.judge_max_tokens)
            out = []
            for texts in drawn:
                finals = [s["final"] for s in map(ecpo.parse_judgement, texts) if s]
                out.append((statistics.mean(finals) if finals else None, 1 - len(finals) / args.samples))
            return out

        def expected(batch, seed):
            read = ecpo.expected_judgements(llm, conversations, args.judge_max_tokens)
            return [(scores.get("final"), outside["final"]) for scores, outside in read]

        for mode, score in (("sampled", sampled), ("expected", expected)):
            if mode in args.modes:
                rows.append(("ECPO judge (-1/0/1)", mode, measure(score, llm, prompts, args.repeats)))
    if not rows:
        sys.exit("error: give --rso-run and/or --ecpo-run (run folders of the default runs)")
    columns = ["calls per item", "seconds per item", "std across runs", "unscored", "mean score"]
    print(f"judge {args.judge}, {args.items} items, K = {args.samples}, {args.repeats} runs, {args.threads} threads")
    print("| judge | scoring | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for judge, mode, found in rows:
        print(f"| {judge} | {mode} | " + " | ".join(f"{found[c]:.3g}" for c in columns) + " |")


if __name__ == "__main__":
    main(tyro.cli(Args))
