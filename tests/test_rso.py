"""rso.py: the returns, the loss and its gradients by hand, PRS and Dist-2 on hand cases, the label mapping on the
real INSPIRED dev.tsv, the rewarder's batched sampling and retries, and a bandit that the planner's update must
learn."""

import math
from collections import Counter

import pytest
import torch

import rso
from common.catalog import Catalog, encoder_path
from common.data import DataError, load_demo_catalog
from tests.conftest import DATA, needs_data

# ------------------------------------------------------------------------------------ returns and loss (Eq. 7-8)


def test_discounted_returns_by_hand():
    assert rso.discounted_returns([0.5, 0.0, 1.0], 0.9) == pytest.approx([0.5 + 0.81, 0.9, 1.0])
    assert rso.discounted_returns([1.0, 1.0], 1.0) == pytest.approx([2.0, 1.0])
    assert rso.discounted_returns([0.25], 0.99) == pytest.approx([0.25])


def test_loss_value_at_the_uniform_policy():
    logits, actions = torch.zeros(2, 13), torch.tensor([3, 7])
    loss, entropy = rso.rso_loss(logits, actions, torch.tensor([1.0, 0.5]), beta=0.1)
    assert entropy.item() == pytest.approx(math.log(13))
    assert loss.item() == pytest.approx(math.log(13) * 1.5 - 0.1 * math.log(13))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_gradient_moves_the_log_prob_with_the_sign_of_the_return(sign):
    logits = torch.randn(1, 13, generator=torch.Generator().manual_seed(0)).requires_grad_()
    loss, _ = rso.rso_loss(logits, torch.tensor([4]), torch.tensor([sign]), beta=0.0)
    loss.backward()
    before = logits.log_softmax(-1)[0, 4].item()
    after = (logits - 0.1 * logits.grad).log_softmax(-1)[0, 4].item()  # one descent step on L
    assert (after - before) * sign > 0  # a positive return raises log pi(h|s), a negative one lowers it


def test_the_entropy_term_raises_the_entropy():
    logits = torch.tensor([[4.0, 1.0] + [0.0] * 11], requires_grad=True)
    loss, entropy = rso.rso_loss(logits, torch.tensor([0]), torch.tensor([0.0]), beta=1.0)  # no return: only H
    loss.backward()
    stepped = logits - 0.5 * logits.grad
    after = -(stepped.softmax(-1) * stepped.log_softmax(-1)).sum().item()
    assert after > entropy.item() + 0.05


def test_baseline_subtracts_the_mean_return_of_the_update():
    episodes = [
        {"turns": [{"cra": {"state": "a", "strategy": 1}}, {"cra": {"state": "b", "strategy": 2}}], "rewards": [0, 1]},
        {"turns": [{"cra": {"state": "c", "strategy": 3}}], "rewards": [0.5]},
    ]
    plain = rso.update_batch(episodes, rso.Args(gamma=1.0))
    assert [r["returns"] for r in plain] == [[1.0, 1.0], [0.5]]
    centred = rso.update_batch(episodes, rso.Args(gamma=1.0, baseline=True))
    assert [r["returns"] for r in centred] == [pytest.approx([1 / 6, 1 / 6]), pytest.approx([-1 / 3])]
    assert centred[0]["states"] == ["a", "b"] and centred[0]["actions"] == [1, 2]


# ------------------------------------------------------------------------------------ evaluation metrics


@pytest.mark.parametrize(
    "i_pre, i_post, i_true, prs",
    [
        (2, 3, 4, 0.5),  # 1 - (4 - 3) / (4 - 2)
        (2, 4, 4, 1.0),
        (2, 5, 4, 1.0),  # i_post above i_true is clipped to i_true
        (3, 1, 5, 0.0),  # 1 - 4 / 2 < 0 is clipped to 0
        (3, 4, 3, None),  # i_true == i_pre: left out of the mean
        (None, 4, 5, None),  # a missing score
    ],
)
def test_persuasiveness_edge_cases(i_pre, i_post, i_true, prs):
    assert rso.persuasiveness(i_pre, i_post, i_true) == (None if prs is None else pytest.approx(prs))


def trajectory(key, target, systems, retrieved, accepted, success):
    turns = [{"system": s, "retrieved": r, "cra": {"strategy": 0}} for s, r in zip(systems, retrieved)]
    return {"key": key, "target": target, "turns": turns, "accepted": accepted, "success": success}


