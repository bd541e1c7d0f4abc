"""One DPO optimizer step of ecpo.py against TRL's DPOTrainer on the same batch and LoRA; prints a table.

    python bench/bench_ecpo_dpo.py                       # embedded SmolLM2, CPU, 4 pairs = 8 rows
    python bench/bench_ecpo_dpo.py --threads 2 --repeats 9

Both sides train the same LoRA (ecpo.Args defaults: rank, alpha, all linear layers) on the same base model and
the same preference pairs: ActCRS states built by ``ecpo.actcrs_prompt`` with "Ask[...]"/"Recommend[...]"
completions. Our step is the body of ``ecpo.train_preferences`` for one DPO micro-batch: the reference log-probs
are stored beforehand by ``ecpo.reference_logps`` (adapter disabled), then one forward of the chosen and rejected
rows together (``ecpo.sequence_logps``), ``ecpo.dpo_loss``, backward, gradient clipping, AdamW and scheduler
step, zero_grad. TRL's step is ``trainer.training_step`` followed by the same clip/step/zero_grad its training
loop does, timed twice: with ``precompute_ref_log_probs=True`` (TRL stores the reference log-probs in its
dataset when the trainer is built, as we do) and with the reference forward inside the step (TRL's default).
The three steps run in turn, one of each per round, and the median of the timed rounds is reported.

lora_B starts from small seeded noise instead of zeros, so the policy differs from the reference and the loss
check is not the trivial ln 2; both models get the same adapter weights. The losses are taken before any update.
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

import ecpo  # noqa: E402
from common.models import add_lora, load_model  # noqa: E402
from common.run import Run  # noqa: E402
from common.tokens import render_prompt  # noqa: E402

# (ActCRS scratchpad, chosen, rejected): the kinds of turns ECPO's backward stage turns into pairs
PAIRS = [
    (
        ["Observation 1: User: Hi! I'm looking for a movie to watch this weekend."],
        "Ask[Happy to help! What are you in the mood for: something light and funny, or something tense and gripping?]",
        "Recommend[You should watch Titanic (1997). It is a classic that almost everyone loves.]",
    ),
    (
        [
            "Observation 1: User: Can you suggest a good science fiction film?",
            "Action 1: Search[thoughtful science fiction drama]",
            "Observation 2: Search results: 1. Arrival (2016); genre: drama, sci-fi "
            "2. Moon (2009); genre: drama, sci-fi",
        ],
        "Recommend[Arrival (2016) is a thoughtful sci-fi drama about language and time. If you like quieter stories, "
        "Moon (2009) is another great pick.]",
        "Ask[Do you like movies?]",
    ),
    (
        [
            "Observation 1: User: I loved Toy Story. Anything similar for a family night?",
            "Action 1: Ask[Do your kids prefer funny adventures or musicals?]",
            "Observation 2: User: Funny adventures, definitely.",
        ],
        "Ask[Great choice! Should it be animated like Toy Story, or would a live-action family comedy work too?]",
        "Recommend[You could try The Shining (1980), a famous film that many people call one of the best ever made.]",
    ),
    (
        [
            "Observation 1: User: I want something romantic but not too cheesy.",
            "Action 1: Search[understated romantic drama]",
            "Observation 2: Search results: 1. Before Sunrise (1995); genre: romance, drama "
            "2. Brooklyn (2015); genre: romance",
        ],
        "Recommend[Before Sunrise (1995) is a quiet, honest romance built on one long conversation. Brooklyn (2015) "
        "is warmer but never cheesy.]",
        "Ask[What kind of movies do you usually watch, and what is your favourite genre of all?]",
    ),
]


@dataclass
class Args:
    policy: str = "smollm2-135m"
    """model both sides train (a load_model spec)"""
    pairs: int = 4
    """preference pairs in the micro-batch (2 rows each); the four built-in pairs repeat beyond 4"""
    repeats: int = 5
    """timed rounds (one step of each variant per round); the median is reported"""
    warmup: int = 1
    """untimed rounds before the timed ones"""
    threads: int | None = None
    """torch CPU threads; None keeps torch's default"""
    perturb_b: float = 0.02
    """std of the seeded noise put in lora_B (0 keeps PEFT's zero init, where the loss is ln 2 on any batch)"""
    seed: int = 1
    """seed of the LoRA init and the lora_B noise"""
    tolerance: float = 1e-4
    """largest |loss TRL - loss ours| that counts as agreement"""


