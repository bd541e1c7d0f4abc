"""The steps of benchmark/gpu_first_look.sh, one per process: what a first look at one borrowed GPU can tell in ten
minutes, offline, on a stock PyTorch image (torch, transformers, accelerate, peft; no DeepSpeed, vLLM, tyro,
datasets or wandb), with models built from a config (random weights: no hub, no model files).

    python benchmark/gpu_first_look.py STEP [--device cuda|cpu]

Steps: env, precision (bf16 against fp32), dpo (one step), grpo (one update, its samples from HF generate), generation
(an 8B-wide model, through the training path's gathered weights), resume (a run killed after a checkpoint, resumed,
compared with an uninterrupted one). Each prints Markdown rows "| step | check | seconds | peak GB | detail |" and
exits non-zero when its check fails. --device cpu runs tiny shapes (CI: tests/test_gpu_first_look.py).

The losses are the scripts' own (ecpo.dpo_loss, smtpo.grpo_loss) where the scripts import (they need tyro: put its
wheel in the folder VENDOR names, benchmark/gpu_first_look.sh installs it); otherwise the same equations, written
here, and the row says which.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
for blocked in filter(None, os.environ.get("FIRST_LOOK_BLOCK", "").split(",")):  # CI: the stock image lacks these
    sys.modules[blocked] = None

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common.run import peak_memory_gb, reset_peak_memory  # noqa: E402
from common.tokens import sequence_logprobs  # noqa: E402

OPTIONAL = ("deepspeed", "vllm", "tyro", "datasets", "wandb", "flash_attn")
# (hidden, layers, heads, kv heads, intermediate, vocab): a ~1B model for the training steps, Llama-3-8B's width (a
# quarter of its depth) for generation, and tiny ones for the CPU
SHAPES = {
    "cuda": {
        "train": (2048, 16, 32, 8, 8192, 32000),
        "wide": (4096, 8, 32, 8, 14336, 128256),
        "resume": (512, 4, 8, 4, 1536, 32000),
    },
    "cpu": {"train": (64, 2, 4, 2, 128, 256), "wide": (128, 2, 4, 2, 256, 512), "resume": (32, 2, 4, 2, 64, 128)},
}
LENGTHS = {
    "cuda": {"seq": 512, "batch": 4, "new": 128, "wide_batch": 8, "wide_new": 256},
    "cpu": {"seq": 24, "batch": 2, "new": 6, "wide_batch": 2, "wide_new": 6},
}


def row(step: str, ok: bool, seconds: float, detail: str) -> None:
    peak = peak_memory_gb()
    print(f"| {step} | {'ok' if ok else 'FAILED'} | {seconds:.1f} | {peak:.2f} | {detail} |", flush=True)


def build(shape, device: str, dtype=torch.float32, seed: int = 0):
    """A Llama of ``shape`` with random weights, built on ``device`` (no copy through the CPU on a GPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab = shape
    config = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=inter, vocab_size=vocab, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model


def batch(vocab: int, rows: int, length: int, completion: int, device: str, seed: int):
    """Random ids (none of the special 0-2), all attended, the last ``completion`` tokens of each row the completion."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=generator).to(device)
    mask = torch.zeros(rows, length, dtype=torch.long, device=device)
    mask[:, -completion:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------- steps


def env(device: str) -> bool:
    import accelerate
    import peft
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, peft {peft.__version__}"  # noqa: E501
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        versions += f"; {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}"  # noqa: E501
    present = []
    for name in OPTIONAL:
        try:
            __import__(name)
            present.append(name)
        except ImportError:
            pass
    scripts = []
    for script in ("grsu", "ecpo", "smtpo", "rso", "ailo_sim"):
        try:
            __import__(script)
            scripts.append(script)
        except ImportError:
            pass
    row("env", True, 0.0, versions)
    row("env", True, 0.0, f"optional packages present: {present or 'none'}; scripts that import: {scripts or 'none'}")
    return device == "cpu" or torch.cuda.is_available()


def precision(device: str) -> bool:
    """The same random weights and batch in fp32 and bf16: the completion log-probs and the loss's gradient norm,
    each pass's time and peak memory. bf16 keeps about 3 significant digits: per-token log-probs within 0.1 of fp32's
    and a loss within 2% pass."""
    lengths, shape = LENGTHS[device], SHAPES[device]["train"]
    inputs = batch(shape[-1], lengths["batch"], lengths["seq"], lengths["seq"] // 4, device, seed=1)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build(shape, device, dtype)
        params = sum(p.numel() for p in model.parameters()) / 1e9
        reset_peak_memory()
        started = time.time()
        total, n_tokens, token_logps = sequence_logprobs(model, **inputs)
        loss = -total.sum() / n_tokens.sum()
        loss.backward()
        synchronize(device)
        grad = math.sqrt(sum(p.grad.float().pow(2).sum().item() for p in model.parameters() if p.grad is not None))
        results[dtype] = (token_logps.detach(), loss.item(), grad, time.time() - started, peak_memory_gb())
        del model, total, token_logps, loss
        if device == "cuda":
            torch.cuda.empty_cache()
    (l32, loss32, g32, t32, m32), (l16, loss16, g16, t16, m16) = results[torch.float32], results[torch.bfloat16]
    gap = (l32 - l16).abs().max().item()
    ok = math.isfinite(loss16) and gap < 0.1 and abs(loss16 - loss32) < 0.02 * abs(loss32)
    detail = (
        f"{params:.2f}B params: loss fp32 {loss32:.4f} / bf16 {loss16:.4f}, largest log-prob gap {gap:.3g}, "
        f"grad norm {g32:.3g} / {g16:.3g}; fwd+bwd {t32:.2f} s / {t16:.2f} s, peak {m32:.2f} / {m16:.2f} GB"
    )
    row("precision", ok, t32 + t16, detail)
    return ok


def scripts_loss(module: str, name: str):
    """The script's own loss function, or None where the script does not import (no tyro)."""
    try:
        return getattr(__import__(module), name)
    except ImportError:
        return None


def dpo(device: str) -> bool:
    """One DPO step (ECPO's Eq. 3) of a LoRA policy against itself with the adapter off, in bf16 where the GPU has
    it. At the start the policy is the reference, so the loss is log 2; after one AdamW step the chosen answers'
    log-ratio must lead the rejected ones'."""
    from common.models import add_lora

    lengths, shape = LENGTHS[device], SHAPES[device]["train"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = add_lora(build(shape, device, dtype), rank=8, alpha=16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # the adapter trains in fp32 (peft's choice in the scripts)
    pairs = lengths["batch"]
    chosen = batch(shape[-1], pairs, lengths["seq"], lengths["seq"] // 4, device, seed=2)
    rejected = batch(shape[-1], pairs, lengths["seq"], lengths["seq"] // 4, device, seed=3)
    both = {k: torch.cat([chosen[k], rejected[k]]) for k in chosen}
    loss_fn = scripts_loss("ecpo", "dpo_loss")
    source = "ecpo.dpo_loss" if loss_fn else "Eq. 3 written here (ecpo.py does not import)"
    loss_fn = loss_fn or (lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * ((pc - rc) - (pr - rr))))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    reset_peak_memory()
    started = time.time()
    with torch.no_grad(), model.disable_adapter():
        reference = sequence_logprobs(model, **both)[0]
    margins = []
    for _ in range(2):  # the step, then the margin it left
        policy = sequence_logprobs(model, **both)[0]
        loss = loss_fn(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], 0.1).mean()
        margins.append(((policy[:pairs] - reference[:pairs]) - (policy[pairs:] - reference[pairs:])).mean().item())
        if len(margins) == 1:
            first = loss.item()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    synchronize(device)
    ok = abs(first - math.log(2)) < 1e-3 and margins[1] > margins[0]
    detail = f"{source}; loss {first:.4f} (log 2 = 0.6931), log-ratio margin {margins[0]:.3g} -> {margins[1]:.3g}"
    row("dpo", ok, time.time() - started, detail)
    return ok


def grpo(device: str) -> bool:
    """One GRPO update (SMTPO's Eq. 14) on samples from HF generate: G outputs per prompt, rewarded by how many of
    their tokens are even (a reward with a known answer), group-normalised advantages, one AdamW step. The best
    output's log-prob must rise against the worst's."""
    from common.models import add_lora

    lengths, shape = LENGTHS[device], SHAPES[device]["train"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = add_lora(build(shape, device, dtype), rank=8, alpha=16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    groups, size, new = 2, 4, lengths["new"]
    prompts = batch(shape[-1], groups, lengths["seq"] // 4, 1, device, seed=4)["input_ids"]
    reset_peak_memory()
    started = time.time()
    with torch.no_grad():
        repeated = prompts.repeat_interleave(size, 0)
        out = model.generate(
            input_ids=repeated, attention_mask=torch.ones_like(repeated), do_sample=True, temperature=1.0, top_k=0,
            max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
        )  # fmt: skip
    synchronize(device)
    generated = time.time() - started
    mask = torch.zeros_like(out)
    mask[:, prompts.shape[1] :] = 1
    inputs = {"input_ids": out, "attention_mask": torch.ones_like(out), "completion_mask": mask}
    rewards = (out[:, prompts.shape[1] :] % 2 == 0).float().mean(-1)
    group_advantages = scripts_loss("smtpo", "group_advantages")
    loss_fn = scripts_loss("smtpo", "grpo_loss")
    source = "smtpo.grpo_loss" if loss_fn else "Eq. 14 written here (smtpo.py does not import)"
    if loss_fn is None:

        def group_advantages(r):
            return (r - r.mean()) / (r.std() + 1e-6)

        def loss_fn(policy, old, ref, adv, m, epsilon, beta):
            ratio = torch.exp(policy - old)
            surrogate = torch.minimum(ratio * adv[:, None], torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv[:, None])
            kl = torch.exp(ref - policy) - (ref - policy) - 1
            return (-(surrogate - beta * kl) * m).sum(-1) / m.sum(-1).clamp(min=1)

    advantages = torch.cat([group_advantages(rewards[g * size : (g + 1) * size]) for g in range(groups)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with torch.no_grad(), model.disable_adapter():
        ref = sequence_logprobs(model, **inputs)[2]
    with torch.no_grad():
        old = sequence_logprobs(model, **inputs)[2]
    total, n_tokens, token_logps = sequence_logprobs(model, **inputs)
    token_mask = inputs["completion_mask"][:, 1:].to(token_logps.dtype)
    loss = loss_fn(token_logps, old, ref, advantages, token_mask, 0.2, 0.04).mean()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = sequence_logprobs(model, **inputs)[0] / n_tokens
    synchronize(device)
    before = total.detach() / n_tokens
    best, worst = advantages.argmax(), advantages.argmin()
    moved = (after - before)[best] - (after - before)[worst]
    ok = bool(torch.isfinite(loss)) and moved.item() > 0 and out.shape[1] == prompts.shape[1] + new
    tokens = groups * size * new
    detail = (f"{source}; {groups} x G={size} samples of {new} tokens: {tokens / generated:.0f} tokens/s; best minus "
              f"worst output's mean log-prob moved {moved.item():+.3g}")  # fmt: skip
    row("grpo", ok, time.time() - started, detail)
    return ok


def generation(device: str) -> bool:
    """Decoding from an 8B-wide model (Llama-3-8B's width and vocabulary, a quarter of its depth) in bf16, through
    common.distributed.generation_weights, the path the training loops sample from (a no-op gather without ZeRO-3):
    tokens/s and peak memory, and what the whole depth would take (an estimate, by the layers)."""
    from common.distributed import generation_weights, make_accelerator

    lengths, shape = LENGTHS[device], SHAPES[device]["wide"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    accelerator = make_accelerator()
    model = accelerator.prepare(build(shape, device, dtype))
    rows, new = lengths["wide_batch"], lengths["wide_new"]
    prompts = batch(shape[-1], rows, lengths["seq"] // 2, 1, device, seed=5)["input_ids"]
    reset_peak_memory()
    started = time.time()
    with generation_weights(accelerator, model) as unwrapped, torch.no_grad():
        out = unwrapped.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                 max_new_tokens=new, min_new_tokens=new, pad_token_id=0)  # fmt: skip
    synchronize(device)
    seconds = time.time() - started
    params = sum(p.numel() for p in model.parameters()) / 1e9
    ok = out.shape == (rows, prompts.shape[1] + new)
    detail = (f"{params:.2f}B params ({shape[1]} layers of hidden {shape[0]}): {rows} x {new} new tokens, "
              f"{rows * new / seconds:.0f} tokens/s, peak {peak_memory_gb():.2f} GB")  # fmt: skip
    row("generation", ok, seconds, detail)
    return ok


@dataclass
class ResumeArgs:  # the fields of a script's Args that Run and supervised_finetuning read
    exp_name: str = "first_look"
    seed: int = 1
    run_name: str = "resume"
    track: bool = False
    wandb_project: str = "cleancrs"
    wandb_entity: str | None = None
    micro_batch_size: int = 2
    max_grad_norm: float = 1.0
    save_every: int = 2


def resume_part(device: str, folder: str, kill_after: int) -> None:
    """One launch of a small full fine-tune (6 steps, a checkpoint every 2) through common/sft.py in ``folder``,
    killed right after the checkpoint of step ``kill_after`` (0: never); writes the final weights' sum per tensor."""
    import common.sft
    from common.run import Run
    from common.sft import supervised_finetuning

    os.chdir(folder)
    args = ResumeArgs()
    run = Run(args)
    shape = SHAPES[device]["resume"]
    model = build(shape, device)
    data = batch(shape[-1], 12, 16, 6, "cpu", seed=6)
    examples = [
        {"input_ids": i.tolist(), "completion_mask": m.tolist()}
        for i, m in zip(data["input_ids"], data["completion_mask"])
    ]  # noqa: E501
    save = common.sft.save_resumable

    def save_then_die(accelerator, model, stage_dir, step, *rest, **kw):
        save(accelerator, model, stage_dir, step, *rest, **kw)
        if step == kill_after:
            os._exit(3)  # killed: no cleanup, as a timeout's SIGKILL

    common.sft.save_resumable = save_then_die

    class Tokenizer:
        pad_token_id = 0

    model = supervised_finetuning(run, args, model, Tokenizer(), examples, "sft", lr=1e-3, batch_size=4, epochs=2,
                                  warmup_ratio=0)  # fmt: skip
    weights = {n: p.detach().float().sum().item() for n, p in run.accelerator.unwrap_model(model).named_parameters()}
    Path("weights.json").write_text(json.dumps(weights))


def resume_verdict(killed_exit: int, relaunch_exit: int, relaunch_log: str, whole_exit: int,
                   killed_weights: dict | None, whole_weights: dict | None) -> tuple[bool, float | None]:  # fmt: skip
    """(ok, the largest relative gap between the two runs' weight sums): the first launch died at the kill (exit 3),
    the relaunch resumed at step 4 and finished, the uninterrupted run finished, and both ended with the same
    weights (sums within 1e-4, relative)."""
    gap = None
    if killed_weights is not None and whole_weights is not None and killed_weights.keys() == whole_weights.keys():
        gap = max(abs(killed_weights[k] - whole_weights[k]) / max(abs(whole_weights[k]), 1.0) for k in whole_weights)
    resumed = "resuming sft at step 4" in relaunch_log
    ok = (killed_exit, relaunch_exit, whole_exit) == (3, 0, 0) and resumed and gap is not None and gap < 1e-4
    return ok, gap


def resume(device: str) -> bool:
    """A run killed right after its checkpoint at step 4 of 6, launched again, must resume at step 4 and end with the
    weights of a run never killed. Each part is its own process, as a real kill and relaunch."""
    import tempfile

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        killed, whole = Path(tmp) / "killed", Path(tmp) / "whole"
        killed.mkdir(), whole.mkdir()

        def part(folder: Path, kill_after: int) -> subprocess.CompletedProcess:
            command = [sys.executable, __file__, "resume-part", "--device", device, "--folder", str(folder)]
            return subprocess.run(command + ["--kill-after", str(kill_after)], capture_output=True, text=True)

        def weights(folder: Path) -> dict | None:
            path = folder / "weights.json"
            return json.loads(path.read_text()) if path.exists() else None

        first, second, third = part(killed, 4), part(killed, 0), part(whole, 0)
        log = second.stdout + second.stderr
        ok, gap = resume_verdict(
            first.returncode, second.returncode, log, third.returncode, weights(killed), weights(whole)
        )
    resumed = "resuming sft at step 4" in log
    detail = (
        f"killed after step 4 (exit {first.returncode}), relaunched (exit {second.returncode}, resumed at step 4: "
        f"{resumed}), uninterrupted (exit {third.returncode}); largest relative gap of a weight sum: {gap}"
    )
    if not ok:
        detail += " / " + (second.stderr or third.stderr or first.stderr)[-300:].replace("\n", " ").replace("|", "/")
    row("resume", ok, time.time() - started, detail)
    return ok


STEPS = {"env": env, "precision": precision, "dpo": dpo, "grpo": grpo, "generation": generation, "resume": resume}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=[*STEPS, "resume-part"])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--folder", default=".")
    parser.add_argument("--kill-after", type=int, default=0)
    options = parser.parse_args()
    if options.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no GPU (torch.cuda.is_available() is False)")
    if options.step == "resume-part":
        resume_part(options.device, options.folder, options.kill_after)
    else:
        sys.exit(0 if STEPS[options.step](options.device) else 1)
