"""rso.py: the returns, the loss and its gradients by hand, PRS and Dist-2 on hand cases, the label mapping on the
real INSPIRED dev.tsv, the rewarder's batched sampling and retries, and a bandit that the planner's update must
learn."""

import math
from collections import Counter

import pytest
import torch

import rso
from common.catalog import Catalog, encoder_path
from common.formats import InputError, load_demo_catalog
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


def test_the_baselines_by_hand():
    returns = [[1.0, 0.4], [0.5]]  # two episodes of the update: turn 1 reached by both, turn 2 by the first alone
    none, _ = rso.subtract_baseline(returns, rso.Args(baseline="none"), {})
    assert none == returns  # the paper's Eq. 7
    batch, baselines = rso.subtract_baseline(returns, rso.Args(baseline="batch"), {})
    assert batch == [pytest.approx([0.25, 0.0]), pytest.approx([-0.25])] and baselines == [[0.75, 0.4], [0.75]]
    running = {}  # ema: the first sight of a turn index uses the update's own mean, later updates the running one
    first, _ = rso.subtract_baseline(returns, rso.Args(baseline="ema", baseline_decay=0.9), running)
    assert first == batch and running == {0: 0.75, 1: 0.4}
    second, baselines = rso.subtract_baseline([[2.0, 1.0, 0.5]], rso.Args(baseline="ema", baseline_decay=0.9), running)
    assert baselines == [[0.75, 0.4, 0.5]]  # read before this episode joins the mean
    assert second == [pytest.approx([1.25, 0.6, 0.0])]
    assert running == {0: pytest.approx(0.9 * 0.75 + 0.1 * 2.0), 1: pytest.approx(0.9 * 0.4 + 0.1), 2: 0.5}


def test_one_episode_per_update_learns_through_the_ema_baseline_only():
    """With one episode per update, the batch mean is the episode's own return (every advantage 0); the running
    mean compares it with the earlier episodes'."""
    running, args = {}, rso.Args(baseline="ema")
    rso.subtract_baseline([[0.5]], args, running)
    (advantage,), _ = rso.subtract_baseline([[0.75]], args, running)
    assert advantage == [pytest.approx(0.25)]
    (advantage,), _ = rso.subtract_baseline([[0.5]], args, running)
    assert advantage[0] < 0  # below the running mean (0.525)


def toy_episode(rewards, accepted):
    return {"turns": [{"reward": r} for r in rewards], "accepted": accepted}


def test_stalling_pays_under_eq_8_and_not_with_the_acceptance_credit():
    """Ten turns just short of acceptance against accepting at the first turn, T_max = 10, gamma = 0.99."""
    stall, accept = toy_episode([0.75] * 10, False), toy_episode([1.0], True)
    paper = rso.Args(max_turns=10, gamma=0.99, accept_credit="none")
    assert rso.episode_returns(stall, paper)[0] == pytest.approx(0.75 * (1 - 0.99**10) / 0.01)  # 7.17
    assert rso.episode_returns(accept, paper) == [1.0]  # Eq. 8 pays the planner to avoid acceptance
    credited = rso.Args(max_turns=10, gamma=0.99)
    assert credited.accept_credit == "remaining"  # the default
    assert rso.episode_returns(stall, credited) == rso.episode_returns(stall, paper)  # nothing accepted: unchanged
    assert rso.episode_returns(accept, credited) == [pytest.approx((1 - 0.99**10) / 0.01)]  # 9.56: the turns left at 1
    late = toy_episode([0.75] * 9 + [1.0], True)  # stalling nine turns, then accepting, earns less than accepting now
    assert rso.episode_returns(late, credited)[0] < rso.episode_returns(accept, credited)[0]
    two = rso.episode_returns(toy_episode([0.5, 0.9], True), credited)
    assert len(two) == 2 and two[1] == pytest.approx(0.9 + sum(0.99**i for i in range(1, 9)))


