"""grsu.py: scoring, ranking, search bookkeeping, data synthesis and evaluation, checked against hand values."""

import math
import re

import pytest

import grsu
from common.catalog import Catalog
from common.formats import Dialogue, Turn, load_demo_catalog
from common.llm import HFChat
from tests.conftest import DATA, ROOT, needs_data


def test_accept_probability_and_list_reward_by_hand():
    assert grsu.accept_probability({"Yes": 0.3, "No": 0.1}) == pytest.approx(0.75)  # p(Yes) / (p(Yes) + p(No))
    assert grsu.accept_probability({"Yes": 0.05, "No": 0.15}) == pytest.approx(0.25)
    assert grsu.accept_probability({"Yes": 0.0, "No": 0.0}) == 0.0
    scores = {"A": 0.75, "B": 0.25, "C": 0.5}
    assert grsu.list_reward(["A", "B", "C"], scores) == pytest.approx(0.5)  # Eq. 2: the mean over the list
    assert grsu.list_reward([], scores) == 0.0


def test_choice_probs_sum_the_spellings_of_each_answer(tiny_model, tokenizer):
    llm = HFChat(tiny_model, tokenizer)
    conversation = [[{"role": "user", "content": "Accept it?"}]]
    (probs,) = llm.choice_probs(conversation, ("Yes", "No"), prefix=grsu.ANSWER_PREFIX)
    text = tokenizer.apply_chat_template(conversation[0], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text + grsu.ANSWER_PREFIX, add_special_tokens=False, return_tensors="pt")["input_ids"]
    manual = tiny_model(input_ids=ids).logits[0, -1].float().softmax(-1)
    for answer in ("Yes", "No"):  # "Yes" and " Yes" both count
        spellings = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in (answer, " " + answer)]
        assert all(len(ids) == 1 for ids in spellings)  # one token each: the next-token probabilities, summed
        assert probs[answer] == pytest.approx(manual[[ids[0] for ids in spellings]].sum().item(), rel=1e-5)


def test_prefix_shared_scoring_equals_scoring_each_full_prompt(tiny_model, tokenizer):
    history = [
        {"role": "user", "content": "I want a tense thriller."},
        {"role": "assistant", "content": "Old or new?"},
        {"role": "user", "content": "New, please."},
    ]
    items = ["Get Out (2017); genre: horror", "Toy Story (1995); genre: animation, family", "Jaws (1975)"]
    shared_llm, full_llm = HFChat(tiny_model, tokenizer, batch_size=2), HFChat(tiny_model, tokenizer)
    shared = grsu.score_items(shared_llm, history, items)
    conversations = [[{"role": "user", "content": grsu.score_prompt(history, item)}] for item in items]
    full = full_llm.choice_probs(conversations, choices=("Yes", "No"), prefix=grsu.ANSWER_PREFIX)
    assert shared == pytest.approx([grsu.accept_probability(p) for p in full], abs=1e-5)
    # billed as an API would: one call per item with its whole prompt, as with full prompts
    assert shared_llm.usage.calls == full_llm.usage.calls == 3
    assert shared_llm.usage.prompt_tokens == full_llm.usage.prompt_tokens


def test_pooled_ranking_averages_repeated_items_and_sorts():
    observations = [("a", 0.2), ("b", 0.5), ("a", 0.8), ("c", 0.9), ("d", 0.1), ("b", 0.5)]
    # a: mean .5 ties with b (.5) and comes first, as it was seen first
    assert grsu.pooled_ranking(observations) == ["c", "a", "b", "d"]
    assert grsu.pooled_ranking([("x", 0.3), ("y", 0.1), ("x", 0.0)]) == ["x", "y"]  # x: .15 > .1


def test_zero_shot_ranking_is_the_greedy_list_then_the_samples_by_rank():
    lists = [["a", "b", "c"], ["d", "a", "e"], ["f", "g"]]
    assert grsu.zero_shot_ranking(lists) == ["a", "b", "c", "d", "f", "g", "e"]


