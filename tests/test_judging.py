"""common/judging.py and the judges that use it: an expected score is the mean of many sampled ones, read in one
forward pass; every judged pair counts in ECPO's win rate."""

import pytest
import torch

import ailo_sim
import ecpo
import rso
from common.judging import expectation, mass_metrics
from common.llm import HFChat, choice_token_ids
from common.parsing import ParseStats
from tests.conftest import tiny_llama

DIGIT_BIAS = {"1": 11.0, "2": 12.0, "3": 12.5, "4": 11.5, "5": 11.0, "0": 10.0}


def digit_judge(tokenizer):
    """A tiny Llama whose LM head carries a bias toward the digit tokens, a different one per digit: most of its
    mass lies on the scores, and how it splits them depends on the prompt, as a judge's would."""
    model = tiny_llama(tokenizer)
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    head.weight = model.lm_head.weight
    with torch.no_grad():
        head.bias.zero_()
        for digit, bias in DIGIT_BIAS.items():
            head.bias[tokenizer.convert_tokens_to_ids(digit)] = bias
    model.lm_head = head
    return model.eval()


def test_a_digit_choice_does_not_count_the_bare_space_that_begins_every_digit(tokenizer):
    # SmolLM2 writes " 4" as " " + "4": the space token began the spaced spelling of every digit, so choice_probs
    # added P(" ") to each of the scores 0-5
    assert choice_token_ids(tokenizer, "4") == [tokenizer.convert_tokens_to_ids("4")]
    assert len(choice_token_ids(tokenizer, "Yes")) == 2  # " Yes" is one token: both spellings still count


def test_expectation_renormalizes_over_the_allowed_scores_and_reports_the_rest():
    read = expectation({"1": 0.1, "2": 0.0, "3": 0.3}, {"1": 1.0, "2": 2.0, "3": 3.0})
    assert read.value == pytest.approx((0.1 + 0.9) / 0.4) and read.mass_outside == pytest.approx(0.6)
    assert expectation({"1": 0.0}, {"1": 1.0}).value is None
    assert mass_metrics([0.1, 0.7, 0.4], "eval/judge") == {
        "eval/judge_mass_outside": pytest.approx(0.4),
        "eval/judge_mostly_elsewhere": 1,
    }


def test_the_expected_score_is_the_mean_of_many_sampled_scores_in_one_forward_pass(tokenizer):
    llm = HFChat(digit_judge(tokenizer), tokenizer, batch_size=8)
    prompts = [
        rso.REWARD_PROMPT.format(history="User: A thriller please.\nSystem: Try Se7en (1995)."),
        rso.REWARD_PROMPT.format(history="User: Something funny?\nSystem: I like turtles."),
        rso.WI_PROMPT.format(history="User: Hi.\nSystem: Hello."),
    ]
    forwards = []
    hook = llm.model.register_forward_hook(lambda *_: forwards.append(1))
    expected = rso.judge_scores(llm, prompts, 1, 1.0, rso.Args(judge_scoring="expected"), ParseStats())
    hook.remove()
    assert len(forwards) == 1 and llm.usage.calls == 3 and llm.usage.completion_tokens == 0  # one batched pass
    draws, stats = 2500, ParseStats()
    sampled_args = rso.Args(judge_scoring="sampled", judge_max_tokens=1, max_parse_tries=1)
    sampled = rso.judge_scores(llm, prompts, draws, 1.0, sampled_args, stats)
    for read, drawn in zip(expected, sampled):
        # the draws' mean over those that gave a score 1-5 (standard error ~0.025 here) and the share that gave none
        assert read["score"] == pytest.approx(drawn["score"], abs=0.08)
        assert read["mass_outside"] == pytest.approx(1 - len(drawn["scores"]) / draws, abs=0.03)
    assert {round(r["score"], 6) for r in expected} != {expected[0]["score"]}  # the prompt moves the expectation


def test_ailo_reads_every_ec_rating_as_an_expectation_after_its_reason(tokenizer):
    llm = HFChat(digit_judge(tokenizer), tokenizer, batch_size=8)
    task = ailo_sim.load_tasks("demo", "", "train")[0]
    users = [ailo_sim.SimUser(task, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])]
    ((ec, outside),) = ailo_sim.AILO(llm, max_tokens=4, ec_scoring="expected").expectation_confirmation(users)
    reason, rating = ec
    assert 0 <= rating <= 5 and rating != int(rating) and 0 <= outside <= 1  # not floored; the mass reported


def test_every_judged_pair_counts_in_the_expected_win_rate(tokenizer):
    llm = HFChat(digit_judge(tokenizer), tokenizer, batch_size=8)
    conversations = [[{"role": "user", "content": ecpo.JUDGE_PROMPT.format(domain="movie", a="A: hi", b="B: yo")}]]
    ((scores, outside),) = ecpo.expected_judgements(llm, conversations, max_tokens=4)
    assert set(scores) == set(ecpo.JUDGE_DIMENSIONS.values()) and all(-1 <= v <= 1 for v in scores.values())
    assert set(outside) == set(scores)
    judgements = [
        {"label": "eval", "order": "ab", "scores": {"final": 0.5}, "mass_outside": {"final": 0.2}},
        {"label": "eval", "order": "ba", "scores": {"final": -0.25}, "mass_outside": {"final": 0.6}},
    ]
    metrics = ecpo.win_rates(judgements, "eval", "eval")
    assert metrics["eval/wr"] == pytest.approx(((1 + 0.5) / 2 + (1 + 0.25) / 2) / 2)
    assert metrics["eval/judgements"] == 2 and metrics["eval/judge_mostly_elsewhere"] == 1
    assert ecpo.win_rate([1, 0], [-1]) == pytest.approx((1 + 0.5 + 1) / 3)  # integer verdicts: as before


