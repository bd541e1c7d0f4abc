"""Scores that an LLM judge writes, read as a number: either sampled and parsed, as the papers do, or as their
expectation under the judge's answer distribution (``--judge-scoring expected``).

The mean of K sampled scores estimates E[s] = sum_s s P(s | prompt, answer so far). That expectation can be read
exactly, without sampling: pre-fill the answer up to the score, and weigh each allowed score by the probability that
the judge writes it there in full, every token of it, with or without a leading space (``HFChat.choice_probs``:
lm-evaluation-harness's continuation log-likelihood, in one batched pass whose prompt runs once). A score written in
two tokens counts both: in Llama-3's, Qwen's and SmolLM2's tokenizers '"Score": -1' is '":' + ' -' + '1' where
'"Score": 1' is '":' + ' ' + '1', so the pre-fill ends before the space, which belongs to the score's spelling. It
costs one call where sampling costs K, and it carries no sampling noise, so a reward or a win rate computed from it
is a deterministic function of what was judged.

The probability the judge puts on answers that are not an allowed score is its ``mass_outside``. The expectation is
taken over the allowed scores (renormalized), and the outside mass is logged beside it, so that a judge that mostly
wants to say something else is reported rather than silently trusted. Beside it, ``greedy`` is the score the judge
would write (the most probable allowed one), for rules that test a written score (a rating against a threshold).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

JudgeScoring = Literal["sampled", "expected"]

MOSTLY_ELSEWHERE = 0.5  # a judgement whose allowed scores hold less than half the mass is counted apart


@dataclass
class Expectation:
    value: float | None  # sum_s s P(s) / sum_s P(s) over the allowed scores; None when they hold no mass at all
    mass_outside: float  # 1 - sum_s P(s)
    probs: dict[str, float]  # P(s) per allowed score, each written in full, as the judge gave them
    greedy: float | None = None  # the most probable allowed score (what the judge writes at temperature 0); or None


def expectation(probs: dict[str, float], values: dict[str, float]) -> Expectation:
    inside = sum(probs.values())
    if inside <= 0:
        return Expectation(None, max(0.0, 1.0 - inside), probs)
    value = sum(values[score] * p for score, p in probs.items()) / inside
    return Expectation(value, max(0.0, 1.0 - inside), probs, values[max(probs, key=probs.get)])


def expected_scores(llm, conversations: list[list[dict]], values: dict[str, float], prefix: str | list[str] = ""):
    """E[score] for each conversation: the judge's probability of writing each score of ``values`` (its text -> its
    number) in full after its answer so far (``prefix``, pre-filled where the backend can; trailing spaces are part
    of the score's spelling, so '"Score": ' and '"Score":' read the same). One batched pass
    (``llm.choice_probs``)."""
    return [expectation(p, values) for p in llm.choice_probs(conversations, tuple(values), prefix=prefix)]


def scores_in_answers(llm, conversations: list[list[dict]], leads: list[str], values: dict[str, float],
                      max_tokens: int) -> list[tuple[str, list[Expectation | None]]]:  # fmt: skip
    """For a judge that cannot be pre-filled (an API): its greedy answer, and E[score] at each place the answer
    reaches a lead (regular expressions, in order, e.g. '"rating":\\s*"?'): the first token edge after which the
    answer goes on with more than spaces and quotes; the score is read from there, spaces removed, each value
    written in full along the answer's tokens (``OpenAIChat.read_choices``, which refuses a value whose probability
    the server's top log-probs cannot give). One call per conversation (``answer_distributions``). A lead the answer
    never reaches gives None."""
    answers = []
    for tokens in llm.answer_distributions(conversations, max_tokens):
        text, read = "", []
        for token, _ in tokens:
            reached = len(read) < len(leads) and re.search(f"(?:{leads[len(read)]})$", text.rstrip(" "))
            if reached and token.strip().strip('"'):
                read.append(expectation(llm.read_choices(tokens, len(text.rstrip(" ")), tuple(values)), values))
            text += token
        answers.append((text, read + [None] * (len(leads) - len(read))))
    return answers


def json_string(text: str) -> tuple[str, str]:
    """The JSON string value that ``text`` goes on with (its opening quote already written): (the text as written,
    up to the quote that closes it, whitespace runs made one space; the value, escapes decoded). The closing quote is
    the first unescaped one after which the JSON goes on: a comma and the next key, a closing brace, or nothing
    (where generation stopped at the next key, or at '"}', which a value rarely holds). So an escaped quote, and a
    quoted title that a model writes unescaped ('"The Matrix" is a classic'), stay in the value; without a closing
    quote the whole text is the value."""
    end, k = len(text), 0
    while k < len(text):
        if text[k] == "\\":
            k += 2
            continue
        if text[k] == '"' and re.match(r'\s*(?:$|}|,\s*(?:$|"[^"\n]*"\s*:))', text[k + 1 :]):
            end = k
            break
        k += 1
    written = " ".join(text[:end].split())
    try:
        value = json.loads(f'"{written}"')
    except json.JSONDecodeError:
        value = written.replace('\\"', '"')
    return written, value


def mass_metrics(outside: list[float], name: str) -> dict[str, float]:
    """``<name>_mass_outside``, the mean mass a judge put outside the allowed scores over the expected scores it
    gave (``outside``, read from the stage's records, so every rank's count), and ``<name>_mostly_elsewhere``, the
    judgements whose allowed scores held less than half the mass. Empty when nothing was read."""
    if not outside:
        return {}
    return {
        f"{name}_mass_outside": sum(outside) / len(outside),
        f"{name}_mostly_elsewhere": sum(o > MOSTLY_ELSEWHERE for o in outside),
    }
