"""smtpo.py: the five rewards on hand-written outputs, the GRPO loss against hand computations and gradient signs,
LightGCN, BPR and InfoNCE by hand, the simulator's lists, and a GRPO update that moves a known case."""

import math

import pytest
import torch
import torch.nn.functional as F

import smtpo
from common.catalog import Catalog
from common.data import load_crs_dataset
from common.formats import InputError, load_demo_catalog
from tests.conftest import DATA, needs_data

CANDIDATES = [
    "Inception (2010)",
    "Crouching Tiger, Hidden Dragon (2000)",
    "Alien (1979)",
    "Aliens (1986)",
    "Up [3D] (2009)",
    "The Matrix (1999)",
]


def output(steps: int, answer: str = "RANK LIST: [Inception (2010), Alien (1979)]") -> str:
    return "<think>\n" + "".join(f"Step {k}: something.\n" for k in range(1, steps + 1)) + "</think>\n" + answer


# ------------------------------------------------------------------------------------ rewards (Eq. 15-19)


@pytest.mark.parametrize("steps, reward", [(0, 0.0), (1, 0.2), (4, 0.8), (5, 1.0), (6, 0.8), (7, 0.6), (8, 0.0)])
def test_process_format_reward_counts_the_step_headers(steps, reward):
    assert smtpo.process_format_reward(output(steps)) == pytest.approx(reward)


def test_process_format_reward_counts_only_inside_think():
    assert smtpo.process_format_reward("Step 1: a\nStep 2: b\nStep 3: c\nStep 4: d\nStep 5: e\nRANK LIST: [x]") == 0
    five = "<think>\nStep 1: a\nStep 2. b\nstep3: c\nSTEP 4: d\nStep 5 : e\n</think>"
    assert smtpo.process_format_reward(five) == 1.0


def test_a_step_header_is_a_line_that_opens_with_one():
    markdown = (
        "<think>\n**Step 1: Preference Inference** a\n### Step 2. b\n- step 3: c\n*Step 4*: d\n> Step 5: e\n</think>"
    )
    assert smtpo.process_format_reward(markdown) == 1.0
    # a step named inside a sentence is no header: one header here, not five
    inline = "<think>Step 1: a, then Step 2. b and step3: c, STEP 4: d, Step 5 : e</think>"
    assert smtpo.process_format_reward(inline) == pytest.approx(0.2)
    mid = "<think>\nStep 1: sci-fi, as Step 2: will show.\nStep 2: matches.\n</think>"
    assert smtpo.process_format_reward(mid) == pytest.approx(0.4)
    assert smtpo.preference_text(mid) == "sci-fi, as Step 2: will show."
    assert smtpo.preference_text(markdown) == "a"


@pytest.mark.parametrize(
    "text, ranked",
    [
        (output(5), ["Inception (2010)", "Alien (1979)"]),
        # titles with commas and brackets, a near-miss spelling, a title outside the candidates, a repeat: the last
        # two keep their places as None
        (
            output(5, "RANK LIST: [Aliens (1986), crouching tiger, hidden dragon (2000), The Matrx (1999), "
                   "Up [3D] (2009), Not A Candidate (1990), Alien (1979), Alien (1979)]"),
            ["Aliens (1986)", "Crouching Tiger, Hidden Dragon (2000)", "The Matrix (1999)", "Up [3D] (2009)", None,
             "Alien (1979)", None],
        ),
        # the list closes at its matching bracket: text after it is not part of R_t
        (output(5, "RANK LIST: [Inception (2010), Alien (1979)] I also like [The Matrix (1999)]"),
         ["Inception (2010)", "Alien (1979)"]),
        # candidates copied with their attributes
        (output(5, "RANK LIST: [Alien (1979) {Attribute: sci-fi, horror}, Inception (2010) (heist, dream)]"),
         ["Alien (1979)", "Inception (2010)"]),
        # a title with a year matches a candidate of that year only: a remake is another film
        (output(5, "RANK LIST: [Halloween (2018), Alien (1979)]"), [None, "Alien (1979)"]),
        (output(5, "RANK LIST: [Halloween (1978), Alien (1979)]"), ["Halloween (1978)", "Alien (1979)"]),
        # malformed answers: no brackets, no colon, the list inside <think>, no </think>, never closed
        (output(5, "RANK LIST: Inception (2010), Alien (1979)"), None),
        (output(5, "RANK LIST [Inception (2010)]"), None),
        ("<think>Step 1: a RANK LIST: [Inception (2010)]</think>\nI recommend Inception.", None),
        ("<think>Step 1: a\nRANK LIST: [Inception (2010)]", None),
        (output(5, "RANK LIST: [Inception (2010), Alien (1979)"), None),
    ],
)  # fmt: skip
def test_rank_list_parsing_on_real_shapes_of_output(text, ranked):
    candidates = CANDIDATES + ["Halloween (1978)"]
    assert smtpo.parse_rank_list(text, candidates) == ranked
    assert smtpo.answer_format_reward(text) == float(ranked is not None)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"grpo_iterations": 0}, "--grpo-iterations"),
        ({"groups_per_step": 0}, "--groups-per-step"),
        ({"group_size": 1}, "--group-size"),
        ({"max_length": 192, "rec_max_tokens": 192}, "no room for a prompt"),
    ],
)
def test_flags_that_would_fail_deep_in_grpo_are_refused_before_anything_loads(flags, message):
    with pytest.raises(InputError, match=message):
        smtpo.check_args(smtpo.Args(**flags), 1)


def test_a_dialogue_continues_only_with_a_list_that_names_a_candidate():
    made_up = output(5, "RANK LIST: [Halloween (2018), The Matrx Reloaded (2003)]")  # well formed, no candidate
    real = output(5, "RANK LIST: [Halloween (2018), Alien (1979)]")
    no_list = output(5, "I recommend Alien (1979).")
    assert smtpo.answer_format_reward(made_up) == 1.0  # the format reward still pays for it
    assert smtpo.continuable([made_up, real, no_list], CANDIDATES) == [1]
    assert smtpo.continuable([made_up, no_list], CANDIDATES) == []


def test_made_up_and_repeated_titles_above_the_target_are_not_free():
    text = output(5, "RANK LIST: [Not A Film (1990), Alien (1979), Alien (1979), Inception (2010)]")
    ranked = smtpo.parse_rank_list(text, CANDIDATES)
    assert ranked == [None, "Alien (1979)", None, "Inception (2010)"]
    assert smtpo.rank_reward(ranked, "Inception (2010)") == pytest.approx(1 - 3 / 4)  # position 4 of 4, not 2 of 2
    assert smtpo.output_rewards(text, CANDIDATES, "Inception (2010)", None, None, n=10)["rank"] == pytest.approx(0.25)
    slots = smtpo.ranking_slots(ranked)  # the evaluation ranks the target where it was written
    assert slots.index("Inception (2010)") == 3 and len(set(slots)) == 4
    assert smtpo.listed_titles(ranked) == ["Alien (1979)", "Inception (2010)"]


