"""common/models.py: model specs checked before anything loads, the dtype a model loads in, LoRA."""

import copy
from types import SimpleNamespace

import pytest
import torch

from common.llm import make_llm
from common.models import ModelSpecError, add_lora, check_specs, default_dtype, load_merged, resolve_model_path


def test_check_specs_reads_llm_specs_from_llm_flags_and_model_specs_from_model_flags(tiny_policy):
    good = {"policy": "smollm2-135m", "user_model": str(tiny_policy), "judge_llm": "openai:gpt-4o", "seed": 1}
    check_specs(SimpleNamespace(**good, experts_llm="hf:smollm2-135m", evaluator_llm=None))
    with pytest.raises(ModelSpecError, match="--experts-llm 'smollm2-135m': use hf:<model>"):
        check_specs(SimpleNamespace(**good, experts_llm="smollm2-135m"))
    with pytest.raises(ModelSpecError, match="unknown model spec 'no such model'"):
        check_specs(SimpleNamespace(**good, experts_llm="hf:no such model"))
    for flag in ("policy", "user_model", "critic_model"):  # every *_model flag, not a list of scripts' flags
        with pytest.raises(ModelSpecError, match="unknown model spec 'no such model'"):
            check_specs(SimpleNamespace(**(good | {flag: "no such model"})))


def test_an_unknown_model_spec_is_a_clear_error():
    with pytest.raises(ModelSpecError, match="unknown model spec 'no such model'"):
        resolve_model_path("no such model")


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


def test_lora_wraps_all_linear_layers(tiny_model):
    model = add_lora(copy.deepcopy(tiny_model), rank=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.split(".lora_A")[0].split(".")[-1] for n in trainable if "lora_A" in n}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
