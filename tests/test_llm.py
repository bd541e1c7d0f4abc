import pytest
import torch

from common.llm import (
    HFChat,
    LLMBackendError,
    OpenAIChat,
    make_llm,
    release_models,
    truncate_at_stop,
    written_choices,
)
from common.models import ModelSpecError, resolve_model_path
from common.tokens import render_prompt

CONVS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Please recommend a long, slow, thoughtful science-fiction film."}],
]


def test_batched_left_padded_generation_matches_one_at_a_time(tiny_model, tokenizer):
    batched = HFChat(tiny_model, tokenizer, batch_size=8).chat(CONVS, max_tokens=8)
    single = HFChat(tiny_model, tokenizer, batch_size=1)
    alone = [single.chat([c], max_tokens=8)[0] for c in CONVS]
    assert batched == alone
    assert single.usage.calls == 2 and single.usage.completion_tokens > 0


def test_n_samples_and_usage(tiny_model, tokenizer):
    llm = HFChat(tiny_model, tokenizer)
    torch.manual_seed(0)
    out = llm.chat(CONVS, n=3, temperature=1.0, max_tokens=5)
    assert [len(o) for o in out] == [3, 3]
    prompt_lengths = [len(tokenizer(render_prompt(tokenizer, c), add_special_tokens=False)["input_ids"]) for c in CONVS]
    assert llm.usage.calls == 6 and llm.usage.prompt_tokens == 3 * sum(prompt_lengths)


def test_n_samples_share_one_prefill_and_equal_plain_generation(tiny_model, tokenizer):
    # greedy, every one of the n samples that share the prompt's prefill is the plain, unshared generation
    llm = HFChat(tiny_model, tokenizer)
    plain = llm.chat(CONVS, n=1, max_tokens=10)
    shared = llm.chat(CONVS, n=3, max_tokens=10)
    assert shared == [[p] * 3 for (p,) in plain]
    # and sampled ones differ from each other
    torch.manual_seed(0)
    sampled = llm.chat(CONVS[:1], n=4, temperature=1.0, max_tokens=10)[0]
    assert len(set(sampled)) > 1


def test_n_samples_of_several_prompts_fill_batches_of_the_batch_size(tiny_model, tokenizer, monkeypatch):
    # 3 prompts x 3 samples in batches of 4 rows: 3 generate calls of 4, 4 and 1 rows (one call per prompt before),
    # the middle prompt's samples split over two batches; greedy, every sample is its prompt's plain generation
    convs = CONVS + [[{"role": "user", "content": "Something to watch with my kids this weekend?"}]]
    plain = [HFChat(tiny_model, tokenizer, batch_size=1).chat([c], max_tokens=10)[0][0] for c in convs]
    generate, rows = tiny_model.generate, []
    monkeypatch.setattr(tiny_model, "generate", lambda **kw: rows.append(len(kw["input_ids"])) or generate(**kw))
    llm = HFChat(tiny_model, tokenizer, batch_size=4)
    assert llm.chat(convs, n=3, max_tokens=10) == [[p] * 3 for p in plain]
    assert rows == [4, 4, 1] and llm.usage.calls == 9
    # sampled, each prompt gets its n samples, and a seed fixes them
    torch.manual_seed(0)
    sampled = llm.chat(convs, n=3, temperature=1.0, max_tokens=6)
    torch.manual_seed(0)
    assert [len(s) for s in sampled] == [3, 3, 3] and llm.chat(convs, n=3, temperature=1.0, max_tokens=6) == sampled