@pytest.mark.parametrize(
    "layout",
    [
        "[Not A Film (1990), Fake Two, Inception (2010)]",  # commas
        "[Not A Film (1990); Fake Two; Inception (2010)]",  # semicolons
        "[\nNot A Film (1990)\nFake Two\nInception (2010)\n]",  # one title a line
        "[1. Not A Film (1990) 2. Fake Two 3. Inception (2010)]",  # numbered, on one line
        "[\n1. Not A Film (1990)\n2. Fake Two\n3. Inception (2010)\n]",  # numbered, a title a line
        "[1) Not A Film (1990), 2) Fake Two, 3) Inception (2010) {Attribute: sci-fi, heist}]",  # numbered with ")"
        "[\n- Not A Film (1990)\n- Fake Two\n- Inception (2010)\n]",  # bulleted
        "[* Not A Film (1990) * Fake Two * Inception (2010)]",  # bulleted, on one line
        "[\u2022 Not A Film (1990)\n\u2022 Fake Two\n\u2022 Inception (2010)]",  # bullet characters
    ],
)
def test_every_list_layout_keeps_the_made_up_titles_above_the_target(layout):
    text = output(5, f"RANK LIST: {layout}")
    ranked = smtpo.parse_rank_list(text, CANDIDATES)
    assert ranked == [None, None, "Inception (2010)"], layout
    assert smtpo.output_rewards(text, CANDIDATES, "Inception (2010)", None, None, n=10)["rank"] == pytest.approx(1 / 3)
    assert smtpo.ranking_slots(ranked).index("Inception (2010)") == 2  # the evaluation ranks it third too


def test_numbers_and_dashes_inside_titles_do_not_split_them():
    candidates = CANDIDATES + ["Spider-Man 2 (2004)", "2001: A Space Odyssey (1968)", "Ocean's 11. (2001)"]
    text = output(5, "RANK LIST: [1. Spider-Man 2 (2004)\n2. 2001: A Space Odyssey (1968)\n3. Ocean's 11. (2001)]")
    assert smtpo.parse_rank_list(text, candidates) == candidates[-3:]


def test_hit_rank_and_preference_rewards():
    ranked = ["Inception (2010)", "Alien (1979)", "The Matrix (1999)", "Aliens (1986)"]
    assert smtpo.hit_reward(ranked, "Alien (1979)") == 1.0 and smtpo.hit_reward(ranked, "Up [3D] (2009)") == 0.0
    assert smtpo.rank_reward(ranked, "Inception (2010)") == 1.0  # position 1 of 4
    assert smtpo.rank_reward(ranked, "Alien (1979)") == pytest.approx(0.75)  # 1 - (2 - 1) / 4
    assert smtpo.rank_reward(ranked, "Up [3D] (2009)") == 0.0
    assert smtpo.preference_reward(torch.tensor([0.6, 0.8]).numpy(), torch.tensor([1.0, 0.0]).numpy()) == pytest.approx(
        0.6
    )
    assert smtpo.preference_reward(None, torch.tensor([1.0, 0.0]).numpy()) == 0.0


def test_output_rewards_sum_the_five_and_read_the_step_one_preference():
    text = output(5).replace("Step 1: something.", "Step 1: Preference Inference: dreamy sci-fi heists.")
    assert smtpo.preference_text(text) == "dreamy sci-fi heists."
    rewards = smtpo.output_rewards(text, CANDIDATES, "Alien (1979)", None, None, n=10)
    assert rewards == {"think": 1.0, "answer": 1.0, "hit": 1.0, "rank": 0.5, "pref": 0.0, "total": 3.5}
    assert smtpo.output_rewards(output(5), CANDIDATES, "Alien (1979)", None, None, n=1)["hit"] == 0.0  # top-1 only


# ------------------------------------------------------------------------------------ the GRPO loss (Eq. 14)


def test_group_advantages_normalize_within_the_group():
    advantages = smtpo.group_advantages(torch.tensor([1.0, 2.0, 3.0, 2.0]))
    assert advantages.tolist() == pytest.approx([-1.2247, 0.0, 1.2247, 0.0], abs=1e-4)
    assert smtpo.group_advantages(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]  # no signal, no step


def test_zero_advantage_leaves_only_the_kl():
    policy = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third position is not the output's
    loss = smtpo.grpo_loss(policy, policy.detach(), ref, torch.tensor([0.0]), mask, 0.2, 0.04)
    kl = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]  # exp(r - p) - (r - p) - 1 per token
    assert loss.item() == pytest.approx(0.04 * sum(kl) / 2, rel=1e-6)
    loss.sum().backward()
    assert policy.grad[0, 2] == 0  # masked off


def test_clipping_acts_on_both_sides():
    old = torch.zeros(1, 1)
    mask = torch.ones(1, 1)
    for log_ratio, advantage, moves in ((0.5, 1.0, False), (-0.5, -1.0, False), (0.5, -1.0, True), (0.1, 1.0, True)):
        policy = torch.full((1, 1), log_ratio, requires_grad=True)
        loss = smtpo.grpo_loss(policy, old, policy.detach(), torch.tensor([advantage]), mask, 0.2, 0.0)
        loss.sum().backward()
        # ratio e^0.5 = 1.65 > 1.2 with A > 0, and e^-0.5 = 0.61 < 0.8 with A < 0: clipped, no gradient; the
        # pessimistic side (A < 0 with a ratio above 1) and a ratio inside the range keep theirs
        assert (policy.grad.abs().item() > 0) is moves, (log_ratio, advantage)
        if moves:
            assert policy.grad.item() == pytest.approx(-advantage * math.exp(log_ratio))


def test_a_positive_advantage_raises_the_outputs_log_probs():
    policy = torch.tensor([[-2.0, -1.0], [-3.0, -0.5]], requires_grad=True)
    loss = smtpo.grpo_loss(
        policy, policy.detach(), policy.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 2), 0.2, 0.04
    )
    loss.sum().backward()
    assert (policy.grad[0] < 0).all() and (policy.grad[1] > 0).all()  # descent raises the first, lowers the second


# ------------------------------------------------------------------------------------ the retriever (Sec. 3.3)


def test_lightgcn_propagation_on_a_three_node_graph():
    edges = torch.tensor([[0, 0], [1, 2]])  # item 0 linked to entities 1 and 2
    adjacency = smtpo.normalized_adjacency(3, edges).to_dense()
    s = 1 / math.sqrt(2)  # 1 / sqrt(deg 2 * deg 1)
    assert torch.allclose(adjacency, torch.tensor([[0, s, s], [s, 0, 0], [s, 0, 0]]))
    e0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    one_layer = torch.tensor([[s * 1, s * 2], [s, 0.0], [s, 0.0]])
    assert torch.allclose(smtpo.lightgcn(e0, adjacency.to_sparse(), 1), (e0 + one_layer) / 2)
    two_layers = adjacency @ one_layer
    assert torch.allclose(smtpo.lightgcn(e0, adjacency.to_sparse(), 2), (e0 + one_layer + two_layers) / 3)


def test_bpr_and_info_nce_by_hand():
    anchor, positive, negative = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert smtpo.bpr_loss(anchor, positive, negative).item() == pytest.approx(-math.log(1 / (1 + math.exp(1.0))))
    scores = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1 + math.e)) + math.log(3)) / 2
    assert smtpo.info_nce_loss(scores).item() == pytest.approx(expected)


def test_fusion_head_views():
    torch.manual_seed(0)
    texts, text_mask = torch.randn(2, 3, 8), torch.tensor([[True, True, False], [True, False, False]])
    entities, entity_mask = torch.randn(2, 4, 6), torch.tensor([[True, True, False, False], [True] * 4])
    both = smtpo.FusionHead(8, 6)
    e = both(texts, text_mask, entities, entity_mask)
    assert e.shape == (2, 12) and both.items(torch.randn(5, 6), torch.randn(5, 8)).shape == (5, 12)
    graph_only, text_only = smtpo.FusionHead(8, 6, "graph"), smtpo.FusionHead(8, 6, "text")
    g, t = graph_only(texts, text_mask, entities, entity_mask), text_only(texts, text_mask, entities, entity_mask)
    assert not g[:, 6:].any() and not t[:, :6].any()
    # no text reaches the graph-only head (its attention is queried from the entities), no entity the text-only one
    assert torch.equal(graph_only(texts * 3 + 1, text_mask, entities, entity_mask), g)
    assert torch.equal(text_only(texts, text_mask, entities * 3 + 1, entity_mask), t)
    assert not torch.equal(both(texts * 3 + 1, text_mask, entities, entity_mask)[:, :6], e[:, :6])  # fused: crossed
    # a masked entity changes nothing, and an entity's length does not count (the graph view reads unit vectors)
    entities2 = entities.clone()
    entities2[0, 3] = 100.0
    entities2[1] *= 7
    assert torch.allclose(both(texts, text_mask, entities2, entity_mask), e, atol=1e-6)


