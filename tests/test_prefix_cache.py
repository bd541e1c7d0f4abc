"""The hf backend's prefix cache (common/llm.py, ``PrefixCache``): a later prompt runs only the tokens that no earlier
prompt of the same weights began with, and reads exactly what it would have read whole."""

import copy

import pytest
import torch

from common.llm import (
    HFChat,
    PrefixCache,
    clear_prefix_caches,
    prefix_cache_capacity,
    prefix_cache_of,
    prompt_ids,
    release_models,
)
from common.models import ModelSpecError, add_lora

DIALOGUE = "User: I want a thriller with a twist.\nSystem: Try Se7en (1995), a dark detective story.\nUser: Seen it.\n"
LATER = DIALOGUE + "System: Then Vertigo (1958), older and stranger.\nUser: Nice, I love Hitchcock.\n"
QUESTIONS = ("Rate the latest exchange.", "What does the user want now?", "Write the next message.")


def judged(history: str, question: str) -> list[dict]:
    return [{"role": "user", "content": f"You read a conversation.\n\nConversation:\n{history}\n{question}"}]


TURN_1 = [judged(DIALOGUE, q) for q in QUESTIONS]  # three roles' prompts on one turn
TURN_2 = [judged(LATER, q) for q in QUESTIONS]  # the same roles one turn later: the history grew


@pytest.fixture(autouse=True)
def empty_caches(monkeypatch):
    monkeypatch.delenv("CLEANCRS_PREFIX_CACHE_GB", raising=False)
    clear_prefix_caches()
    yield
    clear_prefix_caches()


def shared_length(a: list[int], b: list[int]) -> int:
    size = 0
    while size < min(len(a), len(b)) and a[size] == b[size]:
        size += 1
    return size


def play_two_turns(model, tokenizer, cached: bool):
    """Greedy answers to both turns, then n sampled answers and samples with their ids, under one seed."""
    llm = HFChat(model, tokenizer, batch_size=4, prefix_cache=cached)
    torch.manual_seed(0)
    first = llm.chat(TURN_1, max_tokens=8)
    before = llm.usage.prefill_tokens
    second = llm.chat(TURN_2, max_tokens=8)
    run_on_turn_2 = llm.usage.prefill_tokens - before
    sampled = llm.chat(TURN_2, n=3, temperature=1.0, max_tokens=8)
    completed = llm.complete(TURN_2[1:], n=2, max_tokens=8)
    ids = [(c.prompt_ids, c.completion_ids) for samples in completed for c in samples]
    return (first, second, sampled, ids), run_on_turn_2, llm.usage


def test_a_later_turn_runs_only_its_new_tokens_and_answers_as_without_the_cache(tiny_model, tokenizer):
    without, run_without, usage_without = play_two_turns(tiny_model, tokenizer, cached=False)
    with_cache, run_with, usage_with = play_two_turns(tiny_model, tokenizer, cached=True)
    assert with_cache == without  # greedy, sampled (n samples of a prompt, one seed) and the sampled token ids
    # each turn-2 prompt runs what follows the longest beginning it shares with a turn-1 prompt, then its last token
    # in generate; without the cache, every token of it
    first, second = prompt_ids(tokenizer, TURN_1, ""), prompt_ids(tokenizer, TURN_2, "")
    new = [len(ids) - 1 - max(shared_length(ids[:-1], old[:-1]) for old in first) + 1 for ids in second]
    assert run_with == sum(new) and run_without == sum(map(len, second))
    assert run_with < 0.4 * run_without
    # the same prompts again (sampled, then completed) read everything but their last token from the cache
    assert usage_with.cached_tokens > usage_without.cached_tokens == 0
    assert usage_with.prompt_tokens == usage_without.prompt_tokens  # billed as before: every call its whole prompt


def test_cached_prefixes_give_the_logits_of_the_whole_prompt(tiny_model, tokenizer):
    # in float64 the cached pass is the whole prompt's to rounding: the cache changes which tokens run, not the
    # function; in float32 the logits differ by less than 1e-5 (the batch's own shape changes them as much)
    prompts, later = prompt_ids(tokenizer, TURN_1, ""), prompt_ids(tokenizer, TURN_2, "")
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        model = copy.deepcopy(tiny_model).to(dtype)
        llm = HFChat(model, tokenizer)
        tree = prefix_cache_of(model)
        llm._prompt_pass(prompts, tree, fresh=1)
        read = llm._prompt_pass(later, tree, fresh=1)
        assert llm.usage.cached_tokens > 0.6 * sum(map(len, later))
        with torch.no_grad():
            whole = torch.stack([model(torch.tensor([ids])).logits[0, -1] for ids in later])
        assert (read.logits - whole).abs().max() < tolerance


