"""A run's profile from its metrics.jsonl, and whether a second run logged the same values.

    python bench/run_profile.py runs/noflag_rso/metrics.jsonl
    python bench/run_profile.py runs/noflag_rso/metrics.jsonl runs/noflag_rso_nocache/metrics.jsonl

Per stage (``Run.stage``'s ``perf/<stage>_*``): seconds, prompt tokens computed (prefill), read from the prefix cache,
the cache's hit rate, tokens generated (decode) and generated tokens per second; with a second file, every value both
runs logged compared line by line, times aside (``time``, ``perf/*``): equal, within 1e-5 (rounding), or where they
differ, for issue 39's check that the cache leaves every metric as it was.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.prompt_log import compare  # noqa: E402

PERF = ("seconds", "prefill_tokens", "prefix_cached_tokens", "prefix_hit_rate", "decode_tokens", "tokens_per_s")


def lines(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def profile(rows: list[dict]) -> None:
    logged = {k: v for row in rows for k, v in row.items()}
    stages = [m.group(1) for k in logged if (m := re.fullmatch(r"perf/(.+)_seconds", k))]
    print(f"{'stage':<16}{'seconds':>9}{'prefill':>10}{'cached':>10}{'hit rate':>9}{'decode':>9}{'decode/s':>9}")
    for stage in stages:
        got = {name: logged.get(f"perf/{stage}_{name}", float("nan")) for name in PERF}
        print(f"{stage:<16}{got['seconds']:>9.0f}{got['prefill_tokens']:>10.0f}{got['prefix_cached_tokens']:>10.0f}"
              f"{got['prefix_hit_rate']:>9.1%}{got['decode_tokens']:>9.0f}{got['tokens_per_s']:>9.1f}")  # fmt: skip
    total = sum(logged[f"perf/{s}_seconds"] for s in stages)
    print(f"{'stages':<16}{total:>9.0f}   cost/llm_calls {logged.get('cost/llm_calls')}, cost/tokens "
          f"{logged.get('cost/tokens')}")  # fmt: skip


def untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "time" and not k.startswith("perf/")}


def main(paths: list[str]) -> None:
    if not 1 <= len(paths) <= 2:
        raise SystemExit("usage: python bench/run_profile.py METRICS.jsonl [OTHER_METRICS.jsonl]")
    first = lines(paths[0])
    print(paths[0])
    profile(first)
    if len(paths) == 2:
        second = lines(paths[1])
        print(f"\n{paths[1]}")
        profile(second)
        both = list(zip(first, second))
        if len(first) != len(second):
            print(f"\nmetrics: {len(first)} lines against {len(second)}; the first {len(both)} compared")
        exact, close, apart = compare([untimed(a) for a, _ in both], [untimed(b) for _, b in both])
        print(f"\nmetrics, times aside: {exact} values equal, {close} within 1e-5 (rounding)"
              + (f", {len(apart)} differ: {', '.join(apart[:20])}" if apart else ", none differ"))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
