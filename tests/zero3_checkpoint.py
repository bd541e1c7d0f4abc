"""Launched by tests/test_distributed.py under `accelerate launch --config_file configs/cpu_zero3.yaml` (2 CPU
ranks): a LoRA on a Llama sharded by ZeRO-3 trains through ``resume_and_prepare`` (resuming from the newest checkpoint
of --stage-dir) up to step --steps, saving a resumable checkpoint after every step. Each save is checked on rank 0:
the checkpoint holds exactly the adapter, equal to the gathered weights, and the save gathered no frozen weight.
At the end rank 0 writes the gathered adapter to --weights. Prints "zero3 checkpoint ok" on each rank."""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest import tiny_llama  # noqa: E402 (tests/ is the script's folder, first on sys.path)

from common.checkpoints import (  # noqa: E402
    latest_checkpoint,  # noqa: E402
    resume_and_prepare,
    save_resumable,
)
from common.distributed import backward_and_step, configure_batches, make_accelerator  # noqa: E402
from common.models import add_lora, load_tokenizer  # noqa: E402


def gathered_adapter(model) -> dict[str, torch.Tensor]:
    """The trainable weights, whole, under peft's saved names (the adapter name dropped)."""
    import deepspeed

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(trainable.values())):
        return {n.replace(".default", ""): p.detach().clone() for n, p in trainable.items()}


def spied_save(accelerator, engine, stage_dir: Path, step: int, optimizer, scheduler) -> tuple[list, bool]:
    """``save_resumable``; returns (every parameter it gathered, whether it asked accelerate for the whole state
    dict, which gathers every weight to rank 0)."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    gathered, whole = [], []
    original_init, original_state_dict = GatheredParameters.__init__, accelerator.get_state_dict

    def recording_init(self, params, *args, **kwargs):
        gathered.extend(params if isinstance(params, (list, tuple)) else [params])
        original_init(self, params, *args, **kwargs)

    def recording_state_dict(*args, **kwargs):
        whole.append(True)
        return original_state_dict(*args, **kwargs)

    GatheredParameters.__init__, accelerator.get_state_dict = recording_init, recording_state_dict
    try:
        save_resumable(accelerator, engine, stage_dir, step, optimizer, scheduler)
    finally:
        GatheredParameters.__init__, accelerator.get_state_dict = original_init, original_state_dict
    return gathered, bool(whole)


def main() -> None:
    from safetensors.torch import load_file
    from transformers import get_linear_schedule_with_warmup

    parser = argparse.ArgumentParser()
    parser.add_argument("--stage-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    args = parser.parse_args()

    accelerator = make_accelerator()
    assert accelerator.state.deepspeed_plugin is not None, "not under DeepSpeed: launch with configs/cpu_zero3.yaml"
    rank = accelerator.process_index
    tokenizer = load_tokenizer("smollm2-135m")
    model = add_lora(tiny_llama(tokenizer, hidden_size=64, max_positions=256), rank=4, alpha=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, 4)  # the learning rate moves with the step
    configure_batches(accelerator, examples=2, batch_size=2, micro=1)
    engine, optimizer, start = resume_and_prepare(accelerator, model, optimizer, scheduler, args.stage_dir)
    unwrapped = accelerator.unwrap_model(engine)
    sharded = [p for p in unwrapped.parameters() if p.ds_tensor.numel() < p.ds_numel]
    assert sharded, "ZeRO-3 left every parameter whole: the model is too small to test a sharded checkpoint"

    for step in range(start, args.steps):
        batch = torch.tensor([[2, 3, 4, 5, 6, 7]]) + 10 * step + rank  # other data on each rank and step
        with accelerator.accumulate(engine):
            loss = engine(input_ids=batch, labels=batch).loss
            backward_and_step(accelerator, engine, optimizer, loss, max_grad_norm=1.0)
        scheduler.step()
        gathered, whole = spied_save(accelerator, engine, args.stage_dir, step + 1, optimizer, scheduler)
        frozen = [p for p in gathered if not p.requires_grad]
        assert not whole and not frozen, f"the save gathered the whole state dict ({whole}) or {len(frozen)} frozen"
        adapter = gathered_adapter(unwrapped)
        if rank == 0:
            saved = load_file(latest_checkpoint(args.stage_dir) / "adapter_model.safetensors")
            assert sorted(saved) == sorted(adapter), (sorted(saved), sorted(adapter))
            assert all(torch.equal(saved[name], adapter[name]) for name in adapter)
        accelerator.wait_for_everyone()

    adapter = gathered_adapter(unwrapped)
    if rank == 0:
        torch.save(adapter, args.weights)
    accelerator.wait_for_everyone()
    print(f"zero3 checkpoint ok on rank {rank}: steps {start}..{args.steps}, {len(adapter)} adapter tensors")


if __name__ == "__main__":
    main()
