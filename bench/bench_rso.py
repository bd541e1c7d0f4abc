"""RSO measurements on the CPU, two tables.

    python bench/bench_rso.py                          # speed: episodes per minute, batched against one at a time,
                                                       # the prefix cache on and off
    python bench/bench_rso.py --table learning         # learning: the planner update in a bandit, per setting
    python bench/bench_rso.py --table learning --updates 300 --seeds 1 2 3 --threads 2

speed: ``rso.rollout`` (Algorithm 1: the Planner, the Reasoner, the Fact Retriever, the Actor, the AILO user and the
K-sample rewarder) plays the same demo tasks with the same untrained planner (the embedded MiniLM with a fresh
13-way head: its forward pass is part of each turn), --batched episodes together against one at a time, each with
the hf backend's prefix cache on and off (--prefix-cache). An episode may end early (acceptance or AILO's
end_conversation), so the table also gives turns per minute. Per turn, the prompt tokens: billed (every call its
whole prompt, as cost/tokens counts them), computed (prefill), read from the prefix cache, the floor (each prompt's
tokens after the longest beginning it shares with any earlier prompt: what an unbounded prefix cache still runs),
and the tokens generated; the dialogue's new tokens per turn (the system's and the user's new messages) beside them.
Every side plays the same episodes: their records must agree (the table says where they do not).

learning: the settings that chose rso.py's RL defaults. One state, 13 strategies, and a judge-like reward: 0.75
(a raw score of 4) for one strategy and 0.5 (a 3) for the others, so every reward is positive as in the paper.
``rso.planner_update`` runs at rso.Args' learning rate (1e-4, AdamW with linear decay over the run) and entropy
weight on the default MiniLM planner (--planner), with each gradient-clipping bound and baseline, one or two
episodes per update, the same number of episodes for each. Per setting and seed: the rewarded strategy's
probability at the start and the end, whether it ended as the argmax, and the gradient norms before clipping.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rso  # noqa: E402
from ailo_sim import AILO  # noqa: E402
from bench.prompt_log import PromptLog, prefix_cache, print_speed, usage_row  # noqa: E402
from common.llm import make_llm  # noqa: E402


@dataclass
class Args:
    table: str = "speed"
    """speed (episodes per minute) or learning (the planner update in a bandit)"""
    llm: str = "hf:smollm2-135m"
    """speed: backend of every LLM role (experts, user, rewarder)"""
    episodes: int = 8
    """speed: episodes per measurement"""
    batched: int = 8
    """speed: episodes played together on the batched side (the other plays 1)"""
    max_turns: int = 2
    """speed: system turns per episode"""
    reward_samples: int = 10
    """speed: K rewarder samples per turn (rso.Args default)"""
    planner: str = "minilm"
    """the planner's encoder (rso.Args default)"""
    updates: int = 300
    """learning: episodes per setting and seed (a setting with two episodes per update takes half as many updates)"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """learning: seeds of the planner's head and of the sampled strategies"""
    target: int = 5
    """learning: the rewarded strategy (5: Offer Help)"""
    threads: int | None = None
    """torch CPU threads; None keeps torch's default"""
    seed: int = 1
    """speed: seed of the planner head and the sampling"""
    prefix_cache: tuple[str, ...] = ("on", "off")
    """speed: the hf backend's prefix cache on each side (CLEANCRS_PREFIX_CACHE_GB sets its bound)"""


# ----------------------------------------------------------------------------------------------- speed


def play_all(args: Args, cfg: rso.Args, data: rso.Data, planner, tokenizer, num_envs: int) -> dict:
    """Play the tasks with ``num_envs`` episodes at a time: seconds, finished episodes, system turns, the episodes,
    and what the backend computed per turn (``usage_row``)."""
    llm, log = make_llm(args.llm, batch_size=max(num_envs, 1) * 2), PromptLog()
    log.watch(llm)
    tasks = [data.rl[k % len(data.rl)] for k in range(args.episodes)]
    tasks = [replace(task, key=f"{k:03d}|{task.key}") for k, task in enumerate(tasks)]
    torch.manual_seed(args.seed)
    roles = rso.Roles(llm, data.catalog, AILO(llm, "movie", cfg.user_max_tokens, cfg.user_parse_tries), llm)
    generator, episodes = torch.Generator().manual_seed(args.seed), []
    start = time.perf_counter()
    for first in range(0, len(tasks), num_envs):
        episodes += rso.rollout(tasks[first : first + num_envs], planner=planner, tokenizer=tokenizer, roles=roles,
                                args=cfg, generator=generator)  # fmt: skip
    seconds = time.perf_counter() - start
    episodes.sort(key=lambda e: e["key"])
    turns = sum(len(e["turns"]) for e in episodes)
    said = [t[field] for e in episodes for t in e["turns"] for field in ("system", "user")]
    dialogue = sum(len(ids) for ids in llm.tokenizer(said, add_special_tokens=False)["input_ids"])
    return {"seconds": seconds, "episodes": len(episodes), "turns": turns, "records": episodes,
            "tokens": usage_row([llm.usage], log, max(turns, 1)) | {"dialogue": dialogue / max(turns, 1)}}  # fmt: skip


