import math

import pytest

from common.metrics import (
    mentions_title,
    mrr_at_k,
    ndcg_at_k,
    paired_bootstrap,
    recall_at_k,
    redact_title,
    success_rate,
)

RANKED = ["a", "b", "c", "d", "e"]


def test_recall_each_k_on_its_own_slice():
    assert recall_at_k(RANKED, ["c", "z"], 2) == 0.0
    assert recall_at_k(RANKED, ["c", "z"], 3) == 0.5
    assert recall_at_k(RANKED, ["a", "e"], 5) == 1.0
    with pytest.raises(ValueError):
        recall_at_k(RANKED, [], 3)


def test_ndcg_hand_computed():
    # relevant at ranks 2 and 4 (1-based); ideal puts both on top
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    ideal = 1 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(RANKED, ["b", "d"], 5) == pytest.approx(dcg / ideal)
    # @3 only sees "b"; the ideal @3 still has both relevant items on top
    assert ndcg_at_k(RANKED, ["b", "d"], 3) == pytest.approx((1 / math.log2(3)) / ideal)
    assert ndcg_at_k(RANKED, ["z"], 5) == 0.0


def test_mrr_hand_computed():
    assert mrr_at_k(RANKED, ["c"], 5) == pytest.approx(1 / 3)
    assert mrr_at_k(RANKED, ["c"], 2) == 0.0
    assert mrr_at_k(RANKED, ["d", "b"], 5) == 0.5


def test_success_rate():
    assert success_rate([True, False, True, True]) == 0.75
    assert success_rate([]) == 0.0


