"""common/judging.py and the judges that use it: an expected score is the probability of each allowed score written
in full (every token, either spelling), read in one batched pass; it is the mean of many sampled scores; Eq. 2 tests
the rating the user would write; reasons end where their JSON string ends; every judged pair counts in ECPO's win
rate."""

import math
import os

import pytest
import torch

import ailo_sim
import ecpo
import rso
from common.judging import expectation, expected_scores, json_string, mass_metrics, scores_in_answers
from common.llm import HFChat, LLMBackendError, prefilled_prompts, truncate_at_stop
from common.parsing import ParseStats
from tests.conftest import LLAMA3_LIKE_TEMPLATE, tiny_llama

TRAJECTORIES = [  # hand-written judge inputs: (A, B)
    (
        "User: I want a thriller.\nSystem: What era do you like?\nUser: The 90s.\nSystem: Try Se7en (1995).",
        "User: I want a thriller.\nSystem: Hello! How are you?\nUser: The 90s.\nSystem: I like turtles.",
    ),
    (
        "User: Something funny?\nSystem: Sure, Airplane! (1980) is a classic spoof.",
        "User: Something funny?\nSystem: Do you prefer slapstick or dry humour? Airplane! (1980) is slapstick.",
    ),
]
REASONS = ["A adapts to the request and B ignores it", "B asks what the user wants where A just answers"]


def judge_conversations() -> list[list[dict]]:
    return [[{"role": "user", "content": ecpo.JUDGE_PROMPT.format(domain="movie", a=a, b=b)}] for a, b in TRAJECTORIES]


def verdict_prefixes(space: bool) -> list[str]:
    return [f'{{"Flexibility": {{"Reason": "{r}", "Score":' + (" " if space else "") for r in REASONS]