@pytest.mark.parametrize(
    "before, credit, returns",
    [  # R_1 of accepting (r = 1) at turn k = 1, 2, ..., 10 after k - 1 turns at ``before``; docs/rso.md's table
        (0.5, "none", [1.00, 1.49, 1.98, 2.46, 2.93, 3.40, 3.87, 4.33, 4.79, 5.24]),  # the figures
        (0.75, "none", [1.00, 1.74, 2.47, 3.20, 3.92, 4.63, 5.33, 6.03, 6.72, 7.40]),
        (0.75, "remaining", [9.56, 9.31, 9.06, 8.82, 8.58, 8.34, 8.10, 7.86, 7.63, 7.40]),
    ],
)
def test_the_returns_of_accepting_at_each_turn(before, credit, returns):
    args = rso.Args(max_turns=10, accept_credit=credit)
    found = [rso.episode_returns(toy_episode([before] * (k - 1) + [1.0], True), args)[0] for k in range(1, 11)]
    assert found == pytest.approx(returns, abs=0.005)
    stall = rso.episode_returns(toy_episode([0.75] * 10, False), args)[0]
    assert stall == pytest.approx(7.17, abs=0.005)  # never accepting, ten turns at a 4 (r = 0.75), either credit
    if before == 0.75:  # up to its acceptance the episode is the stalling one: accepting must pay more than stalling
        assert all(r > stall for r in found) == (credit == "remaining")


# ------------------------------------------------------------------------------------ evaluation metrics


@pytest.mark.parametrize(
    "i_pre, i_post, i_true, prs",
    [
        (2, 3, 4, 0.5),  # 1 - (4 - 3) / (4 - 2)
        (2, 4, 4, 1.0),
        (2, 5, 4, 1.0),  # i_post above i_true is clipped to i_true
        (3, 1, 5, 0.0),  # 1 - 4 / 2 < 0 is clipped to 0
        (3, 4, 3, None),  # i_true == i_pre: left out of the mean
        (4, 2, 3, None),  # i_true < i_pre: left out too (the formula would give 1 whatever the conversation did)
        (None, 4, 5, None),  # a missing score
    ],
)
def test_persuasiveness_edge_cases(i_pre, i_post, i_true, prs):
    assert rso.persuasiveness(i_pre, i_post, i_true) == (None if prs is None else pytest.approx(prs))


def evaluated_episode(key, target, systems, retrieved, accepted, success):
    turns = [
        {"system": s, "retrieved": r, "strategy": 0, "entropy": 2.0 + len(s) / 10} for s, r in zip(systems, retrieved)
    ]
    return {"key": key, "target": target, "turns": turns, "accepted": accepted, "success": success}


def test_conversation_metrics_by_hand():
    episodes = [
        evaluated_episode("a", "Jaws (1975)", ["a b c", "x"], [["Jaws (1975)", "Alien (1979)"], ["Dune (2021)"]], True,
                          True),
        evaluated_episode("b", "Alien (1979)", ["a b d a b"], [["Jaws (1975)", "Dune (2021)", "Alien (1979)"]], False,
                          False),
        evaluated_episode("c", "Dune (2021)", ["e f"], [["Jaws (1975)"]], False, False),
    ]  # fmt: skip
    judged = {
        "a": {"wi": 4, "i_pre": 2, "i_post": 3, "i_true": 4, "cred": 5},
        "b": {"wi": 2, "i_pre": 3, "i_post": 2, "i_true": 3, "cred": None},  # i_true == i_pre; Cred unscored
        "c": {"wi": 3, "i_pre": 4, "i_post": 4, "i_true": 2, "cred": 4},  # i_true < i_pre
    }
    metrics = rso.conversation_metrics(episodes, judged)
    # Dist-2 per response: "a b c" 2/2, "x" has no bigram (left out), "a b d a b" 3 distinct of 4, "e f" 1/1
    assert metrics["dist2"] == pytest.approx((1 + 3 / 4 + 1) / 3)
    # corpus: (a b) (b c) | (a b) (b d) (d a) (a b) | (e f): 5 distinct of 7
    assert metrics["dist2_corpus"] == pytest.approx(5 / 7)
    assert metrics["sr"] == pytest.approx(1 / 3) and metrics["rec_sr"] == pytest.approx(1 / 3)
    assert metrics["wi"] == 3.0 and metrics["cred"] == 4.5
    assert metrics["prs"] == pytest.approx(0.5) and metrics["prs_scored"] == 1
    assert metrics["prs_left_out"] == 2 and metrics["prs_unscored"] == 0
    # pooled over turns: a's target in its first list, b's in its top 5; last turn only: a's last list lacks it
    assert metrics["recall@1"] == pytest.approx(1 / 3) and metrics["recall@5"] == pytest.approx(2 / 3)
    assert metrics["recall@1_last"] == 0.0 and metrics["recall@5_last"] == pytest.approx(1 / 3)
    assert metrics["turns"] == pytest.approx(4 / 3)
    assert metrics["planner_entropy"] == pytest.approx(2.0 + (5 + 1 + 9 + 3) / 40)  # the mean over the 4 turns


