"""What every rank of an ``accelerate launch`` must agree on: the process group, the data of each optimizer
step, and the checkpoints a resumed run starts from. Used by every script that trains."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from datetime import timedelta
from pathlib import Path

import torch

from common.data import DataError
from common.tracking import checkpoint_path, latest_checkpoint, prune_checkpoints, save_checkpoint, staging_path


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
    if not 0 < minutes < float("inf"):  # timedelta overflows on inf
        raise DataError(f"CLEANCRS_COLLECTIVE_TIMEOUT_MINUTES={value!r}: use a positive, finite number of minutes")
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


def start_training(accelerator, model, optimizer, scheduler, stage_dir: Path):
    """(model, optimizer, first step): resume from the newest checkpoint in ``stage_dir``, then let accelerate
    wrap the model and optimizer (DDP or DeepSpeed); under ZeRO-3 the checkpoint's optimizer state loads only now,
    into the optimizer DeepSpeed built. The scheduler stays unprepared: accelerate would step it once per rank, as
    it does for sharded dataloaders; the training loop steps it once per optimizer step."""
    start = resume(model, optimizer, scheduler, stage_dir)
    if start and accelerator.is_main_process:
        print(f"resuming {stage_dir.name} at step {start}")
    model, optimizer = accelerator.prepare(model, optimizer)
    if start:
        resume_optimizer_partition(accelerator, model, stage_dir, start)
    while scheduler.last_epoch < start:  # a checkpoint whose optimizer state is sharded keeps no scheduler state
        scheduler.step()
    model.train()
    return model, optimizer, start


def global_batch_mean(losses: torch.Tensor, weights: torch.Tensor, normalizer, world: int, accum: int) -> torch.Tensor:
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


def optimizer_step(accelerator, model, optimizer, loss, max_grad_norm: float):
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
    # on the CPU: a tensor saved from GPU k would otherwise come back on GPU k on every rank (load_state_dict moves
    # the state to each parameter's own device)
    state = torch.load(checkpoint / "training_state.pt", map_location="cpu", weights_only=False)
    if state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return json.loads((checkpoint / "state.json").read_text())["step"]


def resume_optimizer_partition(accelerator, model, stage_dir: Path, step: int) -> None:
    """After ``accelerator.prepare``, under ZeRO-3: load this rank's partition of the optimizer state (AdamW's
    moments and the fp32 weights it updates) from the newest checkpoint of ``stage_dir`` into DeepSpeed's optimizer,
    between the hooks DeepSpeed's own ``engine.load_checkpoint`` calls around it. ZeRO cuts the state by the number
    of ranks, so only a launch with as many ranks can load it. Any other resume that lacks the optimizer state (a
    checkpoint of another number of ranks, DeepSpeed on one side only) restores the weights and the schedule and
    says, once, that AdamW's moments start again."""
    checkpoint = latest_checkpoint(stage_dir)
    saved_ranks = json.loads((checkpoint / "state.json").read_text()).get("ranks")
    world, rank = accelerator.num_processes, accelerator.process_index
    partitions = list(checkpoint.glob("training_state_rank*.pt"))
    plugin = accelerator.state.deepspeed_plugin
    zero3 = under_zero3(accelerator)
    if zero3 and saved_ranks == world == len(partitions):
        optimizer = model.optimizer  # DeepSpeed's ZeRO-3 optimizer, which accelerate's wrapper steps
        states = [None] * world  # it reads the entry of its own rank
        states[rank] = torch.load(checkpoint / f"training_state_rank{rank}.pt", map_location="cpu", weights_only=False)
        optimizer.checkpoint_event_prologue()
        optimizer.load_state_dict(states)
        optimizer.checkpoint_event_epilogue()
        return
    whole_state = torch.load(checkpoint / "training_state.pt", map_location="cpu", weights_only=False, mmap=True)
    whole = whole_state["optimizer"] is not None  # mapped, not read: only whether the state is there
    if whole and plugin is None:
        return  # resume() loaded it before prepare
    if partitions:
        saved = f"the checkpoint holds its ZeRO-3 partitions for {saved_ranks} ranks"
    elif whole:
        saved = "the checkpoint holds it whole, saved without DeepSpeed"
    else:
        saved = "the checkpoint holds none (saved under ZeRO-1/2)"
    launch = f"{world} rank{'s' if world > 1 else ''} {'under' if zero3 else 'without'} ZeRO-3"
    if accelerator.is_main_process:
        print(
            f"resuming {stage_dir.name} at step {step} without the optimizer state: {saved}, and this launch runs "
            f"{launch}; AdamW's moments start again from zero"
        )