def test_bpr_negatives_are_never_the_movies_own_attributes():
    edges = torch.tensor([[0, 0, 0, 1], [2, 3, 4, 2]])  # movie 0 has entities 2, 3, 4 of 2..5; movie 1 has 2
    torch.manual_seed(0)
    for _ in range(50):
        negatives = smtpo.bpr_negatives(edges, num_items=2, num_nodes=6)
        assert negatives[:3].tolist() == [5, 5, 5]  # the only entity movie 0 lacks
        assert negatives[3].item() in (3, 4, 5)


def planted_corpus(turns: int, seed: int, graph_kinds=8, text_kinds=10, per_kind=5, text_dim=384, graph_dim=64):
    """Items of graph_kinds x text_kinds kinds (per_kind each): a turn's entities point at its target's graph kind,
    its texts at its text kind, so only both views together single out the target's kind (1 in 80)."""
    g = torch.Generator().manual_seed(seed)
    graph_centres, text_centres = (
        torch.randn(graph_kinds, graph_dim, generator=g),
        torch.randn(text_kinds, text_dim, generator=g),
    )
    kinds = [(a, b) for a in range(graph_kinds) for b in range(text_kinds) for _ in range(per_kind)]
    graph_kind, text_kind = torch.tensor([a for a, _ in kinds]), torch.tensor([b for _, b in kinds])
    item_graph = graph_centres[graph_kind] + 0.3 * torch.randn(len(kinds), graph_dim, generator=g)
    item_text = F.normalize(text_centres[text_kind] + 0.3 * torch.randn(len(kinds), text_dim, generator=g), dim=-1)

    def split(n):
        targets = torch.randint(len(kinds), (n,), generator=g)
        texts = F.normalize(
            text_centres[text_kind[targets]][:, None] + 0.3 * torch.randn(n, 3, text_dim, generator=g), dim=-1
        )
        entities = graph_centres[graph_kind[targets]][:, None] + 0.3 * torch.randn(n, 4, graph_dim, generator=g)
        masks = torch.ones(n, 3, dtype=torch.bool), torch.ones(n, 4, dtype=torch.bool)
        return smtpo.RetrieverTurns(texts, masks[0], entities, masks[1], targets, [[] for _ in range(n)])

    return split(turns), split(200), item_graph, item_text


def test_the_fused_retriever_learns_what_needs_both_views_at_the_papers_settings():
    args = smtpo.Args()  # lr 5e-5 (Adam), up to 50 epochs with early stopping, 64 negatives, batches of 32
    train, held_out, item_graph, item_text = planted_corpus(800, seed=0)
    chance = smtpo.random_recall(held_out, len(item_graph))
    found = {
        views: smtpo.fit_fusion_head(train, held_out, item_graph, item_text, views, args)
        for views in ("both", "text", "graph")
    }
    recall = {views: result[1]["recall@10"] for views, result in found.items()}
    assert chance["recall@10"] == pytest.approx(10 / 400)
    assert recall["both"] >= 0.8  # the target's kind (5 items) is in the top 10
    assert recall["both"] > recall["text"] + 0.3 and recall["both"] > recall["graph"] + 0.3  # one view: 40 or 50 items
    history = found["both"][2]
    assert history[-1]["loss"] < history[0]["loss"] and {"loss", "recall@1", "recall@10", "recall@20"} <= set(
        history[0]
    )


def one_view_corpus(informative: str, seed: int, turns=300, items=200, graph_noise=10.0, text_noise=3.0):
    """Items with random graph and text embeddings; a turn's entities (or texts) are its target's graph (text)
    embedding under heavy noise, its texts (entities) pure noise: one view knows, the other is silent."""
    g = torch.Generator().manual_seed(seed)
    item_graph, item_text = (
        torch.randn(items, 64, generator=g),
        F.normalize(torch.randn(items, 384, generator=g), dim=-1),
    )

    def split(n):
        targets = torch.randint(items, (n,), generator=g)
        entities, texts = torch.randn(n, 4, 64, generator=g), torch.randn(n, 3, 384, generator=g) / math.sqrt(384)
        if informative == "graph":
            entities = item_graph[targets][:, None] + graph_noise * entities
        else:
            texts = item_text[targets][:, None] + text_noise * texts
        masks = torch.ones(n, 3, dtype=torch.bool), torch.ones(n, 4, dtype=torch.bool)
        texts = F.normalize(texts, dim=-1)
        return smtpo.RetrieverTurns(texts, masks[0], entities, masks[1], targets, [[] for _ in range(n)])

    return split(turns), split(100), item_graph, item_text


@pytest.mark.parametrize("informative", ["graph", "text"])
def test_the_fused_retriever_keeps_what_its_informative_view_knows_when_the_other_is_silent(informative):
    args = smtpo.Args()  # the paper's lr 5e-5, up to 50 epochs, 64 negatives; batches of 32
    train, held_out, item_graph, item_text = one_view_corpus(informative, seed=0)
    torch.manual_seed(0)
    alone = smtpo.fit_fusion_head(train, held_out, item_graph, item_text, informative, args)[1]["recall@20"]
    torch.manual_seed(0)
    state, fused, _ = smtpo.fit_fusion_head(train, held_out, item_graph, item_text, "both", args)
    assert alone > 3 * smtpo.random_recall(held_out, len(item_graph))["recall@20"]  # the view does know
    assert fused["recall@20"] >= 0.9 * alone, (fused, alone)
    silent = "text" if informative == "graph" else "graph"
    assert fused[f"{silent}_weight"] < fused[f"{informative}_weight"]  # the held-out turns turned the silent one down
    head = smtpo.FusionHead(384, 64)
    head.load_state_dict(state)  # the saved head retrieves with the chosen weights
    assert smtpo.held_out_recall(head, held_out, head.items(item_graph, item_text)) == {
        k: fused[k] for k in ("recall@1", "recall@10", "recall@20")
    }


def test_the_retriever_trains_on_the_turn_one_pattern_and_never_reads_the_target_in_its_list():
    catalog = Catalog(load_demo_catalog())
    target, others = catalog.titles[0], catalog.titles[1:4]
    samples = [smtpo.Task(f"k{k}", [{"role": "user", "content": "x"}], [], target) for k in range(3)]
    texts = {"k0": ("too sweet", "likes horror", [others[0], target, others[1]]), "k1": ("", "", []),
             "k2": ("", "", [others[2]])}  # fmt: skip
    rows, feedback, preference, lists, first = smtpo.retriever_examples(samples, texts, smtpo.Args())
    assert [s.key for s in rows] == ["k0", "k0", "k1", "k2", "k2"] and first == [True, False, True, True, False]
    assert all(not (f or p or r) for f, p, r, one in zip(feedback, preference, lists, first) if one)  # as at turn 1
    assert (feedback[1], preference[1], lists[1]) == ("too sweet", "likes horror", [others[0], others[1]])
    assert all(target not in items for items in lists)  # the answer is never among the keys
    for ablation, kept in (("no-rec", ("too sweet", "likes horror", [])), ("no-pref", ("too sweet", "", others[:2])),
                           ("no-feedback", ("", "likes horror", others[:2]))):  # fmt: skip
        _, f, p, r, _ = smtpo.retriever_examples(samples[:1], texts, smtpo.Args(ablations=(ablation,)))
        assert (f[1], p[1], r[1]) == kept, ablation