def test_prs_counts_missing_scores_apart_from_the_left_out():
    rows = [evaluated_episode(k, "Jaws (1975)", ["hi there"], [[]], False, False) for k in "ab"]
    judged = {"a": {"i_pre": None, "i_post": 3, "i_true": 4}, "b": {"i_pre": 2, "i_post": 2, "i_true": 2}}
    metrics = rso.conversation_metrics(rows, judged)
    assert metrics["prs_unscored"] == 1 and metrics["prs_left_out"] == 1 and metrics["prs_scored"] == 0
    assert math.isnan(metrics["prs"])


def test_strategy_by_progress_shares():
    one = {"turns": [{"strategy": s} for s in (0, 1, 1, 2)]}
    shares = rso.strategy_by_progress([one], bins=2)
    assert shares[0, 0] == shares[0, 1] == 0.5 and shares[1, 1] == shares[1, 2] == 0.5
    assert shares.sum(1).tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------------ strategies and data


def test_the_14_inspired_labels_map_onto_the_13_strategies():
    assert len(rso.NAMES) == 13 and len(rso.INSPIRED_LABELS) == 14
    assert set(rso.INSPIRED_LABELS.values()) == set(rso.NAMES)
    assert rso.INSPIRED_LABELS["preference_confirmation"] == "Rephrase Preference"
    with pytest.raises(InputError, match="unknown strategy label 'recommend'"):
        rso.strategy_index("recommend", "dev.tsv")


@needs_data("inspired/sweetpeach/dev.tsv")
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


@needs_data("inspired")
@pytest.mark.parametrize("split, playable, dialogues", [("test", 84, 99), ("valid", 17, 20)])
def test_the_evaluated_count_is_printed_with_the_reason(split, playable, dialogues):
    """The paper's Tables are over 99 INSPIRED test dialogues; 15 of them name no film of the CFCRS KG after their
    opening (7 recommend only films the KG lacks, 1 only the KG film its opening named, 7 none), so there is no
    target to play: the run says how many it plays. On the valid split evaluation plays the SFT-held-out dev
    dialogues (20 at --sft-held-out 0.2)."""
    args = rso.Args(dataset="inspired", data_dir=str(DATA), eval_split=split, num_test=99)
    data = rso.load_data(args)
    assert len(data.evaluated) == playable and data.evaluable == (playable, dialogues)
    assert rso.evaluated_count(data, args).startswith(
        f"evaluation plays {playable} dialogues: {playable} of the {dialogues} inspired {split} dialogues"
    )


def test_a_short_last_update_is_refused_under_deepspeed_before_anything_loads(monkeypatch):
    args = rso.Args(rl_episodes=7, num_envs=2, stages=("rl",))
    rso.check_args(args, 2)  # data parallelism takes a short last update
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(InputError, match="multiple of --num-envs"):
        rso.check_args(args, 2)
    rso.check_args(rso.Args(rl_episodes=8, num_envs=2, stages=("rl",)), 2)


def test_bundled_demo_labels_and_tasks():
    args = rso.Args()
    data = rso.load_data(args)
    labels = {rso.NAMES[e["label"]] for e in data.sft_train + data.sft_held_out}
    assert labels == set(rso.NAMES)  # every class appears in the bundled labels
    assert not {e["dialog"] for e in data.sft_train} & {e["dialog"] for e in data.sft_held_out}
    for task in data.rl + data.evaluated:
        assert task.opening[-1]["role"] == "user" and task.target.title in data.catalog.by_title
        assert not any(task.target.title in m["content"] for m in task.opening)
    assert len(data.evaluated) == args.num_test  # the bundle holds enough test dialogues for the default


