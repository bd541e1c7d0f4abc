"""Launched by tests/test_distributed.py under `accelerate launch --config_file configs/cpu_zero3.yaml` (2 CPU
ranks): a Llama sharded by ZeRO-3 samples through ``HFChat`` inside ``generation_weights`` with unequal work per
rank (rank 0: two conversations, two samples each, 12 new tokens; rank 1: one conversation and 2 tokens, or nothing
with --idle-rank), then both ranks take a training step. Prints "zero3 generation ok" on each rank; a hang is what
the test's timeout catches."""

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest import tiny_llama  # noqa: E402 (tests/ is the script's folder, first on sys.path)

from common.distributed import configure_batches, generation_weights, make_accelerator  # noqa: E402
from common.llm import HFChat  # noqa: E402
from common.models import load_tokenizer  # noqa: E402


def main() -> None:
    accelerator = make_accelerator()
    assert accelerator.state.deepspeed_plugin is not None, "not under DeepSpeed: launch with configs/cpu_zero3.yaml"
    rank = accelerator.process_index
    tokenizer = load_tokenizer("smollm2-135m")
    model = tiny_llama(tokenizer, hidden_size=64, max_positions=256)
    reference = copy.deepcopy(model).eval()  # the same weights, never sharded
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    configure_batches(accelerator, examples=2, batch_size=2, micro=1)
    model, optimizer = accelerator.prepare(model, optimizer)
    sharded = [p for p in accelerator.unwrap_model(model).parameters() if p.ds_tensor.numel() < p.ds_numel]
    assert sharded, "ZeRO-3 left every parameter whole: the model is too small to test sharded generation"

    conversations = [[{"role": "user", "content": text}] for text in ("Hi there.", "Recommend a film, please.")]
    if rank == 0:
        work = {"conversations": conversations, "n": 2, "max_tokens": 12}
    else:
        work = {"conversations": [] if "--idle-rank" in sys.argv else conversations[:1], "n": 1, "max_tokens": 2}
    with generation_weights(accelerator, model) as current:
        sampled = HFChat(current, tokenizer).complete(temperature=0.0, **work) if work["conversations"] else []
    expected = HFChat(reference, tokenizer).complete(temperature=0.0, **work) if work["conversations"] else []
    ids = [[c.completion_ids for c in row] for row in sampled]
    assert ids == [[c.completion_ids for c in row] for row in expected], (rank, ids)  # the whole weights

    batch = torch.tensor([[2, 3, 4, 5, 6, 7]]) + rank  # the hooks are back: a training step runs on both ranks
    loss = model(input_ids=batch, labels=batch).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    assert torch.isfinite(loss)
    accelerator.wait_for_everyone()
    tokens = sum(len(c) for row in ids for c in row)
    print(f"zero3 generation ok on rank {rank}: {len(sharded)} sharded tensors, {tokens} tokens generated")


if __name__ == "__main__":
    main()