def speed(args: Args) -> None:
    cfg = rso.Args(max_turns=args.max_turns, reward_samples=args.reward_samples, seed=args.seed)
    data = rso.load_data(cfg)
    data.catalog.embeddings()  # the retrieval index, built once before timing
    planner, tokenizer = rso.load_planner(args.planner, "cpu", args.seed)
    rows = {}
    for label, num_envs in ((f"batched {args.batched}", args.batched), ("one at a time", 1)):
        for cache in args.prefix_cache:
            with prefix_cache(cache == "on"):
                rows[f"{label}, cache {cache}"] = play_all(args, cfg, data, planner, tokenizer, num_envs)
    print(f"\nmodel: {args.llm}   planner: {args.planner}   device: cpu x {torch.get_num_threads()} threads   "
          f"episodes: {args.episodes} x <= {args.max_turns} turns   K = {args.reward_samples}")  # fmt: skip
    print_speed(rows, "episodes")


# ----------------------------------------------------------------------------------------------- learning

SETTINGS = (  # (label, gradient clipping, baseline, episodes per update)
    ("clip 1.0, no baseline (old default)", 1.0, "none", 1),
    ("no clip, no baseline (paper)", math.inf, "none", 1),
    ("clip 1.0, ema baseline", 1.0, "ema", 1),
    ("no clip, ema baseline", math.inf, "ema", 1),
    ("no clip, ema baseline, 2/update", math.inf, "ema", 2),
    ("no clip, batch baseline, 2/update", math.inf, "batch", 2),
)
STATE = "User: Hi! I'm looking for a movie to watch tonight, something fun."


def bandit(args: Args, clip: float, baseline: str, per_update: int, seed: int) -> dict:
    """One bandit run through rso.planner_update; the rewarded strategy's probability before and after, and the
    gradient norms before clipping."""
    from transformers import get_linear_schedule_with_warmup

    from common.checkpoints import resume_and_prepare
    from common.run import Run

    cfg = rso.Args(run_name=f"bandit_{seed}_{clip}_{baseline}_{per_update}", seed=seed, num_envs=per_update,
                   baseline=baseline, rl_max_grad_norm=clip)  # fmt: skip
    run = Run(cfg)
    model, tokenizer = rso.load_planner(args.planner, "cpu", seed, trainable=True)
    updates = args.updates // per_update
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.rl_lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, updates)
    model, optimizer, _ = resume_and_prepare(run.accelerator, model, optimizer, scheduler, run.dir / "rl")
    generator, running, norms = torch.Generator().manual_seed(seed), {}, []
    start = rso.strategy_distribution(model, tokenizer, [STATE], cfg.planner_max_length)[0]
    for _ in range(updates):
        probs = rso.strategy_distribution(model, tokenizer, [STATE], cfg.planner_max_length)[0]
        actions = torch.multinomial(probs, per_update, replacement=True, generator=generator).tolist()
        episodes = [{"turns": [{"state": STATE, "strategy": a, "reward": 0.75 if a == args.target else 0.5}],
                     "accepted": False} for a in actions]  # fmt: skip
        metrics, _ = rso.planner_update(run, cfg, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                        episodes=episodes, running=running)  # fmt: skip
        norms.append(metrics["train/grad_norm"])
        scheduler.step()
    end = rso.strategy_distribution(model, tokenizer, [STATE], cfg.planner_max_length)[0]
    return {"start": start[args.target].item(), "end": end[args.target].item(), "top": end.max().item(),
            "argmax": int(end.argmax()) == args.target, "norms": norms}  # fmt: skip


def learning(args: Args) -> None:
    os.chdir(tempfile.mkdtemp(prefix="bench_rso_"))  # the Run folders of the bandits
    print(f"planner: {args.planner}   lr 1e-4 (AdamW, linear decay)   beta_ent 0.01   {args.updates} episodes per "
          f"run   reward 0.75 for {rso.NAMES[args.target]}, 0.5 for the others   seeds {args.seeds}")  # fmt: skip
    header = f"{'setting':<37}{'p start':>9}{'p end':>9}{'max p':>8}{'argmax':>8}{'norm p50':>10}{'norm p90':>10}"
    print(header + f"{'norm max':>10}{'clipped':>9}{'s':>6}")
    for label, clip, baseline, per_update in SETTINGS:
        started, results = time.time(), [bandit(args, clip, baseline, per_update, s) for s in args.seeds]
        norms = np.array([n for r in results for n in r["norms"]])
        for k, r in enumerate(results):
            print(f"  seed {args.seeds[k]}: p {r['start']:.3f} -> {r['end']:.3f} (max p {r['top']:.3f})"
                  f"{'  argmax' if r['argmax'] else ''}")  # fmt: skip
        print(
            f"{label:<37}{np.mean([r['start'] for r in results]):>9.3f}{np.mean([r['end'] for r in results]):>9.3f}"
            f"{np.mean([r['top'] for r in results]):>8.3f}{sum(r['argmax'] for r in results):>5}/{len(results)}"
            f"{np.percentile(norms, 50):>10.3g}{np.percentile(norms, 90):>10.3g}{norms.max():>10.3g}"
            f"{np.mean(norms > clip):>9.0%}{time.time() - started:>6.0f}",
            flush=True,
        )


def main(args: Args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table not in ("speed", "learning"):
        raise SystemExit(f"error: --table {args.table!r}: expected speed or learning")
    speed(args) if args.table == "speed" else learning(args)


if __name__ == "__main__":
    main(tyro.cli(Args))
