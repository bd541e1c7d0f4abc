"""Ranking metrics, success rate, where a text names a title, and the paired interval of a comparison. Every @k is
computed on its own top-k slice."""

from __future__ import annotations

import functools
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
# A sequel's number on the same line after a name names another item of its series: "Halo 3", "Toy Story 2",
# "Rocky II" (not "Dune\n2. Alien", a list's next line)
_SEQUEL = r"[ \t]+(?:\d{1,2}|II|III|IV|V|VI|VII|VIII|IX|X)(?![\w-])"
# Words that open sentences as themselves, never as a title ("It is a great movie" is the pronoun)
_FUNCTION_WORDS = frozenset(
    "it this that these those he she they we you i there here what which who one her him us them his its our their "
    "my your".split()
)
# What a sentence says of a work it opens with: "Educated is a memoir by ...", "Up was the best film", "Emma by"
_KINDS_OF_WORK = (
    "book|novel|memoir|biography|autobiography|story|stories|collection|anthology|thriller|mystery|romance|classic|"
    "guide|handbook|cookbook|series|saga|trilogy|tale|film|movie|documentary|comedy|drama|game|sequel|read|"
    "page-turner|title|album|comic|manga|restaurant|cafe|bar|spot|place|shop|bakery"
)
# A subtitle's edition ("Battle Pass Edition", "Third Edition") and the word that names a series or a kind of work
_EDITION = re.compile(r"(?:\s*\S+){0,2}\s*\bEdition\b.*", re.IGNORECASE)
_KINDS_OF_SERIES = r"series|mysteries|novels?|poems|stories|essays|memoirs?|collection|anthology|trilogy"
_SAID_TO_BE_A_WORK = re.compile(
    rf"[ \t]+(?:(?:is|was)[ \t]+(?:a|an|the|one)(?:[ \t]+[\w'-]+){{0,4}}?[ \t]+(?:{_KINDS_OF_WORK})s?\b"
    rf"|by[ \t]+[A-Z])"
)


def split_title(title: str) -> tuple[str, str]:
    """(name, rest): a title's name, and what follows it from its first "(" or ":" on ("Alien", ": Covenant (2017)";
    "Jaws", " (1975)"); a title without either is all name."""
    match = re.search(r"\s*[(:]", title)
    return (title[: match.start()].strip(), title[match.start() :]) if match else (title.strip(), "")


def names_item(rest: str) -> bool:
    """Whether a title's name names the item by itself, without the ``rest`` that follows it. A "(year)", a
    "(Series Book 7)" or a "(Platform)" adds to a name, and so does a colon's subtitle that describes the item: one
    that starts with "A", "An" or a number ("Educated: A Memoir", "The Best of the Rejection Collection: 293
    Cartoons ..."), runs to five words or more ("A Walk in the Woods: Rediscovering America on the Appalachian
    Trail"), names its kind or series ("What Kind of Woman: Poems", "Eye of Danger: Tiger's Eye Mysteries") or is an
    edition alone ("Bridge For Dummies: Third Edition"). A shorter subtitle is the item's own name within a series,
    and the name before it the series': "Halo", "Alien" and "Star Wars" do not name "Halo: Reach", "Alien:
    Covenant (2017)" or "Star Wars: KOTOR", nor "Paper Mario" "Paper Mario: The Origami King - Nintendo Switch"."""
    subtitle = re.match(r"\s*:\s*([^:(\[]*?)\s*(?:\s-\s|[:(\[]|$)", rest)
    if subtitle is None:
        return True
    words = re.sub(_EDITION, "", subtitle.group(1)).split()
    return (
        not words
        or words[0].lower() in ("a", "an")
        or words[0][0].isdigit()
        or len(words) >= 5
        or re.fullmatch(_KINDS_OF_SERIES, words[-1], re.IGNORECASE) is not None
    )


def title_forms(title: str) -> list[str]:
    """The full title, and its name without a trailing "(year)" or a subtitle when that differs."""
    return list(dict.fromkeys(form for form in (title.strip(), split_title(title)[0]) if form))


def is_ordinary_word(form: str) -> bool:
    """A form that could be an ordinary word: one word once a leading article is dropped ("It", "Up", "Rage",
    "Emma", "1948", "The Thing")."""
    return len(_ARTICLE.sub("", form).split()) <= 1


def _written_as_title(text: str, start: int, end: int, form: str, sentence_start: bool) -> bool:
    """Quoted ("It", *It*), or, for a form with letters, capitalised away from the start of a sentence ("Have you
    seen It?", "I loved JAWS", not "like it"); at the start of a sentence ("It was fun") only if ``sentence_start``,
    or where the sentence goes on to say what kind of work it is ("Educated is a memoir", "Emma by Jane Austen";
    not "Emma is a name I like", nor a pronoun's "It is a great movie").
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
    if capitalised and opens_sentence and not sentence_start:
        return quoted or (form.lower() not in _FUNCTION_WORDS and _SAID_TO_BE_A_WORK.match(text, end) is not None)
    return quoted or capitalised


def title_spans(text: str, title: str, sentence_start: bool = False) -> list[tuple[int, int]]:
    """Where ``text`` names ``title``: its full title, or its name (``split_title``), as whole words in any case, as
    non-overlapping (start, end) spans. The name counts where it goes on with the title's own year or subtitle, and,
    where it names the item by itself (``names_item``), also where nothing else follows that would make it another
    item: another year or subtitle ("Alien (1979)" is not named in "Alien: Covenant"), or a sequel's number
    ("Alien 3", "Halo 3"). A form that could be an ordinary word counts only where it is written as a title
    (``_written_as_title``), so that "I would like it to be scary" does not name "It (2017)", nor "Try Itchy Feet"
    name "It"."""
    spans = []
    for pattern in _title_patterns(title):
        for match in pattern.finditer(text):
            named = match.group()
            if not is_ordinary_word(named) or _written_as_title(text, *match.span(), named, sentence_start):
                spans.append(match.span())
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


@functools.lru_cache(maxsize=1 << 15)
def _title_patterns(title: str) -> tuple[re.Pattern, ...]:
    """The compiled patterns of ``title_spans`` (a catalog's titles are matched again and again)."""
    full = title.strip()
    name, rest = split_title(full)
    forms = [(full, r"(?!\w)(?!" + _SEQUEL + ")")]
    if name and name != full:
        own = _own_rest(rest)
        alone = r"|(?!\s*[(:]|" + _SEQUEL + ")" if names_item(rest) else ""
        forms.append((name, r"(?!\w)(?:" + own + alone + ")"))  # the own subtitle's words are part of the span
    return tuple(re.compile(r"(?<!\w)" + re.escape(form) + end, re.IGNORECASE) for form, end in forms)


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


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 10_000, seed: int = 0):
    """(mean of a - b, and the 2.5th and 97.5th percentiles of that mean over ``resamples`` bootstrap resamples): the
    95% interval of a comparison of two systems measured on the same dialogues or tasks, a[i] and b[i] on item i.
    The pairs are resampled together, so what every item shares (an easy task, a hard one) cancels out."""
    import numpy as np

    if len(a) != len(b) or not a:
        raise ValueError(f"paired_bootstrap needs two equally long, non-empty lists (got {len(a)} and {len(b)})")
    differences = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(differences), size=(resamples, len(differences)))
    low, high = np.percentile(differences[draws].mean(axis=1), [2.5, 97.5])
    return float(differences.mean()), float(low), float(high)