def our_step(model, examples, optimizer, scheduler, cfg: ecpo.Args, beta: float, pad_id: int, device) -> torch.Tensor:
    """What ecpo.train_preferences does for one DPO micro-batch (one rank, no accumulation, all weights 1)."""
    rows = [(e["chosen_ids"], e["chosen_mask"]) for e in examples] + [
        (e["rejected_ids"], e["rejected_mask"]) for e in examples
    ]
    logps, _ = ecpo.sequence_logps(model, rows, pad_id, device)  # chosen and rejected rows in one forward
    b = len(examples)
    ref_chosen = torch.tensor([e["ref_chosen"] for e in examples], device=device)
    ref_rejected = torch.tensor([e["ref_rejected"] for e in examples], device=device)
    loss = ecpo.dpo_loss(logps[:b], logps[b:], ref_chosen, ref_rejected, beta).sum() / b
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss.detach()


def main(args: Args) -> None:
    warnings.filterwarnings("ignore")
    import transformers
    import trl
    from accelerate import Accelerator
    from datasets import Dataset, disable_progress_bars
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import get_cosine_schedule_with_warmup
    from trl import DPOConfig, DPOTrainer

    transformers.logging.set_verbosity_error()
    disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ecpo.Args()
    beta = cfg.beta if cfg.beta is not None else ecpo.DEFAULT_BETA["dpo"]
    pairs = [
        {
            "key": f"pair-{k}",
            "prompt": ecpo.actcrs_prompt("movie", PAIRS[k % len(PAIRS)][0], few_shot=False),
            "chosen": PAIRS[k % len(PAIRS)][1],
            "rejected": PAIRS[k % len(PAIRS)][2],
        }
        for k in range(args.pairs)
    ]

    # ------------------------------------------------------------------ ours: ecpo.py's model, data and reference
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.policy)
    model = add_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    if args.perturb_b:
        noise = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=noise) * args.perturb_b)
    examples = ecpo.pair_examples(tokenizer, pairs, cfg.max_length)
    with tempfile.TemporaryDirectory() as tmp:  # stored once, outside the timed step, as in the po stage
        cfg.run_name = str(Path(tmp) / "bench")  # an absolute name: the run folder is the temporary one
        epoch = [list(range(len(examples)))]  # one global batch of every pair, one micro-batch each
        ecpo.reference_logps(Run(cfg), model, tokenizer=tokenizer, examples=examples, args=cfg, epoch=epoch,
                             accum=len(examples))  # fmt: skip
    accelerator = Accelerator(cpu=True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.po_lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, 1000)

    # ------------------------------------------------------------------ TRL: same base, LoRA config, weights, pairs
    trl_base, _ = load_model(args.policy)
    dataset = Dataset.from_list(
        [
            {
                "prompt": render_prompt(tokenizer, [{"role": "user", "content": p["prompt"]}]),
                "chosen": p["chosen"],
                "rejected": p["rejected"],
            }
            for p in pairs
        ]
    )
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.pairs,
        gradient_accumulation_steps=1,
        learning_rate=cfg.po_lr,
        beta=beta,
        loss_type=["sigmoid"],
        max_grad_norm=cfg.max_grad_norm,
        precompute_ref_log_probs=True,
        max_length=None,
        padding_free=False,
        disable_dropout=True,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,  # TRL defaults to bf16 and checkpointing; we use neither
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        seed=args.seed,
    )
    # peft_config (not a wrapped model) makes TRL's reference "adapter disabled", like ecpo.py's
    trainer = DPOTrainer(
        model=trl_base,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=copy.deepcopy(model.peft_config["default"]),
    )
    trl_model = trainer.model
    set_peft_model_state_dict(trl_model, get_peft_model_state_dict(model))
    ours_sd, trl_sd = get_peft_model_state_dict(model), get_peft_model_state_dict(trl_model)
    same_adapter = ours_sd.keys() == trl_sd.keys() and all(torch.equal(ours_sd[k], trl_sd[k]) for k in ours_sd)
    rows = [trainer.train_dataset[i] for i in range(args.pairs)]
    same_tokens = all(
        r["prompt_ids"] + r[f"{part}_ids"] == e[f"{part}_ids"]
        for r, e in zip(rows, examples)
        for part in ("chosen", "rejected")
    )
    batch = trainer.data_collator(rows)  # fixed order; carries TRL's precomputed ref_chosen/rejected_logps
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1  # set by train(), which we do not call
    trl_model.train()

    def trl_step(precomputed: bool) -> torch.Tensor:
        trainer.precompute_ref_logps = precomputed  # the attribute precompute_ref_log_probs sets; read per batch
        loss = trainer.training_step(trl_model, batch)
        trainer.accelerator.clip_grad_norm_(trl_model.parameters(), config.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trl_model.zero_grad()
        return loss

    # ------------------------------------------------------------------ losses on identical weights, no update
    with torch.no_grad():
        rows_ours = [(e["chosen_ids"], e["chosen_mask"]) for e in examples] + [
            (e["rejected_ids"], e["rejected_mask"]) for e in examples
        ]
        logps, _ = ecpo.sequence_logps(model, rows_ours, tokenizer.pad_token_id, accelerator.device)
        ref_c = torch.tensor([e["ref_chosen"] for e in examples])
        ref_r = torch.tensor([e["ref_rejected"] for e in examples])
        loss_ours = ecpo.dpo_loss(logps[: args.pairs], logps[args.pairs :], ref_c, ref_r, beta).mean().item()
        loss_trl = {}
        for precomputed in (True, False):
            trainer.precompute_ref_logps = precomputed
            loss_trl[precomputed] = trainer.compute_loss(trl_model, trainer._prepare_inputs(batch)).item()
    ref_diff = max(
        (batch["ref_chosen_logps"] - ref_c).abs().max().item(), (batch["ref_rejected_logps"] - ref_r).abs().max().item()
    )

    # ------------------------------------------------------------------ timing, one step of each per round
    variants = {
        "ours (ecpo.py, ref stored)": lambda: our_step(
            model, examples, optimizer, scheduler, cfg, beta, tokenizer.pad_token_id, accelerator.device
        ),
        "TRL, ref precomputed": lambda: trl_step(True),
        "TRL, ref in step (default)": lambda: trl_step(False),
    }
    times = {name: [] for name in variants}
    for round_ in range(args.warmup + args.repeats):
        for name, step in variants.items():
            start = time.perf_counter()
            step()
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    ours_ms = ms["ours (ecpo.py, ref stored)"]

    n_tokens = sum(len(e[f"{part}_ids"]) for e in examples for part in ("chosen", "rejected"))
    width = max(len(e[f"{part}_ids"]) for e in examples for part in ("chosen", "rejected"))
    print(
        f"\nmodel: {args.policy} + LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha}   "
        f"device: cpu x {torch.get_num_threads()} "
        f"threads   trl {trl.__version__}   beta {beta}   lr {cfg.po_lr}"
    )
    print(
        f"batch: {args.pairs} pairs = {2 * args.pairs} rows x {width} tokens ({n_tokens} unpadded)   "
        f"median of {args.repeats} rounds after {args.warmup} warm-up   lora_B noise std {args.perturb_b}"
    )
    print(
        f"same adapter weights: {same_adapter}   same token ids: {same_tokens}   "
        f"max |ref logp TRL - ours|: {ref_diff:.2e}"
    )
    loss_of = {
        "ours (ecpo.py, ref stored)": loss_ours,
        "TRL, ref precomputed": loss_trl[True],
        "TRL, ref in step (default)": loss_trl[False],
    }
    name_w = max(map(len, variants))
    print(f"{'step':<{name_w}}  {'ms':>9}  {'TRL/ours':>8}  {'loss':>12}  {'|loss - ours|':>13}")
    for name in variants:
        ratio = f"{ms[name] / ours_ms:.2f}" if name != "ours (ecpo.py, ref stored)" else "-"
        print(
            f"{name:<{name_w}}  {ms[name]:9.1f}  {ratio:>8}  {loss_of[name]:12.8f}  "
            f"{abs(loss_of[name] - loss_ours):13.2e}"
        )
    for precomputed, label in (
        (True, "ref precomputed, like for like"),
        (False, "TRL default, ref forward in its step"),
    ):
        ratio = ms["TRL, ref precomputed" if precomputed else "TRL, ref in step (default)"] / ours_ms
        print(f"ratio TRL/ours ({label}): {ratio:.2f}  -> ours {'no slower' if ratio >= 1 else 'SLOWER'} than TRL")
    diff = max(abs(loss - loss_ours) for loss in loss_trl.values())
    print(
        f"loss check: max |loss TRL - loss ours| = {diff:.2e} (tolerance {args.tolerance:g}): "
        f"{'PASS' if diff <= args.tolerance else 'FAIL'}"
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