def test_the_held_out_recall_is_read_per_pattern():
    train, held_out, item_graph, item_text = one_view_corpus("graph", seed=1, turns=20)
    held_out.first_turn = torch.arange(len(held_out)) % 2 == 0
    head = smtpo.FusionHead(384, 64, "graph")
    found = smtpo.pattern_recall(head.state_dict(), "graph", held_out, item_graph, item_text)
    for pattern, rows in (("turn1", held_out.first_turn), ("later", ~held_out.first_turn)):
        alone = smtpo.held_out_recall(head, held_out.subset(rows), head.items(item_graph, item_text))
        assert {k: found[f"{pattern}/{k}"] for k in alone} == alone


def test_held_out_recall_ranks_over_the_catalog_without_the_mentioned_items():
    head = smtpo.FusionHead(2, 2)
    items = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 2.0]])
    turns = smtpo.RetrieverTurns(torch.ones(2, 3, 2), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 1, 2),
                                 torch.ones(2, 1, dtype=torch.bool), torch.tensor([2, 2]), [[], [1]])  # fmt: skip
    with torch.no_grad():
        sign = (head(*turns.views()) @ items.T)[0, 1].sign().item()  # the head's score is +/- the last column
    found = smtpo.held_out_recall(head, turns, items * sign, ks=(1, 2))
    assert found == {"recall@1": 0.5, "recall@2": 1.0}  # item 1 outranks the target unless it was mentioned
    assert smtpo.random_recall(turns, 3, ks=(1, 2)) == {
        "recall@1": pytest.approx((1 / 3 + 1 / 2) / 2),
        "recall@2": pytest.approx((2 / 3 + 1) / 2),
    }


def test_sft_puts_a_missed_target_at_a_seeded_random_slot():
    import random
    from collections import Counter

    retrieved = [f"Film {k} (2000)" for k in range(20)]
    slots = Counter(
        smtpo.sft_candidates(retrieved, "Target (1999)", random.Random(f"1:turn{k}")).index("Target (1999)")
        for k in range(4000)
    )
    assert sorted(slots) == list(range(20))  # every slot is used
    assert max(slots.values()) / 4000 < 0.07  # uniform is 0.05; the old rule put it in the last slot every time
    chi_square = sum((count - 200) ** 2 / 200 for count in slots.values())
    assert chi_square < 43.8  # the 0.999 quantile of chi-square with 19 degrees of freedom
    again = smtpo.sft_candidates(retrieved, "Target (1999)", random.Random("1:turn7"))
    assert again == smtpo.sft_candidates(retrieved, "Target (1999)", random.Random("1:turn7"))
    assert len(again) == 20 and retrieved[-1] not in again
    assert smtpo.sft_candidates(retrieved, "Film 3 (2000)", random.Random(0)) == retrieved  # found: left alone


def test_the_prompt_shows_candidates_with_attributes_and_keeps_the_latest_preference():
    catalog = Catalog(load_demo_catalog())
    title = next(t for t in catalog.titles if catalog.by_title[t].attributes.get("genre"))
    sample = smtpo.Task("k", [{"role": "user", "content": "x"}], [], title)
    genres = ", ".join(catalog.by_title[title].attributes["genre"])
    turns = [
        {"turn": 1, "feedback": "", "ranked": ["Alien (1979)", None], "preference": "old taste"},
        {"turn": 2, "feedback": "scarier", "ranked": [None, "Jaws (1975)"], "preference": "likes sharks"},
    ]
    context = smtpo.turn_context(turns)
    assert context == (
        "Turn 1: feedback: -; list: Alien (1979)\nTurn 2: feedback: scarier; list: Jaws (1975)\n"
        "Latest preference: likes sharks\n"
    )
    prompt = smtpo.recommender_prompt(sample, [title], "more", turns, 10, catalog)
    assert context in prompt
    assert f"- {title} {{Attribute: {genres}}}" in prompt and "old taste" not in prompt


# ------------------------------------------------------------------------------------ prompts at the paper's lengths

RECIPE = {"max_length": 2048, "rec_max_tokens": 1024, "max_turns": 5}  # benchmark/smtpo_table1.sh
THIRTY_WORDS = " ".join(["a darker thriller with a strong lead and less romance from the nineties please"] * 2)
THIRTY_WORDS += " maybe twists"


def longest_contexts(dataset: str, split: str, count: int):
    """The ``count`` real contexts of ``split`` with the longest dialogues (the hardest to fit), and the catalog."""
    data = load_crs_dataset(dataset, DATA, "valid")
    catalog = Catalog(data.items)
    samples = smtpo.make_tasks(data.train if split == "train" else data.evaluated, set(catalog.titles))
    return sorted(samples, key=lambda s: -len(smtpo.render_history(s.history)))[:count], catalog


def latest_user_utterance(sample) -> str:
    return "User: " + [m["content"] for m in sample.history if m["role"] == "user"][-1]


class ReadingPolicy:
    """A recommender that reads its prompt exactly as the samplers do (``common.llm.prompt_ids``, cut to
    max_prompt_tokens) and writes a five-step answer whose list names ten candidates and a 30-word preference."""

    def __init__(self, tokenizer):
        self.tokenizer, self.read = tokenizer, []

    def complete(self, conversations, n, temperature, max_tokens, prefix, max_prompt_tokens):
        from common.llm import Completion, prompt_ids

        results = []
        for conversation in conversations:
            ids = prompt_ids(self.tokenizer, [conversation], prefix, max_prompt_tokens)[0]
            self.read.append((conversation[0]["content"], self.tokenizer.decode(ids)))
            candidates = [
                line[2:].split(" {")[0] for line in conversation[0]["content"].split("\n") if line[:2] == "- "
            ]
            text = f"Step 1: Preference Inference: {THIRTY_WORDS}\n</think>\nRANK LIST: [{', '.join(candidates[:10])}]"
            results.append([Completion(text, ids, [])] * n)
        return results


class TalkingSimulator:
    def chat(self, conversations, max_tokens):
        return [(THIRTY_WORDS,) for _ in conversations]


@needs_data("inspired", "redial")
@pytest.mark.parametrize("dataset", ["inspired", "redial"])
def test_prompts_at_the_recipes_lengths_keep_their_instruction_and_the_latest_user_utterance(dataset, tokenizer):
    import random

    samples, catalog = longest_contexts(dataset, "test", 24)
    args = smtpo.Args(**RECIPE)
    rng = random.Random(0)

    class Retriever:
        def retrieve(self, batch, feedback, preference, lists, k):
            return [rng.sample(catalog.titles, k) for _ in batch]

    policy = ReadingPolicy(tokenizer)
    roles = smtpo.Roles(policy, TalkingSimulator(), Retriever(), {})
    data = smtpo.Data([], [], samples, catalog)
    episodes = smtpo.rollout(
        tasks=samples, roles=roles, data=data, args=args, n=1, temperature=0.0, training=False, rng=random.Random(0)
    )
    turns = [t for _, t in episodes]
    assert [len(t) for t in turns] == [5] * len(samples) and len(policy.read) == 5 * len(samples)
    budget = args.max_length - args.rec_max_tokens
    latest = [latest_user_utterance(s) for s in samples] * 5  # the rollout batches the samples turn by turn
    for (prompt, read), utterance in zip(policy.read, latest):
        assert read.startswith("<|im_start|>system") and "You are a movie recommender." in read  # the instruction
        assert "answer with exactly 10 candidate titles" in read and read.endswith("<|im_start|>assistant\n<think>\n")
        assert utterance in read and prompt.count("\n- ") == 20  # the latest user utterance, the 20 candidates
        assert len(tokenizer(read, add_special_tokens=False)["input_ids"]) <= budget
    turn_five = [t[4] for t in turns]
    assert all(t["prompt_tokens_dropped"] > 0 and not t["prompt_over_budget"] for t in turn_five)  # and it says so
    assert all(f"Latest preference: {THIRTY_WORDS}" in t["prompt"] for t in turn_five)
    assert sum("Turn 4: feedback:" in t["prompt"] for t in turn_five) >= len(turn_five) / 2  # left out the latest