def test_malformed_tsv_names_file_and_line(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("dialog_id\tspeaker\ttext\texpert_label\nd1\tRECOMMENDER\tHi\tno_strategy\nd1\tSEEKER\n")
    with pytest.raises(InputError, match=r"dev.tsv:3: row has 2 columns"):
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
    assert rso.reward_of(sum([5, 4, 1, 3]) / 4) == pytest.approx((4 + 3 + 0 + 2) / 16)
    assert rso.reward_of(None) is None


def test_unparsable_judge_is_counted_not_fatal(scripted_llm):
    stats = rso.ParseStats()
    scores = rso.sample_scores(scripted_llm(lambda p: "I think so"), ["x"], 3, 1.0, rso.Args(max_parse_tries=2), stats)
    assert scores == [[]] and stats.failures == 3 and stats.retries == 3


# ------------------------------------------------------------------------------------ the rollout (Algorithm 1)


def scripted_roles(judge):
    """One scripted backend for every role of the rollout: AILO's policy, content and expectation confirmation as
    JSON, the rewarder by ``judge(the judged conversation)``, and a fixed line for the Reasoner and the Actor."""

    def respond(prompt):
        if "Rate the latest exchange" in prompt:
            return judge(prompt.split("Conversation:\n")[1].split("\n\nAnswer")[0])
        if "Choose how to respond next" in prompt:
            return '{"reason": "r", "policy": "respond_to_clarification"}'
        if "Write one or two sentences in your own voice" in prompt:
            return '{"reason": "r", "response": "I like films about space."}'
        if "expectation" in prompt.lower() or "Final rating" in prompt:
            return '{"reason": "fine", "rating": "4"}'
        return "How about a space adventure?"

    return respond


@pytest.fixture(scope="module")
def demo_catalog():
    return Catalog(load_demo_catalog())


def scripted_rollout(scripted_llm, catalog, judge, max_turns=3, episodes=2, greedy=False, roles=None):
    """The rollout generator on ``episodes`` demo tasks, every role played by one scripted backend; and the backend."""
    from common.formats import load_demo_tasks

    llm = scripted_llm(roles or scripted_roles(judge))
    args = rso.Args(max_turns=max_turns, reward_samples=2, judge_scoring="sampled")  # the script writes its scores
    tasks = [rso.Task(f"e{k}", [{"role": "user", "content": f"Hi, a movie for tonight? (e{k})"}], t.target, t.persona)
             for k, t in enumerate(load_demo_tasks()[:episodes])]  # fmt: skip
    roles = rso.Roles(llm, catalog, rso.AILO(llm, "movie", 16, 1), llm)
    played = rso.rollout(tasks, planner=None, tokenizer=None, roles=roles, args=args,
                         generator=torch.Generator().manual_seed(0), greedy=greedy)  # fmt: skip
    return played, llm


def play_scripted(scripted_llm, catalog, judge, max_turns=3, episodes=2, greedy=False, roles=None):
    played, llm = scripted_rollout(scripted_llm, catalog, judge, max_turns, episodes, greedy, roles)
    return list(played), llm


def test_the_rollout_stops_when_the_reward_passes_tau(scripted_llm, demo_catalog):
    """The rewarder scores 5 (r = 1 > tau) once the conversation has two system turns: every episode stops at its
    second turn, accepted; each turn carries s_t, h_t, C1_t, C2_t, a_t, the user's reply and r_t."""

    def judge(history):
        return "5" if history.count("System:") >= 2 else "3"

    episodes, _ = play_scripted(scripted_llm, demo_catalog, judge)
    assert [e["key"] for e in episodes] == ["e0", "e1"]
    for episode in episodes:
        assert episode["accepted"] and episode["end"] == "accepted" and episode["num_turns"] == 2
        assert [t["reward"] for t in episode["turns"]] == [0.5, 1.0] and episode["turns"][1]["scores"] == [5, 5]
        first, second = episode["turns"]
        assert first["state"] == f"User: Hi, a movie for tonight? ({episode['key']})"  # s_1: the opening, as read
        assert second["state"].endswith("User: I like films about space.")  # s_2 holds a_1 and the user's reply
        assert "System: How about a space adventure?" in second["state"]
        for turn in episode["turns"]:
            assert 0 <= turn["strategy"] < 13 and turn["strategy_name"] == rso.NAMES[turn["strategy"]]
            assert turn["logprob"] == pytest.approx(-math.log(13)) and turn["entropy"] == pytest.approx(math.log(13))
            assert turn["preference"] and len(turn["facts"]) == 5 and len(turn["retrieved"]) == 5
            assert turn["system"] == "How about a space adventure?" and turn["user"] == "I like films about space."


def test_an_episode_is_yielded_as_soon_as_it_ends(scripted_llm, demo_catalog):
    """The user of e1 accepts at the first turn (a 5), e0's never does (a 4): e1 comes out of the rollout, complete,
    while e0 is still on its first turn, so that a run killed later has it recorded (``Run.map``)."""
    played, _ = scripted_rollout(scripted_llm, demo_catalog, lambda history: "5" if "(e1)" in history else "4")
    first = next(played)
    assert first["key"] == "e1" and first["end"] == "accepted" and first["num_turns"] == 1
    (second,) = played  # the rest: e0, after its three turns
    assert second["key"] == "e0" and second["end"] == "turn limit" and len(second["turns"]) == 3


def test_the_user_replies_on_the_last_turn_before_the_rewarder_scores_it(scripted_llm, demo_catalog):
    def judge(history):  # 5 when the judged state ends on the user's words, 1 when it ends on the system's
        return "5" if history.splitlines()[-1].startswith("User:") else "1"

    (episode,), _ = play_scripted(scripted_llm, demo_catalog, judge, max_turns=1, episodes=1)
    assert episode["turns"][0]["reward"] == 1.0 and episode["turns"][0]["user"]


def test_the_turn_limit_ends_an_unaccepted_episode(scripted_llm, demo_catalog):
    episodes, llm = play_scripted(scripted_llm, demo_catalog, lambda history: "4", max_turns=3)
    assert len(episodes) == 2
    for episode in episodes:  # r = 0.75 is not above tau: never accepted
        assert not episode["accepted"] and episode["end"] == "turn limit" and episode["num_turns"] == 3
        assert [t["reward"] for t in episode["turns"]] == [0.75] * 3
    judged = [p for p in llm.prompts if "Rate the latest exchange" in p]
    assert len(judged) == 2 * 3  # one rewarder prompt per episode and turn, K = 2 samples each (n = 2)


def test_a_user_who_leaves_once_its_target_is_recommended_has_accepted(scripted_llm, demo_catalog):
    """AILO's user ends the conversation once its target has been recommended (an Efficiency-seeking one at once),
    saying goodbye; the judge, reading the goodbye, gives a 3. The episode is still the user's acceptance, scored as
    the judge scores acceptance (r = 1): its return, Conv-SR and Rec-SR all count the success."""
    from common.formats import load_demo_tasks

    target = load_demo_tasks()[0].target.title
    actor_calls, goodbyes = [], []

    def roles(prompt):
        if "Rate the latest exchange" in prompt:
            return "3"
        if "Choose how to respond next" in prompt:  # AILO's policy: leave once the system named the target
            last = prompt.split('The system just said: "')[1].split('"\n')[0]
            return '{"reason": "r", "policy": "%s"}' % (
                "end_conversation" if target in last else "respond_to_clarification"
            )
        if "Write one or two sentences in your own voice" in prompt:
            if "End the conversation politely" in prompt:
                goodbyes.append(prompt)
                return '{"reason": "r", "response": "Thanks, that one it is. Bye!"}'
            return '{"reason": "r", "response": "I like films about space."}'
        if "expectation" in prompt.lower() or "Final rating" in prompt:
            return '{"reason": "fine", "rating": "4"}'
        if "Write your next message" in prompt:  # the Actor: a question, then the target
            actor_calls.append(prompt)
            return "What do you like?" if len(actor_calls) == 1 else f"You should watch {target}."
        return "The user wants a movie."

    (episode,), _ = play_scripted(scripted_llm, demo_catalog, None, max_turns=3, episodes=1, roles=roles)
    assert [t["user_policy"] for t in episode["turns"]] == ["respond_to_clarification", "end_conversation"]
    assert episode["end"] == "left with its target" and episode["accepted"] and episode["success"]
    assert [t["score"] for t in episode["turns"]] == [3, 3]  # the judge's, as it gave them
    assert [t["reward"] for t in episode["turns"]] == [0.5, 1.0]  # the goodbye scored as the judge's 5
    args = rso.Args(max_turns=3)
    assert rso.episode_returns(episode, args) == pytest.approx([0.5 + 0.99 * (1 + 0.99), 1 + 0.99])  # accepted
    metrics = rso.conversation_metrics([episode], {})
    assert metrics["sr"] == metrics["rec_sr"] == 1.0
    assert "say that you will take it" in goodbyes[0]  # the goodbye says whether the user takes what it was offered


def test_the_greedy_random_planner_plays_every_strategy_not_the_first(scripted_llm, demo_catalog):
    """The argmax of the uniform distribution was always index 0 (Credibility): ties are broken at random."""
    episodes, _ = play_scripted(scripted_llm, demo_catalog, lambda history: "4", episodes=4, greedy=True)
    strategies = [t["strategy"] for e in episodes for t in e["turns"]]
    assert len(strategies) == 12 and len(set(strategies)) >= 6  # 12 draws, uniform over 13
    generator = torch.Generator().manual_seed(0)
    peaked = torch.tensor([[0.1, 0.7, 0.2] + [0.0] * 10] * 50)
    assert rso.most_likely(peaked, generator).tolist() == [1] * 50  # a planner's most likely strategy, always


# ------------------------------------------------------------------------------------ PRS


def test_the_intention_judges_know_the_users_taste_on_every_dataset(demo_catalog):
    """INSPIRED's and ReDial's personas have no interests: the judges of i_pre, i_true and i_post are told the
    hidden target's features (not its title), the taste the simulated user played."""
    from common.formats import Persona

    target, other = demo_catalog.by_title["Inception (2010)"], demo_catalog.by_title["Groundhog Day (1993)"]
    persona = Persona("u1", "Efficiency-seeking user who answers in a word or two.")  # no interests
    task = rso.Task("d1", [{"role": "user", "content": "Hi, a movie for tonight?"}], target, persona)
    episode = {"key": "d1", "target": target.title, "turns": [
        {"system": f"Try {other.title}, a fine comedy.", "user": "Maybe.", "retrieved": [other.title]}]}  # fmt: skip
    prompts = rso.judge_prompts(episode, task, demo_catalog)
    assert prompts["item"] == other.title  # the recommended movie is what the intentions are about
    for name in ("i_pre", "i_true", "i_post"):
        assert "director: Christopher Nolan" in prompts[name] and "genre: sci-fi" in prompts[name], prompts[name]
        assert "Inception" not in prompts[name]  # the target's features, never its name
    assert "director: Harold Ramis" in prompts["i_true"]  # the recommended movie's full card


class IntentionJudge:
    """An evaluator read by expected scoring: P(1-5) per prompt from ``probs(prompt)``."""

    can_prefill = True

    def __init__(self, probs):
        from common.llm import Usage

        self.probs, self.usage = probs, Usage()

    def choice_probs(self, conversations, choices, prefix=""):
        return [self.probs(conversation[-1]["content"]) for conversation in conversations]


def test_prs_compares_the_scores_the_judge_writes(tmp_path, monkeypatch, demo_catalog):
    """Expected scores are continuous: i_pre 3.40, i_post 3.44 and i_true 3.45 gave PRS 0.8 on differences of 0.01.
    PRS reads the integer each judge writes (its most probable score), so this dialogue ties (3, 3, 3) and is left
    out, as in the paper; the other (2, 3, 4) scores 0.5 where its expectations (2.4, 2.6, 3.6) gave 0.17."""
    from common.formats import Persona
    from common.run import Run

    monkeypatch.chdir(tmp_path)
    args = rso.Args(run_name="prs")
    run = Run(args)
    persona = Persona("u1", "Efficiency-seeking user.")
    tasks = [rso.Task(key, [{"role": "user", "content": f"{key}: a movie for tonight?"}],
                      demo_catalog.by_title["Inception (2010)"], persona) for key in ("tied", "apart")]  # fmt: skip
    episodes = [{"key": task.key, "target": task.target.title, "accepted": False, "success": False, "turns": [
        {"system": "Try Inception (2010).", "user": "Sounds good.", "retrieved": [], "strategy": 0, "entropy": 2.0}]}
        for task in tasks]  # fmt: skip
    evidence = {"i_pre": "All you know about the movie is its title", "i_true": "Here is everything about the movie",
                "i_post": "Then you had this conversation"}  # fmt: skip
    spread = {("tied", "i_pre"): {"3": 0.6, "4": 0.4}, ("tied", "i_post"): {"3": 0.56, "4": 0.44},
              ("tied", "i_true"): {"3": 0.55, "4": 0.45}, ("apart", "i_pre"): {"2": 0.6, "3": 0.4},
              ("apart", "i_post"): {"3": 0.6, "2": 0.4}, ("apart", "i_true"): {"4": 0.6, "3": 0.4}}  # fmt: skip

    def probs(prompt):
        for (key, name), distribution in spread.items():
            if f"{key}: a movie" in prompt and evidence[name] in prompt:
                return distribution
        return {"5": 1.0}  # WI and Cred

    data = rso.Data([], [], [], tasks, demo_catalog)
    judged = rso.judge_conversations(run, args, data, evaluator=IntentionJudge(probs), episodes=episodes, name="rl")
    assert [judged["tied"][f] for f in ("i_pre", "i_true", "i_post")] == [3, 3, 3]
    assert [judged["apart"][f] for f in ("i_pre", "i_true", "i_post")] == [2, 4, 3]
    assert judged["tied"]["intentions_read"]["i_pre"] == pytest.approx(3.4)  # the expectations, kept
    assert judged["tied"]["wi"] == 5.0
    metrics = rso.conversation_metrics(episodes, judged)
    assert metrics["prs"] == pytest.approx(0.5) and metrics["prs_scored"] == 1 and metrics["prs_left_out"] == 1


# ------------------------------------------------------------------------------------ it must learn


@pytest.fixture
def one_thread():
    """A tiny planner's passes are too small to share between threads: on a busy CPU two threads mostly wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planner_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder_path("minilm"))
    tokenizer.truncation_side = "left"
    return tokenizer


STATE = "User: Hi! I'm looking for a movie to watch tonight, something fun."


def train_planner(tmp_path, monkeypatch, tokenizer, args, updates, play, seed=0):
    """A small random planner (a 1-layer BERT) trained by rso.planner_update under rso.reinforce's optimizer and
    linear decay: each update steps on the episodes ``play(planner, generator)`` plays with the current planner.
    Returns pi(. | STATE) before each update and after the last, and the updates' statistics."""
    from transformers import BertConfig, BertForSequenceClassification, get_linear_schedule_with_warmup

    from common.checkpoints import resume_and_prepare
    from common.run import Run

    monkeypatch.chdir(tmp_path)
    args.run_name, args.planner_max_length = f"planner_{seed}_{args.beta_ent}_{args.baseline}_{args.max_turns}", 64
    run = Run(args)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=13, hidden_dropout_prob=0.0,
                        max_position_embeddings=64)  # fmt: skip
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.rl_lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, updates)
    model, optimizer, _ = resume_and_prepare(run.accelerator, model, optimizer, scheduler, run.dir / "rl")
    generator, running, history, stats = torch.Generator().manual_seed(seed), {}, [], []
    for _ in range(updates):
        history.append(rso.strategy_distribution(model, tokenizer, [STATE], 64)[0])
        episodes = play(model, generator)
        metrics, _ = rso.planner_update(run, args, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                        episodes=episodes, running=running)  # fmt: skip
        stats.append(metrics)
        scheduler.step()
    history.append(rso.strategy_distribution(model, tokenizer, [STATE], 64)[0])
    return history, stats