def test_an_expected_rating_counts_by_its_integer_part_against_lambda():
    ratings = [4.3, 5.0, 3.9, 4]  # three expectations and a parsed integer
    turns = [
        {"turn": k, "ec_rating": r, "ec_reason": "ok", "cra": {"state": "s", "action": "Ask[more?]"}}
        for k, r in enumerate(ratings)
    ]
    trajectories = [{"key": "task", "turns": turns}]
    assert [t["rating"] for t in ecpo.rewritable_turns(trajectories, 4)] == [4.3, 3.9, 4]  # not a confident 5
    assert [t["rating"] for t in ecpo.rewritable_turns(trajectories, 3)] == [3.9]
    rewrites = [{"key": f"t{k}", "state": "s", "refinement": "Ask[x]", "action": "Ask[y]", "rating": r, "conf": "c",
                 "status": "ok"} for k, r in enumerate(ratings)]  # fmt: skip
    assert [p["rating"] for p in ecpo.select_pairs(rewrites, 4)] == [4.3, 3.9, 4]  # D_pre reads the same test


def fake_endpoint(answers: list[list[tuple[str, dict[str, float]]]], monkeypatch):
    """An OpenAIChat whose server answers each request with the next of ``answers``: (token, {top token: p})."""
    import math
    from types import SimpleNamespace

    from common.llm import OpenAIChat

    replies = iter(answers)

    def request(self, **kwargs):
        assert kwargs["logprobs"] and kwargs["top_logprobs"] == 20 and kwargs["temperature"] == 0.0
        content = [
            SimpleNamespace(
                token=token, top_logprobs=[SimpleNamespace(token=t, logprob=math.log(p)) for t, p in top.items()]
            )
            for token, top in next(replies)
        ]
        return SimpleNamespace(choices=[SimpleNamespace(logprobs=SimpleNamespace(content=content))])

    monkeypatch.setattr(OpenAIChat, "_request", request)
    return OpenAIChat("judge", base_url="http://localhost:1/v1", max_workers=1)


def spelled(text: str, at: dict[int, dict[str, float]] | None = None) -> list[tuple[str, dict[str, float]]]:
    """``text`` as one token per character, each with itself as the top token, but at the indices in ``at``."""
    return [(c, (at or {}).get(k, {c: 1.0})) for k, c in enumerate(text)]


def test_an_api_judge_gives_its_distribution_where_its_own_answer_writes_the_score(monkeypatch):
    answer = '{"reason": "vague", "rating": "3"}'
    digit = answer.index("3")
    ec = fake_endpoint([spelled(answer, {digit: {"3": 0.5, "4": 0.3, " 2": 0.1, "x": 0.1}})], monkeypatch)
    ((reason, read),) = ailo_sim.AILO(ec, ec_scoring="expected")._read_ec(["rate this"])
    assert reason == "vague" and read.value == pytest.approx((1.5 + 1.2 + 0.2) / 0.9)
    assert read.mass_outside == pytest.approx(0.1)

    judgement = '{"Flexibility": {"Reason": "a", "Score": 1}, "Coherence": {"Reason": "b", "Score": -1}, ' + (
        '"User Guidance": {"Reason": "c", "Score": 0}, "Final Score": 1}'
    )
    at = {
        judgement.index("1}"): {"1": 0.6, "0": 0.4},
        judgement.index("-1}"): {"-": 0.7, "1": 0.1, "0": 0.2},
        judgement.index("0}"): {"0": 1.0},
        judgement.rindex("1}"): {"1": 0.5, " -": 0.25, "x": 0.25},
    }
    judge = fake_endpoint([spelled(judgement, at)], monkeypatch)
    ((scores, outside),) = ecpo.expected_judgements(judge, [[{"role": "user", "content": "judge"}]], max_tokens=99)
    assert scores == pytest.approx({"flexibility": 0.6, "coherence": -0.6, "user_guidance": 0.0, "final": 0.25 / 0.75})
    assert outside["final"] == pytest.approx(0.25) and outside["flexibility"] == pytest.approx(0.0)


def test_an_endpoint_without_logprobs_is_a_clear_error(monkeypatch):
    from types import SimpleNamespace

    from common.llm import LLMBackendError, OpenAIChat

    monkeypatch.setattr(
        OpenAIChat, "_request", lambda self, **kw: SimpleNamespace(choices=[SimpleNamespace(logprobs=None)])
    )
    with pytest.raises(LLMBackendError, match="returned no logprobs"):
        OpenAIChat("m", base_url="http://localhost:1/v1").answer_distributions([[{"role": "user", "content": "x"}]], 4)