@needs_data("inspired")
def test_training_examples_at_the_recipes_lengths_keep_their_instruction(tokenizer):
    samples, catalog = longest_contexts("inspired", "train", 12)
    completion = "<think>\n" + "Step 1: Preference Inference: a darker thriller.\n" * 66 + "</think>\nRANK LIST: [x]"
    assert 1000 < len(tokenizer(completion)["input_ids"]) <= 1024  # an output at the recipe's --rec-max-tokens
    for sample in samples:
        prompts = [
            smtpo.recommender_prompt(sample, catalog.titles[:20], THIRTY_WORDS, [], 10, catalog),
            smtpo.feedback_prompt(sample, catalog.titles[:10], catalog),
        ]
        for prompt in prompts:
            example = smtpo.encode_example(tokenizer, prompt, completion, RECIPE["max_length"], "<think>\n")
            start = example["completion_mask"].index(1)
            text = tokenizer.decode(example["input_ids"][:start])
            assert text.startswith("<|im_start|>system") and prompt.split("\n")[0] in text  # the instruction
            assert latest_user_utterance(sample) in text and text.endswith("<|im_start|>assistant\n<think>\n")
            assert len(example["input_ids"]) <= RECIPE["max_length"] and not example["cut"]
    assert example["prompt_tokens_dropped"] > 0  # the longest contexts do need the fit


@needs_data("redial")
def test_redial_training_and_test_contexts_carry_the_same_kind_of_entities():
    data = load_crs_dataset("redial", DATA, "valid")
    catalog = Catalog(data.items)
    linker = smtpo.entity_linker(catalog)

    def attributes_per_turn(dialogues):
        samples = smtpo.make_tasks(dialogues, set(catalog.titles), linker)
        return sum(m in linker.vocabulary for s in samples for m in s.mentioned) / len(samples)

    # the official training format annotates no entity and iEvaLM's test format does (1.26 a turn on valid): one
    # linker over the utterances gives both the same kind of I_D
    train, test = attributes_per_turn(data.train), attributes_per_turn(data.evaluated)
    assert train > 0.8 and abs(train - test) < 0.2 * test, (train, test)


def test_a_prompt_loses_its_oldest_dialogue_lines_then_its_oldest_turns(tokenizer):
    catalog = Catalog(load_demo_catalog())
    history = [{"role": "user" if k % 2 == 0 else "assistant", "content": f"message {k} " * 20} for k in range(8)]
    history.append({"role": "assistant", "content": "a last word from the system"})
    sample = smtpo.Task("k", history, [], catalog.titles[0])
    turns = [
        {"turn": t, "feedback": f"feedback {t} " * 10, "ranked": catalog.titles[:3], "preference": "p"}
        for t in (1, 2, 3)
    ]
    droppable = smtpo.droppable_parts(sample, turns)
    assert droppable == 6 + 3  # the utterances before the latest user utterance, the turns' lines
    prompts = [smtpo.recommender_prompt(sample, catalog.titles[:3], "more", turns, 10, catalog, k) for k in range(10)]
    assert "message 0" not in prompts[1] and "message 1" in prompts[1] and "(1 earlier message left out)" in prompts[1]
    assert "message 5" not in prompts[6] and "message 6" in prompts[6] and "Turn 1:" in prompts[6]
    assert "Turn 1:" not in prompts[7] and "(1 earlier turn left out)" in prompts[7] and "Turn 2:" in prompts[7]
    assert "Turn 2:" not in prompts[8] and "Turn 3:" in prompts[8] and "a last word from the system" in prompts[8]
    assert "Turn 3:" not in prompts[9] and "(3 earlier turns left out)\nLatest preference: p" in prompts[9]
    lengths = [smtpo.prompt_length(tokenizer, [{"role": "user", "content": p}], "<think>\n") for p in prompts]
    args = smtpo.Args(max_length=lengths[5] + 100, rec_max_tokens=100)
    fitted = smtpo.fitted_recommender_prompt(tokenizer, sample, catalog.titles[:3], "more", turns, args, catalog)
    assert (fitted.text, fitted.dropped_parts, fitted.tokens) == (prompts[5], 5, lengths[5])  # the fewest that fit
    assert fitted.dropped_tokens == lengths[0] - lengths[5]


# ------------------------------------------------------------------------------------ the simulator's data


def test_simulator_lists_by_attribute_overlap_and_seeded():
    import random

    catalog = Catalog(load_demo_catalog())
    sample = smtpo.Task("k", [{"role": "user", "content": "x"}], ["Jaws (1975)"], "Alien (1979)")
    lists = smtpo.simulator_lists(sample, catalog, 5, random.Random(0))
    assert sample.target in lists["H+"] and sample.target in lists["S+"]
    assert sample.target not in lists["H-"] + lists["S-"] and "Jaws (1975)" not in sum(lists.values(), [])
    wanted = smtpo.attributes_of(catalog, sample.target)

    def overlap(items):
        return min(len(wanted & smtpo.attributes_of(catalog, t)) for t in items)

    assert overlap(lists["H-"]) >= max(len(wanted & smtpo.attributes_of(catalog, t)) for t in lists["S-"])
    assert lists == smtpo.simulator_lists(sample, catalog, 5, random.Random(0))


def test_simulator_jobs_show_the_target_to_the_teacher_only_and_draw_lists_per_turn():
    catalog = Catalog(load_demo_catalog())
    sample = smtpo.Task("k", [{"role": "user", "content": "A scary space film?"}], [], "Alien (1979)")
    jobs, examples = smtpo.simulator_jobs(sample, catalog, smtpo.Args(simulator_lists=4, simulator_predictions=3))
    assert sorted(j["list"] for j in jobs) == ["H+", "H-", "S+", "S-"]
    one, _ = smtpo.simulator_jobs(sample, catalog, smtpo.Args(simulator_lists=1))
    assert len(one) == 1 and one == smtpo.simulator_jobs(sample, catalog, smtpo.Args(simulator_lists=1))[0]
    assert all("Alien (1979)" in j["teacher_prompt"] and "really want is" not in j["prompt"] for j in jobs)
    tasks = [(e["task"], e["completion"]) for e in examples]
    assert tasks[0][0] == "alignment" and tasks[0][1].startswith("Alien (1979); ")
    assert [t for t in tasks[1:]] == [("prediction", "Yes"), ("prediction", "No"), ("prediction", "No")]


def test_the_simulators_yes_no_labels_are_balanced_by_default():
    catalog = Catalog(load_demo_catalog())
    sample = smtpo.Task("k", [{"role": "user", "content": "A scary space film?"}], [], "Alien (1979)")
    _, examples = smtpo.simulator_jobs(sample, catalog, smtpo.Args())
    answers = [e["completion"] for e in examples if e["task"] == "prediction"]
    assert sorted(answers) == ["No", "Yes"]


