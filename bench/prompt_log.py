"""What the hf backend's prefix cache saves, for bench_rso.py and bench_ailo.py: every prompt an HFChat reads, and
how many of its tokens no earlier prompt began with (the floor: what even an unbounded prefix cache must run)."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

from common.llm import release_models


class PromptLog:
    """Watches HFChat backends (``watch``): every prompt they read, in order, goes into a trie of token ids; ``new``
    counts, per prompt, its tokens after the longest beginning it shares with any prompt read before it (at least
    one: the pass that gives the next token runs one token whatever it holds)."""

    def __init__(self):
        self.trie: dict = {}
        self.prompts = 0
        self.tokens = 0
        self.new = 0

    def read(self, ids: list[int]) -> None:
        node, shared = self.trie, 0
        for token in ids:
            if token not in node:
                break
            node, shared = node[token], shared + 1
        for token in ids[shared:]:
            node = node.setdefault(token, {})
        self.prompts += 1
        self.tokens += len(ids)
        self.new += max(1, len(ids) - shared)

    def watch(self, llm) -> None:
        """Log the prompts of ``llm``'s generation (each distinct prompt of a call once: its n samples share it) and
        of its scoring (each context)."""
        sample, passes = llm._sample, llm._context_passes

        def logged_sample(prompts, *args, **kwargs):
            for ids in prompts:
                self.read(ids)
            return sample(prompts, *args, **kwargs)

        def logged_passes(contexts, *args, **kwargs):
            for ids in contexts:
                self.read(ids)
            return passes(contexts, *args, **kwargs)

        llm._sample, llm._context_passes = logged_sample, logged_passes


@contextmanager
def prefix_cache(on: bool):
    """The hf backend with its prefix cache on (at its default bound, or ``CLEANCRS_PREFIX_CACHE_GB`` as set) or
    off, starting empty, and models loaded afresh."""
    before = os.environ.get("CLEANCRS_PREFIX_CACHE_GB")
    if not on:
        os.environ["CLEANCRS_PREFIX_CACHE_GB"] = "0"
    release_models()
    try:
        yield
    finally:
        release_models()
        if before is None:
            os.environ.pop("CLEANCRS_PREFIX_CACHE_GB", None)
        else:
            os.environ["CLEANCRS_PREFIX_CACHE_GB"] = before


def usage_row(usages, log: PromptLog, turns: int) -> dict[str, float]:
    """Per turn: prompt tokens billed (every call its whole prompt), computed (prefill), read from the cache, the
    floor (``PromptLog.new``), generated (decode); and the cache's hit rate over the prompt tokens."""
    prefill = sum(u.prefill_tokens for u in usages)
    cached = sum(u.cached_tokens for u in usages)
    return {
        "billed": sum(u.prompt_tokens for u in usages) / turns,
        "prefill": prefill / turns,
        "cached": cached / turns,
        "floor": log.new / turns,
        "decode": sum(u.completion_tokens for u in usages) / turns,
        "hit_rate": cached / max(cached + prefill, 1),
    }


def print_speed(rows: dict[str, dict], unit: str) -> None:
    """The speed table of bench_rso and bench_ailo: per side the rate, the time, and per turn the prompt tokens
    billed, computed, cached, their floor, and those generated; then the speed-ups against one at a time without
    the cache, and whether the records with the cache are those without it."""
    base = next((r for label, r in rows.items() if label.startswith("one at a time") and label.endswith("off")), None)
    print(f"the peer: one at a time without the cache; 'x peer' is each side's {unit}/min over the peer's")
    print(f"{'measurement':<26}{unit + '/min':>18}{'x peer':>8}{'turns/min':>11}{'seconds':>9}{unit:>14}{'turns':>7}"
          "   per turn:"
          f"{'billed':>8}{'prefill':>9}{'cached':>8}{'floor':>7}{'decode':>8}{'dialogue':>9}"
          f"{'hit rate':>9}")  # fmt: skip
    for label, r in rows.items():
        t = r["tokens"]
        peer = (r[unit] / r["seconds"]) / (base[unit] / base["seconds"]) if base else float("nan")
        print(f"{label:<26}{r[unit] / r['seconds'] * 60:>18.2f}{peer:>7.2f}x{r['turns'] / r['seconds'] * 60:>11.2f}"
              f"{r['seconds']:>9.0f}{r[unit]:>14}{r['turns']:>7}   {'':>9}{t['billed']:>8.0f}{t['prefill']:>9.0f}"
              f"{t['cached']:>8.0f}{t['floor']:>7.0f}{t['decode']:>8.0f}{t.get('dialogue', float('nan')):>9.0f}"
              f"{t['hit_rate']:>9.1%}")  # fmt: skip
    for label, r in rows.items():
        if base is not None and r is not base:
            rate = (r[unit] / r["seconds"]) / (base[unit] / base["seconds"])
            turns = (r["turns"] / r["seconds"]) / (base["turns"] / base["seconds"])
            print(
                f"{label}: {rate:.2f}x {unit}/min, {turns:.2f}x turns/min of one at a time without the cache "
                "(target for batched with the cache: at least 4x)"
            )
        t = r["tokens"]
        print(
            f"{label}: prompt tokens computed per turn {t['prefill'] / max(t.get('dialogue', 0), 1):.2f}x the "
            f"dialogue's new tokens, {t['prefill'] / max(t['floor'], 1):.2f}x the floor"
        )
    for label, r in rows.items():  # the same episodes with and without the cache (batching changes the draws)
        twin = label.replace("cache off", "cache on")
        if twin != label and twin in rows:
            exact, close, apart = compare(rows[twin]["records"], r["records"])
            print(f"records of {label} against {twin}: {exact} values equal, {close} within 1e-5 (rounding)"
                  + (f", {len(apart)} differ: {', '.join(apart[:5])}" if apart else ""))  # fmt: skip


def compare(a, b, where: str = "") -> tuple[int, int, list[str]]:
    """(values equal, floats within 1e-5 relative, where the others differ) of two nested records."""
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        parts = [compare(a[k], b[k], f"{where}.{k}") for k in a]
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        parts = [compare(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))]
    elif a == b:
        return 1, 0, []
    elif isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-8):
        return 0, 1, []
    else:
        return 0, 0, [where or "."]
    return sum(p[0] for p in parts), sum(p[1] for p in parts), [w for p in parts for w in p[2]]
