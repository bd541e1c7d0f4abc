"""Speed figures for the hf backend and the AILO simulator; prints a table.

    python bench/bench_ailo.py                 # embedded SmolLM2 on CPU
    python bench/bench_ailo.py --llm hf:meta-llama/Llama-3.1-8B-Instruct --conversations 64
    python bench/bench_ailo.py --batch-sizes --max-turns 3      # the AILO table alone, three turns

Generation throughput counts generated tokens (eos included) over wall time, sampled at temperature 1 so
that every batch size does the same kind of work. AILO conversations/minute runs the same tasks through the
simulator and the zero-shot CRA: all conversations advanced together, and one conversation at a time, each with the
hf backend's prefix cache on and off (--prefix-cache); per CRA turn, the prompt tokens billed, computed (prefill),
read from the cache, their floor, generated, and the dialogue's new tokens (prompt_log.print_speed), and
whether every side played the same conversations.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ailo_sim import AILO, make_zero_shot_cra, run_episodes  # noqa: E402
from bench.prompt_log import PromptLog, prefix_cache, print_speed, usage_row  # noqa: E402
from common.catalog import Catalog  # noqa: E402
from common.formats import load_demo_catalog, load_demo_tasks  # noqa: E402
from common.llm import make_llm  # noqa: E402


@dataclass
class Args:
    llm: str = "hf:smollm2-135m"
    """backend to measure (hf:<model>)"""
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    """generation batch sizes to time"""
    new_tokens: int = 64
    """max new tokens per generation in the throughput test"""
    conversations: int = 16
    """AILO conversations per measurement"""
    max_turns: int = 1
    """CRA turns per conversation in the AILO measurement"""
    user_max_tokens: int = 64
    """simulator max tokens in the AILO measurement (kept small so the one-at-a-time run stays short)"""
    seed: int = 1
    """torch seed"""
    prefix_cache: tuple[str, ...] = ("on", "off")
    """the hf backend's prefix cache on each side of the AILO table (CLEANCRS_PREFIX_CACHE_GB sets its bound)"""


def main(args: Args) -> None:
    torch.manual_seed(args.seed)
    rows = []
    llm = make_llm(args.llm, batch_size=max(args.batch_sizes, default=1))
    prompt = [{"role": "user", "content": "Describe your three favourite movies and why you like them."}]
    llm.chat([prompt], max_tokens=4)  # warm-up
    for batch_size in args.batch_sizes:
        before = llm.usage.completion_tokens
        start = time.perf_counter()
        llm.chat([prompt] * batch_size, temperature=1.0, max_tokens=args.new_tokens)
        seconds = time.perf_counter() - start
        tokens = llm.usage.completion_tokens - before
        rows.append(
            (
                f"hf generate, batch {batch_size}",
                f"{tokens / seconds:.1f} tokens/s",
                f"{tokens} tokens in {seconds:.1f} s",
            )
        )

    if rows:
        print(f"\nmodel: {args.llm}   device: cpu x {torch.get_num_threads()} threads")
        width = max(len(r[0]) for r in rows)
        print(f"{'measurement':<{width}}  {'rate':<24}  detail")
        for name, rate, detail in rows:
            print(f"{name:<{width}}  {rate:<24}  {detail}")

    tasks, catalog = load_demo_tasks()[: args.conversations], Catalog(load_demo_catalog())
    catalog.embeddings()
    sides = {}
    for label, batch_size in (("batched", args.conversations), ("one at a time", 1)):
        for cache in args.prefix_cache:
            with prefix_cache(cache == "on"):
                sides[f"{label}, cache {cache}"] = play(args, tasks, catalog, batch_size)
    print(f"\nAILO: {len(tasks)} demo conversations x <= {args.max_turns} CRA turns, simulator max tokens "
          f"{args.user_max_tokens}")  # fmt: skip
    print_speed(sides, "conversations")


def play(args: Args, tasks, catalog: Catalog, batch_size: int) -> dict:
    """The tasks' conversations, ``batch_size`` at a time: seconds, conversations, CRA turns, the episodes, and what
    the backend computed per turn."""
    user_llm, cra_llm, log = make_llm(args.llm, batch_size=batch_size), make_llm(args.llm, batch_size), PromptLog()
    for llm in (user_llm, cra_llm):
        log.watch(llm)
    cra = make_zero_shot_cra(cra_llm, catalog=catalog, domain="movie", top_k=5, max_tokens=64)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    simulator = AILO(user_llm, max_tokens=args.user_max_tokens)
    episodes = list(run_episodes(tasks, cra=cra, simulator=simulator, max_turns=args.max_turns, batch_size=batch_size))
    seconds = time.perf_counter() - start
    episodes.sort(key=lambda e: e["key"])
    turns = sum(len(e["turns"]) for e in episodes)
    said = [e["opening"]["user"] for e in episodes]
    said += [turn.get(field) or "" for e in episodes for turn in e["turns"] for field in ("system", "user")]
    dialogue = sum(len(ids) for ids in user_llm.tokenizer(said, add_special_tokens=False)["input_ids"])
    per_turn = usage_row([user_llm.usage, cra_llm.usage], log, max(turns, 1))
    return {"seconds": seconds, "conversations": len(episodes), "turns": turns, "records": episodes,
            "tokens": per_turn | {"dialogue": dialogue / max(turns, 1)}}  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(Args))
