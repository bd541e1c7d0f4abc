"""One GRPO update of smtpo.py against TRL's GRPOTrainer on the same group and LoRA, and one rollout turn with G
shared-prefill samples against G independent generations; prints two tables.

    python bench/bench_smtpo_grpo.py                  # embedded SmolLM2, CPU, G = 4
    python bench/bench_smtpo_grpo.py --threads 2 --repeats 9

The group: G outputs sampled (temperature 1) from one SMTPO recommender prompt (``smtpo.recommender_prompt`` on
the first demo test context and 20 demo candidates) by ``HFChat.chat(n=G)``; its advantages come from fixed
rewards (a 135M model rarely writes the format, so its real rewards are often all equal and every advantage 0).
Both sides train the same LoRA (smtpo.Args defaults) from the same weights, without gradient checkpointing.

Our update is ``smtpo.grpo_update``: the reference log-probs with the adapter switched off, one forward of the
group, ``smtpo.grpo_loss`` (Eq. 14), backward, clipping and the AdamW step. TRL's is the same work as its
trainer splits it: the reference log-probs (``_get_per_token_logps_and_entropies`` with the adapter disabled,
done in its generation step), ``compute_loss`` with ``loss_type="grpo"``, backward, clipping and the step. The
two variants alternate, one of each per round, and the median of the timed rounds is reported. lora_B starts
from seeded noise, so the policy differs from the reference and the KL term is not zero. Losses are compared on
identical weights, before any update.
"""

from __future__ import annotations

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
from common.tokens import collate, render_prompt  # noqa: E402


@dataclass
class Args:
    policy: str = "smollm2-135m"
    """model both sides train (a load_model spec)"""
    group_size: int = 4
    """G: outputs of the one prompt (paper: 4)"""
    max_tokens: int = 160
    """length cap of each sampled output (smtpo.Args.rec_max_tokens)"""
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