def test_choice_probs_read_the_same_from_the_cache_and_each_turn_costs_its_new_tokens(tiny_model, tokenizer):
    # choices of several tokens (" -1" is " -" then "1"), a shared dialogue prefix, and a second turn
    choices, prefix = ("1", "0", "-1"), '{"Score": '
    read = {}
    for cached in (False, True):
        llm = HFChat(tiny_model, tokenizer, batch_size=2, prefix_cache=cached)
        first = llm.choice_probs(TURN_1, choices, prefix=prefix, shared_prefix=True)
        before = llm.usage.prefill_tokens
        second = llm.choice_probs(TURN_2, choices, prefix=prefix)
        read[cached] = (first, second, llm.usage.prefill_tokens - before)
    for got, want in zip(read[True][:2], read[False][:2]):
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=1e-6, rel=1e-5)
    assert read[True][2] < 0.5 * read[False][2]


def test_the_cache_is_emptied_when_the_weights_change(tiny_model, tokenizer):
    # A LoRA policy between updates reuses its cache; after an optimizer step (a fused AdamW, which leaves the
    # weights' version counters as they were), with its adapter switched off, or after loading weights, it reads
    # what the new weights give, as a backend without the cache does.
    model = add_lora(copy.deepcopy(tiny_model), rank=4, alpha=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, fused=True)
    ids = torch.tensor(prompt_ids(tokenizer, TURN_1[:1], ""))

    def update():
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def read_fresh():
        return HFChat(model, tokenizer, prefix_cache=False).choice_probs(TURN_1)

    policy = HFChat(model, tokenizer)
    update()  # LoRA's B starts at zero: one step makes the adapter change the outputs
    policy.choice_probs(TURN_1)
    again, cached = policy.choice_probs(TURN_1), policy.usage.cached_tokens
    assert cached > 0  # between updates, the policy's prompts come from the cache
    update()
    after = policy.choice_probs(TURN_1)
    assert policy.usage.cached_tokens == cached  # nothing read from before the step
    assert after == pytest.approx(read_fresh(), rel=1e-5) and after != pytest.approx(again, rel=1e-3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    update()
    policy.choice_probs(TURN_1)
    model.load_state_dict(state)
    assert policy.choice_probs(TURN_1) == pytest.approx(read_fresh(), rel=1e-5)
    # an adapter that no longer trains (GRSU's simulated user), switched off for an ablation
    model.requires_grad_(False)
    with_adapter = policy.choice_probs(TURN_1)
    with model.disable_adapter():
        without = policy.choice_probs(TURN_1)
        assert without == pytest.approx(read_fresh(), rel=1e-5) and without != pytest.approx(with_adapter, rel=1e-3)


def test_roles_on_one_model_share_its_cache_within_the_memory_bound(tiny_model, tokenizer, monkeypatch):
    user, judge = HFChat(tiny_model, tokenizer), HFChat(tiny_model, tokenizer)
    user.chat(TURN_1[:1], max_tokens=4)
    judge.chat(TURN_1[:1], max_tokens=4)  # the user's prompt, read by another role: only its last token runs
    assert judge.usage.prefill_tokens == 1 and judge.usage.cached_tokens == user.usage.prefill_tokens - 1
    (first,), (later,) = prompt_ids(tokenizer, TURN_1[:1], ""), prompt_ids(tokenizer, TURN_2[:1], "")
    tree = prefix_cache_of(tiny_model)
    per_token = tree.nbytes / (len(first) - 1)
    # room for the later prompt and a few more tokens, not for the first one's own ending too: it goes, being the
    # least recently used
    monkeypatch.setenv("CLEANCRS_PREFIX_CACHE_GB", str(per_token * (len(later) + 4) / 2**30))
    judge.chat(TURN_2[:1], max_tokens=4)
    assert tree.nbytes <= prefix_cache_capacity()
    assert tree.match(later, len(later))[0] == len(later) - 1
    assert tree.match(first, len(first))[0] == shared_length(first, later)
    monkeypatch.setenv("CLEANCRS_PREFIX_CACHE_GB", "0")  # off
    assert prefix_cache_of(tiny_model) is None and not HFChat(tiny_model, tokenizer).prefix_cache
    monkeypatch.setenv("CLEANCRS_PREFIX_CACHE_GB", "lots")
    with pytest.raises(ModelSpecError, match="CLEANCRS_PREFIX_CACHE_GB='lots': use a size in GB"):
        HFChat(tiny_model, tokenizer)


def test_the_tree_holds_a_shared_beginning_once():
    def states(ids):
        return lambda start, end: ([torch.arange(start, end, dtype=torch.float32).view(1, -1, 1)],) * 2

    tree = PrefixCache()
    tree.insert([1, 2, 3, 4], states([1, 2, 3, 4]))
    tree.insert([1, 2, 7], states([1, 2, 7]))  # splits [1, 2, 3, 4] after two tokens
    (node,) = tree.root.children.values()
    assert node.tokens == (1, 2) and sorted(c.tokens for c in node.children.values()) == [(3, 4), (7,)]
    assert tree.nbytes == 2 * 4 * 5  # keys and values of five tokens, four bytes each: [1, 2] once
    size, path = tree.match([1, 2, 3, 9], limit=4)
    assert size == 3 and [(n.tokens, part) for n, part in path] == [((1, 2), 2), ((3, 4), 1)]
    assert torch.equal(path[1][0].keys[0].flatten(), torch.tensor([2.0, 3.0]))  # places 2, 3 of the first prompt
    assert tree.match([1, 2, 3, 4], limit=3)[0] == 3  # at most ``limit`` tokens


def test_a_model_with_sliding_window_layers_runs_without_the_cache(tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8)  # fmt: skip
    model = MistralForCausalLM(config).eval()
    assert prefix_cache_of(model) is None  # a window drops the prefix that a later prompt would read
    llm = HFChat(model, tokenizer)
    assert llm.chat(TURN_1, max_tokens=4) == HFChat(model, tokenizer, prefix_cache=False).chat(TURN_1, max_tokens=4)
    assert llm.usage.cached_tokens == 0


def test_the_embedded_model_answers_and_scores_the_same_from_its_cache():
    from common.llm import make_llm

    release_models()
    llm = make_llm("hf:smollm2-135m")
    plain = HFChat(llm.model, llm.tokenizer, prefix_cache=False)
    for turn in (TURN_1[:2], TURN_2[:2]):
        assert llm.chat(turn, max_tokens=6) == plain.chat(turn, max_tokens=6)
        sampled = []
        for chat in (llm, plain):
            torch.manual_seed(0)
            sampled.append(chat.chat(turn, n=2, temperature=1.0, max_tokens=6))
        assert sampled[0] == sampled[1]
        for got, want in zip(llm.choice_probs(turn, ("1", "2", "3")), plain.choice_probs(turn, ("1", "2", "3"))):
            assert got == pytest.approx(want, abs=1e-5)
    assert llm.usage.cached_tokens > llm.usage.prefill_tokens
    # The next-token logits of a later turn read from the cache against the whole prompt's. In float64 they are the
    # same to rounding; in float32 (logits up to ~30) they differ by ~3e-5, as the same prompt padded in a batch
    # without the cache does, and the whole float32 pass is itself ~2.5e-5 from float64: so 1e-5 of the logits' scale.
    later = prompt_ids(llm.tokenizer, TURN_2[2:], "")
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        model = llm.model.to(dtype)  # a new dtype is new weights: the cache empties itself
        llm.chat(TURN_2[:2], max_tokens=1)
        before = llm.usage.cached_tokens
        read = llm._prompt_pass(later, prefix_cache_of(model), fresh=1)
        assert llm.usage.cached_tokens - before > 0.6 * len(later[0])
        with torch.no_grad():
            whole = model(torch.tensor(later)).logits[:, -1]
        assert (read.logits - whole).abs().max() < tolerance * whole.abs().max()
    release_models()


def test_a_stage_logs_what_its_roles_computed(tmp_path, monkeypatch, tiny_policy, settings):
    from common.run import Run

    monkeypatch.chdir(tmp_path)
    run, used = Run(settings()), []

    def stage(run):
        user = run.llm(f"hf:{tiny_policy}")
        user.chat(TURN_1, max_tokens=4)
        user.chat(TURN_2, max_tokens=4)
        used.append(user.usage)

    run.stage("play", stage)
    (usage,), logged = used, run.summary
    assert logged["perf/play_prefill_tokens"] == usage.prefill_tokens
    assert logged["perf/play_prefix_cached_tokens"] == usage.cached_tokens > 0
    assert logged["perf/play_decode_tokens"] == usage.completion_tokens
    share = usage.cached_tokens / (usage.cached_tokens + usage.prefill_tokens)
    assert logged["perf/play_prefix_hit_rate"] == pytest.approx(share)


def test_one_prompt_at_a_time_runs_what_no_earlier_prompt_began_with(tiny_model, tokenizer):
    # bench/prompt_log.PromptLog's floor (each prompt's tokens after the longest beginning it shares with any earlier
    # prompt) is what the benches set the cache's prefill against; one prompt at a time, the cache runs just that
    from bench.prompt_log import PromptLog

    llm, log = HFChat(tiny_model, tokenizer, batch_size=1), PromptLog()
    log.watch(llm)
    for prompt in TURN_1 + TURN_2 + TURN_1[:1]:
        llm.chat([prompt], max_tokens=2)
    assert log.prompts == 7 and log.tokens == llm.usage.prompt_tokens
    assert llm.usage.prefill_tokens == log.new < 0.5 * log.tokens
