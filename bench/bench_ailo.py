"""Speed figures for the hf backend and the AILO simulator; prints a table.

    python bench/bench_ailo.py                 # embedded SmolLM2 on CPU
    python bench/bench_ailo.py --llm hf:meta-llama/Llama-3.1-8B-Instruct --conversations 64

Generation throughput counts generated tokens (eos included) over wall time, sampled at temperature 1 so
that every batch size does the same kind of work. AILO conversations/minute runs the same tasks through the
simulator and the zero-shot CRA twice: all conversations advanced together, and one conversation at a time.
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
from common.catalog import Catalog  # noqa: E402
from common.data import load_demo_catalog, load_demo_tasks  # noqa: E402
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


def main(args: Args) -> None:
    torch.manual_seed(args.seed)
    rows = []
    llm = make_llm(args.llm, batch_size=max(args.batch_sizes))
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

    tasks, catalog = load_demo_tasks()[: args.conversations], Catalog(load_demo_catalog())
    catalog.embeddings()
    for label, batch_size in (("batched", args.conversations), ("one at a time", 1)):
        user_llm = make_llm(args.llm, batch_size=batch_size)
        cra_llm = make_llm(args.llm, batch_size=batch_size)
        cra = make_zero_shot_cra(cra_llm, catalog=catalog, domain="movie", top_k=5, max_tokens=64)
        simulator = AILO(user_llm, max_tokens=args.user_max_tokens)
        start = time.perf_counter()
        list(run_episodes(tasks, cra=cra, simulator=simulator, max_turns=args.max_turns, batch_size=batch_size))
        minutes = (time.perf_counter() - start) / 60
        rows.append(
            (
                f"AILO {len(tasks)} conversations, {label}",
                f"{len(tasks) / minutes:.2f} conversations/min",
                f"{minutes * 60:.0f} s, {user_llm.usage.calls} simulator calls",
            )
        )

    print(f"\nmodel: {args.llm}   device: cpu x {torch.get_num_threads()} threads   turns: {args.max_turns}")
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'rate':<24}  detail")
    for name, rate, detail in rows:
        print(f"{name:<{width}}  {rate:<24}  {detail}")


if __name__ == "__main__":
    main(tyro.cli(Args))