def test_search_shapes_keep_the_number_of_lists():
    # D counts the initial lists as the first iteration: 16 + 4 x 16 = 80 lists at B = N = 4, D = 5 (released code)
    args = grsu.Args(beam_width=4, expansion=4, depth=5)
    assert grsu.search_shape(args) == (4, 4, 4)
    for search, shape in (("greedy", (1, 16, 4)), ("greedy-small", (1, 4, 4)), ("mc", (16, 4, 1)), ("none", (0, 0, 0))):
        args.search = search
        assert grsu.search_shape(args) == shape
    for search in ("beam", "mc", "greedy"):  # Table 6: Monte Carlo and greedy (large) generate as many lists as beam
        width, expansion, rounds = grsu.search_shape(grsu.Args(search=search, beam_width=4, expansion=4, depth=5))
        assert 16 + width * expansion * rounds == 80
    assert grsu.search_shape(grsu.Args(beam_width=4, expansion=2, depth=2)) == (4, 2, 1)  # N^2 = 4 lists, keep 4
    with pytest.raises(grsu.InputError):
        grsu.search_shape(grsu.Args(beam_width=5, expansion=2))
    with pytest.raises(grsu.InputError):
        grsu.search_shape(grsu.Args(depth=0))


def test_ranking_metrics_average_within_turns_then_over_turns_and_over_pairs():
    ranked = [f"x{i}" for i in range(30)]
    ranked[19] = "gold"  # rank 20
    one = {"labels": ["gold"], "mentioned": [], "ranked": ranked}
    m = grsu.ranking_metrics([one], "ranked", ks=(10, 50), prefix="eval")
    assert m["eval/recall@10"] == 0 and m["eval/ndcg@10"] == 0 and m["eval/mrr@10"] == 0  # each k on its own slice
    assert m["eval/recall@50"] == 1 and m["eval/mrr@50"] == pytest.approx(1 / 20)
    assert m["eval/ndcg@50"] == pytest.approx(1 / math.log2(21))
    # a turn with two labels, one hit (x0 at rank 1), and a turn with one label, missed: by turn (0.5 + 0) / 2, by
    # (turn, label) pair 1 / 3; a label outside the catalog can never be ranked, so it is a miss
    two = {"labels": ["x0", "not in the catalog"], "mentioned": [], "ranked": ranked}
    miss = {"labels": ["gold"], "mentioned": [], "ranked": ranked[:10]}
    m = grsu.ranking_metrics([two, miss], "ranked", ks=(10,), prefix="eval")
    assert m["eval/recall@10"] == pytest.approx(0.25) and m["eval_pairs/recall@10"] == pytest.approx(1 / 3)
    assert m["eval/mrr@10"] == pytest.approx(0.25) and m["eval_pairs/ndcg@10"] == pytest.approx(1 / 3)
    # earlier mentions stay in the ranking unless asked (neither the paper nor its code removes them)
    one["mentioned"] = ranked[:10]
    assert grsu.ranking_metrics([one], "ranked", ks=(10,), prefix="eval")["eval/recall@10"] == 0
    removed = grsu.ranking_metrics([one], "ranked", ks=(10,), prefix="eval", remove_mentioned=True)
    assert removed["eval/recall@10"] == 1 and removed["eval/mrr@10"] == pytest.approx(1 / 10)


