"""Scores that an LLM judge writes, read as a number: either sampled and parsed, as the papers do, or as their
expectation under the judge's answer distribution (``--judge-scoring expected``).

The mean of K sampled scores estimates E[s] = sum_s s P(s | prompt, answer so far). That expectation can be read
exactly, in one forward pass: pre-fill the answer up to the score, and weigh each allowed score token by its
next-token probability (G-Eval's scoring). It costs one call where sampling costs K, and it carries no sampling
noise, so a reward or a win rate computed from it is a deterministic function of what was judged.

The probability the judge puts on tokens that are not an allowed score is its ``mass_outside``. The expectation is
taken over the allowed tokens (renormalized), and the outside mass is logged beside it, so that a judge that mostly
wants to say something else is reported rather than silently trusted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

JudgeScoring = Literal["sampled", "expected"]

MOSTLY_ELSEWHERE = 0.5  # a judgement whose allowed tokens hold less than half the mass is counted apart


@dataclass
class Expectation:
    value: float | None  # sum_s s P(s) / sum_s P(s) over the allowed scores; None when they hold no mass at all
    mass_outside: float  # 1 - sum_s P(s)
    probs: dict[str, float]  # P(s) per allowed score token, as the judge gave them


def expectation(probs: dict[str, float], values: dict[str, float]) -> Expectation:
    inside = sum(probs.values())
    value = sum(values[token] * p for token, p in probs.items()) / inside if inside > 0 else None
    return Expectation(value, max(0.0, 1.0 - inside), probs)


def expected_scores(llm, conversations: list[list[dict]], values: dict[str, float], prefix: str | list[str] = ""):
    """E[score] for each conversation: the judge's next-token distribution after its answer so far (``prefix``,
    pre-filled where the backend can), over the tokens of ``values`` (score token -> its number). One forward pass
    per conversation (``llm.choice_probs``)."""
    return [expectation(p, values) for p in llm.choice_probs(conversations, tuple(values), prefix=prefix)]


def scores_in_answers(llm, conversations: list[list[dict]], leads: list[str], values: dict[str, float],
                      max_tokens: int) -> list[tuple[str, list[Expectation | None]]]:  # fmt: skip
    """For a judge that cannot be pre-filled (an API): its greedy answer, and E[score] at each place the answer
    reaches a lead (regular expressions, in order, e.g. '"rating":\\s*"?'): the distribution the server reports at
    the first token after it that is more than spaces and quotes, over the tokens of ``values``. One call per
    conversation (``answer_distributions``). A lead the answer never reaches gives None."""
    answers = []
    for tokens in llm.answer_distributions(conversations, max_tokens):
        text, read = "", []
        for token, top in tokens:
            # the score is the first token after the lead that is more than spaces and quotes
            reached = len(read) < len(leads) and re.search(f"(?:{leads[len(read)]})$", text)
            if reached and token.strip().strip('"'):
                # a token counts for the score it begins (" 4" for 4, "-" for -1), as choice_token_ids counts them
                probs = {c: sum(p for t, p in top.items() if t.strip() and c.startswith(t.strip())) for c in values}
                read.append(expectation(probs, values))
            text += token
        answers.append((text, read + [None] * (len(leads) - len(read))))
    return answers


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
