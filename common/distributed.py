"""What every rank of an ``accelerate launch`` must agree on: the process group, the data of each optimizer
step, and the checkpoints a resumed run starts from. Used by every script that trains."""

from __future__ import annotations

import contextlib
import json
import os
from datetime import timedelta
from pathlib import Path

import torch

from common.data import DataError
from common.tracking import latest_checkpoint, save_checkpoint


def collective_timeout() -> timedelta:
    """How long a rank waits for the others at a barrier or any collective before the run stops with an error (the
    process group's timeout, NCCL's on GPUs): ``CLEANCRS_COLLECTIVE_TIMEOUT_MINUTES``, default 120. torch's default
    of 10 minutes for NCCL is too short for the work one rank does while the others wait at a barrier: rank 0 alone
    trains SMTPO's retriever, and merges and saves the policy its vLLM engine loads."""
    value = os.environ.get("CLEANCRS_COLLECTIVE_TIMEOUT_MINUTES", "120")
    try:
        minutes = float(value)
    except ValueError:
        minutes = float("nan")
    if not minutes > 0:
        raise DataError(f"CLEANCRS_COLLECTIVE_TIMEOUT_MINUTES={value!r}: use a positive number of minutes")
    return timedelta(minutes=minutes)


def make_accelerator(**kwargs):
    """An Accelerator that also runs on CPU ranks: gloo for the process group there (DeepSpeed would ask for
    nccl, which CPUs lack); on GPUs accelerate picks nccl itself. Under a DeepSpeed config it is not told cpu=True:
    that would silently fall back to plain data parallelism, where DeepSpeed runs on CPU ranks as it is. Its
    process group waits ``collective_timeout()`` at a collective."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    on_cpu = not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    backend = {"backend": "gloo"} if on_cpu and distributed else {}
    handlers = [InitProcessGroupKwargs(timeout=collective_timeout(), **backend)]
    return Accelerator(cpu=on_cpu and not deepspeed, kwargs_handlers=handlers, **kwargs)


def global_batches(n_examples: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """The example indices of every optimizer step: a seeded shuffle per epoch, cut into global batches (the
    last one of an epoch may be smaller). Every rank computes the same list, so ranks agree on the data."""
    batches = []
    for epoch in range(epochs):
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        batches += [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]
    return batches


def rank_micro_batches(
    batch: list[int], rank: int, world: int, micro: int, accum: int
) -> list[list[tuple[int, float]]]:
    """This rank's share of a global batch as ``accum`` micro-batches of ``micro`` (index, weight) entries.
    A short batch is padded with weight-0 copies so every rank runs the same number of equal-sized passes,
    which keeps DDP and ZeRO-3 in lockstep; the weights keep the padding out of the loss."""
    share = [(i, 1.0) for i in batch[rank::world]]
    share += [(batch[0], 0.0)] * (micro * accum - len(share))
    return [share[k * micro : (k + 1) * micro] for k in range(accum)]


def micro_batches(examples: list[dict], batch: list[int], accelerator, micro: int, accum: int):
    """This rank's share of the global batch ``batch`` (indices into ``examples``), as ``accum`` micro-batches of
    (examples, weights): the weights are 0 on the padding rows, which keep ranks in lockstep."""
    rank, world = accelerator.process_index, accelerator.num_processes
    for chunk in rank_micro_batches(batch, rank, world, micro, accum):
        yield [examples[i] for i, _ in chunk], torch.tensor([w for _, w in chunk], device=accelerator.device)


def launched_processes() -> int:
    """How many ranks ``accelerate launch`` started (1 without it), known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_division(world: int, batch_size: int, micro: int, flag: str) -> str:
    """Refuse a global batch (the value of ``flag``) that does not split evenly into ``world`` ranks x micro-batches
    of ``micro``: each script checks its training batches with this before anything loads (and ``--dry-run``
    for any number of ranks), and training checks again with it, so the two cannot disagree. Returns the split in
    words, for the dry run's plan."""
    if min(world, batch_size, micro) < 1:
        raise DataError(f"{flag} {batch_size} with micro-batch {micro} on {world} ranks: each must be at least 1")
    if batch_size % (world * micro):
        fits = [m for m in range(1, batch_size // world + 1) if batch_size % (world * m) == 0]
        hint = f"micro-batches that fit: {', '.join(map(str, fits))}" if fits else f"make it a multiple of {world}"
        raise DataError(f"{flag} {batch_size} must be a multiple of ranks x micro-batch = {world} x {micro} ({hint})")
    accum = batch_size // (world * micro)
    return f"{flag} {batch_size} = {world} ranks x micro-batch {micro} x {accum} accumulation steps"


def print_dry_run(script: str, world: int, batches: list[str], data: dict[str, int]) -> None:
    """The plan a dry run checked: every training batch's split over ``world`` ranks and what the data holds."""
    print(f"dry run of {script} for {world} processes: flags, batch divisions and data files checked, no model loaded")
    for line in batches or ["no training batch in the stages asked for"]:
        print(f"  {line}")
    print("  data: " + ", ".join(f"{count} {what}" for what, count in data.items()))


def configure_batches(accelerator, examples: int, batch_size: int, micro: int) -> tuple[int, int]:
    """(global batch, accumulation steps) for ``examples`` training rows. The global batch must split evenly
    into ranks x micro-batches; with fewer examples than one batch it shrinks to the data instead of running
    padding. DeepSpeed has no prepared dataloader to read these from, so its config is told directly."""
    world = accelerator.num_processes
    check_division(world, batch_size, micro, "the global batch")
    batch_size = min(batch_size, -(-examples // (world * micro)) * world * micro)
    accum = batch_size // (world * micro)
    accelerator.gradient_accumulation_steps = accum
    if accelerator.state.deepspeed_plugin is not None:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"] = micro, accum
        ds_config["train_batch_size"] = batch_size
    return batch_size, accum


def training_steps(accelerator, examples: int, batch_size: int, micro: int, epochs: int, seed: int):
    """(the example indices of every optimizer step, accumulation steps): ``configure_batches`` then
    ``global_batches``, the same on every rank."""
    batch_size, accum = configure_batches(accelerator, examples, batch_size, micro)
    return global_batches(examples, batch_size, epochs, seed), accum


def start_training(accelerator, model, optimizer, scheduler, stage_dir: Path):
    """(model, optimizer, first step): resume from the newest checkpoint in ``stage_dir``, then let accelerate
    wrap the model and optimizer (DDP or DeepSpeed). The scheduler stays unprepared: accelerate would step it once
    per rank, as it does for sharded dataloaders; the training loop steps it once per optimizer step."""
    start = resume(model, optimizer, scheduler, stage_dir)
    if start and accelerator.is_main_process:
        print(f"resuming {stage_dir.name} at step {start}")
    model, optimizer = accelerator.prepare(model, optimizer)
    while scheduler.last_epoch < start:  # a checkpoint saved without optimizer state (DeepSpeed)
        scheduler.step()
    # accelerate counts micro-batches on the Accelerator, across stages: an earlier stage's count would shift
    # which micro-batch of each global batch steps the optimizer.
    accelerator.step = 0
    model.train()
    return model, optimizer, start


def optimizer_step(accelerator, model, optimizer, loss, max_grad_norm: float):
    """Backward one micro-batch's loss inside ``accelerator.accumulate``; on the last micro-batch of the global
    batch, clip and step (accelerate makes the step a no-op before it). Returns the gradient norm where it was
    clipped, else nan (before the last micro-batch; DeepSpeed clips inside its own step)."""
    accelerator.backward(loss)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm) if accelerator.sync_gradients else None
    optimizer.step()
    optimizer.zero_grad()
    return float("nan") if grad_norm is None else float(grad_norm)


@contextlib.contextmanager
def generation_weights(accelerator, model):
    """The unwrapped model with its full weights, to sample from in the middle of training (every rank must enter
    together). ZeRO-3 shards the weights: each rank gathers them once, and DeepSpeed's module hooks come off while
    the model generates, as TRL and DeepSpeed's own ``unwrap_model_for_generation`` do. With the hooks on, every
    forward pass releases and gathers each layer again (collectives at every decode step), and ranks that generate
    different numbers of tokens, or none, meet each other's collectives out of order and hang."""
    unwrapped = accelerator.unwrap_model(model)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        yield unwrapped
        return
    import deepspeed

    hooks = getattr(model.optimizer, "parameter_offload", model.optimizer)  # where ZeRO-3 keeps its module hooks
    root = hooks.module
    # The root's pre-forward hook checks, by a collective, that every rank traced the same modules: it must come off
    # too, or a rank that generates while another does not waits there.
    start_of_forward = root._forward_pre_hooks[hooks.fwd_pre_hook.id]
    with deepspeed.zero.GatheredParameters(list(unwrapped.parameters())):
        for hook in [hooks.fwd_pre_hook, *hooks.forward_hooks, *hooks.backward_hooks]:
            hook.remove()
        hooks.forward_hooks, hooks.backward_hooks = [], []
        try:
            yield unwrapped
        finally:
            hooks.fwd_pre_hook = root.register_forward_pre_hook(start_of_forward)
            hooks._register_deepspeed_module(root)
            coordinator = getattr(hooks, "param_coordinator", None)
            if coordinator is not None and not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()  # the generation's forwards are not the training step's trace


def resume(model, optimizer, scheduler, stage_dir: Path) -> int:
    """Load the newest checkpoint of ``stage_dir`` into the (unprepared) model, optimizer and scheduler; return
    its step, 0 if there is none. A peft model loads its adapter, any other model its full weights."""
    from safetensors.torch import load_file

    checkpoint = latest_checkpoint(stage_dir)
    if checkpoint is None:
        return 0
    if (checkpoint / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
    else:
        model.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=False)
    state = torch.load(checkpoint / "training_state.pt", weights_only=False)
    if state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return json.loads((checkpoint / "state.json").read_text())["step"]


def save_resumable(accelerator, model, stage_dir: Path, step: int, optimizer, scheduler) -> None:
    """A resumable checkpoint: the weights (gathered from all ranks under ZeRO-3; a peft model saves only its
    adapter), the optimizer and the scheduler. Under DeepSpeed the optimizer state is sharded, so it is not
    saved and a resume restarts its moments."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        deepspeed = accelerator.state.deepspeed_plugin is not None
        save_checkpoint(
            stage_dir,
            step,
            accelerator.unwrap_model(model),
            None if deepspeed else optimizer,
            None if deepspeed else scheduler,
            state_dict=state_dict,
        )
    accelerator.wait_for_everyone()


def save_final(accelerator, model, folder: Path, info: dict, tokenizer=None) -> None:
    """A stage's result: the weights (an adapter alone for a peft model), gathered from every rank under
    ZeRO-3, the tokenizer if given, and a JSON summary ``steps.json`` whose presence marks the stage done."""
    # A model that never trained (an empty D_sft) was never prepared: every rank holds it whole, and DeepSpeed's
    # gather would fail on it.
    prepared = accelerator.unwrap_model(model) is not model
    state_dict = accelerator.get_state_dict(model) if prepared else None
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(folder, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        (folder / "steps.json").write_text(json.dumps(info))
    accelerator.wait_for_everyone()