def test_tasks_decide_repeated_items_from_the_annotations():
    dialogue = Dialogue(
        "d",
        [
            Turn("recommender", "Have you seen Jaws (1975)?", ["Jaws (1975)"]),  # no history: not an example
            Turn("seeker", "Yes! I also loved Alien, and I saw it twice."),  # Alien named, not annotated
            Turn(
                "recommender",
                "Then Jaws (1975) again, or Alien (1979), or Fargo (1996).",
                ["Jaws (1975)", "Alien (1979)", "Fargo (1996)"],
            ),
            Turn("recommender", "Or something new.", ["Not In Catalog (2000)", ""]),
        ],
    )
    # the paper: the repeated item (Jaws, annotated in turn 0) is dropped; Alien was never annotated, so it stays
    turns = grsu.make_tasks([dialogue], only_new="labels")
    assert [t.labels for t in turns] == [["Alien (1979)", "Fargo (1996)"], ["Not In Catalog (2000)"]]
    assert turns[0].mentioned == ["Jaws (1975)"] and turns[0].conversation == "d"
    assert [h["role"] for h in turns[0].history] == ["assistant", "user"]  # the recommender, then the seeker
    # the released code skips a turn with any repeated item; off keeps every label
    assert [t.labels for t in grsu.make_tasks([dialogue], only_new="turn")] == [["Not In Catalog (2000)"]]
    assert grsu.make_tasks([dialogue], only_new="off")[0].labels == ["Jaws (1975)", "Alien (1979)", "Fargo (1996)"]
    # the released code first drops the labels outside the catalog, and a turn left without one (counted)
    catalog, dropped = {"Jaws (1975)", "Alien (1979)"}, {}
    assert [t.labels for t in grsu.make_tasks([dialogue], only_new="off", catalog=catalog, dropped=dropped)] == [
        ["Jaws (1975)", "Alien (1979)"]
    ]
    assert dropped == {"labels": 2, "turns": 1}  # Fargo, and the turn whose one label is outside
    assert grsu.make_tasks([dialogue], only_new="turn", catalog=catalog) == []  # Jaws was mentioned before


def test_ievalm_repeated_items_come_from_the_entity_annotations_or_whole_titles(tmp_path):
    import json

    from common.formats import load_ievalm_turns

    # real cases from ReDial's validation split: "Saw (2003)" after "chainsaw", "It (2017)" after the pronoun "it"
    rows = [
        {"dialog_id": "1", "turn_id": 3, "context": ["I love a good chainsaw horror", "Seen any lately?", "no"],
         "rec": ["Saw (2003)"], "resp": "Try Saw (2003)", "entity": ["horror"]},
        {"dialog_id": "2", "turn_id": 3, "context": ["Something scary?", "Like it?", "I want it to be scary"],
         "rec": ["It (2017)"], "resp": "It (2017)!"},
        {"dialog_id": "3", "turn_id": 3, "context": ["I loved It (2017)", "Same!", "more?"],
         "rec": ["It (2017)", "Us (2019)"], "resp": "..."},
    ]  # fmt: skip
    path = tmp_path / "valid_data_processed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    turns = grsu.make_tasks(load_ievalm_turns(path), only_new="labels")
    assert [t.labels for t in turns] == [["Saw (2003)"], ["It (2017)"], ["Us (2019)"]]
    assert [t.conversation for t in turns] == ["1", "2", "3"]


@needs_data("redial")
def test_real_redial_repeated_items_and_training_overlap():
    from common.formats import load_cfcrs_kg, load_redial_official

    dataset = grsu.load_data("redial", str(DATA), "valid", only_new="labels")
    turns = dataset.evaluated
    it_2017 = [t for t in turns if "It (2017)" in t.labels]
    assert len(it_2017) >= 36  # a label 39 times, repeated 3 times (the substring rule kept 15)
    assert len(turns) > 2524  # the substring rule emptied 192 turns, the annotations 148: 2568 kept
    assert len(grsu.load_data("redial", str(DATA), "valid", only_new="turn").evaluated) < len(turns)  # the code's skip
    # 50 of the 600 mirrored training conversations are in the validation file: they never train the user, and the
    # titles only they name are not candidates
    evaluated = {t.conversation for t in turns}
    assert dataset.left_out > 0 and not {t.conversation for t in dataset.train} & evaluated
    folder = DATA / "redial" / "official"
    official = load_redial_official(folder / "train_subset_500.jsonl") + load_redial_official(
        folder / "valid_subset_100.jsonl"
    )
    shared = [d for d in official if d.dialog_id in evaluated]
    assert len(shared) == 50
    named = {m for d in shared for t in d.turns for m in t.items}
    elsewhere = {m for d in official if d.dialog_id not in evaluated for t in d.turns for m in t.items}
    attributes = {item.title for item in load_cfcrs_kg(DATA / "redial" / "ievalm")}
    assert not (named - elsewhere - attributes) & {item.title for item in dataset.items}