def full_string_probs(model, tokenizer, text: str, values) -> dict[str, float]:
    """P(value written in full after ``text``), each spelling scored on its own: the log-likelihood of the whole
    text + spelling, tokenized at once and summed token by token, minus that of ``text`` alone. One right-padded
    batch (padding after a row's end changes none of its tokens); the tokens every row begins with add the same
    terms to each log-likelihood, so the sums start where the rows first differ."""
    strings = [text] + [text + s for v in values for s in (v, " " + v)]
    rows = [tokenizer(string, add_special_tokens=False)["input_ids"] for string in strings]
    width, start = max(map(len, rows)), len(os.path.commonprefix(rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():  # the logits of positions start - 1 ... width - 1
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=width - start + 1).logits
    logprobs = logits.double().log_softmax(-1)
    loglik = [sum(float(logprobs[k, j - start, r[j]]) for j in range(start, len(r))) for k, r in enumerate(rows)]
    spelled = iter(loglik[1:])
    return {v: math.exp(next(spelled) - loglik[0]) + math.exp(next(spelled) - loglik[0]) for v in values}


def check_verdicts_are_full_string_likelihoods(llm):
    conversations = judge_conversations()
    reads = {space: expected_scores(llm, conversations, ecpo.VERDICTS, verdict_prefixes(space)) for space in (0, 1)}
    for before, after in zip(reads[0], reads[1]):  # the pre-fill's space belongs to the score (the second read
        assert before.probs == pytest.approx(after.probs, rel=1e-5)  # comes from the prefix cache: rounding apart)
    for conv, prefix, read in zip(conversations, verdict_prefixes(False), reads[1]):
        (text,) = prefilled_prompts(llm.tokenizer, [conv], prefix)
        truth = full_string_probs(llm.model, llm.tokenizer, text, ecpo.VERDICTS)
        assert read.probs == pytest.approx(truth, abs=1e-4)
        value = sum(float(v) * p for v, p in truth.items()) / sum(truth.values())
        assert read.value == pytest.approx(value, abs=1e-4) and read.mass_outside == pytest.approx(
            1 - sum(truth.values()), abs=1e-4
        )
    return reads[1]


@pytest.fixture(scope="module")
def embedded_judge():
    from common.llm import make_llm

    return make_llm("hf:smollm2-135m", batch_size=4)


def test_a_verdict_is_its_full_string_likelihood_on_the_embedded_model(embedded_judge):
    # '"Score": -1' is '":' + ' -' + '1': the old reading weighed first tokens after '"Score": ' (E +0.5 where the
    # answers written in full give about +0.1) and after '"Score":' (E near -0.9)
    ids = embedded_judge.tokenizer('"Score": -1', add_special_tokens=False)["input_ids"]
    assert [embedded_judge.tokenizer.decode([i]) for i in ids][-2:] == [" -", "1"]
    reads = check_verdicts_are_full_string_likelihoods(embedded_judge)
    assert all(e.probs["-1"] > 0.001 for e in reads)


# Tokenizers shaped like Llama 3's and Qwen2's, built offline: their pre-tokenizer patterns (numbers split from
# punctuation, ' -' a token of its own; Llama 3 groups up to 3 digits, Qwen one) over a byte-level BPE trained on
# judge prompts and answers, with each one's chat template.
WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = WORDS + r"|\p{N}{1,3}" + REST
QWEN2_SPLIT = WORDS + r"|\p{N}" + REST
QWEN_LIKE_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def shaped_tokenizer(split: str, template: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [c[0]["content"] for c in judge_conversations()] + [a + b for a, b in TRAJECTORIES]
    for v in ecpo.VERDICTS:  # a merged '":-' too, so that a spelling can take the prompt's last token with it
        corpus += [f'{{"Flexibility": {{"Reason": "{r}", "Score": {v}}}, "Final Score":{v}}}' for r in REASONS] * 3
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>"
    )
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize("split, template", [(LLAMA3_SPLIT, LLAMA3_LIKE_TEMPLATE), (QWEN2_SPLIT, QWEN_LIKE_TEMPLATE)])
def test_a_verdict_is_its_full_string_likelihood_with_llama3_and_qwen_shaped_tokenizers(split, template):
    tokenizer = shaped_tokenizer(split, template)
    pieces = [tokenizer.decode([i]) for i in tokenizer('"Score": -1', add_special_tokens=False)["input_ids"]]
    assert pieces[-2:] == [" -", "1"] and tokenizer.decode(tokenizer('":-1')["input_ids"][:1]) == '":-'
    llm = HFChat(tiny_llama(tokenizer).eval(), tokenizer, batch_size=2)
    reads = check_verdicts_are_full_string_likelihoods(llm)
    assert all(e.value is not None for e in reads)


def test_scores_written_in_one_token_read_as_before(embedded_judge, tokenizer):
    # AILO's ratings after '"rating": "' and RSO's scores after 'Score: ' were read from the next-token distribution
    # over the digit tokens; a digit's spaced spelling is ' ' + digit, which that left out, and it holds little mass
    def before(conversations, prefix, values):
        out = []
        for conv, p in zip(conversations, prefix):
            ids = tokenizer(prefilled_prompts(tokenizer, [conv], p)[0], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                probs = embedded_judge.model(torch.tensor([ids])).logits[0, -1].softmax(-1)
            digit = {v: float(probs[tokenizer.convert_tokens_to_ids(v)]) for v in values}
            out.append(sum(float(v) * q for v, q in digit.items()) / sum(digit.values()))
        return out

    rewards = [[{"role": "user", "content": rso.REWARD_PROMPT.format(history=f"User: {a}\nSystem: {b}")}]
               for a, b in TRAJECTORIES]  # fmt: skip
    ratings = [[{"role": "user", "content": ailo_sim.EC_PROMPT.format(last=b, history=a, target="Se7en (1995)")}]
               for a, b in TRAJECTORIES]  # fmt: skip
    rating_prefix = ['{"reason": "' + r + '", "rating": "' for r in REASONS]
    for conversations, prefix, values in (
        (rewards, ["Score: "] * 2, rso.SCORE_VALUES),
        (ratings, rating_prefix, {str(d): float(d) for d in range(6)}),
    ):
        now = [e.value for e in expected_scores(embedded_judge, conversations, values, prefix)]
        assert now == pytest.approx(before(conversations, prefix, values), abs=1e-3)
    # Yes/No are one token in both spellings: exactly the one-pass softmax of before (tests/test_llm.py)


DIGIT_BIAS = {"1": 11.0, "2": 12.0, "3": 12.5, "4": 11.5, "5": 11.0, "0": 10.0}
VERDICT_BIAS = {"1": 11.0, "0": 10.5, "-": 9.5, " -": 11.0, " ": 10.5}


def biased_judge(tokenizer, bias: dict[str, float]):
    """A tiny Llama whose LM head carries a bias toward some tokens, a different one per token: most of its mass
    lies on the scores' spellings, and how it splits them depends on the prompt, as a judge's would."""
    model = tiny_llama(tokenizer)
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    head.weight = model.lm_head.weight
    with torch.no_grad():
        head.bias.zero_()
        for token, value in bias.items():
            head.bias[tokenizer(token, add_special_tokens=False)["input_ids"][0]] = value
    model.lm_head = head
    return model.eval()


def test_expectation_renormalizes_over_the_allowed_scores_and_reports_the_rest():
    read = expectation({"1": 0.1, "2": 0.0, "3": 0.3}, {"1": 1.0, "2": 2.0, "3": 3.0})
    assert read.value == pytest.approx((0.1 + 0.9) / 0.4) and read.mass_outside == pytest.approx(0.6)
    assert read.greedy == 3.0  # the score the judge writes
    assert expectation({"1": 0.0}, {"1": 1.0}).value is None and expectation({"1": 0.0}, {"1": 1.0}).greedy is None
    assert mass_metrics([0.1, 0.7, 0.4], "eval/judge") == {
        "eval/judge_mass_outside": pytest.approx(0.4),
        "eval/judge_mostly_elsewhere": 1,
    }


def test_the_expected_verdict_is_the_mean_of_many_sampled_answers_in_one_batched_pass(tokenizer):
    # answers sampled token by token after '"Score":' and read by the verdict their text begins with (" -1" and "-1"
    # alike): their mean is the expectation, and the share that begins with no verdict is the mass outside
    llm = HFChat(biased_judge(tokenizer, VERDICT_BIAS), tokenizer, batch_size=8)
    conversations = judge_conversations()
    forwards = []
    hook = llm.model.register_forward_hook(lambda *_: forwards.append(1))
    read = expected_scores(llm, conversations, ecpo.VERDICTS, verdict_prefixes(space=True))
    hook.remove()
    # the prompts run once; one pass more reads the second token after " ", " -" and "-" for both
    assert len(forwards) == 2 and llm.usage.calls == 2 and llm.usage.completion_tokens == 0
    draws, generator = 4000, torch.Generator().manual_seed(0)

    def sample(ids: list[int], count: int) -> list[int]:  # next tokens drawn from the model's softmax
        with torch.no_grad():
            probs = llm.model(torch.tensor([ids])).logits[0, -1].double().softmax(-1)
        return torch.multinomial(probs, count, replacement=True, generator=generator).tolist()

    spellings = [s for v in ecpo.VERDICTS for s in (v, " " + v)]
    for e, conv, prefix in zip(read, conversations, verdict_prefixes(space=False)):
        ids = tokenizer(prefilled_prompts(tokenizer, [conv], prefix)[0], add_special_tokens=False)["input_ids"]
        firsts, texts = sample(ids, draws), []
        for first in set(firsts):
            text, count = tokenizer.decode([first]), firsts.count(first)
            if any(s.startswith(text) and s != text for s in spellings):  # a verdict goes on after it: a second token
                texts += [text + tokenizer.decode([second]) for second in sample(ids + [first], count)]
            else:
                texts += [text] * count
        values = [float(v) for t in texts for v in ecpo.VERDICTS if t.startswith(v) or t.startswith(" " + v)]
        assert e.probs["-1"] > 0.05 and e.value == pytest.approx(sum(values) / len(values), abs=0.04)
        assert e.mass_outside == pytest.approx(1 - len(values) / draws, abs=0.03)


def test_rso_scores_read_in_one_batched_pass(tokenizer):
    llm = HFChat(biased_judge(tokenizer, DIGIT_BIAS), tokenizer, batch_size=8)
    prompts = [
        rso.REWARD_PROMPT.format(history="User: A thriller please.\nSystem: Try Se7en (1995)."),
        rso.REWARD_PROMPT.format(history="User: Something funny?\nSystem: I like turtles."),
    ]
    expected = rso.judge_scores(llm, prompts, 1, 1.0, rso.Args(judge_scoring="expected"), ParseStats())
    assert llm.usage.calls == 2 and all(1 <= r["score"] <= 5 for r in expected)
    assert expected[0]["score"] != expected[1]["score"]  # the prompt moves the expectation


def test_ailo_rates_with_the_most_probable_rating_and_logs_the_expectation(tokenizer):
    llm = HFChat(biased_judge(tokenizer, DIGIT_BIAS), tokenizer, batch_size=8)
    task = ailo_sim.load_tasks("demo", "", "train")[0]
    users = [ailo_sim.SimUser(task, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])]
    (ec,) = ailo_sim.AILO(llm, max_tokens=4, ec_scoring="expected").expectation_confirmation(users)
    assert ec.rating in range(6) and ec.expected != int(ec.expected) and 0 <= ec.mass_outside <= 1
    assert abs(ec.rating - ec.expected) < 2.5  # the most probable rating, with the expectation beside it


class RatingUser:
    """A local AILO backend that writes ``reason`` (cut at the stop strings it is given, as a backend cuts) and
    puts the rating distribution ``ratings`` after it."""

    can_prefill = True

    def __init__(self, reason: str, ratings: dict[str, float]):
        from common.llm import Usage

        self.reason, self.ratings, self.usage, self.prefixes = reason, ratings, Usage(), []

    def chat(self, conversations, n=1, temperature=0.0, max_tokens=256, stop=None, prefix=""):
        return [[truncate_at_stop(self.reason, stop).strip()] for _ in conversations]

    def choice_probs(self, conversations, choices=("Yes", "No"), prefix="", shared_prefix=False):
        self.prefixes += list(prefix)
        return [{c: self.ratings.get(c, 0.0) for c in choices} for _ in conversations]


def rate(reason: str, ratings: dict[str, float], max_turns: int = 2) -> list[dict]:
    def cra(keys, histories):
        return [ailo_sim.CRAReply("Ask[What era?]", record={"state": "s", "action": "Ask[What era?]"}) for _ in keys]

    simulator = ailo_sim.AILO(RatingUser(reason, ratings), max_parse_tries=1, ec_scoring="expected")
    simulator._content = lambda users, policies: (["The 90s."] * len(users), ["clean"] * len(users))
    simulator._ask = lambda prompts, parse, **kw: ([None] * len(prompts), [""] * len(prompts))
    task = ailo_sim.load_tasks("demo", "", "train")[0]
    return list(ailo_sim.run_episodes([task], cra=cra, simulator=simulator, max_turns=max_turns))


def test_eq2_tests_the_rating_the_user_would_write():
    # E[r] = 4.1 and the user would write 5: not short of expectation at lambda = 4; E[r] = 4.25 and it would write 4
    confident = rate("fine", {"5": 0.4, "4": 0.3, "3": 0.3})
    hesitant = rate("fine", {"4": 0.5, "5": 0.45, "0": 0.05})
    assert confident[0]["turns"][0]["ec_rating"] == 5 and hesitant[0]["turns"][0]["ec_rating"] == 4
    assert confident[0]["turns"][0]["ec_expected"] == pytest.approx(4.1)
    assert ecpo.rewritable_turns(confident, 4) == []
    ((turn,),) = [ecpo.rewritable_turns(hesitant, 4)]
    assert turn["rating"] == 4 and turn["expected"] == pytest.approx(4.25)
    pairs = ecpo.select_pairs([{**turn, "refinement": "Ask[x]", "status": "ok"}], 4)
    assert [p["rating"] for p in pairs] == [4]  # D_pre reads the same test
    assert ecpo.rewritable_turns(hesitant, 3) == []


def test_the_last_turn_is_not_rated_as_in_the_papers_released_code():
    (episode,) = rate("fine", {"3": 1.0}, max_turns=2)
    assert [t["ec_rating"] for t in episode["turns"]] == [3, None]
    assert [t["key"] for t in ecpo.rewritable_turns([episode], 4)] == [f"{episode['key']}#1"]


def test_a_reason_keeps_its_quoted_title_whole():
    answer = 'I liked \\"The Matrix\\" (1999) and its sequel", "rating": "4"}'
    (episode,) = rate(answer, {"4": 1.0})
    assert episode["turns"][0]["ec_reason"] == 'I liked "The Matrix" (1999) and its sequel'
    llm = RatingUser(answer, {"4": 1.0})
    ailo_sim.AILO(llm, ec_scoring="expected")._read_ec(["rate this"])
    assert llm.prefixes == ['{"reason": "I liked \\"The Matrix\\" (1999) and its sequel", "rating": "']
    # and in the judge's reasons, which its JSON goes on after
    judge = RatingUser('B names "The Matrix" without a reason", "Score": 1}, ', {"1": 1.0})
    ecpo.expected_judgements(judge, [[{"role": "user", "content": "judge"}]], max_tokens=64)
    assert judge.prefixes[0] == '{"Flexibility": {"Reason": "B names "The Matrix" without a reason", "Score": '


@pytest.mark.parametrize(
    "text, written, value",
    [
        ('says \\"The Matrix\\" rocks", ', 'says \\"The Matrix\\" rocks', 'says "The Matrix" rocks'),
        ('says "The Matrix" rocks", "rating": "4"}', 'says "The Matrix" rocks', 'says "The Matrix" rocks'),
        ('lists "Heat", "Alien" as picks", ', 'lists "Heat", "Alien" as picks', 'lists "Heat", "Alien" as picks'),
        ('ends here"}', "ends here", "ends here"),
        ('ends\n  here",\n', "ends here", "ends here"),
        ("never closes", "never closes", "never closes"),
        ('a \\\\"', "a \\\\", "a \\"),  # an escaped backslash, then the closing quote
    ],
)
def test_a_json_string_ends_at_its_closing_quote(text, written, value):
    assert json_string(text) == (written, value)


def test_every_judged_pair_counts_in_the_expected_win_rate(tokenizer):
    llm = HFChat(biased_judge(tokenizer, VERDICT_BIAS), tokenizer, batch_size=8)
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


def test_the_judge_template_shows_the_released_placeholders():
    # the paper's released judge writes "Score": -1 or 1 or 0 and "Reason": "{reason}", not a tie as the example
    shown = ecpo.JUDGE_PROMPT.format(domain="movie", a="A", b="B")
    assert shown.count('"Score": -1 or 1 or 0') == 3 and '"Final Score": -1 or 1 or 0}' in shown
    assert shown.count('"Reason": "{reason}"') == 3 and '"Score": 0' not in shown


def fake_endpoint(answers: list[list[tuple[str, dict[str, float]]]], monkeypatch):
    """An OpenAIChat whose server answers each request with the next of ``answers``: (token, {top token: p})."""
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


def tokenized(pieces: list[str], at: dict[int, dict[str, float]] | None = None) -> list[tuple[str, dict[str, float]]]:
    """``pieces`` as the answer's tokens, each with itself as the top token, but at the indices in ``at``."""
    return [(piece, (at or {}).get(k, {piece: 1.0})) for k, piece in enumerate(pieces)]


def test_an_api_judge_gives_its_distribution_where_its_own_answer_writes_the_score(monkeypatch):
    pieces = ["{", '"', "reason", '":', ' "', "vague", '",', ' "', "rating", '":', ' "', "3", '"}']
    answer = tokenized(pieces, {11: {"3": 0.5, "4": 0.3, "2": 0.1, "x": 0.1}})
    ec = fake_endpoint([answer], monkeypatch)
    ((reason, read),) = ailo_sim.AILO(ec, ec_scoring="expected")._read_ec(["rate this"])
    assert reason == "vague" and read.value == pytest.approx((1.5 + 1.2 + 0.2) / 0.9) and read.greedy == 3
    assert read.mass_outside == pytest.approx(0.1)

    # '"Score": 1' as '":' ' ' '1' and '"Score": -1' as '":' ' -' '1'; each verdict is read from '"Score":' on, and
    # one whose first token the answer did not write is unreadable: left out below 1% of the mass read, else refused
    flexibility = ["{", '"', "Flexibility", '":', " {", '"', "Reason", '":', ' "', "a", '",', ' "', "Score", '":']
    pieces = flexibility + [" ", "1", "},", ' "', "Final", " Score", '":', " -", "1", "}"]
    at = {
        14: {" ": 0.9, " -": 0.001, "1": 0.099},  # " -" begins " -1", whose "1" after it the answer never shows
        15: {"1": 0.6, "0": 0.4},
        21: {" -": 0.995, " ": 0.003},  # " " begins " 1" and " 0", unread here
        22: {"1": 0.8, "0": 0.2},
    }
    leads = [r'"Flexibility"\s*:\s*{[^{}]*"Score"\s*:\s*"?', r'"Final Score"\s*:\s*"?']
    judge = fake_endpoint([tokenized(pieces, at)], monkeypatch)
    ((text, (first, final)),) = scores_in_answers(judge, [[]], leads, ecpo.VERDICTS, 99)
    assert text == "".join(pieces)
    assert first.probs == pytest.approx({"1": 0.099 + 0.9 * 0.6, "0": 0.9 * 0.4, "-1": 0.0})
    assert first.mass_outside == pytest.approx(0.001) and first.greedy == 1
    assert final.probs == pytest.approx({"1": 0.0, "0": 0.0, "-1": 0.995 * 0.8}) and final.greedy == -1
    refused = tokenized(pieces, {**at, 14: {" ": 0.7, " -": 0.2, "1": 0.1}})
    with pytest.raises(LLMBackendError, match=r"cannot give the probability of '-1' \(begun with p = 0.2\)"):
        scores_in_answers(fake_endpoint([refused], monkeypatch), [[]], leads, ecpo.VERDICTS, 99)
    # an API rewarder's first answer token: "4" in one token, " 4" begun by a space it did not write
    rewarder = fake_endpoint([tokenized(["4"], {0: {"4": 0.7, "3": 0.295, " ": 0.005}})], monkeypatch)
    assert rewarder.choice_probs([[]], ("3", "4")) == [pytest.approx({"3": 0.295, "4": 0.7})]


def test_an_endpoint_without_logprobs_is_a_clear_error(monkeypatch):
    from types import SimpleNamespace

    from common.llm import OpenAIChat

    monkeypatch.setattr(
        OpenAIChat, "_request", lambda self, **kw: SimpleNamespace(choices=[SimpleNamespace(logprobs=None)])
    )
    with pytest.raises(LLMBackendError, match="returned no logprobs"):
        OpenAIChat("m", base_url="http://localhost:1/v1").answer_distributions([[{"role": "user", "content": "x"}]], 4)
