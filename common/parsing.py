"""JSON and action extraction from LLM text, and a bounded-retry wrapper that counts failures."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_SMART_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})


def _close_truncated(text: str) -> str:
    """Append the quotes and brackets that a generation cut off by max_tokens left open."""
    stack, in_string, escaped = [], False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and stack:
            stack.pop()
    return text + ('"' if in_string else "") + "".join(reversed(stack))


def _candidates(text: str):
    text = text.translate(_SMART_QUOTES)
    yield from (m.strip() for m in _FENCE.findall(text))
    start, end = text.find("{"), text.rfind("}")
    if start != -1:
        if end > start:
            yield text[start : end + 1]
        yield _close_truncated(text[start:])


def parse_json(text: str) -> dict | None:
    """The first JSON object in ``text``, tolerating code fences, prose around it, trailing commas,
    Python-style single quotes and a cut-off tail. ``None`` when nothing parses."""
    for candidate in _candidates(text):
        for attempt in (candidate, _TRAILING_COMMA.sub(r"\1", candidate)):
            try:
                value = json.loads(attempt)
            except json.JSONDecodeError:
                try:  # the object may be followed by more text or a second object
                    value, _ = json.JSONDecoder().raw_decode(attempt)
                except json.JSONDecodeError:
                    continue
            if isinstance(value, dict):
                return value
        if '"' not in candidate and "'" in candidate:
            value = parse_json(candidate.replace("'", '"'))
            if value is not None:
                return value
    return None


def parse_action(text: str, actions=("Ask", "Recommend", "Response", "Search")) -> tuple[str, str] | None:
    """``(type, argument)`` of the first ``Type[argument]`` in ``text``.

    The closing ``]`` may be missing because generation stops at it; nested brackets are not allowed.
    """
    match = re.search(r"\b(" + "|".join(map(re.escape, actions)) + r")\s*\[([^\[\]]+)\]?", text)
    if match is None or not match.group(2).strip():
        return None
    return match.group(1), match.group(2).strip()


def coerce_int(value: Any, low: int, high: int) -> int | None:
    """``int(float(value))`` clipped to [low, high]; accepts "4", "4.0", "4/5", 4.5. ``None`` if no number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = value
    else:
        match = re.search(r"-?\d+(?:\.\d+)?", str(value))
        if match is None:
            return None
        number = float(match.group())
    return max(low, min(high, int(float(number))))


@dataclass
class ParseStats:
    """How often parsing needed a retry or failed outright; logged as ``rollout/parse_*``."""

    attempts: int = 0
    retries: int = 0
    failures: int = 0

    def metrics(self, prefix: str = "rollout/") -> dict[str, int]:
        return {f"{prefix}parse_attempts": self.attempts, f"{prefix}parse_retries": self.retries,
                f"{prefix}parse_failures": self.failures}


def chat_parsed(llm, conversations: list[list[dict]], parse: Callable[[str], Any], stats: ParseStats,
                max_tries: int = 3, temperature: float = 0.0, temperature_step: float = 0.3,
                max_tokens: int = 256, stop=None) -> list[Any]:
    """One batched ``llm.chat`` call, then re-ask only the conversations whose output ``parse`` rejected
    (returned None), each retry hotter by ``temperature_step`` so greedy decoding does not repeat itself.
    Gives ``None`` for those still unparsed after ``max_tries``; never raises on bad output."""
    results: list[Any] = [None] * len(conversations)
    pending = list(range(len(conversations)))
    for attempt in range(max_tries):
        if not pending:
            break
        if attempt:
            stats.retries += len(pending)
        stats.attempts += len(pending)
        outputs = llm.chat([conversations[i] for i in pending], temperature=temperature + attempt * temperature_step,
                           max_tokens=max_tokens, stop=stop)
        still = []
        for i, (text,) in zip(pending, outputs):
            results[i] = parse(text)
            if results[i] is None:
                still.append(i)
        pending = still
    stats.failures += len(pending)
    return results