@needs_data("inspired")
def test_real_inspired_catalog_comes_from_the_kg_and_training_split():
    from common.data import restore_years
    from common.formats import load_cfcrs_dialogues, load_cfcrs_kg, load_unicrs_jsonl

    dataset = grsu.load_data("inspired", str(DATA), "valid")
    turns, catalog = dataset.evaluated, {item.title for item in dataset.items}
    attributes = load_cfcrs_kg(DATA / "inspired" / "cfcrs")
    train = load_unicrs_jsonl(DATA / "inspired" / "unicrs" / "train_data_dbpedia.jsonl")
    restore_years(train, attributes)
    assert catalog == {item.title for item in attributes} | {m for d in train for t in d.turns for m in t.items}
    # the released code's protocol drops the labels outside the catalog and the turns left without one; --outside-
    # catalog miss keeps them, as misses
    assert all(label in catalog for t in turns for label in t.labels) and dataset.outside["labels"] > 0
    dropped = grsu.load_data("inspired", str(DATA), "valid", only_new="off", outside_catalog="drop")
    kept = grsu.load_data("inspired", str(DATA), "valid", only_new="off", outside_catalog="miss").evaluated
    outside = [label for t in kept for label in t.labels if label not in catalog]
    assert len(outside) == dropped.outside["labels"] < sum(len(t.labels) for t in kept)
    assert len(kept) - len(dropped.evaluated) == dropped.outside["turns"] > 0
    valid_only = {
        m for d in load_cfcrs_dialogues(DATA / "inspired/cfcrs/valid_data.jsonl") for t in d.turns for m in t.items
    }
    assert valid_only - catalog  # titles only the evaluated split names are not candidates


def test_synthesis_puts_the_preference_in_the_teacher_prompt_only():
    catalog = Catalog(load_demo_catalog())
    history = [{"role": "user", "content": "Something scary and smart."}]
    turn = grsu.Task("t1", "d1", history, labels=["Get Out (2017)", "Alien (1979)"], mentioned=["Jaws (1975)"])
    args = grsu.Args(max_subsets=10, no_gt_lists=1, scoring_negatives=1)
    critiques, scoring = grsu.synthesis_jobs(turn, catalog, args)
    assert len(critiques) == 3 + 1  # the subsets {a}, {b}, {a, b} and one list without ground truth
    for job in critiques:
        assert len(job["items"]) == 10 and len(set(job["items"])) == 10 and "Jaws (1975)" not in job["items"]
        # the paper's [C; list; p_k; d_c] for the teacher, [C; list; d_c] for the student; nothing else is added
        listing, instruction = job["prompt"].split("\n\n" + grsu.CRITIQUE_INSTRUCTION)
        assert job["teacher_prompt"].startswith(listing) and job["teacher_prompt"].endswith(grsu.CRITIQUE_INSTRUCTION)
        preference = job["teacher_prompt"][len(listing) : -len(grsu.CRITIQUE_INSTRUCTION)]
        assert preference.startswith("\n\nWhat you really want:\n") and "never" not in job["teacher_prompt"]
        assert all(catalog.card(t, grsu.CARD_FIELDS) in preference for t in turn.labels)
        assert "What you really want" not in job["prompt"] and instruction == ""
    assert [job["gt_in_list"] for job in critiques] == [1, 1, 2, 0]
    answers = [(r["item"], r["completion"].rsplit(" ", 1)[-1]) for r in scoring]
    assert [a for _, a in answers] == ["Yes", "No", "Yes", "No"]
    assert all((item in turn.labels) == (answer == "Yes") for item, answer in answers)
    assert all(r["prompt"].endswith(catalog.card(r["item"], grsu.CARD_FIELDS)) for r in scoring)
    # seeded by the turn: a rerun (or another rank) draws the same negatives
    assert grsu.synthesis_jobs(turn, catalog, args) == (critiques, scoring)


