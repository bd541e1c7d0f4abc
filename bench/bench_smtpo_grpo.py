"""GRPO updates of smtpo.py against TRL's GRPOTrainer on the same group and LoRA (mu = 2 iterations on it, so that
the clip acts in the second), and one rollout turn with G shared-prefill samples against G independent generations;
prints two tables.

    python bench/bench_smtpo_grpo.py                  # embedded SmolLM2, CPU, G = 4
    python bench/bench_smtpo_grpo.py --threads 2 --repeats 9

The group: G outputs sampled (temperature 1) from one SMTPO recommender prompt (``smtpo.recommender_prompt`` on
the first demo test context and 20 demo candidates) by ``HFChat.complete(n=G)``, kept as the sampled token ids;
its advantages come from fixed rewards (a 135M model rarely writes the format, so its real rewards are often all
equal and every advantage 0). Both sides train the same LoRA (smtpo.Args defaults) from the same weights, without
gradient checkpointing.

Our update is ``smtpo.grpo_update`` with ``--iterations`` (mu, default 2): the reference log-probs with the adapter
switched off, then per iteration one forward of the group, ``smtpo.grpo_loss`` (Eq. 14), backward, clipping and
the AdamW step; pi_old's log-probs are the first iteration's, held. TRL's is the same work as its trainer splits
it (``num_iterations`` = mu): the reference and, for mu > 1, pi_old's log-probs (``_get_per_token_logps_and_
entropies``, done in its generation step), then per iteration ``compute_loss`` with ``loss_type="grpo"`` and
``use_bias_correction_kl=False`` (Eq. 14's KL; TRL's default weights it by the ratio), backward, clipping and the
step. From identical weights, the losses, TRL's clip ratio and the gradients each step applies are compared
iteration by iteration (the second iteration's clip acts on both sides; the first iteration's loss is almost all
KL, since the advantages sum to zero, so its gradient is the sharper check); then the two variants alternate, one of
each per timed round, and the median is reported. lora_B starts from seeded noise, so the policy differs from the
reference and the KL term is not zero.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import smtpo  # noqa: E402
from common.llm import HFChat  # noqa: E402
from common.models import load_merged  # noqa: E402
from common.run import Run  # noqa: E402
from common.tokens import collate  # noqa: E402


@dataclass
class Args:
    policy: str = "smollm2-135m"
    """model both sides train (a load_model spec)"""
    group_size: int = 4
    """G: outputs of the one prompt (paper: 4)"""
    max_tokens: int = 160
    """length cap of each sampled output (smtpo.Args.rec_max_tokens)"""
    iterations: int = 2
    """mu: optimizer steps on the group (smtpo --grpo-iterations, TRL num_iterations)"""
    lr: float = 1e-3
    """learning rate of both sides (above smtpo.Args.grpo_lr, 3e-4, so that the second iteration clips)"""
    rewards: tuple[float, ...] = (2.0, 0.0, 1.0, 0.5)
    """the group's rewards (repeated to G), normalized into advantages by smtpo.group_advantages"""
    repeats: int = 5
    """timed rounds; the median is reported"""
    warmup: int = 1
    """untimed rounds before the timed ones"""
    threads: int | None = None
    """torch CPU threads; None keeps torch's default"""
    perturb_b: float = 0.02
    """std of the seeded noise put in lora_B (0 keeps PEFT's zero init, where the policy is the reference)"""
    seed: int = 1
    """seed of the LoRA init, the lora_B noise and the sampling"""
    tolerance: float = 1e-5
    """largest |loss TRL - loss ours| that counts as agreement"""
    grad_tolerance: float = 1e-3
    """largest relative difference of one weight matrix's applied gradient that counts as agreement (fp32 rounding
    of two different log-prob kernels, amplified where the group's gradients cancel)"""


def group_prompt(cfg: smtpo.Args) -> str:
    data = smtpo.load_data(cfg)
    sample = data.evaluated[0]
    candidates = ([sample.target] + [t for t in data.catalog.titles if t != sample.target])[: cfg.num_candidates]
    return smtpo.recommender_prompt(sample, candidates, "", [], cfg.list_length, data.catalog)