def test_conversation_metrics_by_hand():
    trajectories = [
        trajectory("a", "Jaws (1975)", ["a b c"], [["Jaws (1975)", "Alien (1979)"]], True, True),
        trajectory("b", "Alien (1979)", ["a b d"], [["Jaws (1975)", "Dune (2021)", "Alien (1979)"]], False, False),
    ]
    judged = {
        "a": {"wi": 4, "i_pre": 2, "i_post": 3, "i_true": 4, "cred": 5},
        "b": {"wi": 2, "i_pre": 3, "i_post": 2, "i_true": 3, "cred": None},  # PRS excluded, Cred unscored
    }
    metrics = rso.conversation_metrics(trajectories, judged)
    assert metrics["dist2"] == pytest.approx(3 / 4)  # bigrams (a b) (b c) (a b) (b d): 3 distinct of 4
    assert metrics["sr"] == 0.5 and metrics["rec_sr"] == 0.5 and metrics["wi"] == 3.0
    assert metrics["prs"] == pytest.approx(0.5) and metrics["prs_scored"] == 1 and metrics["cred"] == 5.0
    assert metrics["recall@1"] == 0.5 and metrics["recall@5"] == 1.0


def test_strategy_by_progress_shares():
    one = {"turns": [{"cra": {"strategy": s}} for s in (0, 1, 1, 2)]}
    shares = rso.strategy_by_progress([one], bins=2)
    assert shares[0, 0] == shares[0, 1] == 0.5 and shares[1, 1] == shares[1, 2] == 0.5
    assert shares.sum(1).tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------------ strategies and data


def test_the_14_inspired_labels_map_onto_the_13_strategies():
    assert len(rso.NAMES) == 13 and len(rso.INSPIRED_LABELS) == 14
    assert set(rso.INSPIRED_LABELS.values()) == set(rso.NAMES)
    assert rso.INSPIRED_LABELS["preference_confirmation"] == "Rephrase Preference"
    with pytest.raises(DataError, match="unknown strategy label 'recommend'"):
        rso.strategy_index("recommend", "dev.tsv")


@needs_data
def test_label_mapping_on_the_real_dev_tsv():
    turns = rso.labelled_turns(DATA / "inspired" / "sweetpeach" / "dev.tsv")
    counts = Counter(rso.NAMES[t["label"]] for t in turns)
    assert counts == {
        "Credibility": 275,
        "No Strategy": 273,
        "Personal Opinion": 236,
        "Opinion Inquiry": 211,
        "Encouragement": 204,
        "Experience Inquiry": 156,
        "Acknowledgment": 134,
        "Rephrase Preference": 102,  # 22 rephrase_preference + 80 preference_confirmation
        "Similarity": 96,
        "Offer Help": 81,
        "Personal Experience": 44,
        "Self Modeling": 40,
        "Transparency": 8,
    }
    assert len({t["dialog"] for t in turns}) == 99 and turns[0]["text"] == "(no messages yet)"


def test_bundled_demo_labels_and_seeds():
    args = rso.Args()
    data = rso.load_data(args)
    labels = {rso.NAMES[e["label"]] for e in data.sft_train + data.sft_held_out}
    assert labels == set(rso.NAMES)  # every class appears in the bundled labels
    assert not {e["dialog"] for e in data.sft_train} & {e["dialog"] for e in data.sft_held_out}
    for seed in data.rl + data.test:
        assert seed.opening[-1]["role"] == "user" and seed.target.title in data.catalog.by_title
        assert not any(seed.target.title in m["content"] for m in seed.opening)
    assert len(data.test) == 4


