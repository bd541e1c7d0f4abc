import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("CLEANCRS_DATA", ROOT.parent / "shared" / "data"))

needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"real data not found at {DATA} (set CLEANCRS_DATA)")


def run_script(*args, cwd, timeout=900, check=True):
    """``python <script> <flags>`` in ``cwd``; with ``check``, it must succeed."""
    result = subprocess.run(
        [sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0 or not check, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def fails_cleanly(*args, cwd) -> str:
    """``python <script> <flags>`` must fail with a one-line error and no traceback; returns its stderr."""
    result = run_script(*args, cwd=cwd, timeout=300, check=False)
    assert result.returncode != 0 and "error: " in result.stderr and "Traceback" not in result.stderr, result.stderr
    return result.stderr


def accelerate_launch(config: str) -> tuple[str, ...]:
    """The command that starts a script under ``accelerate launch`` with ``configs/<config>.yaml`` (CPU ranks)."""
    config_file = str(ROOT / "configs" / f"{config}.yaml")
    return (sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file)


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2 tokenizer (real vocabulary and chat template)."""
    from common.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def tiny_llama(tokenizer, hidden_size: int = 32, max_positions: int = 512):
    """A 2-layer random Llama over the real vocabulary: fast, deterministic, shaped like the real thing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return tiny_llama(tokenizer).eval()


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory, tiny_model, tokenizer):
    """``tiny_model`` saved as a model folder, for the scripts' --policy flags in subprocess tests."""
    folder = tmp_path_factory.mktemp("tiny_policy")
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class ScriptedLLM:
    """A backend stand-in that answers each prompt with ``respond(prompt_text)``; counts like the real ones."""

    def __init__(self, respond):
        from common.llm import Usage

        self.respond, self.usage, self.prompts = respond, Usage(), []

    def chat(self, conversations, n=1, temperature=0.0, max_tokens=256, stop=None):
        out = []
        for conv in conversations:
            text = conv[-1]["content"]
            self.prompts.append(text)
            self.usage.add(n, len(text.split()), 1)
            out.append([self.respond(text) for _ in range(n)])
        return out


@pytest.fixture
def scripted_llm():
    return ScriptedLLM


# Chat templates of two shapes that the embedded model's does not have, written for these tests: DeepSeek-R1-Distill's
# (it writes the BOS, and its generation header opens the reasoning with "<think>\n") and Llama-3's (it writes the BOS,
# which vLLM, tokenizing a rendered text, would add a second time).
R1_DISTILL_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% else %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{% endif %}"
)
LLAMA3_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n\n' + m['content'] + '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}"
)


def templated(tokenizer, template: str):
    """A copy of the embedded tokenizer with ``template`` as its chat template and a BOS of its own (SmolLM2's BOS is
    its turn marker, which would hide a doubled BOS among the turns)."""
    import copy

    copied = copy.deepcopy(tokenizer)
    copied.chat_template, copied.bos_token = template, "<|endoftext|>"
    return copied


@pytest.fixture(scope="session")
def r1_distill_tokenizer(tokenizer):
    return templated(tokenizer, R1_DISTILL_LIKE_TEMPLATE)


@pytest.fixture(scope="session")
def llama3_tokenizer(tokenizer):
    return templated(tokenizer, LLAMA3_LIKE_TEMPLATE)