def play_bandit(tmp_path, monkeypatch, tokenizer, args, updates, reward, seed=0):
    """Episodes of one turn from one state, rewarded by ``reward(strategy)``, --num-envs of them per update."""

    def play(model, generator):
        probs = rso.strategy_distribution(model, tokenizer, [STATE], 64)[0]
        actions = torch.multinomial(probs, args.num_envs, replacement=True, generator=generator).tolist()
        return [{"turns": [{"state": STATE, "strategy": a, "reward": reward(a)}], "accepted": False} for a in actions]

    return train_planner(tmp_path, monkeypatch, tokenizer, args, updates, play, seed)


TARGET = 5  # Offer Help


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_update_learns_a_judge_like_reward_at_the_papers_settings(
    tmp_path, monkeypatch, planner_tokenizer, one_thread, seed
):
    """rso.Args' defaults (lr 1e-4, AdamW with linear decay, the default clipping and baseline, one episode per
    update: the paper's regime) and a judge's positive rewards: 0.75 (a score of 4) for one strategy, 0.5 (a 3) for the
    others. The rewarded strategy must become the planner's most likely one within 100 updates and stay so. With
    the old defaults (clipping at 1.0, no baseline) it did not within 200 updates for any of 5 seeds."""
    args = rso.Args()
    assert args.rl_lr == 1e-4 and args.num_envs == 1  # the paper's learning rate and one episode per update
    history, stats = play_bandit(tmp_path, monkeypatch, planner_tokenizer, args, 100, lambda a: 0.75 if a == TARGET
                                 else 0.5, seed)  # fmt: skip
    assert int(history[0].argmax()) != TARGET and history[0][TARGET] < 0.08  # near uniform (1/13), not the argmax
    reached = next(k for k, probs in enumerate(history) if int(probs.argmax()) == TARGET)
    assert all(int(probs.argmax()) == TARGET for probs in history[reached:]), f"lost after update {reached}"
    assert history[-1][TARGET] > history[0][TARGET]
    assert all(math.isfinite(s["train/grad_norm"]) and s["train/grad_norm"] > 0 for s in stats[1:])  # before clipping


