"""Checkpoints: a stage's resumable checkpoints (written whole or not at all, the newest few kept), the resume
that loads the newest back (the optimizer state too, partitioned over the ranks under ZeRO-3), and a stage's
final weights."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

from common.distributed import under_zero3


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """``checkpoints/step_<step>/`` of a run. A checkpoint is written in ``staging_path`` of it and renamed into
    place when complete, so a run killed while saving never resumes from half a checkpoint."""
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def staging_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + ".tmp")


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model,
    optimizer=None,
    scheduler=None,
    state: dict | None = None,
    state_dict: dict | None = None,
) -> Path:
    """Write ``checkpoints/step_<step>/``: the model (a peft model saves only its adapter), the optimizer
    and scheduler states, and a JSON ``state``. The folder is renamed into place when complete, with whatever the
    caller wrote into its staging folder before (each rank's share of a sharded optimizer state).
    ``state_dict`` overrides the model's own (under ZeRO-3, the weights gathered from the ranks; for a peft model,
    its trainable weights alone are enough: peft keeps the adapter's entries of whatever it is given)."""
    final = checkpoint_path(run_dir, step)
    tmp = staging_path(final)
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    torch.save(
        {
            "optimizer": optimizer.state_dict() if optimizer else None,
            "scheduler": scheduler.state_dict() if scheduler else None,
        },
        tmp / "training_state.pt",
    )
    (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    folders = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
    return folders[-1] if folders else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints of a run and delete the rest, with any staging folder a save
    killed mid-way left behind (call it only when no save is under way). A checkpoint with its optimizer state is
    about three times the trainable weights, every one of which a run of many steps would otherwise keep."""
    folders = sorted((Path(run_dir) / "checkpoints").glob("step_*"))
    complete = [p for p in folders if not p.name.endswith(".tmp")]
    for old in [p for p in folders if p.name.endswith(".tmp")] + complete[: max(len(complete) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)


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


def resume_and_prepare(accelerator, model, optimizer, scheduler, stage_dir: Path):
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
    rank writes its own partition, ``training_state_rank<r>.pt``, which ``resume_and_prepare`` loads back into a
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