def test_parse_titles_on_real_crs_outputs():
    bold = "1. **Inception (2010)**\n2. **The Matrix (1999)** - a classic\n3. **Dune (2021)**"
    assert grsu.parse_titles(bold) == ["Inception (2010)", "The Matrix (1999)", "Dune (2021)"]
    # SmolLM2, after the "1. **" pre-fill, often drops the bold from the second line on
    numbered = '1. **Die Hard (1988)**\n2. Toy Story (1995)\n3) "Coco"\n4. ****'
    assert grsu.parse_titles(numbered) == ["Die Hard (1988)", "Toy Story (1995)", "Coco"]
    assert grsu.parse_titles("My picks: **Fargo (1996)** and **Up**.") == ["Fargo (1996)", "Up"]
    assert grsu.parse_titles("I cannot recommend anything.") == []


@needs_data("inspired", "redial")
def test_real_inspired_and_redial_turns_load():
    for name in ("inspired", "redial"):
        dataset = grsu.load_data(name, str(DATA), "valid")
        assert len(dataset.evaluated) > 100 and len(dataset.train) > 1000
        assert all(t.labels and t.history for t in dataset.evaluated + dataset.train)
        off = grsu.load_data(name, str(DATA), "valid", only_new="off").evaluated  # repeated items kept: more labels
        assert sum(len(t.labels) for t in off) > sum(len(t.labels) for t in dataset.evaluated)
    train = grsu.load_data("inspired", str(DATA), "valid").train
    years = sum(bool(re.search(r"\(\d{4}\)$", label)) for t in train for label in t.labels)
    assert len(train) > 1000 and years / sum(len(t.labels) for t in train) > 0.5  # UniCRS titles got their years back


def test_beam_search_bookkeeping_at_depth_one_on_the_embedded_model():
    from common.llm import make_llm

    dataset = grsu.load_data("demo", "", "valid")
    turns, catalog = dataset.evaluated, Catalog(dataset.items)
    b, n, d = 2, 2, 2  # the initial lists, then one critique round
    args = grsu.Args(beam_width=b, expansion=n, depth=d, crs_max_tokens=48, critique_max_tokens=16, max_resamples=1)
    search = grsu.Search(
        crs=make_llm("hf:smollm2-135m"), user_llm=make_llm("hf:smollm2-135m"), catalog=catalog, args=args
    )
    (record,) = search.rollout(turns[:1])
    c = search.counts
    assert c["crs_lists"] == n * n + b * n * (d - 1) == len(record["states"]) and c["zero_shot_lists"] == 1
    assert c["critiques"] == b * n * (d - 1) and c["lists_scored"] == n * n + b * n * (d - 1)
    assert c["crs_calls"] == c["crs_lists"] + c["zero_shot_lists"] + c["crs_resamples"]
    seen = {t for s in record["states"] for t in s["items"]}
    assert c["items_scored"] == len(seen) == len(record["item_scores"])  # each item scored once per conversation
    assert search.user_llm.usage.calls == c["critiques"] + c["critique_resamples"] + c["items_scored"]
    # depth-1 states hang off the best B initial lists, N each
    initial = record["states"][: n * n]
    best = sorted(initial, key=lambda s: -s["reward"])[:b]
    children = record["states"][n * n :]
    assert sorted(s["parent"] for s in children) == sorted([s["id"] for s in best] * n)
    assert all(s["critique"] is not None and s["depth"] == 1 for s in children)
    for s in record["states"]:  # Eq. 2: each list's reward is the mean P(accept) of its items
        mean = sum(record["item_scores"][t] for t in s["items"]) / len(s["items"]) if s["items"] else 0.0
        assert s["reward"] == pytest.approx(mean, abs=1e-4)
    assert sorted(record["ranked"]) == sorted(seen)
    assert record["zero_shot"][: len(record["greedy"])] == record["greedy"]  # the zero-shot CRS's own answer first