ACCEPTING = 5  # Offer Help


def conversation_state(turn: int) -> str:
    """s_t as the planner reads it after t - 1 turns of a conversation that has not ended."""
    return STATE + "\nSystem: Here is one more idea for you.\nUser: Hmm, tell me more." * (turn - 1)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_whole_episodes_teach_the_planner_to_make_the_user_accept(
    tmp_path, monkeypatch, planner_tokenizer, one_thread, seed
):
    """Whole episodes at the paper's settings (rso.Args' defaults with T_max = 10: lr 1e-4, gamma 0.99, tau 0.75,
    one episode per update): one strategy makes the user accept at once (a 5, r = 1, the episode ends), every other
    keeps the user interested (a 4, r = 0.75) until the turn limit. The accepting strategy must become the planner's
    most likely one within 100 episodes and stay so. Under Eq. 8 as printed (--accept-credit none, the old default)
    stalling returns 7.17 and accepting at once 1.0: it never did, within 400 episodes for any of seeds 1 to 8."""
    args = rso.Args(max_turns=10)
    assert (args.rl_lr, args.gamma, args.tau, args.num_envs, args.max_turns) == (1e-4, 0.99, 0.75, 1, 10)

    def play(model, generator):
        turns = []
        for t in range(1, args.max_turns + 1):
            state = conversation_state(t)
            probs = rso.strategy_distribution(model, planner_tokenizer, [state], 64)[0]
            strategy = int(torch.multinomial(probs, 1, generator=generator))
            turns.append({"state": state, "strategy": strategy, "reward": 1.0 if strategy == ACCEPTING else 0.75})
            if turns[-1]["reward"] > args.tau:  # the user accepts: the episode ends
                break
        return [{"turns": turns, "accepted": turns[-1]["reward"] > args.tau}]

    history, stats = train_planner(tmp_path, monkeypatch, planner_tokenizer, args, 100, play, seed)
    assert int(history[0].argmax()) != ACCEPTING and history[0][ACCEPTING] < 0.08  # near uniform (1/13)
    reached = next((k for k, probs in enumerate(history) if int(probs.argmax()) == ACCEPTING), None)
    assert reached is not None, f"never the argmax: p {history[0][ACCEPTING]:.4f} -> {history[-1][ACCEPTING]:.4f}"
    assert all(int(probs.argmax()) == ACCEPTING for probs in history[reached:]), f"lost after episode {reached}"
    assert history[-1][ACCEPTING] > history[0][ACCEPTING]


