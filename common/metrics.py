"""Ranking metrics, success rate, Dist-n and win rate. Every @k is computed on its own top-k slice."""

from __future__ import annotations

import math
from collections.abc import Sequence


def recall_at_k(ranked: Sequence[str], labels: Sequence[str], k: int) -> float:
    """Fraction of ``labels`` found in the top-k of ``ranked``."""
    if not labels:
        raise ValueError("recall needs at least one label")
    top = set(ranked[:k])
    return sum(label in top for label in set(labels)) / len(set(labels))


def ndcg_at_k(ranked: Sequence[str], labels: Sequence[str], k: int) -> float:
    """Binary-relevance NDCG@k: DCG of the top-k over the DCG of an ideal top-k."""
    relevant = set(labels)
    dcg = sum(1.0 / math.log2(rank + 2) for rank, item in enumerate(ranked[:k]) if item in relevant)
    ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(relevant), k)))
    return dcg / ideal if ideal else 0.0


def mrr_at_k(ranked: Sequence[str], labels: Sequence[str], k: int) -> float:
    """Reciprocal rank of the first relevant item in the top-k, 0 if none."""
    relevant = set(labels)
    for rank, item in enumerate(ranked[:k]):
        if item in relevant:
            return 1.0 / (rank + 1)
    return 0.0


def mentions_title(text: str, title: str) -> bool:
    """ECPO's success check: the lower-cased title is a substring of the lower-cased text."""
    return title.lower() in text.lower()


def success_rate(outcomes: Sequence[bool]) -> float:
    return sum(outcomes) / len(outcomes) if outcomes else 0.0


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Dist-n: distinct n-grams over all n-grams, pooled across ``texts`` (whitespace tokens)."""
    grams = [
        tuple(tokens[i : i + n]) for text in texts for tokens in [text.split()] for i in range(len(tokens) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(scores_ab: Sequence[float], scores_ba: Sequence[float]) -> float:
    """(wins + 0.5 ties) / total over both position orders.

    ``scores_ab[i]`` is the judge's verdict with the candidate shown as A (1 = A better, -1 = B better,
    0 = tie); ``scores_ba[i]`` is the verdict on the same pair with the positions swapped, so it is
    negated to speak for the candidate again.
    """
    verdicts = list(scores_ab) + [-s for s in scores_ba]
    if not verdicts:
        return 0.0
    return (sum(v > 0 for v in verdicts) + 0.5 * sum(v == 0 for v in verdicts)) / len(verdicts)
