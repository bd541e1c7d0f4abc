import pytest
import torch

from common.llm import HFChat, LLMBackendError, OpenAIChat, make_llm, truncate_at_stop
from common.models import ModelSpecError, add_lora, resolve_model_path
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


def test_lora_wraps_all_linear_layers(tiny_model):
    import copy

    model = add_lora(copy.deepcopy(tiny_model), rank=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.split(".lora_A")[0].split(".")[-1] for n in trainable if "lora_A" in n}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