def test_a_missing_simulator_adapter_is_an_error_unless_the_ablation_asks_for_it(tmp_path, monkeypatch):

    monkeypatch.chdir(tmp_path)
    loaded = []
    monkeypatch.setattr(smtpo, "load_merged", lambda *a, **k: loaded.append(a[1]) or (None, None))
    monkeypatch.setattr(smtpo, "HFChat", lambda *a: type("Chat", (), {"usage": None})())
    run = type(
        "FakeRun", (), {"dir": tmp_path / "run", "main": True, "device": "cpu", "count_costs": lambda self, x: x}
    )()
    run.finished = lambda folder: False
    with pytest.raises(InputError, match="--untrained-simulator"):
        smtpo.load_simulator(run, smtpo.Args())
    smtpo.load_simulator(run, smtpo.Args(untrained_simulator=True))
    assert loaded == [[]]  # the base model, no adapter


# ------------------------------------------------------------------------------------ a GRPO update, learning

# the fields of Args that grpo_update reads, at the paper's values (the preset test below checks them against PAPER)
GRPO_SETTINGS = dict(
    exp_name="grpo",
    run_name="grpo",
    micro_batch_size=1,
    max_grad_norm=1.0,
    epsilon=0.2,
    kl_beta=0.04,
    grpo_iterations=1,
)