def test_defaults_follow_the_released_protocol_where_the_paper_is_silent():
    """Issue 37: the released code skips a turn with a repeated item and drops labels outside the catalog; the other
    readings are one flag away (--only-new labels, --outside-catalog miss)."""
    args = grsu.Args()
    assert (args.only_new, args.outside_catalog) == ("turn", "drop")
    assert grsu.load_data("demo", "", "valid").outside == {"labels": 0, "turns": 0}


class _ScriptedCRS:
    """A CRS stand-in that answers each call with the next list of ``lists`` ("1. **Title**" lines)."""

    def __init__(self, lists):
        from common.llm import Usage

        self.lists, self.usage = list(lists), Usage()

    def chat(self, conversations, temperature=0.0, max_tokens=256, prefix="", **_):
        self.usage.add(len(conversations), 1, 1)
        return [["\n".join(f"{i}. **{t}**" for i, t in enumerate(self.lists.pop(0), 1))] for _ in conversations]


class _ScriptedUser:
    """A simulated user stand-in: P(accept) of each item from ``accept``, a fixed critique."""

    def __init__(self, accept):
        from common.llm import Usage

        self.accept, self.usage, self.model = accept, Usage(), object()

    def choice_probs(self, conversations, choices, prefix="", shared_prefix=False):
        self.usage.add(len(conversations), 1, 0)
        probs = []
        for conv in conversations:
            (title,) = [t for t in self.accept if t in conv[-1]["content"]]
            probs.append({"Yes": self.accept[title], "No": 1 - self.accept[title]})
        return probs

    def chat(self, conversations, temperature=0.0, max_tokens=256, stop=None):
        self.usage.add(len(conversations), 1, 1)
        return [["Too old for me."] for _ in conversations]


@pytest.mark.parametrize("scoring", ["generative", "majority", "weighted-majority"])
def test_the_beam_keeps_the_highest_reward_lists_whatever_ranks_the_output(scoring):
    """As in the released code, the votes rank only the output: the beam keeps the lists of highest mean P(accept)
    (Eq. 2) under every --scoring. Before issue 37, majority skipped the scoring and kept the lists of most votes."""
    a, b, c, d, e, f = "Jaws (1975)", "Alien (1979)", "Oldboy (2003)", "Fargo (1996)", "Coco (2017)", "Dune (2021)"
    accept = {a: 0.9, b: 0.8, c: 0.1, d: 0.1, e: 0.1, f: 0.1}
    initial = [[a, b], [c, d], [c, e], [c, f]]  # by reward [a, b] leads (.85); by votes c (3 of 4 lists)
    crs = _ScriptedCRS([[a, b]] + initial + [[a, e], [b, f]])  # the greedy baseline, the N^2 lists, one round
    catalog = Catalog([item for item in load_demo_catalog() if item.title in accept])
    args = grsu.Args(beam_width=1, expansion=2, depth=2, list_length=2, scoring=scoring, max_resamples=0)
    turn = grsu.Task("t", "d", [{"role": "user", "content": "A thriller?"}], [c], [])
    (record,) = grsu.Search(crs=crs, user_llm=_ScriptedUser(accept), catalog=catalog, args=args).rollout([turn])
    states = record["states"]
    assert [s["items"] for s in states] == initial + [[a, e], [b, f]]
    for s in states:  # every list's reward is its mean P(accept)
        assert s["reward"] == pytest.approx(sum(accept[t] for t in s["items"]) / 2)
    assert [s["parent"] for s in states[4:]] == [0, 0]  # the beam kept [a, b]
    votes = {"generative": a, "majority": c, "weighted-majority": a}  # c: 3 of 6 lists x .1 < a: 2 of 6 x .9
    assert record["ranked"][0] == votes[scoring]


