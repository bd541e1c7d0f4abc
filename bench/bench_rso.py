"""RSO episodes per minute: the experts, the user and the rewarder batched across 8 parallel episodes against the
same 8 episodes played one at a time; prints a table.

    python bench/bench_rso.py                    # embedded SmolLM2 in every role, MiniLM planner, CPU
    python bench/bench_rso.py --episodes 16 --max-turns 3 --threads 2

Both sides play the same demo seeds (the RL stage's training dialogues) with the same untrained planner (the
embedded MiniLM with a fresh 13-way head: its forward pass is part of each turn) through ``rso.play``'s pieces:
``NetworkOfExperts`` (Reasoner, Fact Retriever, Actor), ``RewardedUser`` (AILO and the K-sample rewarder) and
``common.conversations.run_episodes``; only ``--num-envs`` differs. Generation caps are rso.Args' defaults. An
episode may end early (acceptance or AILO's end_conversation), so the table also gives turns per minute.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rso  # noqa: E402
from ailo_sim import AILO  # noqa: E402
from common.conversations import run_episodes  # noqa: E402
from common.data import Task  # noqa: E402
from common.llm import make_llm  # noqa: E402
from common.tracking import RecordFile  # noqa: E402


@dataclass
class Args:
    llm: str = "hf:smollm2-135m"
    """backend of every LLM role (experts, user, rewarder)"""
    episodes: int = 8
    """episodes per measurement"""
    batched: int = 8
    """--num-envs of the batched side (the other plays 1)"""
    max_turns: int = 2
    """system turns per episode"""
    reward_samples: int = 10
    """K rewarder samples per turn (rso.Args default)"""
    threads: int | None = None
    """torch CPU threads; None keeps torch's default"""
    seed: int = 1
    """seed of the planner head and the sampling"""


def play_all(args: Args, cfg: rso.Args, data: rso.Data, planner, tokenizer, num_envs: int) -> tuple[float, int, int]:
    """(seconds, finished episodes, system turns) of playing the seeds with ``num_envs`` episodes at a time."""
    llm = make_llm(args.llm, batch_size=max(num_envs, 1) * 2)
    seeds = [data.rl[k % len(data.rl)] for k in range(args.episodes)]
    keys = [f"{k:03d}|{s.key}" for k, s in enumerate(seeds)]
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        records = RecordFile(Path(folder) / "episodes.jsonl")
        env = rso.RewardedUser(AILO(llm, "movie", cfg.user_max_tokens, cfg.user_parse_tries), llm, cfg,
                               {k: s.opening for k, s in zip(keys, seeds)}, records)  # fmt: skip
        cra = rso.NetworkOfExperts(planner, tokenizer, llm, data.catalog, cfg, args.seed)
        tasks = [Task(k, s.persona, s.target) for k, s in zip(keys, seeds)]
        start = time.perf_counter()
        run_episodes(tasks, cra, env, cfg.max_turns, batch_size=num_envs, on_episode=env.finish)
        seconds = time.perf_counter() - start
        episodes = records.records()
    return seconds, len(episodes), sum(len(e["turns"]) for e in episodes)


def main(args: Args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = rso.Args(max_turns=args.max_turns, reward_samples=args.reward_samples, seed=args.seed)
    data = rso.load_data(cfg)
    data.catalog.embeddings()  # the retrieval index, built once before timing
    planner, tokenizer = rso.load_planner(cfg.planner, "cpu", args.seed)
    rows = []
    for label, num_envs in ((f"batched, --num-envs {args.batched}", args.batched), ("one at a time", 1)):
        seconds, episodes, turns = play_all(args, cfg, data, planner, tokenizer, num_envs)
        rows.append((label, episodes / seconds * 60, turns / seconds * 60, seconds, episodes, turns))
    speedup = rows[0][1] / rows[1][1]
    print(f"\nmodel: {args.llm}   planner: {cfg.planner}   device: cpu x {torch.get_num_threads()} threads   "
          f"episodes: {args.episodes} x <= {args.max_turns} turns   K = {args.reward_samples}")  # fmt: skip
    print(f"{'measurement':<26}{'episodes/min':>14}{'turns/min':>12}{'seconds':>10}{'episodes':>10}{'turns':>8}")
    for label, per_minute, turns_per_minute, seconds, episodes, turns in rows:
        print(f"{label:<26}{per_minute:>14.2f}{turns_per_minute:>12.2f}{seconds:>10.0f}{episodes:>10}{turns:>8}")
    print(f"speed-up of batching: {speedup:.2f}x episodes/min (target: at least 4x)")


if __name__ == "__main__":
    main(tyro.cli(Args))