def trainable_policy(run, tiny_model, lr: float):
    import copy

    from transformers import get_constant_schedule

    from common.checkpoints import resume_and_prepare
    from common.models import add_lora

    torch.manual_seed(0)
    model = add_lora(copy.deepcopy(tiny_model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = get_constant_schedule(optimizer)
    model, optimizer, _ = resume_and_prepare(run.accelerator, model, optimizer, scheduler, run.dir / "grpo")
    return model, optimizer, scheduler


def sampled_group(tokenizer, prompt: str, outputs: list[str], rewards: list[float]) -> dict:
    """A recorded turn as rollout writes it, its outputs as ids (closed with eos, as a finished sample is)."""
    from common.tokens import render_prompt

    prompt_ids = tokenizer(render_prompt(tokenizer, [{"role": "user", "content": prompt}]), add_special_tokens=False)
    completion_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for o in outputs]
    return {
        "prompt_ids": prompt_ids["input_ids"],
        "completion_ids": completion_ids,
        "rewards": [{"total": r} for r in rewards],
    }


def test_grpo_updates_move_probability_to_the_rewarded_outputs_at_the_papers_settings(
    tmp_path, monkeypatch, tokenizer, tiny_model, settings
):
    from common.run import Run
    from common.tokens import collate, sequence_logprobs

    monkeypatch.chdir(tmp_path)
    args = settings(**GRPO_SETTINGS)  # the paper's clip 0.2, KL 0.04 and grad-norm 1.0; its lr 1e-5 and G = 4 below
    run = Run(args)
    model, optimizer, scheduler = trainable_policy(run, tiny_model, lr=1e-5)
    outputs = ["<think>\nStep 1: a\n</think>\nRANK LIST: [Alien (1979)]", "I do not know.", "RANK LIST: [", "Hmm."]
    rewards = [3.9, 0.2, 1.0, 0.0]  # the five rewards' sum: 0 to 5
    examples = smtpo.group_examples([sampled_group(tokenizer, "Rank the films.", outputs, rewards)])
    batch = collate([(e["input_ids"], e["completion_mask"]) for e in examples], tokenizer.pad_token_id)

    def per_token_logps():
        with torch.no_grad():
            logps, lengths, _ = sequence_logprobs(model, **batch)
        return logps / lengths

    before = per_token_logps()
    for _ in range(3):
        (stats,) = smtpo.grpo_update(run, args, model, optimizer, scheduler, examples)
    moved = per_token_logps() - before
    advantages = torch.tensor([e["advantage"] for e in examples])
    # the best output rises, the worst falls, and the change follows the advantages (outputs share tokens, so an
    # output just below the mean may still rise a little with the best one)
    assert moved[advantages.argmax()] > 0 and moved[advantages.argmin()] < 0, moved
    assert (advantages * moved).sum() > 0, moved
    assert stats["logp_change/positive_advantage"] > 0 > stats["logp_change/negative_advantage"]  # as logged
    assert stats["kl"] > 0  # the policy left the reference
    assert stats["clip_ratio/region_mean"] == 0  # one iteration per rollout: the ratio is 1, nothing clips


def test_with_two_iterations_the_second_update_clips(tmp_path, monkeypatch, tokenizer, tiny_model, settings):
    from common.run import Run

    monkeypatch.chdir(tmp_path)
    args = settings(**GRPO_SETTINGS | {"grpo_iterations": 2})
    run = Run(args)
    model, optimizer, scheduler = trainable_policy(run, tiny_model, lr=5e-2)
    group = sampled_group(tokenizer, "Rank the films.", ["RANK LIST: [Alien (1979)]", "I do not know."], [1.0, 0.0])
    first, second = smtpo.grpo_update(run, args, model, optimizer, scheduler, smtpo.group_examples([group]))
    assert first["clip_ratio/region_mean"] == 0  # pi_theta = pi_old before any update
    assert second["clip_ratio/region_mean"] > 0  # after a large step, pi_old is held: ratios leave [0.8, 1.2]
    assert second["clip_ratio/region_mean"] == pytest.approx(
        second["clip_ratio/low_mean"] + second["clip_ratio/high_mean"]
    )


def test_grpo_trains_exactly_the_sampled_token_ids(tokenizer, tiny_model):
    from common.llm import HFChat

    chat = HFChat(tiny_model, tokenizer)
    torch.manual_seed(0)
    conversation = [{"role": "user", "content": "Rank the films."}]
    ((truncated, _),) = chat.complete([conversation], n=2, temperature=1.0, max_tokens=6, prefix="<think>\n")
    assert len(truncated.completion_ids) == 6 and tokenizer.eos_token_id not in truncated.completion_ids
    assert tokenizer.decode(truncated.prompt_ids).endswith("<|im_start|>assistant\n<think>\n")
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    starts_with_newline = newline + tokenizer("Step 1: x", add_special_tokens=False)["input_ids"]
    ended = tokenizer("RANK LIST: [Alien (1979)]", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    group = {
        "prompt_ids": truncated.prompt_ids,
        "completion_ids": [truncated.completion_ids, starts_with_newline, ended],
        "rewards": [{"total": 0.0}, {"total": 1.0}, {"total": 2.0}],
    }
    examples = smtpo.group_examples([group])
    for example, completion in zip(examples, group["completion_ids"]):
        start = example["completion_mask"].index(1)
        assert example["input_ids"] == truncated.prompt_ids + completion  # no eos added to the truncated sample
        assert example["input_ids"][start:] == completion and sum(example["completion_mask"]) == len(completion)
    assert examples[1]["input_ids"][len(truncated.prompt_ids)] == newline[0]  # the sampled newline is trained
    assert [e["advantage"] for e in examples] == pytest.approx([-1.0, 0.0, 1.0])
    # a row that stopped early is cut after its first eos (the rest is padding)
    eos = tokenizer.eos_token_id
    assert chat._trim(torch.tensor([5, 6, eos, eos, eos])) == [5, 6, eos]


def test_the_prefilled_think_tag_is_prompt_for_training_and_output_for_the_rewards(tokenizer):
    from common.tokens import encode_prompt_completion

    prefix = smtpo.output_prefix(smtpo.Args())
    text = prefix + "Step 1: Preference Inference: sci-fi.\n</think>\nRANK LIST: [Alien (1979)]"
    assert smtpo.process_format_reward(text) == pytest.approx(0.2) and smtpo.answer_format_reward(text) == 1.0
    example = smtpo.encode_example(tokenizer, "Rank the films.", text, 512, prefix)
    messages = [{"role": "user", "content": "Rank the films."}]
    ids, mask = encode_prompt_completion(tokenizer, messages, text[len(prefix) :], 512, prefix)
    assert (example["input_ids"], example["completion_mask"]) == (ids, mask)
    start = mask.index(1)
    assert tokenizer.decode(ids[:start]).endswith(prefix) and not tokenizer.decode(ids[start:]).startswith("<think>")
    plain = smtpo.encode_example(tokenizer, "Rank the films.", text, 512)  # no prefill: the tag is trained
    assert tokenizer.decode(plain["input_ids"][plain["completion_mask"].index(1) :]).startswith("<think>")


def test_the_think_tag_is_not_prefilled_twice_where_the_template_opens_it(r1_distill_tokenizer):
    # DeepSeek-R1-Distill's generation header ends with "<think>\n" (the paper's backbone): the pre-filled tag is the
    # template's, once, in the prompt that SFT trains on and GRPO samples from
    prefix = smtpo.output_prefix(smtpo.Args())
    text = prefix + "Step 1: Preference Inference: sci-fi.\n</think>\nRANK LIST: [Alien (1979)]"
    example = smtpo.encode_example(r1_distill_tokenizer, "Rank the films.", text, 512, prefix)
    start = example["completion_mask"].index(1)
    prompt = r1_distill_tokenizer.decode(example["input_ids"][:start])
    assert prompt.endswith("Rank the films.<｜Assistant｜><think>\n") and prompt.count("<think>") == 1
    assert r1_distill_tokenizer.decode(example["input_ids"][start:]).startswith("Step 1: Preference Inference")


def test_every_rank_rolls_out_a_dialogue_in_every_round():
    recipe = smtpo.Args(groups_per_step=8, max_turns=5, stages=("grpo",))  # benchmark/smtpo_table1.sh's
    assert smtpo.round_size(recipe, 0, 8) == 8  # ceil(8 / 5) = 2 dialogues would leave 6 of 8 GPUs idle
    assert smtpo.round_size(recipe, 0, 1) == 2 and smtpo.round_size(recipe, 7, 3) == 3
    assert smtpo.round_size(smtpo.Args(), 0, 1) == 1  # the demo: 2 groups from dialogues of up to 2 turns
    (line,) = [b for b in smtpo.check_args(recipe, 8) if b.startswith("grpo")]
    assert "rolls out 8 dialogues, 1 per rank" in line  # what the dry run prints


def test_grpo_epochs_count_passes_over_the_training_dialogues():
    args = smtpo.Args(grpo_epochs=3, groups_per_step=8, max_turns=5, grpo_steps=2000)
    assert smtpo.grpo_steps_planned(args, 1113, 8) == math.ceil(3 * 1113 / 8)  # INSPIRED on 8 ranks: 418, not 2,000
    assert not smtpo.grpo_finished(args, 2000, 3 * 1113 - 1, 1113) and smtpo.grpo_finished(args, 5, 3 * 1113, 1113)
    steps = smtpo.Args(grpo_steps=3)
    assert smtpo.grpo_steps_planned(steps, 1113, 8) == 3 and smtpo.grpo_finished(steps, 3, 0, 1113)


def test_without_the_simulator_no_feedback_is_asked_for_and_the_retriever_reads_no_list_without_rec(monkeypatch):
    import random

    catalog = Catalog(load_demo_catalog())
    samples = [smtpo.Task("a", [{"role": "user", "content": "A scary film?"}], [], catalog.titles[0])]
    read = []

    class Retriever:
        def retrieve(self, batch, feedback, preference, lists, k):
            read.append((feedback, preference, lists))
            return [catalog.titles[:k] for _ in batch]

    class Policy:
        tokenizer = None

        def complete(self, conversations, **kwargs):
            from common.llm import Completion

            answer = f"Step 1: Preference Inference: scary.\n</think>\nRANK LIST: [{catalog.titles[3]}]"
            return [[Completion(answer, [], [])] for _ in conversations]

    class Mute:
        def chat(self, *a, **k):
            raise AssertionError("w/o Feedback asks no simulator")

    data = smtpo.Data([], [], samples, catalog)
    for ablations, feedback_seen, lists_seen in ((("no-feedback",), [""], [[catalog.titles[3]]]),
                                                  (("no-rec", "no-pref"), None, [[]])):  # fmt: skip
        read.clear()
        args = smtpo.Args(max_turns=3, ablations=ablations)
        simulator = Mute() if "no-feedback" in ablations else TalkingSimulator()
        roles = smtpo.Roles(Policy(), simulator, Retriever(), {})
        monkeypatch.setattr(  # the prompt as it is: no tokenizer here
            smtpo, "fitted_recommender_prompt", lambda tok, s, c, f, t, a, cat: smtpo.Fitted("prompt", 0, 0, 0)
        )
        ((_, turns),) = smtpo.rollout(
            tasks=samples,
            roles=roles,
            data=data,
            args=args,
            n=1,
            temperature=0.0,
            training=False,
            rng=random.Random(0),
        )
        assert len(turns) == 3 and len(read) == 3
        later = read[1:]
        if feedback_seen is not None:
            assert all(f == feedback_seen for f, _, _ in later) and all(t["feedback"] == "" for t in turns)
        assert all(r == lists_seen for _, _, r in later)
        if "no-pref" in ablations:
            assert all(p == [""] for _, p, _ in later) and turns[0]["preference"] == "scary."


def test_the_retriever_is_scored_at_every_turn_as_in_fig_4b():
    target = "Alien (1979)"
    results = [
        {"target": target, "turns": [{"ranked": [target], "candidates": ["x", target] + ["y"] * 18},
                                     {"ranked": [None, target], "candidates": [target] + ["y"] * 19}]},
        {"target": target, "turns": [{"ranked": [], "candidates": ["y"] * 20}]},  # stopped: keeps its last turn
    ]  # fmt: skip
    one, two = smtpo.turn_scores(results, 1), smtpo.turn_scores(results, 2)
    assert one["retriever_recall@20"] == two["retriever_recall@20"] == 0.5
    assert one["retriever_ndcg@20"] == pytest.approx((1 / math.log2(3)) / 2)
    assert two["retriever_ndcg@20"] == pytest.approx(0.5) and two["recall@1"] == 0 and one["recall@1"] == 0.5
    assert two["mrr@10"] == pytest.approx(0.25)


@needs_data("redial")
def test_redial_runs_link_the_entities_of_their_training_turns():
    loaded = smtpo.load_data(smtpo.Args(dataset="redial", data_dir=str(DATA), num_train=200, num_test=1))
    attributes = {v for item in loaded.catalog.items for k in ("genre", "director", "star", "writer")
                  for v in item.attributes.get(k) or []}  # fmt: skip
    assert sum(m in attributes for s in loaded.train for m in s.mentioned) > 0.8 * len(loaded.train)  # was 0


@needs_data("inspired")
def test_num_test_counts_dialogues_and_the_retriever_reads_a_dialogues_latest_utterances():
    args = smtpo.Args(dataset="inspired", data_dir=str(DATA), num_test=10, num_train=2)
    data = smtpo.load_data(args)
    dialogues = {s.key.rsplit(":", 1)[0] for s in data.evaluated}  # CFCRS: <dialog_id>:<turn>
    assert len(dialogues) == 10 and len(data.evaluated) > 10  # every context of 10 dialogues (the first 10)
    every = smtpo.make_tasks(load_crs_dataset("inspired", DATA, "valid").evaluated, set(data.catalog.titles))
    assert data.evaluated == [s for s in every if s.key.rsplit(":", 1)[0] in dialogues]
    old = [{"role": "user" if k % 2 else "assistant", "content": "I loved the old westerns. " * 8} for k in range(7)]
    history = old + [{"role": "user", "content": "Now a shark movie in the ocean, with divers and a boat."}] * 3
    sample = smtpo.Task("k", history, [], data.catalog.titles[0])
    assert len(data.catalog._load_encoder().tokenizer(smtpo.render_history(history))["input_ids"]) > 256
    retriever = smtpo.Retriever(smtpo.FusionHead(384, 4), data.catalog.titles, torch.zeros(1096, 4), data.catalog)
    texts, _, _, _ = retriever.conversation_inputs([sample], [""], [""], [[]])
    (sharks,) = data.catalog.encode(["A shark movie in the ocean, with divers and a boat."])
    (beginning,) = data.catalog.encode([smtpo.render_history(history)])  # the window's default: the first tokens
    assert texts[0, 0].numpy() @ sharks > beginning @ sharks + 0.2  # the window kept the latest utterances


def test_the_learning_signal_of_a_step_counts_what_the_groups_can_teach():
    def group(totals, in_candidates, fallback=False, substituted=False, dropped=0):
        return {
            "rewards": [{"total": t} for t in totals],
            "target_in_candidates": in_candidates,
            "fallback": fallback,
            "feedback_substituted": substituted,
            "prompt_parts_dropped": int(dropped > 0),
            "prompt_tokens_dropped": dropped,
            "prompt_over_budget": False,
        }

    groups = [
        group([1.2, 1.2, 1.2, 1.2], False, fallback=True),  # every output alike: advantages 0, nothing to learn
        group([0.7, 1.9, 0.7, 0.7], True, substituted=True, dropped=310),
        group([0.5, 0.5, 0.5, 0.5], False, fallback=True, dropped=12),
        group([0.2, 0.3, 0.2, 0.2], False),
    ]
    signal = smtpo.learning_signal(groups)
    assert signal == {
        "rollout/frac_reward_zero_std": 0.5,
        "rollout/target_in_candidates": 0.25,
        "rollout/fallback_continuations": 2,
        "rollout/substituted_feedback": 1,
        "rollout/truncated_prompts": 2,
        "rollout/prompt_tokens_dropped": 322,
        "rollout/prompts_over_budget": 0,
    }
    zero = [smtpo.group_advantages(torch.tensor([r["total"] for r in g["rewards"]])) for g in groups]
    assert [bool((a == 0).all()) for a in zero] == [True, False, True, False]  # what the zero-std share counts
    panels = [m for metrics in smtpo.CURVES.values() for m in metrics]
    assert {"rollout/frac_reward_zero_std", "rollout/target_in_candidates", "rollout/fallback_continuations",
            "rollout/substituted_feedback", "rollout/truncated_prompts"} <= set(panels)  # fmt: skip


def test_an_empty_feedback_is_replaced_and_counted():
    import random

    class Quiet:
        def chat(self, conversations, max_tokens):
            return [("  ",), ("Too sweet, I want horror.",)]

    catalog = Catalog(load_demo_catalog())
    samples = [smtpo.Task(k, [{"role": "user", "content": "x"}], [], catalog.titles[0]) for k in "ab"]
    texts, stock = smtpo.simulate_feedback(Quiet(), samples, [[], []], catalog, smtpo.Args(), random.Random(0))
    assert texts == [smtpo.STOCK_FEEDBACK, "Too sweet, I want horror."] and stock == [True, False]


def test_reward_curve_compares_the_first_and_second_half_of_the_steps():
    rollouts = [
        {
            "key": f"{step}|{2 * step + k}|d{k}",
            "turns": [{"rewards": [{"total": step, "think": 0.2 * step, "answer": 1.0, "pref": 0}]}],
        }
        for step in range(5)
        for k in range(2)
    ]
    curve = smtpo.reward_curve(rollouts)
    assert curve["rollout/reward_total_first_half"] == 0.5  # steps 0 and 1
    assert curve["rollout/reward_total_second_half"] == 3.0  # steps 2, 3 and 4
    assert curve["rollout/reward_think_second_half"] == pytest.approx(0.6)
    assert smtpo.reward_curve([]) == {}


# ------------------------------------------------------------------------------------ the paper's settings


def test_the_paper_preset_names_every_field_and_the_recipe_selects_it():
    from common.presets import check_preset, markdown_table, parse_args
    from tests.conftest import ROOT

    check_preset(smtpo.Args, smtpo.PAPER)
    assert markdown_table(smtpo.PAPER) in (ROOT / "docs" / "smtpo.md").read_text()  # the docs show the preset itself
    args = parse_args(smtpo.Args, smtpo.PRESETS, ["paper", "--dataset", "redial", "--ablations", "no-rec"])
    paper_values = (args.sft_lr, args.grpo_lr, args.groups_per_step, args.grpo_epochs, args.max_turns, args.num_test)
    assert paper_values == (5e-5, 1e-5, 8, 3.0, 5, 0)
    assert (args.dataset, args.ablations, args.simulator_lists) == ("redial", ("no-rec",), 4)
    assert parse_args(smtpo.Args, smtpo.PRESETS, ["--max-turns", "4"]) == smtpo.Args(max_turns=4)  # the demo's
    # the learning test above trains the preset's update: its clip, KL weight, clipping and iterations (lr 1e-5, G = 4)
    update = ("epsilon", "kl_beta", "max_grad_norm", "grpo_iterations")
    paper = {name: value for name, (value, _) in smtpo.PAPER.values.items()}
    assert {name: paper[name] for name in update} == {name: GRPO_SETTINGS[name] for name in update}
    assert (paper["grpo_lr"], paper["group_size"]) == (1e-5, 4)


def test_the_retriever_loads_on_the_cpu_whatever_device_saved_it(tmp_path, monkeypatch):
    """torch.load without map_location puts each tensor back on the device that saved it: every rank's retriever on
    the GPU of the rank that saved it (issue 37)."""
    from types import SimpleNamespace

    catalog = Catalog(load_demo_catalog())
    nodes, _ = smtpo.item_graph(catalog)
    head = smtpo.FusionHead(catalog.encode(["x"]).shape[1], 8)
    (tmp_path / "retriever").mkdir()
    saved = {"nodes": nodes, "node_embeddings": torch.randn(len(nodes), 8), "heads": {"both": head.state_dict()}}
    torch.save(saved, tmp_path / "retriever" / "retriever.pt")
    loads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("map_location")) or real_load(*a, **k))
    run = SimpleNamespace(dir=tmp_path, finished=lambda folder: True)
    retriever = smtpo.load_retriever(run, smtpo.Data([], [], [], catalog))
    assert loads == ["cpu"] and retriever.node_embeddings.device.type == "cpu"


def test_the_entity_linker_finds_genres_and_people_as_whole_words():
    linker = smtpo.EntityLinker(["comedy", "horror", "sci-fi"], ["Mila Kunis", "J.D. Salinger", "Prince"])
    text = "I like comedies and Horror, sci-fi too; mila kunis! Anything by J.D. Salinger? The Prince of Egypt, horrors"
    assert linker(text) == ["comedy", "horror", "sci-fi", "Mila Kunis", "J.D. Salinger"]  # once each, in order
    assert linker("a comedian in a horrorshow, kunis") == []  # whole words only, a full name only
    assert linker.vocabulary == {"comedy", "horror", "sci-fi", "Mila Kunis", "J.D. Salinger", "Prince"}
