"""JSON extraction from LLM text, and a bounded-retry wrapper that counts failures."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


_NUMBER = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+|points?|stars?)?\s*\.?\s*", re.IGNORECASE)


def coerce_int(value: Any, low: int, high: int) -> int | None:
    """``int(float(value))`` clipped to [low, high]. Accepts 4, 4.5, "4", "4.0", "4/5", "4 points";
    rejects text with no single clear number, such as an echoed "<rating from 0 to 5>"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        match = _NUMBER.fullmatch(str(value))
        if match is None:
            return None
        number = float(match.group(1))
    return max(low, min(high, int(number)))


def is_placeholder(text: str) -> bool:
    """An echoed template slot such as "<your message to the system>"."""
    text = text.strip()
    return text.startswith("<") and text.endswith(">")


@dataclass
class ParseStats:
    """How often parsing needed a retry or failed outright; logged as ``rollout/parse_*``."""

    attempts: int = 0
    retries: int = 0
    failures: int = 0

    def metrics(self, prefix: str = "rollout/") -> dict[str, int]:
        return {
            f"{prefix}parse_attempts": self.attempts,
            f"{prefix}parse_retries": self.retries,
            f"{prefix}parse_failures": self.failures,
        }


def chat_parsed(
    llm,
    conversations: list[list[dict]],
    parse: Callable[[str], Any],
    stats: ParseStats,
    max_tries: int = 3,
    temperature: float = 0.0,
    temperature_step: float = 0.3,
    max_tokens: int = 256,
    stop=None,
    retry_temperature: float | None = None,
) -> tuple[list[Any], list[str]]:
    """One batched ``llm.chat`` call, then re-ask only the conversations whose output ``parse`` rejected
    (returned None), each retry hotter by ``temperature_step`` so greedy decoding does not repeat itself, or
    every retry at ``retry_temperature`` when that is given.

    Returns ``(parsed, last_texts)``: ``parsed[i]`` is ``None`` where every try failed (counted in
    ``stats.failures``), and ``last_texts[i]`` is the last raw output, for a caller's fallback.
    Never raises on bad output."""
    results: list[Any] = [None] * len(conversations)
    texts: list[str] = [""] * len(conversations)
    pending = list(range(len(conversations)))
    for attempt in range(max_tries):
        if not pending:
            break
        if attempt:
            stats.retries += len(pending)
        stats.attempts += len(pending)
        if not attempt:
            current = temperature
        else:
            current = retry_temperature if retry_temperature is not None else temperature + attempt * temperature_step
        outputs = llm.chat([conversations[i] for i in pending], temperature=current, max_tokens=max_tokens, stop=stop)
        still = []
        for i, (text,) in zip(pending, outputs):
            texts[i] = text
            results[i] = parse(text)
            if results[i] is None:
                still.append(i)
        pending = still
    stats.failures += len(pending)
    return results, texts
