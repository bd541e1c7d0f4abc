"""Peak memory and time of one DPO step of ecpo.py (one pair: chosen and rejected rows in one forward and backward
pass), with and without gradient checkpointing, SDPA and eager attention, on the embedded SmolLM2 + LoRA r8.

    python bench/bench_memory.py                  # a ~1.5k-token pair, as a 5-turn ActCRS state gives
    python bench/bench_memory.py --tokens 600     # the demo's 2-turn states

Each configuration runs in its own process, since a process's peak resident set size only grows. Saved activations
are the bytes autograd keeps for the backward pass (counted with saved-tensor hooks, shared storage once); the peak
RSS adds the weights, the step's transient tensors and what the allocator keeps of freed blocks (glibc keeps large
freed blocks in its heap; MALLOC_MMAP_THRESHOLD_=1048576 returns them to the system, at a cost in time).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [  # (name, attention, gradient checkpointing, extra environment)
    ("eager attention (before: eager is the fallback)", "eager", False, {}),
    ("SDPA, no checkpointing (before)", "sdpa", False, {}),
    ("SDPA + gradient checkpointing (after, the default)", "sdpa", True, {}),
    ("... + MALLOC_MMAP_THRESHOLD_=1048576", "sdpa", True, {"MALLOC_MMAP_THRESHOLD_": "1048576"}),
]


@dataclass
class Args:
    tokens: int = 1500
    """tokens per row (prompt + completion); the completion is the last 50"""
    threads: int = 0
    """torch CPU threads; 0 keeps torch's default"""
    child: str = ""
    """internal: run one configuration (attention,checkpointing) and print its figures as JSON"""


def peak_rss_gb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 2**20


def one_step(args: Args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from common.models import add_lora, enable_gradient_checkpointing, resolve_model_path
    from common.tokens import sequence_logprobs

    attention, checkpointing = args.child.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2-135m"), attn_implementation=attention)
    model = add_lora(model)
    if checkpointing == "True":
        enable_gradient_checkpointing(model)
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (2, args.tokens))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, -100:] = 0  # the rejected row is shorter: padding, as in a real pair
    completion = torch.zeros_like(ids)
    completion[:, -150:-100] = 1
    saved, seen = [0], set()

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            saved[0] += key[1]
        return tensor

    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: the step, not the loading
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logps, _, _ = sequence_logprobs(model, ids, attention_mask, completion)
    (-logps.sum()).backward()
    return {"seconds": time.perf_counter() - start, "peak_rss_gb": peak_rss_gb(), "saved_gb": saved[0] / 2**30}


def main(args: Args) -> None:
    if args.child:
        print(json.dumps(one_step(args)))
        return
    print(f"one DPO step on SmolLM2-135M + LoRA r8, 2 rows x {args.tokens} tokens, fp32, CPU")
    print(f"{'configuration':52}{'saved activations':>19}{'peak RSS':>10}{'seconds':>9}")
    for name, attention, checkpointing, env in CONFIGS:
        command = [sys.executable, __file__, "--child", f"{attention},{checkpointing}", "--tokens", str(args.tokens)]
        command += ["--threads", str(args.threads)]
        out = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"{name:52}{row['saved_gb']:16.2f} GB{row['peak_rss_gb']:7.2f} GB{row['seconds']:9.1f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
