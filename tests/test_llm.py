import pytest
import torch

from common.llm import HFChat, LLMBackendError, OpenAIChat, make_llm, truncate_at_stop
from common.models import ModelSpecError, add_lora, default_dtype, load_merged, resolve_model_path
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
    with pytest.raises(ModelSpecError, match="unknown model spec 'no such model'"):
        resolve_model_path("no such model")


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


def test_models_load_in_bf16_on_a_bf16_gpu_and_in_fp32_on_cpu(monkeypatch, tiny_policy):
    monkeypatch.delenv("CLEANCRS_DTYPE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_dtype() == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # a V100 or T4
    assert default_dtype() == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert default_dtype() == torch.bfloat16
    monkeypatch.setenv("CLEANCRS_DTYPE", "float32")
    assert default_dtype() == torch.float32
    monkeypatch.setenv("CLEANCRS_DTYPE", "bfloat16")  # every load path reads it: a role, a policy, its fresh LoRA
    assert make_llm(f"hf:{tiny_policy}").model.dtype == torch.bfloat16
    policy, _ = load_merged(str(tiny_policy), lora=(4, 8))
    assert {p.dtype for p in policy.parameters() if p.requires_grad} == {torch.float32}  # peft: the adapter in fp32
    assert {p.dtype for p in policy.parameters() if not p.requires_grad} == {torch.bfloat16}
    monkeypatch.setenv("CLEANCRS_DTYPE", "fp16")
    with pytest.raises(ModelSpecError, match="CLEANCRS_DTYPE='fp16': use auto, bfloat16 or float32"):
        default_dtype()


def test_openai_concurrency_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("CLEANCRS_OPENAI_CONCURRENCY", raising=False)
    assert make_llm("openai:m").max_workers == 8
    monkeypatch.setenv("CLEANCRS_OPENAI_CONCURRENCY", "64")
    assert make_llm("openai:m").max_workers == 64
    monkeypatch.setenv("CLEANCRS_OPENAI_CONCURRENCY", "0")
    with pytest.raises(ModelSpecError, match="CLEANCRS_OPENAI_CONCURRENCY='0': use a positive number"):
        make_llm("openai:m")


def test_lora_wraps_all_linear_layers(tiny_model):
    import copy

    model = add_lora(copy.deepcopy(tiny_model), rank=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.split(".lora_A")[0].split(".")[-1] for n in trainable if "lora_A" in n}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
