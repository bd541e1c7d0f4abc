"""common/models.py: model specs checked before anything loads, the dtype a model loads in, LoRA."""

from types import SimpleNamespace

import pytest

from common.models import ModelSpecError, check_specs


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