def checkpoint_weights(accelerator, model) -> dict | None:
    """The weights a checkpoint of the prepared ``model`` keeps, on the main process (None on the others; every rank
    must call it). A peft model keeps its trainable weights, the adapter, under their names in the model, and under
    ZeRO-3 only those are gathered: accelerate's ``get_state_dict`` would gather every base weight to rank 0 too,
    a whole model's traffic and rank 0's memory to keep a few MB. Any other model keeps all its weights."""
    from peft import PeftModel

    unwrapped = accelerator.unwrap_model(model)
    if not isinstance(unwrapped, PeftModel):
        return accelerator.get_state_dict(model)
    trainable = {name: p for name, p in unwrapped.named_parameters() if p.requires_grad}
    gathered = contextlib.nullcontext()
    if under_zero3(accelerator):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(trainable.values()))
    with gathered:
        if not accelerator.is_main_process:
            return None
        return {name: p.detach().cpu().clone() for name, p in trainable.items()}  # gathered tensors go on leaving


def save_resumable(accelerator, model, stage_dir: Path, step: int, optimizer, scheduler, keep: int = 2) -> None:
    """A resumable checkpoint: the weights (a peft model's adapter alone), the optimizer and the scheduler; of a
    stage's checkpoints the newest ``keep`` stay. Under ZeRO-3 the optimizer state is cut over the ranks: every
    rank writes its own partition, ``training_state_rank<r>.pt``, which ``start_training`` loads back into a
    launch with as many ranks (the scheduler, a function of the step, is replayed). Under ZeRO-1/2, whose
    partitions are not saved, a resume restarts the optimizer state and says so."""
    weights = checkpoint_weights(accelerator, model)
    plugin = accelerator.state.deepspeed_plugin
    staging = staging_path(checkpoint_path(stage_dir, step))
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # a save killed mid-way, maybe by a launch of more ranks
        staging.mkdir(parents=True)
    if under_zero3(accelerator):
        accelerator.wait_for_everyone()
        torch.save(model.optimizer.state_dict(), staging / f"training_state_rank{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        whole = plugin is None  # under DeepSpeed the ranks' partitions hold it, and the schedule is replayed
        save_checkpoint(
            stage_dir,
            step,
            accelerator.unwrap_model(model),
            optimizer if whole else None,
            scheduler if whole else None,
            state={"ranks": accelerator.num_processes},
            state_dict=weights,
        )
        prune_checkpoints(stage_dir, keep)
    accelerator.wait_for_everyone()


def save_final(accelerator, model, folder: Path, info: dict, tokenizer=None) -> None:
    """A stage's result: the weights (an adapter alone for a peft model, gathered alone under ZeRO-3), the
    tokenizer if given, and a JSON summary ``steps.json`` whose presence marks the stage done."""
    # A model that never trained (an empty D_sft) was never prepared: every rank holds it whole, and DeepSpeed's
    # gather would fail on it.
    prepared = accelerator.unwrap_model(model) is not model
    state_dict = checkpoint_weights(accelerator, model) if prepared else None
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(folder, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        (folder / "steps.json").write_text(json.dumps(info))
    accelerator.wait_for_everyone()
