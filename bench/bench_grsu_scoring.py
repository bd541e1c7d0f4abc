"""Items scored per second: grsu.py's one-forward-pass P(accept) scorer against scoring by generating the answer
and parsing Yes/No, on the same model, conversation and items. Prints a table and the ratio (target: >= 10x).

    python bench/bench_grsu_scoring.py                       # embedded SmolLM2, a real INSPIRED conversation, CPU
    python bench/bench_grsu_scoring.py --conversation demo   # a 3-utterance demo conversation instead
    python bench/bench_grsu_scoring.py --model meta-llama/Llama-3.1-8B-Instruct --items 200

The conversation is the INSPIRED validation turn of median history length (--history-quantile; GRSU scores at
every turn); the items are the first --items titles of that dataset's catalog. The shared prefix is the
conversation, so the longer it is, the more the one-pass scorer saves; the demo conversation shows the short end.

Three ways, each over every item once, after one warm-up item:
  generate   the answer is generated greedily ("Accept the recommendation (Yes/No)? Yes": up to --answer-tokens
             tokens) and Yes/No is parsed from it, batched like every other hf call (HFChat.chat)
  one pass   one batched forward pass per batch of full prompts, P(Yes)/(P(Yes)+P(No)) at the answer token
             (HFChat.choice_probs after the pre-filled question)
  grsu.py    the same single pass, with the conversation's shared prompt prefix run once and its key/value
             cache reused by every item (grsu.score_items: HFChat.choice_probs with shared_prefix)
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grsu  # noqa: E402
from common.catalog import Catalog  # noqa: E402
from common.conversations import render_history  # noqa: E402
from common.llm import HFChat  # noqa: E402
from common.models import load_model  # noqa: E402


@dataclass
class Args:
    model: str = "smollm2-135m"
    """the simulated user's model (a spec load_model accepts)"""
    conversation: Literal["inspired", "demo"] = "inspired"
    """inspired: a real validation conversation from --data-dir; demo: the first bundled test conversation"""
    data_dir: str = "../shared/data"
    """root of the real data"""
    items: int = 40
    """items to score (catalog titles in order; a catalog smaller than this repeats)"""
    batch_size: int = 32
    """items per batched call, the same for all three ways"""
    answer_tokens: int = 12
    """generation budget of the generate-and-parse way: the answer line is 11 tokens on SmolLM2"""
    threads: int = 0
    """torch CPU threads; 0 keeps torch's default"""
    history_quantile: float = 0.5
    """which conversation by history length: 0.5 the median (the default setting), 1.0 the longest"""


def main(args: Args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    try:
        dataset = grsu.load_data(args.conversation, args.data_dir, "valid")
    except grsu.InputError as err:  # no real data here: say so, and measure the bundled demo conversation
        print(
            f"{err}\nthe INSPIRED conversation needs the real data (--data-dir); measuring --conversation demo instead"
        )
        args.conversation = "demo"
        dataset = grsu.load_data("demo", args.data_dir, "valid")
    turns, catalog = dataset.evaluated, Catalog(dataset.items)
    by_length = sorted(turns, key=lambda t: len(render_history(t.history)))
    history = by_length[min(len(turns) - 1, int(args.history_quantile * len(turns)))].history
    titles = [catalog.titles[i % len(catalog)] for i in range(args.items)]
    prompts = [grsu.score_prompt(history, catalog.card(t, grsu.CARD_FIELDS)) for t in titles]
    convs = [[{"role": "user", "content": p}] for p in prompts]
    llm = HFChat(model, tokenizer, batch_size=args.batch_size)

    def generate(c):
        texts = [t for (t,) in llm.chat(c, max_tokens=args.answer_tokens)]
        return [
            1.0 if re.search(r"\byes\b", t, re.I) else 0.0 if re.search(r"\bno\b", t, re.I) else float("nan")
            for t in texts
        ]

    def one_pass(c):
        probs = llm.choice_probs(c, choices=("Yes", "No"), prefix=grsu.ANSWER_PREFIX)
        return [p["Yes"] / (p["Yes"] + p["No"]) for p in probs]

    cards = [catalog.card(t, grsu.CARD_FIELDS) for t in titles]

    def shared(c):
        return grsu.score_items(llm, history, cards[: len(c)])

    rows = []
    with torch.inference_mode():
        for name, fn in (
            ("generate + parse", generate),
            ("one pass, full prompts", one_pass),
            ("grsu.py (shared prefix)", shared),
        ):
            fn(convs[:1])  # warm-up
            start = time.perf_counter()
            scores = fn(convs)
            seconds = time.perf_counter() - start
            parsed = sum(s == s for s in scores)
            rows.append((name, seconds, len(convs) / seconds, parsed, scores))
    prompt_tokens = sum(
        len(tokenizer(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False))["input_ids"])
        for c in convs
    )
    print(
        f"\n{args.model}, {len(convs)} items of one {args.conversation} conversation, "
        f"mean prompt {prompt_tokens / len(convs):.0f} tokens, "
        f"batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    print(f"{'scorer':26}{'seconds':>10}{'items/s':>10}{'scored':>9}")
    for name, seconds, rate, parsed, _ in rows:
        print(f"{name:26}{seconds:10.2f}{rate:10.2f}{parsed:>6}/{len(convs)}")
    agreement = max(abs(a - b) for a, b in zip(rows[1][4], rows[2][4]))
    print(
        f"\ngrsu.py vs generate + parse: {rows[2][2] / rows[0][2]:.1f}x items/s (target >= 10x): "
        f"{'PASS' if rows[2][2] >= 10 * rows[0][2] else 'FAIL'}"
    )
    print(
        f"grsu.py vs one pass over full prompts: {rows[2][2] / rows[1][2]:.1f}x; "
        f"max |P(accept) difference| {agreement:.2e}"
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
