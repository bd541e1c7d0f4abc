"""What every rank of an ``accelerate launch`` must agree on: the process group, the data of each optimizer
step, the step itself (backward, clipping under DeepSpeed) and the weights a rank samples from mid-training. Used by
every script that trains; the checkpoints a resumed run starts from are common/checkpoints.py's."""

from __future__ import annotations

import contextlib
import math
import os
from datetime import timedelta

import torch

from common.formats import InputError


def collective_timeout() -> timedelta:
    """How long a rank waits for the others at a barrier or any collective before the run stops with an error (the
    process group's timeout, NCCL's on GPUs): ``CLEANCRS_COLLECTIVE_TIMEOUT_MINUTES``, default 120. torch's default
    of 10 minutes for NCCL is too short for the work one rank does while the others wait at a barrier: rank 0 alone
    trains a retriever, or merges and saves the policy a vLLM engine then loads."""
    value = os.environ.get("CLEANCRS_COLLECTIVE_TIMEOUT_MINUTES", "120")
    try:
        minutes = float(value)
    except ValueError:
        minutes = float("nan")
    if not 0 < minutes < float("inf"):  # timedelta overflows on inf
        raise InputError(f"CLEANCRS_COLLECTIVE_TIMEOUT_MINUTES={value!r}: use a positive, finite number of minutes")
    return timedelta(minutes=minutes)


def make_accelerator(**kwargs):
    """An Accelerator that also runs on CPU ranks: gloo for the process group there (DeepSpeed would ask for
    nccl, which CPUs lack); on GPUs accelerate picks nccl itself. Under a DeepSpeed config it is not told cpu=True:
    that would silently fall back to plain data parallelism, where DeepSpeed runs on CPU ranks as it is. Its
    process group waits ``collective_timeout()`` at a collective."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    on_cpu = not torch.cuda.is_available()
    deepspeed = launched_with_deepspeed()
    distributed = launched_processes() > 1
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


def under_zero3(accelerator) -> bool:
    """Whether the prepared model's weights and optimizer state are cut over the ranks (DeepSpeed ZeRO-3)."""
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


def launched_with_deepspeed() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config, known before any process group exists."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def launched_processes() -> int:
    """How many ranks ``accelerate launch`` started (1 without it), known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_division(world: int, batch_size: int, micro: int, flag: str) -> str:
    """Refuse a global batch (the value of ``flag``) that does not split evenly into ``world`` ranks x micro-batches
    of ``micro``: each script checks its training batches with this before anything loads (and ``--dry-run``
    for any number of ranks), and training checks again with it, so the two cannot disagree. Returns the split in
    words, for the dry run's plan."""
    if min(world, batch_size, micro) < 1:
        raise InputError(f"{flag} {batch_size} with micro-batch {micro} on {world} ranks: each must be at least 1")
    if batch_size % (world * micro):
        fits = [m for m in range(1, batch_size // world + 1) if batch_size % (world * m) == 0]
        hint = f"micro-batches that fit: {', '.join(map(str, fits))}" if fits else f"make it a multiple of {world}"
        raise InputError(f"{flag} {batch_size} must be a multiple of ranks x micro-batch = {world} x {micro} ({hint})")
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
    # accelerate counts micro-batches on the Accelerator, across stages and updates of different sizes: an earlier
    # count would shift which micro-batch of each global batch steps the optimizer.
    accelerator.step = 0
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


def share_of_global_mean(
    losses: torch.Tensor, weights: torch.Tensor, normalizer, world: int, accum: int
) -> torch.Tensor:
    """This micro-batch's term of the global batch's mean, sum(losses * weights) / normalizer over every rank and
    micro-batch, scaled for backward: accelerate divides each micro-batch's loss by ``accum`` and DDP averages the
    gradients over ranks, so * world * accum leaves the gradient of the global mean itself, however the batch was
    split. ``weights`` are 0 on padding rows; the value to report is the result / (world * accum)."""
    return (losses * weights).sum() / normalizer * world * accum


def deepspeed_clipping(engine, max_grad_norm: float) -> None:
    """Make a DeepSpeed engine clip the gradient norm at ``max_grad_norm`` (inf: not at all, DeepSpeed's 0). DeepSpeed
    clips inside its own step, at the config's ``gradient_clipping``, which accelerate fills with 1.0 at prepare
    when no DeepSpeed config names it, whatever a script's flag says. The engine reads the value from its config
    when it clips itself, and each ZeRO (and fp16 / bf16) optimizer keeps its own copy as ``clip_grad``."""
    clip = 0.0 if math.isinf(max_grad_norm) else float(max_grad_norm)
    engine._config.gradient_clipping = clip
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = clip


def backward_and_step(accelerator, model, optimizer, loss, max_grad_norm: float):
    """Backward one micro-batch's loss inside ``accelerator.accumulate``; on the last micro-batch of the global
    batch, clip at ``max_grad_norm`` (inf: no clipping) and step (accelerate makes the step a no-op before it).
    Returns the gradient norm before clipping where it was clipped, else nan (before the last micro-batch). Under
    DeepSpeed the step happens inside the backward, clipped by the engine: ``deepspeed_clipping`` sets its clip to
    ``max_grad_norm`` first."""
    if accelerator.state.deepspeed_plugin is not None:
        deepspeed_clipping(model, max_grad_norm)
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
    if not under_zero3(accelerator):
        yield unwrapped
        return
    import deepspeed

    hooks = getattr(model.optimizer, "parameter_offload", model.optimizer)  # where ZeRO-3 keeps its module hooks
    root = hooks.module
    # The root's pre-forward hook checks, by a collective, that every rank traced the same modules: it must come off
    # too, or a rank that generates while another does not waits there.
    start_of_forward = root._forward_pre_hooks[hooks.fwd_pre_hook.id]
    with deepspeed.zero.GatheredParameters(list(unwrapped.parameters())):
        # a parameter some module still counts as in use is not released when the gathered block ends (TRL clears
        # these sets too)
        for param in unwrapped.parameters():
            getattr(param, "ds_active_sub_modules", set()).clear()
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