def test_malformed_tsv_names_file_and_line(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("dialog_id\tspeaker\ttext\texpert_label\nd1\tRECOMMENDER\tHi\tno_strategy\nd1\tSEEKER\n")
    with pytest.raises(DataError, match=r"dev.tsv:3: row has 2 columns"):
        rso.labelled_turns(path)


def test_fact_retriever_returns_kg_facts_of_the_top_k():
    catalog = Catalog(load_demo_catalog())
    (entities,) = rso.fact_retriever(catalog, [[{"role": "user", "content": "dreams inside dreams heist"}]], [""], 3)
    assert len(entities) == 3 and entities[0]["entity"] in catalog.by_title
    assert "director: Christopher Nolan" in rso.kg_facts(catalog, "Inception (2010)")


# ------------------------------------------------------------------------------------ the rewarder


@pytest.mark.parametrize("text, score", [("4", 4), (" 5 stars", 5), ("**3**", 3), ("2.7", 2), ("15", None), ("7", None),
                                         ("Not bad", None), ("", None)])  # fmt: skip
def test_parse_score(text, score):
    assert rso.parse_score(text) == score


def test_rewarder_samples_k_scores_in_one_call_and_retries_malformed(scripted_llm):
    answers = iter(["5", "oops", "4", "1", "2", "3", "3", "3", "3"])
    llm = scripted_llm(lambda prompt: next(answers))
    stats = rso.ParseStats()
    scores = rso.sample_scores(llm, ["first", "second"], 4, 1.0, rso.Args(max_parse_tries=2), stats)
    assert scores == [[5, 4, 1, 3], [2, 3, 3, 3]]
    assert llm.usage.calls == 8 + 1  # n = 4 for both in one call, then only the missing sample re-asked
    assert stats.attempts == 9 and stats.retries == 1 and stats.failures == 0
    assert rso.reward_of([5, 4, 1, 3]) == pytest.approx((4 + 3 + 0 + 2) / 16)
    assert rso.reward_of([]) is None


def test_unparsable_judge_is_counted_not_fatal(scripted_llm):
    stats = rso.ParseStats()
    scores = rso.sample_scores(scripted_llm(lambda p: "I think so"), ["x"], 3, 1.0, rso.Args(max_parse_tries=2), stats)
    assert scores == [[]] and stats.failures == 3 and stats.retries == 3


def test_the_user_replies_on_the_last_turn_before_the_rewarder_scores_it(scripted_llm, tmp_path):
    from common.data import load_demo_tasks
    from common.tracking import RecordFile

    def judge(prompt):  # 5 when the judged state ends on the user's words, 1 when it ends on the system's
        history = prompt.split("Conversation:\n")[1].split("\n\nAnswer")[0]
        return "5" if history.splitlines()[-1].startswith("User:") else "1"

    task = load_demo_tasks()[0]
    ailo = rso.AILO(scripted_llm(lambda p: "Sounds good, I will watch it."), "movie", 16, 1)
    openings = {task.task_id: [{"role": "user", "content": "Hi, I want a movie for tonight."}]}
    env = rso.RewardedUser(ailo, scripted_llm(judge), rso.Args(reward_samples=2), openings, RecordFile(tmp_path / "r"))
    users, _ = env.start([task])
    (answer,) = env.step(users, ["How about this one?"], final=True)
    assert users[0].ended and answer.response  # the turn limit ends the episode, after the user's reply
    assert users[0].history[-1]["role"] == "user"
    assert env.rewards[task.task_id] == [{"reward": 1.0, "scores": [5, 5]}]


# ------------------------------------------------------------------------------------ it must learn: a bandit


@pytest.fixture(scope="module")
def planner_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder_path("minilm"))
    tokenizer.truncation_side = "left"
    return tokenizer


def play_bandit(tmp_path, monkeypatch, tokenizer, beta: float, updates: int, target: int = 5):
    """Episodes of one turn whose reward is 1 for the target strategy and 0 otherwise, sampled from the planner;
    one rso.planner_update per batch of 8. Returns the target's probability and the entropy after each update."""
    from transformers import BertConfig, BertForSequenceClassification, get_constant_schedule

    from common.distributed import start_training
    from common.run import Run

    monkeypatch.chdir(tmp_path)
    args = rso.Args(run_name=f"bandit{beta}", beta_ent=beta, episodes_per_update=8, planner_max_length=32)
    run = Run(args)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=13, hidden_dropout_prob=0.0)  # fmt: skip
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer, _ = start_training(run.accelerator, model, optimizer, get_constant_schedule(optimizer),
                                         tmp_path / f"b{beta}")  # fmt: skip
    generator, history = torch.Generator().manual_seed(0), []
    state = "User: I want a movie for tonight."
    for _ in range(updates):
        with torch.no_grad():
            probs = rso.planner_logits(model, tokenizer, [state], 32).softmax(-1)[0]
        actions = torch.multinomial(probs, 8, replacement=True, generator=generator).tolist()
        episodes = [{"turns": [{"cra": {"state": state, "strategy": a}}], "rewards": [float(a == target)]}
                    for a in actions]  # fmt: skip
        stats = rso.planner_update(run, args, model, tokenizer, optimizer, episodes)
        history.append((probs[target].item(), stats["entropy"]))
    with torch.no_grad():
        probs = rso.planner_logits(model, tokenizer, [state], 32).softmax(-1)[0]
    history.append((probs[target].item(), -(probs * probs.log()).sum().item()))
    return history


def test_bandit_moves_probability_to_the_rewarded_strategy(tmp_path, monkeypatch, planner_tokenizer):
    history = play_bandit(tmp_path, monkeypatch, planner_tokenizer, beta=0.01, updates=60)
    assert history[0][0] < 0.2  # near uniform at the start (1/13)
    reached = next((k for k, (p, _) in enumerate(history) if p > 0.8), None)
    assert reached is not None and reached <= 60, history[-1]
    assert history[-1][1] < history[0][1]  # the policy became more certain


def test_a_higher_entropy_weight_keeps_the_entropy_higher(tmp_path, monkeypatch, planner_tokenizer):
    low = play_bandit(tmp_path, monkeypatch, planner_tokenizer, beta=0.0, updates=40)
    high = play_bandit(tmp_path, monkeypatch, planner_tokenizer, beta=2.0, updates=40)
    assert high[-1][1] > low[-1][1] + 0.3
    assert high[-1][0] < low[-1][0]  # and spread the mass: less on the rewarded strategy