def test_choice_probs_equal_one_forward_softmax(tiny_model, tokenizer):
    llm = HFChat(tiny_model, tokenizer)
    probs = llm.choice_probs(CONVS, choices=("Yes", "No"))
    ids = tokenizer(render_prompt(tokenizer, CONVS[1]), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        p = tiny_model(torch.tensor([ids])).logits[0, -1].softmax(-1)
    yes = {
        tokenizer("Yes", add_special_tokens=False)["input_ids"][0],
        tokenizer(" Yes", add_special_tokens=False)["input_ids"][0],
    }
    assert probs[1]["Yes"] == pytest.approx(float(p[sorted(yes)].sum()), rel=1e-4)
    assert 0 < probs[0]["No"] < 1 and llm.usage.completion_tokens == 0


def test_choices_of_several_tokens_read_the_same_batched_shared_or_alone(tiny_model, tokenizer):
    # one dialogue judged for several verdicts: the key/value cache of each prompt (or of their shared beginning)
    # serves the rows that read a spelling's second token, and none of them changes another's numbers
    dialogue = "User: I want a thriller.\nSystem: Try Se7en (1995).\n"
    convs = [[{"role": "user", "content": dialogue + f"Rate the reply on {d}."}] for d in ("tone", "fit", "length")]
    choices, prefix = ("1", "0", "-1"), '{"Score": '
    alone = [HFChat(tiny_model, tokenizer, batch_size=1).choice_probs([c], choices, prefix=prefix)[0] for c in convs]
    for llm, shared in ((HFChat(tiny_model, tokenizer, batch_size=2), False), (HFChat(tiny_model, tokenizer), True)):
        read = llm.choice_probs(convs, choices, prefix=prefix, shared_prefix=shared)
        assert all(r == pytest.approx(a, rel=1e-4) for r, a in zip(read, alone))
    assert len({a["1"] for a in alone}) == 3  # each conversation its own numbers


def test_per_conversation_prefixes_match_one_call_per_prefix(tiny_model, tokenizer):
    llm = HFChat(tiny_model, tokenizer, batch_size=1)
    prefixes = ['{"rating": "', "Ask["]
    together = llm.choice_probs(CONVS, choices=("1", "2"), prefix=prefixes)
    apart = [llm.choice_probs([c], choices=("1", "2"), prefix=p)[0] for c, p in zip(CONVS, prefixes)]
    assert together == apart
    assert llm.chat(CONVS, max_tokens=4, prefix=prefixes) == [
        llm.chat([c], max_tokens=4, prefix=p)[0] for c, p in zip(CONVS, prefixes)
    ]
    with pytest.raises(ValueError, match="1 prefixes for 2 conversations"):
        llm.chat(CONVS, prefix=["Ask["])


def test_stop_strings_truncate():
    assert truncate_at_stop("Ask[which era?] and more", ["]"]) == "Ask[which era?"
    assert truncate_at_stop("abc", None) == "abc"


def test_bad_specs_give_clear_errors():
    with pytest.raises(ModelSpecError, match="must look like hf:<model>"):
        make_llm("smollm2-135m")
    with pytest.raises(ModelSpecError, match="unknown LLM backend 'tgi'"):
        make_llm("tgi:foo")


def test_vllm_backend_is_guarded():
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="requirements-gpu.txt"):
        make_llm("vllm:smollm2-135m")


def test_openai_backend_reports_endpoint_after_retries():
    llm = OpenAIChat("m", base_url="http://127.0.0.1:9/v1", max_retries=1, timeout=2)
    with pytest.raises(LLMBackendError, match=r"127.0.0.1:9/v1 .*failed after 2 tries"):
        llm.chat(CONVS[:1], max_tokens=2)


def test_openai_concurrency_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("CLEANCRS_OPENAI_CONCURRENCY", raising=False)
    assert make_llm("openai:m").max_workers == 8
    monkeypatch.setenv("CLEANCRS_OPENAI_CONCURRENCY", "64")
    assert make_llm("openai:m").max_workers == 64
    monkeypatch.setenv("CLEANCRS_OPENAI_CONCURRENCY", "0")
    with pytest.raises(ModelSpecError, match="CLEANCRS_OPENAI_CONCURRENCY='0': use a positive number"):
        make_llm("openai:m")


# ------------------------------------------------------------------------------------------- in-process vLLM
# vLLM has no CPU build: a stand-in module takes its place, records what each engine is built with and the prompts it
# is sent, answers "Yes" to everything, and gives the prompt log-probs of a real model where one is asked for.