def perturb(model, std: float, seed: int) -> None:
    noise = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=noise) * std)


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def main(args: Args) -> None:
    warnings.filterwarnings("ignore")
    import transformers
    import trl
    from datasets import Dataset, disable_progress_bars
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import get_constant_schedule
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = smtpo.Args(
        micro_batch_size=args.group_size,
        gradient_checkpointing=False,
        seed=args.seed,
        grpo_iterations=args.iterations,
        grpo_lr=args.lr,
    )
    prompt = group_prompt(cfg)
    conversation = [{"role": "user", "content": prompt}]

    # ------------------------------------------------------------------ rollout: one prefill shared by G samples
    model, tokenizer = load_merged(args.policy, [], "cpu", (cfg.lora_rank, cfg.lora_alpha), args.seed)
    perturb(model, args.perturb_b, args.seed)
    chat = HFChat(model, tokenizer, batch_size=args.group_size)
    shared, independent = [], []
    for round_ in range(args.warmup + max(1, args.repeats // 2)):
        torch.manual_seed(args.seed + round_)
        start = time.perf_counter()
        (sampled,) = chat.complete([conversation], n=args.group_size, temperature=1.0, max_tokens=args.max_tokens)
        middle = time.perf_counter()
        for _ in range(args.group_size):
            chat.complete([conversation], n=1, temperature=1.0, max_tokens=args.max_tokens)
        end = time.perf_counter()
        if round_ >= args.warmup:
            shared.append(middle - start)
            independent.append(end - middle)
        if round_ == 0:
            group = sampled
    prompt_tokens = len(group[0].prompt_ids)

    # ------------------------------------------------------------------ the group as both sides see it
    rewards = [args.rewards[k % len(args.rewards)] for k in range(args.group_size)]
    turn = {
        "prompt_ids": group[0].prompt_ids,
        "completion_ids": [c.completion_ids for c in group],
        "rewards": [{"total": r} for r in rewards],
    }
    examples = smtpo.group_examples([turn])
    advantages = smtpo.group_advantages(torch.tensor(rewards))
    batch = collate([(e["input_ids"], e["completion_mask"]) for e in examples], tokenizer.pad_token_id)
    prompt_length = len(group[0].prompt_ids)
    completion_ids = batch["input_ids"][:, prompt_length:]
    completion_mask = batch["completion_mask"][:, prompt_length:]
    trl_inputs = {
        "prompt_ids": batch["input_ids"][:, :prompt_length],
        "prompt_mask": batch["attention_mask"][:, :prompt_length],
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "num_items_in_batch": completion_mask.sum(),
    }

    # ------------------------------------------------------------------ ours: smtpo.grpo_update
    with tempfile.TemporaryDirectory() as tmp:
        cfg.run_name = str(Path(tmp) / "bench")
        run = Run(cfg)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=cfg.grpo_lr, weight_decay=0
        )
        scheduler = get_constant_schedule(optimizer)
        model, optimizer = run.accelerator.prepare(model, optimizer)
        model.train()
        start_state = copy.deepcopy(get_peft_model_state_dict(run.accelerator.unwrap_model(model)))

        # ------------------------------------------------------------------ TRL: same base, LoRA, weights
        trl_base, _ = load_merged(args.policy)
        config = GRPOConfig(
            output_dir=tempfile.mkdtemp(),
            loss_type="grpo",
            beta=cfg.kl_beta,
            # Eq. 14's KL term is the k3 estimate alone. TRL's default (True) multiplies it by the ratio pi_theta /
            # pi_old (DeepSeek-V3.2's correction): the loss changes from the second iteration on, and the gradient
            # in every iteration, since the ratio is differentiable even where it equals 1.
            use_bias_correction_kl=False,
            epsilon=cfg.epsilon,
            num_iterations=args.iterations,
            num_generations=args.group_size,
            per_device_train_batch_size=args.group_size,
            gradient_accumulation_steps=1,
            learning_rate=cfg.grpo_lr,
            max_grad_norm=cfg.max_grad_norm,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            optim="adamw_torch",
            gradient_checkpointing=False,
            bf16=False,
            fp16=False,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            seed=args.seed,
        )
        trainer = GRPOTrainer(
            model=trl_base,
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
            args=config,
            train_dataset=Dataset.from_list([{"prompt": conversation}] * args.group_size),
            processing_class=tokenizer,
            peft_config=copy.deepcopy(run.accelerator.unwrap_model(model).peft_config["default"]),
        )
        trl_model = trainer.model
        set_peft_model_state_dict(trl_model, start_state)
        trainer.create_optimizer_and_scheduler(num_training_steps=1000)
        trainer.current_gradient_accumulation_steps = 1  # set by train(), which we do not call
        trl_model.train()
        input_ids = batch["input_ids"]
        attention_mask = batch["attention_mask"]

        def trl_logps(adapter: bool) -> torch.Tensor:
            with torch.no_grad(), contextlib.nullcontext() if adapter else trl_model.disable_adapter():
                logps, _, _ = trainer._get_per_token_logps_and_entropies(
                    trl_model, input_ids, attention_mask, completion_ids.size(1)
                )
            return logps

        def trl_update() -> list[dict[str, float]]:
            """TRL's generation step (the reference's and pi_old's log-probs), then mu optimizer steps."""
            inputs = trl_inputs | {"ref_per_token_logps": trl_logps(adapter=False)}
            if args.iterations > 1:
                inputs["old_per_token_logps"] = trl_logps(adapter=True)
            steps = []
            for _ in range(args.iterations):
                trainer._metrics["train"].clear()
                loss = trainer.compute_loss(trl_model, inputs)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trl_model.parameters(), cfg.max_grad_norm)
                trainer.optimizer.step()
                trl_model.zero_grad()
                clip = trainer._metrics["train"]["clip_ratio/region_mean"]
                steps.append({"loss": loss.item(), "clip_ratio/region_mean": clip[-1]})
            return steps

        def our_update() -> list[dict[str, float]]:
            return smtpo.grpo_update(run, cfg, model, optimizer, scheduler, examples)

        # ------------------------------------------------------------------ mu iterations from identical weights
        applied = {"ours": [], "TRL": []}  # per optimizer step, the gradients it applies (after clipping), by name
        hooks = []
        for side, optim, owner in (
            ("ours", getattr(optimizer, "optimizer", optimizer), run.accelerator.unwrap_model(model)),
            ("TRL", trainer.optimizer, trl_model),
        ):
            names = {id(p): n.removeprefix("base_model.model.") for n, p in owner.named_parameters()}

            def record(opt, *_, side=side, names=names):
                grads = {
                    names[id(p)]: p.grad.clone() for g in opt.param_groups for p in g["params"] if p.grad is not None
                }
                applied[side].append(grads)

            hooks.append(optim.register_step_pre_hook(record))
        per_iteration = {"ours (smtpo.grpo_update)": our_update(), "TRL GRPOTrainer": trl_update()}
        for hook in hooks:
            hook.remove()
        times = {"ours (smtpo.grpo_update)": [], "TRL GRPOTrainer": []}
        for round_ in range(args.warmup + args.repeats):
            for name, update in (("ours (smtpo.grpo_update)", our_update), ("TRL GRPOTrainer", trl_update)):
                start = time.perf_counter()
                update()
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - start)

    lengths = completion_mask.sum(-1).tolist()
    print(
        f"\nmodel: {args.policy} + LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha}   device: cpu x "
        f"{torch.get_num_threads()} threads   trl {trl.__version__}   beta {cfg.kl_beta}   eps {cfg.epsilon}"
    )
    print(
        f"group: G = {args.group_size}, prompt {prompt_tokens} tokens, outputs {lengths} tokens, "
        f"advantages {[round(a, 3) for a in advantages.tolist()]}   median of {args.repeats} rounds"
    )
    ours, theirs = per_iteration["ours (smtpo.grpo_update)"], per_iteration["TRL GRPOTrainer"]
    print(
        f"\n{'iteration':<11}{'loss ours':>16}{'loss TRL':>16}{'|diff|':>10}{'clipped ours':>14}{'clipped TRL':>13}"
        f"{'gradient diff':>15}"
    )
    worst, worst_grad = 0.0, 0.0
    for k, (a, b, g_ours, g_trl) in enumerate(zip(ours, theirs, applied["ours"], applied["TRL"]), 1):
        diff = abs(a["loss"] - b["loss"]) + abs(a["clip_ratio/region_mean"] - b["clip_ratio/region_mean"])
        # the largest relative difference of one weight matrix's gradient
        grad = max(float((g_ours[n] - g_trl[n]).norm() / g_trl[n].norm().clamp(min=1e-30)) for n in g_trl)
        worst, worst_grad = max(worst, diff), max(worst_grad, grad)
        print(
            f"{k:<11}{a['loss']:16.10f}{b['loss']:16.10f}{abs(a['loss'] - b['loss']):10.2e}"
            f"{a['clip_ratio/region_mean']:14.4f}{b['clip_ratio/region_mean']:13.4f}{grad:15.2e}"
        )
    verdict = "PASS" if worst <= args.tolerance and worst_grad <= args.grad_tolerance else "FAIL"
    print(
        f"agreement of losses and clip ratios (<= {args.tolerance:g}) and of gradients (<= {args.grad_tolerance:g} "
        f"relative, per weight matrix): {verdict}"
    )
    print(f"\n{'GRPO update, mu = ' + str(args.iterations):<26}{'ms':>10}{'x ours':>9}")
    ours_ms = median_ms(times["ours (smtpo.grpo_update)"])
    for name, t in times.items():
        print(f"{name:<26}{median_ms(t):10.1f}{median_ms(t) / ours_ms:9.2f}")
    speed = median_ms(times["TRL GRPOTrainer"]) / ours_ms
    print(f"ours is {speed:.2f}x TRL's speed (target >= 1.0x)")

    s, i = statistics.median(shared), statistics.median(independent)
    print(f"\n{'rollout turn, G = ' + str(args.group_size):<34}{'s':>8}{'outputs/s':>11}")
    print(f"{'HFChat.complete(n=G), one prefill':<34}{s:8.2f}{args.group_size / s:11.2f}")
    print(f"{'G independent generations':<34}{i:8.2f}{args.group_size / i:11.2f}")
    print(f"shared prefill: {i / s:.2f}x the speed of independent generations (max {args.max_tokens} new tokens)")


if __name__ == "__main__":
    main(tyro.cli(Args))