def test_the_search_yields_each_batchs_records_before_it_searches_the_next():
    """run.map appends each record as the search yields it, so a kill loses no finished batch: Search.results searches
    a batch of --examples-per-batch tasks only when the records of the one before are taken, each record holding an
    even share of its batch's LLM calls and tokens."""
    a, b = "Jaws (1975)", "Alien (1979)"
    crs, user = _ScriptedCRS([[a, b]] * 20), _ScriptedUser({a: 0.9, b: 0.5})
    catalog = Catalog([item for item in load_demo_catalog() if item.title in (a, b)])
    args = grsu.Args(beam_width=1, expansion=1, depth=1, list_length=2, max_resamples=0, examples_per_batch=2)
    tasks = [grsu.Task(f"t{i}", f"d{i}", [{"role": "user", "content": "A thriller?"}], [a], []) for i in range(3)]
    search = grsu.Search(crs=crs, user_llm=user, catalog=catalog, args=args)
    records = search.results(tasks)
    first, second = next(records), next(records)
    calls, tokens = search.cost()  # the first batch's, all of it: the second has not started
    assert [first["key"], second["key"]] == ["t0", "t1"] and calls > 0
    assert first["llm_calls"] == second["llm_calls"] == calls / 2 and first["tokens"] == tokens / 2
    (third,) = list(records)
    assert third["key"] == "t2" and third["llm_calls"] == search.cost()[0] - calls > 0


def test_checkpoints_at_epoch_ends_and_only_the_last_kept(tmp_path, monkeypatch, tokenizer, tiny_model):
    """GRSU's full fine-tune of an 8B model writes about 112 GB per checkpoint: --save-every 0 saves at each epoch's
    end (and not every 50 steps), --keep-checkpoints 1 keeps the newest alone."""
    import copy

    from common.run import Run
    from common.sft import supervised_finetuning
    from common.tokens import encode_prompt_completion

    monkeypatch.chdir(tmp_path)
    args = grsu.Args(run_name="ckpt", micro_batch_size=1, save_every=0, keep_checkpoints=1)
    run = Run(args)
    encoded = [encode_prompt_completion(tokenizer, [{"role": "user", "content": f"q{i}"}], "a") for i in range(4)]
    examples = [{"input_ids": ids, "completion_mask": mask} for ids, mask in encoded]
    saved = []
    monkeypatch.setattr("common.sft.save_resumable", lambda *a, **k: saved.append((a[3], a[6:] or k)))
    model = copy.deepcopy(tiny_model)
    supervised_finetuning(run, args, model, tokenizer, examples, "user", lr=1e-3, batch_size=2, epochs=3,
                          warmup_ratio=0, keep_checkpoints=args.keep_checkpoints)  # fmt: skip
    assert [step for step, _ in saved] == [2, 4, 6]  # 2 steps an epoch
    assert all(keep in ((1,), {"keep": 1}) for _, keep in saved)


def test_the_paper_preset_names_every_field_and_the_recipe_selects_it():
    from common.presets import check_preset, markdown_table, parse_args

    check_preset(grsu.Args, grsu.PAPER)
    assert markdown_table(grsu.PAPER) in (ROOT / "docs" / "grsu.md").read_text()  # the docs show the preset itself
    args = parse_args(grsu.Args, grsu.PRESETS, ["paper", "--dataset", "inspired", "--epochs", "2"])
    assert (args.epochs, args.lr, args.finetune, args.depth, args.dataset) == (2, 1e-6, "full", 5, "inspired")
    assert parse_args(grsu.Args, grsu.PRESETS, ["--epochs", "2"]) == grsu.Args(epochs=2)  # no preset: the demo's