class FakeEngine:
    """``vllm.LLM``'s stand-in. A text prompt is tokenized as vLLM tokenizes it: with the BOS that Llama's and
    DeepSeek's tokenizers add to a text, where the template may have written one already. ``prompt_logprobs`` are
    ``model``'s, as vLLM gives them: None for the first token, then {token: Logprob} of each prompt token."""

    built: list[dict] = []
    tokenizer = None
    model = None

    def __init__(self, **kwargs):
        self.built.append(kwargs)
        self.sent: list[list[int]] = []

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        from types import SimpleNamespace

        outputs = []
        for prompt in prompts:
            if isinstance(prompt, str):
                ids = [self.tokenizer.bos_token_id] + self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            else:
                ids = list(prompt["prompt_token_ids"])
            self.sent.append(ids)
            top = {42: SimpleNamespace(logprob=0.0, decoded_token="Yes")}
            sample = SimpleNamespace(text="Yes", token_ids=[42], logprobs=[top])
            prompt_logprobs = None
            if params.prompt_logprobs is not None:
                with torch.no_grad():
                    logprobs = self.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
                read = [{t: SimpleNamespace(logprob=float(logprobs[j - 1, t]))} for j, t in enumerate(ids) if j]
                prompt_logprobs = [None] + read
            outputs.append(
                SimpleNamespace(prompt_token_ids=ids, outputs=[sample] * params.n, prompt_logprobs=prompt_logprobs)
            )
        return outputs


class FakeSamplingParams:
    def __init__(self, n=1, prompt_logprobs=None, **kwargs):
        self.n, self.prompt_logprobs = n, prompt_logprobs


@pytest.fixture
def fake_vllm(monkeypatch, tokenizer):
    """A ``vllm`` module whose ``LLM`` is a fresh ``FakeEngine`` class (its ``built`` list: every engine's kwargs),
    in a single process with no vLLM setting in the environment."""
    import sys
    import types

    module = types.ModuleType("vllm")
    module.LLM = type("LLM", (FakeEngine,), {"built": [], "tokenizer": tokenizer})
    module.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "CLEANCRS_VLLM_MEMORY", "CLEANCRS_VLLM_MAX_MODEL_LEN"):
        monkeypatch.delenv(name, raising=False)
    release_models()
    yield module.LLM
    release_models()


def test_roles_on_one_vllm_model_share_one_engine_and_each_model_takes_its_memory_share(
    fake_vllm, tiny_policy, monkeypatch
):
    monkeypatch.setenv("CLEANCRS_VLLM_MEMORY", "0.4")
    user, cra = make_llm("vllm:smollm2-135m"), make_llm("vllm:smollm2-135m")
    assert user.engine is cra.engine and len(fake_vllm.built) == 1
    user.chat(CONVS)
    assert (user.usage.calls, cra.usage.calls) == (2, 0)  # one engine, usage counted per role
    other = make_llm(f"vllm:{tiny_policy}")
    assert other.engine is not user.engine
    assert [kwargs["model"] for kwargs in fake_vllm.built] == [resolve_model_path("smollm2-135m"), str(tiny_policy)]
    assert [kwargs["gpu_memory_utilization"] for kwargs in fake_vllm.built] == [0.4, 0.4]
    assert [kwargs["max_model_len"] for kwargs in fake_vllm.built] == [8192, 512]  # tiny_policy's context is 512
    assert all("distributed_executor_backend" not in kwargs for kwargs in fake_vllm.built)
    from common.llm import vllm_memory_fraction

    monkeypatch.setenv("CLEANCRS_VLLM_MEMORY", "90")
    assert make_llm("vllm:smollm2-135m").engine is user.engine  # built already: the setting is not read again
    with pytest.raises(ModelSpecError, match=r"CLEANCRS_VLLM_MEMORY='90': use a share of GPU memory in \(0, 1\]"):
        vllm_memory_fraction()


def test_a_vllm_engine_under_several_ranks_runs_in_its_rank_with_the_external_launcher(fake_vllm, monkeypatch):
    # accelerate launch's environment on the second of two ranks
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("CLEANCRS_VLLM_MAX_MODEL_LEN", "4096")
    make_llm("vllm:smollm2-135m", seed=7)
    (kwargs,) = fake_vllm.built
    assert kwargs["distributed_executor_backend"] == "external_launcher"  # the engine on GPU LOCAL_RANK, in-process
    assert kwargs["seed"] == 8 and kwargs["max_model_len"] == 4096 and kwargs["gpu_memory_utilization"] == 0.9


