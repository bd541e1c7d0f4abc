"""Supervised fine-tuning on (prompt, completion) examples, the step every method shares: ECPO's SGPT (Eq. 1),
GRSU's instruction tuning (Eq. 4), SMTPO's simulator and recommender SFT (Eq. 6). All of them minimise the
negative log-likelihood of the completion tokens given the prompt, averaged over the completion tokens of each
global batch; the methods differ only in their data and their hyper-parameters.

    examples = [{"input_ids": ids, "completion_mask": mask}, ...]   # common.tokens.encode_prompt_completion
    model = supervised_finetuning(run, args, model, tokenizer, examples, "sft", lr=5e-5, batch_size=8, epochs=3, ...)
"""

from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

from common.checkpoints import resume_and_prepare, save_resumable
from common.distributed import backward_and_step, micro_batches, share_of_global_mean, training_steps
from common.tokens import collate, sequence_logprobs


def completion_nll(token_logps: torch.Tensor) -> torch.Tensor:
    """-sum_k log p(o_k | o_<k, prompt) over each row's completion tokens ([B]; ``token_logps`` [B, L] is zero off
    the completion). Divided by the global batch's completion tokens, a step's loss is the mean NLL per token."""
    return -token_logps.sum(-1)


def supervised_finetuning(
    run,
    args,
    model,
    tokenizer,
    examples: list[dict],
    stage: str,
    *,
    lr: float,
    batch_size: int,
    epochs: int,
    warmup_ratio: float,
    max_warmup_steps: int | None = None,
    min_lr_ratio: float = 0.0,
    weight_decay: float = 0.0,
    metric_prefix: str = "train",
    keep_checkpoints: int = 2,
):
    """AdamW, linear warmup over ``warmup_ratio`` of the run (at most ``max_warmup_steps``), then cosine decay to
    ``min_lr_ratio`` of the peak, gradient clipping at ``args.max_grad_norm``; the same global batches of
    ``args.micro_batch_size`` micro-batches on any number of ranks, ordered by ``args.seed``. Resumes from the
    newest checkpoint in runs/<run>/<stage>/, saved every ``args.save_every`` steps (0: at the end of each epoch) and
    at the end, of which the newest ``keep_checkpoints`` stay; logs <metric_prefix>/loss per step. Returns the
    prepared model."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    accelerator = run.accelerator
    steps, accum = training_steps(accelerator, len(examples), batch_size, args.micro_batch_size, epochs, args.seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    warmup = min(math.ceil(warmup_ratio * len(steps)), max_warmup_steps or len(steps))
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, len(steps), min_lr_rate=min_lr_ratio)
    model, optimizer, start = resume_and_prepare(accelerator, model, optimizer, scheduler, run.dir / stage)
    per_epoch, epoch_losses = len(steps) // epochs, []
    every = args.save_every or max(per_epoch, 1)  # optimizer steps between checkpoints: an epoch by default
    logged = run.steps_logged(metric_prefix, start, f"{stage} steps")
    for step in tqdm(range(start, len(steps)), desc=stage, initial=start, total=len(steps), disable=not run.main):
        started, batch, loss_sum = time.time(), steps[step], 0.0
        completion_tokens = sum(sum(examples[i]["completion_mask"]) for i in batch)
        for chunk, weights in micro_batches(examples, batch, accelerator, args.micro_batch_size, accum):
            # ALGO LOGIC: the masked NLL of the completions (Eq. 1), its share of the global token mean, a step
            with accelerator.accumulate(model):
                rows = [(e["input_ids"], e["completion_mask"]) for e in chunk]
                inputs = {k: v.to(run.device) for k, v in collate(rows, tokenizer.pad_token_id).items()}
                _, _, token_logps = sequence_logprobs(model, **inputs)
                loss = share_of_global_mean(completion_nll(token_logps), weights, completion_tokens, run.world, accum)
                grad_norm = backward_and_step(accelerator, model, optimizer, loss, args.max_grad_norm)
            loss_sum += loss.item() / (run.world * accum)
        scheduler.step()

        # bookkeeping: the step's curve point (its loss summed over ranks) and line, each epoch's mean, a checkpoint
        metrics = {"lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "epoch": (step + 1) * epochs / len(steps)}
        metrics = {f"{metric_prefix}/{name}": value for name, value in metrics.items()}
        sums, show = {f"{metric_prefix}/loss": loss_sum}, f"{stage} step {step + 1}/{len(steps)}"
        if step >= logged:
            epoch_losses.append(
                run.log_step(metrics, time.time() - started, sums=sums, show=show)[f"{metric_prefix}/loss"]
            )
        else:  # a step a killed launch logged is redone, not logged again; its loss still counts in the epoch's mean
            epoch_losses.append(run.sum_over_ranks(sums)[f"{metric_prefix}/loss"])
        if (step + 1) % per_epoch == 0 and run.main:  # batches differ in what they hold: the epoch mean shows the trend
            tqdm.write(
                f"{stage} epoch {(step + 1) // per_epoch}: mean loss {sum(epoch_losses) / len(epoch_losses):.4f}"
            )
            epoch_losses = []
        if (step + 1) % every == 0 or step + 1 == len(steps):
            save_resumable(accelerator, model, run.dir / stage, step + 1, optimizer, scheduler, keep_checkpoints)
    return model