def test_a_higher_entropy_weight_keeps_the_entropy_higher(tmp_path, monkeypatch, planner_tokenizer, one_thread):
    def entropy(probs):
        return -(probs * probs.log()).sum().item()

    def reward(a):
        return float(a == TARGET)

    low, _ = play_bandit(tmp_path, monkeypatch, planner_tokenizer, rso.Args(num_envs=8, beta_ent=0.0, rl_lr=3e-3), 40,
                         reward)  # fmt: skip
    high, _ = play_bandit(tmp_path, monkeypatch, planner_tokenizer, rso.Args(num_envs=8, beta_ent=2.0, rl_lr=3e-3),
                          40, reward)  # fmt: skip
    assert entropy(high[-1]) > entropy(low[-1]) + 0.3
    assert high[-1][TARGET] < low[-1][TARGET]  # and spread the mass: less on the rewarded strategy


# ------------------------------------------------------------------------------------ the paper's settings

RL_UPDATE = ("rl_lr", "gamma", "tau", "num_envs", "beta_ent", "baseline", "baseline_decay", "accept_credit",
             "rl_max_grad_norm")  # fmt: skip


def test_the_paper_preset_names_every_field_and_the_recipe_selects_it():
    from common.presets import check_preset, markdown_table, parse_args
    from tests.conftest import ROOT

    check_preset(rso.Args, rso.PAPER)
    assert markdown_table(rso.PAPER) in (ROOT / "docs" / "rso.md").read_text()  # the docs show the preset itself
    args = parse_args(rso.Args, rso.PRESETS, ["paper", "--dataset", "redial", "--num-envs", "16"])
    paper_values = (args.sft_lr, args.sft_epochs, args.rl_episodes, args.max_turns, args.judge_scoring, args.num_test)
    assert paper_values == (6e-6, 10, 1000, 10, "sampled", 99)
    assert (args.dataset, args.num_envs, args.accept_credit, args.sft_labels) == ("redial", 16, "remaining", "inspired")
    assert parse_args(rso.Args, rso.PRESETS, ["--max-turns", "4"]) == rso.Args(max_turns=4)  # no preset: the demo's
    # the learning tests above run rso.Args' RL update at --max-turns 10: the preset's, value for value
    paper = parse_args(rso.Args, rso.PRESETS, ["paper"])
    assert {name: getattr(paper, name) for name in RL_UPDATE} == {name: getattr(rso.Args(), name) for name in RL_UPDATE}
