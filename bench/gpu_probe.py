"""The measurements of a first GPU session that need no hub download, one step per call, each printing one
Markdown table row (``benchmark/gpu_smoke.sh`` runs them in order, each under ``timeout``):

    python bench/gpu_probe.py env                       # versions, the device, bf16 support
    python bench/gpu_probe.py throughput --shape 8b     # an 8B-shaped random Llama: fp32 vs bf16 decoding
    python bench/gpu_probe.py vllm-lora                 # one vLLM engine with LoRA: generate, logprobs, an adapter

``throughput`` builds a Llama-3-8B-shaped model from a config with random weights (no download), straight on the
device, and times greedy decoding of ``--new-tokens`` tokens for ``--batch`` prompts in fp32 and then in bf16,
with the peak memory of each; ``--shape tiny`` is the same on a 2-layer model, which runs on a CPU (the tests do).
``vllm-lora`` loads the embedded SmolLM2 in one engine with LoRA enabled, samples with logprobs, then saves a fresh
random LoRA adapter with peft and samples through it: the path SMTPO's vLLM rollouts take after every update.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {  # LlamaConfig fields: Llama-3-8B's shape, and a 2-layer one for CPUs
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
}  # fmt: skip


@dataclass
class Args:
    probe: tyro.conf.Positional[Literal["env", "throughput", "vllm-lora"]]
    """what to measure"""
    shape: Literal["8b", "tiny"] = "8b"
    """the random Llama's shape (throughput)"""
    batch: int = 8
    """prompts decoded together (throughput)"""
    prompt_tokens: int = 512
    """tokens per prompt (throughput)"""
    new_tokens: int = 128
    """greedy tokens generated per prompt (throughput, vllm-lora)"""


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def probe_env() -> None:
    import accelerate
    import transformers

    versions = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}"
    )
    for name in ("deepspeed", "peft", "vllm"):
        try:
            versions += f", {name} {__import__(name).__version__}"
        except ImportError:
            versions += f", {name} missing"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        where = f"{torch.cuda.device_count()} x {props.name} ({props.total_memory / 2**30:.0f} GiB)"
        where += f", CUDA {torch.version.cuda}"
        bf16 = torch.cuda.is_bf16_supported()
    else:
        where, bf16 = "CPU only", False
    print(f"| env | {where} | bf16 {'yes' if bf16 else 'no'} | {versions} |")


def decode_seconds(model, args: Args) -> tuple[float, float]:
    """(tokens per second over the batch, peak memory in GiB) of greedy decoding; the first call warms up."""
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_tokens), device=model.device)
    generate = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    model.generate(prompt[:, :8], **(generate | {"max_new_tokens": 2, "min_new_tokens": 2}))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model.generate(prompt, **generate)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return args.batch * args.new_tokens / seconds, peak


def probe_throughput(args: Args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=args.prompt_tokens + args.new_tokens + 8)
    dtypes = [torch.float32, torch.bfloat16] if device().type == "cuda" or args.shape == "tiny" else [torch.float32]
    for dtype in dtypes:
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with device():  # random weights initialized where they live: no host copy of an 8B model
                model = LlamaForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(default)
        parameters = sum(p.numel() for p in model.parameters()) / 1e9
        tokens_per_s, peak = decode_seconds(model, args)
        print(
            f"| throughput | {args.shape} ({parameters:.2f}B), {str(dtype).removeprefix('torch.')} | "
            f"{tokens_per_s:,.0f} tokens/s | batch {args.batch} x {args.prompt_tokens} prompt + {args.new_tokens} "
            f"new, peak {peak:.1f} GiB |"
        )
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def probe_vllm_lora(args: Args) -> None:
    from peft import LoraConfig, get_peft_model

    from common.llm import VLLMChat
    from common.models import load_model, resolve_model_path

    path = resolve_model_path("smollm2-135m")
    chat = VLLMChat(path, enable_lora=True, max_lora_rank=8, max_model_len=2048, gpu_memory_utilization=0.3)
    conversation = [[{"role": "user", "content": "Name one movie about space."}]]
    started = time.perf_counter()
    base = chat.complete(conversation, n=4, temperature=1.0, max_tokens=args.new_tokens)[0]
    probs = chat.choice_probs(conversation, choices=("Yes", "No"))[0]
    with tempfile.TemporaryDirectory() as folder:
        model, _ = load_model("smollm2-135m", dtype=torch.float32)
        torch.manual_seed(0)
        adapter = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        adapter.save_pretrained(folder)
        chat.use_adapter(folder, version=1)
        tuned = chat.complete(conversation, n=4, temperature=1.0, max_tokens=args.new_tokens)[0]
        tuned_probs = chat.choice_probs(conversation, choices=("Yes", "No"))[0]  # deterministic, unlike the samples
    seconds = time.perf_counter() - started
    print(
        f"| vllm-lora | smollm2-135m, LoRA r8 | {len(base)} + {len(tuned)} samples, P(Yes) + P(No) = "
        f"{sum(probs.values()):.2f} | {seconds:.1f} s; the adapter moved P(Yes) by "
        f"{abs(tuned_probs['Yes'] - probs['Yes']):.2e} (0 means it was not applied) |"
    )


def main(args: Args) -> None:
    if args.probe == "env":
        probe_env()
    elif args.probe == "throughput":
        probe_throughput(args)
    else:
        probe_vllm_lora(args)


if __name__ == "__main__":
    main(tyro.cli(Args))
