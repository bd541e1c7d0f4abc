"""Ranking metrics, success rate, and where a text names a title. Every @k is computed on its own top-k slice."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence


def _unique(ranked: Sequence[str]) -> list[str]:
    """A ranking that lists an item twice keeps its first place (an item cannot be found twice)."""
    return list(dict.fromkeys(ranked))


def recall_at_k(ranked: Sequence[str], labels: Sequence[str], k: int) -> float:
    """Fraction of ``labels`` found in the top-k of ``ranked``."""
    if not labels:
        raise ValueError("recall needs at least one label")
    top = set(_unique(ranked)[:k])
    return sum(label in top for label in set(labels)) / len(set(labels))


def ndcg_at_k(ranked: Sequence[str], labels: Sequence[str], k: int) -> float:
    """Binary-relevance NDCG@k: DCG of the top-k over the DCG of an ideal top-k."""
    relevant = set(labels)
    dcg = sum(1.0 / math.log2(rank + 2) for rank, item in enumerate(_unique(ranked)[:k]) if item in relevant)
    ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(relevant), k)))
    return dcg / ideal if ideal else 0.0


def mrr_at_k(ranked: Sequence[str], labels: Sequence[str], k: int) -> float:
    """Reciprocal rank of the first relevant item in the top-k, 0 if none."""
    relevant = set(labels)
    for rank, item in enumerate(_unique(ranked)[:k]):
        if item in relevant:
            return 1.0 / (rank + 1)
    return 0.0


_ARTICLE = re.compile(r"^(the|a|an)\s+", re.IGNORECASE)
_QUOTES = "\"'*_\u201c\u201d\u2018\u2019"
_SENTENCE_END = ".!?\n\"'\u201c\u2018"


def title_forms(title: str) -> list[str]:
    """The full title, and its name without a trailing "(year)" or a subtitle when that differs."""
    name = re.split(r"\s*[(:]", title, maxsplit=1)[0].strip()
    return list(dict.fromkeys(form for form in (title.strip(), name) if form))


def is_ordinary_word(form: str) -> bool:
    """A form that could be an ordinary word: one word once a leading article is dropped ("It", "Up", "Rage",
    "Emma", "1948", "The Thing")."""
    return len(_ARTICLE.sub("", form).split()) <= 1


def _written_as_title(text: str, start: int, end: int, form: str, sentence_start: bool) -> bool:
    """Quoted ("It", *It*), or, for a form with letters, capitalised away from the start of a sentence ("Have you
    seen It?", "I loved JAWS", not "like it"); at the start of a sentence ("It was fun") only if ``sentence_start``.
    A form with a leading article is judged by its first word after the article, wherever it stands: "the
    Godfather trilogy" and "The Thing scared me" name the film, "the thing is" and "The thing is" do not."""
    closed = end < len(text) and text[end] in _QUOTES and not text[end + 1 : end + 2].isalnum()  # not "It's"
    quoted = 0 < start and text[start - 1] in _QUOTES and closed
    article = _ARTICLE.match(text[start:end]) if _ARTICLE.match(form) else None
    if article:  # the article's capital is the sentence's; the name's is the title's ("the Godfather", "The Thing")
        return quoted or text[start + article.end()].isupper()
    before = text[:start].rstrip()
    list_item = re.search(r"(^|\s)\d+[.)]$", before) is not None  # "1. Dune"
    opens_sentence = before == "" or (before[-1] in _SENTENCE_END and not list_item)
    capitalised = any(c.isalpha() for c in form) and text[start].isupper()
    return quoted or (capitalised and (sentence_start or not opens_sentence))


def title_spans(text: str, title: str, sentence_start: bool = False) -> list[tuple[int, int]]:
    """Where ``text`` names ``title``: any of ``title_forms`` as whole words, in any case, as non-overlapping
    (start, end) spans. A form that could be an ordinary word counts only where it is written as a title
    (``_written_as_title``), so that "I would like it to be scary" does not name "It (2017)", nor "Try Itchy Feet"
    name "It"."""
    spans = []
    full, *name = title_forms(title)
    for form in (full, *name):
        # the name without its year or subtitle does not count where another year or subtitle follows it
        # ("Alien (1979)" does not name "Alien: Covenant (2017)"), only where none follows or the title's own does
        end = r"(?!\w)" if form == full else r"(?!\w)(?=" + _own_rest(full[len(form) :]) + r"|(?!\s*[(:]))"
        for match in re.finditer(r"(?<!\w)" + re.escape(form) + end, text, re.IGNORECASE):
            if not is_ordinary_word(form) or _written_as_title(text, *match.span(), form, sentence_start):
                spans.append(match.span())
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _own_rest(rest: str) -> str:
    """A pattern for a title's own year or subtitle going on after its name, judged on its first two words:
    "Witch at Heart: the Jinx Hamilton Series" names "Witch at Heart: The Jinx Hamilton Series - Book 1" although
    the full title is not written out; "Star Wars: Episode V" does not name "Star Wars: Episode IV (1977)"."""
    words = re.findall(r"\w+", rest)[:2]
    return r"\W*" + r"\W+".join(map(re.escape, words)) + r"(?!\w)" if words else r"(?!)"


def mentions_title(text: str, title: str, sentence_start: bool = False) -> bool:
    """ECPO's success check (SR): ``text`` names ``title`` (``title_spans``). The ECPO code checks a lower-cased
    substring, which counts "it" for "It" and "chainsaw" for "Saw". AILO's leak guard passes ``sentence_start``,
    erring towards catching "Jaws!" at the start of a sentence."""
    return bool(title_spans(text, title, sentence_start))


def redact_title(text: str, title: str, replacement: str = "that one") -> str:
    """``text`` with every place that names ``title`` replaced, a sentence's first word included (the leak guard)."""
    for start, end in reversed(title_spans(text, title, sentence_start=True)):
        text = text[:start] + replacement + text[end:]
    return text


def success_rate(outcomes: Sequence[bool]) -> float:
    return sum(outcomes) / len(outcomes) if outcomes else 0.0