def test_a_ranking_that_repeats_an_item_counts_it_once():
    # "b" listed twice used to give NDCG 1.63; an item is found once, at its first place
    assert ndcg_at_k(["b", "b", "c"], ["b"], 3) == 1.0
    assert ndcg_at_k(["a", "b", "b", "c"], ["b", "c"], 3) == pytest.approx(
        (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    )
    assert recall_at_k(["a", "a", "b"], ["b"], 2) == 1.0 and mrr_at_k(["a", "a", "b"], ["b"], 2) == 0.5
    for ranked in (["x", "x", "x"], ["b"] * 5, ["b", "c", "b", "c"]):
        assert 0.0 <= ndcg_at_k(ranked, ["b", "c"], 5) <= 1.0


@pytest.mark.parametrize(
    "text, title, named",
    [
        # short or common titles are titles only when written as titles (the real task targets Rage, Emma, 1948, ...)
        ("I would like it to be scary", "It (2017)", False),
        ("Try Itchy Feet", "It", False),
        ("It was fun, but I want something else", "It (2017)", False),
        ("Have you seen It? Or It (2017), the remake?", "It (2017)", True),
        ('Try "It", a horror film', "It (2017)", True),
        ("I'm in a rage about it", "Rage", False),
        ("You might like Rage.", "Rage", True),
        ("Emma is a name I like", "Emma", False),
        ("Read Emma by Jane Austen", "Emma", True),
        ("It came out in 1948", "1948", False),
        ('Read "1948", a novel', "1948", True),
        ("I drink beer on Fridays", "Beer", False),
        ("Have you read Beer?", "Beer", True),
        ("Luke is my cousin", "Luke", False),
        ("the thing is, I like horror", "The Thing (1982)", False),
        ("The thing is, I like horror", "The Thing (1982)", False),  # the article's capital is the sentence's
        # a title led by an article: judged by its first word after the article (issue 26, from a real AILO turn)
        ("I'm particularly interested in the Godfather trilogy, ...", "The Godfather (1972)", True),
        ("the Godfather trilogy is what I want.", "The Godfather (1972)", True),  # a sentence's start, lower-case
        ("Great. the Matrix was fun.", "The Matrix (1999)", True),
        ("Something like the Thing would be great", "The Thing (1982)", True),
        ("The Thing scared me", "The Thing (1982)", True),
        ("My godfather gave me the godfather of all hints", "The Godfather (1972)", False),
        ("a chainsaw massacre, or I saw it", "Saw (2003)", False),
        ("Watch Saw tonight", "Saw (2003)", True),
        # longer titles: whole words, any case, with or without the year
        ("I loved JAWS as a kid", "Jaws (1975)", True),
        ("jawsome day", "Jaws (1975)", False),
        ("try heat (1995) tonight", "Heat (1995)", True),
        ("I recommend star wars for you", "Star Wars (1977)", True),
        ("like the Killer Clown Calamity", "The Killer Clown Calamity (A Charlie Rhodes Cozy Mystery Book 7)", True),
        # a list item or a colon opens no sentence; another year or subtitle names another title; It's is no quote
        ("Here: 1. Dune\n2. Alien", "Dune (2021)", True),
        ("I recommend: Minecraft", "Minecraft", True),
        ("Try Alien (1979) instead", "Alien: Covenant (2017)", False),
        ("Star Wars: Episode V is better", "Star Wars: Episode IV (1977)", False),
        ("Star Wars: The Empire Strikes Back", "Star Wars: The Last Jedi (2017)", False),
        # the name followed by its own subtitle, not written out in full (a real AILO opening on ECPO Book)
        (
            "I'm excited to introduce you to the world of Witch at Heart: the Jinx Hamilton Series, a magical ...",
            "Witch at Heart: The Jinx Hamilton Series - Book 1",
            True,
        ),
        ("Read Jaws (1975 edition)", "Jaws (1975)", True),
        (
            "the Chupacabra Catastrophe (a Charlie Rhodes mystery)",
            "The Chupacabra Catastrophe (A Charlie Rhodes 2)",
            True,
        ),
        ("'It's fine'", "It (2017)", False),
        # issue 37: the item, not its series. A colon's short subtitle is the item's own name in its series, so the
        # name before it names the series; a sequel's number names a sibling
        ("I recommend Halo 3", "Halo: Reach", False),
        ("I recommend Halo, the whole series", "Halo: Reach", False),
        ("Halo Reach is the one", "Halo: Reach", True),  # its own subtitle goes on after the name
        ("I loved Alien as a kid", "Alien: Covenant (2017)", False),
        ("Alien 3 was a mess", "Alien (1979)", False),
        ("I recommend Toy Story 2", "Toy Story (1995)", False),
        ("I love star wars games", "Star Wars: KOTOR", False),
        ("Chicken Soup for the Soul is a series", "Chicken Soup for the Soul: My Very Good, Very Bad Cat", True),
        ("Try Paper Mario, it is fun", "Paper Mario: The Origami King - Nintendo Switch", False),
        ("Try Paper Mario: The Origami King", "Paper Mario: The Origami King - Nintendo Switch", True),
        ("Call of Duty is loud", "Call of Duty: Modern Warfare Battle Pass Edition - [Xbox One Digital Code]", False),
        # a subtitle that describes the item (an article, a number, five words or more, a kind, an edition) leaves
        # the name naming it (real ECPO Book targets)
        ("I think you'd love Anxious People.", "Anxious People: A Novel", True),
        ("Try A Walk in the Woods", "A Walk in the Woods: Rediscovering America on the Appalachian Trail", True),
        ("Read What Kind of Woman", "What Kind of Woman: Poems", True),
        ("Bridge For Dummies helps", "Bridge For Dummies: Third Edition", True),
        # a one-word title opening a sentence that says what kind of work it is
        ("Educated is a memoir by Tara Westover.", "Educated: A Memoir", True),
        ("Great. Educated is a powerful book.", "Educated: A Memoir", True),
        ("Educated people read more", "Educated: A Memoir", False),
        ("Emma is a novel by Jane Austen", "Emma", True),
        ("Emma by Jane Austen", "Emma", True),
        ("It is a great movie", "It (2017)", False),
        ("Up is a Pixar film", "Up (2009)", True),
    ],
)
def test_mentions_title_whole_words_and_short_titles_as_titles(text, title, named):
    assert mentions_title(text, title) is named


def test_the_leak_guard_leaves_a_series_name_alone():
    """AILO's guard (``sentence_start``) redacts the item, never the series the user is talking about."""
    assert redact_title("I love star wars games.", "Star Wars: KOTOR") == "I love star wars games."
    assert redact_title("Star Wars: KOTOR, please.", "Star Wars: KOTOR") == "that one, please."
    assert redact_title("Halo 3 was fun; Halo: Reach?", "Halo: Reach") == "Halo 3 was fun; that one?"
    assert not mentions_title("Alien. Alien 3. Alien is old.", "Alien: Covenant (2017)", sentence_start=True)
    assert mentions_title("Educated! That one.", "Educated: A Memoir", sentence_start=True)


def test_redact_title_replaces_each_form_once():
    assert redact_title("Is it Jaws (1975)? Jaws!", "Jaws (1975)") == "Is it that one? that one!"
    assert (
        redact_title("I would like it to be scary. Try It.", "It (2017)")
        == "I would like it to be scary. Try that one."
    )


def test_paired_bootstrap_resamples_the_pairs_together():
    a = [10.0, 20.0, 30.0, 40.0, 50.0]  # items of very unequal difficulty, one system 0.5 ahead on every one
    assert paired_bootstrap(a, [x - 0.5 for x in a]) == pytest.approx((0.5, 0.5, 0.5))


def test_paired_bootstrap_by_hand():
    # differences 1, 0, 0, 0: a resample's mean is k/4 with k ~ Binomial(4, 1/4); P(k = 0) = 0.32 > 2.5% puts the
    # low end at 0, and P(k >= 3) = 5.1% > 2.5% > P(k = 4) = 0.4% puts the high end at 3/4
    assert paired_bootstrap([1, 0, 0, 0], [0, 0, 0, 0]) == (0.25, 0.0, 0.75)
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1.0, 2.0], [1.0])
