import math

import pytest

from common.metrics import distinct_n, mrr_at_k, ndcg_at_k, recall_at_k, success_rate, win_rate

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


def test_success_rate_and_distinct():
    assert success_rate([True, False, True, True]) == 0.75
    assert success_rate([]) == 0.0
    # bigrams: (a b) (b a) (a b) | (c d) -> 3 distinct of 4
    assert distinct_n(["a b a b", "c d"], 2) == 0.75


def test_win_rate_counts_both_orders():
    # candidate as A: win, tie; swapped (candidate is B): judge says A better (-> loss), B better (-> win)
    assert win_rate([1, 0], [1, -1]) == pytest.approx((2 + 0.5) / 4)
    # a system against itself with a position-biased judge (always A) scores exactly 0.5
    assert win_rate([1, 1, 1], [1, 1, 1]) == 0.5