def test_vllm_prompts_go_in_as_token_ids_with_the_templates_bos_only(fake_vllm, llama3_tokenizer, tiny_model):
    fake_vllm.tokenizer, fake_vllm.model = llama3_tokenizer, tiny_model
    llm = make_llm("vllm:smollm2-135m")
    llm.chat(CONVS[:1])
    llm.choice_probs(CONVS[:1])
    llm.complete(CONVS[:1])
    rendered = llama3_tokenizer(render_prompt(llama3_tokenizer, CONVS[0]), add_special_tokens=False)["input_ids"]
    bos = llama3_tokenizer.bos_token_id
    assert rendered[0] == bos and rendered[1] != bos
    chat, *scored, complete = llm.engine.sent  # choice_probs: the prompt and then each spelling of Yes and No
    assert chat == complete == rendered and all(ids[0] == bos and ids.count(bos) == 1 for ids in scored)
    # "\n\nYes" is "\n", "\n", "Yes" where the prompt ends in "\n\n": its own ending is scored apart (the tail)
    written = written_choices(llama3_tokenizer, render_prompt(llama3_tokenizer, CONVS[0]), ("Yes", "No"))
    assert written.tail and scored == [written.context + ids for ids in written.sequences()]


def test_vllm_reads_each_choice_written_in_full_as_the_hf_backend_does(fake_vllm, tokenizer, tiny_model):
    # prompt log-probs of the prompt followed by each spelling: " -1" is " -" and "1", read after '"Score":' whether
    # the pre-fill ends before or after the space; billed as one call per conversation, as hf bills it
    fake_vllm.model = tiny_model
    llm, hf = make_llm("vllm:smollm2-135m"), HFChat(tiny_model, tokenizer)
    choices = ("1", "0", "-1")
    for prefix in ('{"Final Score":', '{"Final Score": '):
        read = llm.choice_probs(CONVS, choices, prefix=prefix)
        for got, want in zip(read, hf.choice_probs(CONVS, choices, prefix=prefix)):
            assert got == pytest.approx(want, rel=1e-4) and got["-1"] > 0
    assert llm.usage.calls == 4 and llm.usage.completion_tokens == 0


def test_think_is_prefilled_once_where_the_template_opens_it(fake_vllm, r1_distill_tokenizer, tokenizer):
    from common.llm import prefilled_prompts
    from common.tokens import encode_prompt_completion

    header = "<think>\nStep 1: Preference Inference:"  # SMTPO's local teacher pre-fills each step's header so
    (opened,) = prefilled_prompts(r1_distill_tokenizer, CONVS[:1], "<think>\n")
    (step,) = prefilled_prompts(r1_distill_tokenizer, CONVS[:1], header)
    assert opened.endswith("<｜Assistant｜><think>\n") and opened.count("<think>") == 1
    assert step.endswith("<｜Assistant｜>" + header) and step.count("<think>") == 1
    # a template that does not open the reasoning gets the tag; a prefix's own leading newline stays
    assert prefilled_prompts(tokenizer, CONVS[:1], "<think>\n")[0].endswith("<|im_start|>assistant\n<think>\n")
    assert prefilled_prompts(tokenizer, CONVS[:1], "\nA")[0].endswith("<|im_start|>assistant\n\nA")
    ids, mask = encode_prompt_completion(r1_distill_tokenizer, CONVS[0], "Step 1: sci-fi.", prefix="<think>\n")
    assert r1_distill_tokenizer.decode(ids[: mask.index(1)]).count("<think>") == 1
    fake_vllm.tokenizer = r1_distill_tokenizer
    ((sample,),) = make_llm("vllm:smollm2-135m").complete(CONVS[:1], prefix="<think>\n")
    assert sample.prompt_ids == ids[: mask.index(1)]  # vLLM samples from the prompt that training reads