def group_prompt(cfg: smtpo.Args) -> str:
    data = smtpo.load_data(cfg)
    sample = data.test[0]
    candidates = ([sample.target] + [t for t in data.catalog.titles if t != sample.target])[: cfg.num_candidates]
    return smtpo.recommender_prompt(sample, candidates, "", "", cfg.list_length)


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
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = smtpo.Args(micro_batch_size=args.group_size, gradient_checkpointing=False, seed=args.seed)
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
        (outputs,) = chat.chat([conversation], n=args.group_size, temperature=1.0, max_tokens=args.max_tokens)
        middle = time.perf_counter()
        for _ in range(args.group_size):
            chat.chat([conversation], n=1, temperature=1.0, max_tokens=args.max_tokens)
        end = time.perf_counter()
        if round_ >= args.warmup:
            shared.append(middle - start)
            independent.append(end - middle)
        if round_ == 0:
            group = outputs
    prompt_tokens = len(tokenizer(render_prompt(tokenizer, conversation), add_special_tokens=False).input_ids)

    # ------------------------------------------------------------------ the group as both sides see it
    rewards = torch.tensor([args.rewards[k % len(args.rewards)] for k in range(args.group_size)])
    advantages = smtpo.group_advantages(rewards)
    examples = [
        smtpo.encode_example(tokenizer, prompt, text, cfg.max_length) | {"advantage": a}
        for text, a in zip(group, advantages.tolist())
    ]
    batch = collate([(e["input_ids"], e["completion_mask"]) for e in examples], tokenizer.pad_token_id)
    prompt_length = examples[0]["completion_mask"].index(1)
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
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.grpo_lr)
        model, optimizer = run.accelerator.prepare(model, optimizer)
        model.train()

        # ------------------------------------------------------------------ TRL: same base, LoRA, weights
        trl_base, _ = load_merged(args.policy)
        config = GRPOConfig(
            output_dir=tempfile.mkdtemp(),
            loss_type="grpo",
            beta=cfg.kl_beta,
            epsilon=cfg.epsilon,
            num_generations=args.group_size,
            per_device_train_batch_size=args.group_size,
            gradient_accumulation_steps=1,
            learning_rate=cfg.grpo_lr,
            max_grad_norm=cfg.max_grad_norm,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
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
        set_peft_model_state_dict(trl_model, get_peft_model_state_dict(run.accelerator.unwrap_model(model)))
        trainer.create_optimizer_and_scheduler(num_training_steps=1000)
        trainer.current_gradient_accumulation_steps = 1  # set by train(), which we do not call
        trl_model.train()
        input_ids = batch["input_ids"]
        attention_mask = batch["attention_mask"]

        def trl_reference() -> torch.Tensor:
            with torch.no_grad(), trl_model.disable_adapter():
                logps, _, _ = trainer._get_per_token_logps_and_entropies(
                    trl_model, input_ids, attention_mask, completion_ids.size(1)
                )
            return logps

        def trl_step() -> float:
            loss = trainer.compute_loss(trl_model, trl_inputs | {"ref_per_token_logps": trl_reference()})
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trl_model.parameters(), cfg.max_grad_norm)
            trainer.optimizer.step()
            trl_model.zero_grad()
            return loss.item()

        def our_step() -> float:
            return smtpo.grpo_update(run, cfg, model, optimizer, tokenizer, examples)["loss"]

        # ------------------------------------------------------------------ losses on identical weights
        with torch.no_grad():
            loss_trl = trainer.compute_loss(trl_model, trl_inputs | {"ref_per_token_logps": trl_reference()}).item()
        times = {"ours (smtpo.grpo_update)": [], "TRL GRPOTrainer": []}
        losses = {}
        for round_ in range(args.warmup + args.repeats):
            for name, step in (("ours (smtpo.grpo_update)", our_step), ("TRL GRPOTrainer", trl_step)):
                start = time.perf_counter()
                loss = step()
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - start)
                losses.setdefault(name, loss)  # the first step's loss: identical weights on both sides
    loss_ours = losses["ours (smtpo.grpo_update)"]

    lengths = completion_mask.sum(-1).tolist()
    print(
        f"\nmodel: {args.policy} + LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha}   device: cpu x "
        f"{torch.get_num_threads()} threads   trl {trl.__version__}   beta {cfg.kl_beta}   eps {cfg.epsilon}"
    )
    print(
        f"group: G = {args.group_size}, prompt {prompt_tokens} tokens, outputs {lengths} tokens, "
        f"advantages {[round(a, 3) for a in advantages.tolist()]}   median of {args.repeats} rounds"
    )
    print(f"\n{'GRPO update':<26}{'ms':>10}{'x ours':>9}{'loss (1st step)':>18}{'|diff|':>11}")
    ours_ms = median_ms(times["ours (smtpo.grpo_update)"])
    for name, t in times.items():
        print(f"{name:<26}{median_ms(t):10.1f}{median_ms(t) / ours_ms:9.2f}{losses[name]:18.10f}{'':>11}")
    diff = abs(loss_trl - loss_ours)
    print(f"{'TRL compute_loss, no step':<26}{'':>10}{'':>9}{loss_trl:18.10f}{diff:11.2e}")
    verdict = "PASS" if diff <= args.tolerance else "FAIL"
    speed = median_ms(times["TRL GRPOTrainer"]) / ours_ms
    print(f"loss agreement (<= {args.tolerance:g}): {verdict};  ours is {speed:.2f}x TRL's speed (target >= 1.0x)")

    s, i = statistics.median(shared), statistics.median(independent)
    print(f"\n{'rollout turn, G = ' + str(args.group_size):<34}{'s':>8}{'outputs/s':>11}")
    print(f"{'HFChat.chat(n=G), one prefill':<34}{s:8.2f}{args.group_size / s:11.2f}")
    print(f"{'G independent generations':<34}{i:8.2f}{args.group_size / i:11.2f}")
    print(f"shared prefill: {i / s:.2f}x the speed of independent generations (max {args.max_tokens} new tokens)")


if __name__ == "__main__":
    main(tyro.cli(Args))
