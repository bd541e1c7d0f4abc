"""RSO: Reinforced Strategy Optimization. A strategy planner, trained by entropy-regularized policy gradient inside a
network of frozen LLM experts (METHODS.md Sec. 4). Docs: docs/rso.md.

    python rso.py                                        # every stage on the embedded models + the bundled demo
    python rso.py --dataset inspired --rl-episodes 12 --sft-held-out 0.25 --num-test 20   # INSPIRED, --data-dir
    accelerate launch rso.py --dataset redial --num-envs 16           # 16 episodes per update, shared by the ranks
    python rso.py paper --dataset inspired --planner <RoBERTa> ...    # the paper's settings (PAPER below)
    bash benchmark/rso_table.sh                          # the paper's Tables IV and V on GPUs

At every turn the Planner (a small encoder with a 13-way head) picks a macro strategy h_t from Table I; a
Preference Reasoner infers the user's preferences C1_t, a Fact Retriever fetches the top-K entities and their
facts from the dataset's KG (C2_t), and an Actor writes the reply a_t from (h_t, C1_t, C2_t, the history). The
user is the AILO simulator with the dialogue's target item and a persona; a Rewarder (LLM judge) scores every
new state from 1 to 5 (Eq. 9), and the episode ends when the user accepts (r_t > tau, or the user leaves after its
target was recommended). Only the Planner trains. The pipeline, one stage function each, writing under
runs/<run_name>/:

  sft   the Planner warmed up on strategy-labelled dialogues (Eq. 6), accuracy and macro-F1 on held-out
        dialogues against the majority class                              -> sft/, sft_planner/
  rl    Algorithm 1: `rollout` plays --num-envs episodes of at most --max-turns turns together with the current
        Planner (h_t ~ pi, C1_t, C2_t, a_t, the user's reply, r_t from the judge (Eq. 9), stop on acceptance);
        `planner_update` takes their discounted returns (Eq. 8, `episode_returns`: an accepted episode's turns
        left count at r = 1, see --accept-credit), subtracts a baseline and takes one step on the
        entropy-regularized policy gradient (Eq. 7); every update is on-policy
                                                                          -> rl_episodes.jsonl, rl/, rl_planner/
  eval  the uniform-random, SFT and RL planners side by side on the evaluated dialogues: Conv-SR, WI, PRS,
        Cred, Dist-2, Rec-SR, Recall@{1,5}, through the same rollout; the strategy distribution by conversation
        progress (Fig. 3)
                                          -> eval_<planner>.jsonl, judged_<planner>.jsonl, strategy_by_progress.png

A rerun with the same --run-name skips every finished record, checkpoint and planner.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ailo_sim import AILO, SimUser, audit_leaks, print_audit
from common.catalog import Catalog, encoder_path, item_card
from common.checkpoints import resume_and_prepare, save_final, save_resumable
from common.conversations import chat_roles, render_history
from common.data import CRSDataset, load_crs_dataset
from common.distributed import (
    backward_and_step,
    check_division,
    configure_batches,
    generation_weights,
    launched_processes,
    launched_with_deepspeed,
    micro_batches,
    print_dry_run,
    share_of_global_mean,
    training_steps,
)
from common.formats import Dialogue, InputError, Item, Persona, load_demo_tasks, load_inspired_tsv, load_redial_official
from common.formats import Task as UserTask
from common.judging import JudgeScoring, expected_scores, mass_metrics
from common.llm import LLMBackendError
from common.metrics import mentions_title, success_rate
from common.models import ModelSpecError, check_specs, whole_weights
from common.parsing import ParseStats
from common.presets import Preset, parse_args
from common.run import Run
from common.tracking import seed_everything

STAGES = ("sft", "rl", "eval")
PLANNERS = ("random", "sft", "rl")


@dataclass
class Args:
    exp_name: str = "rso"
    """the name of this experiment (prefix of the default run name)"""
    seed: int = 1
    """seed of python, numpy and torch: data order, head init, sampled strategies and generations"""
    run_name: str | None = None
    """outputs go to runs/<run_name>/; rerun with the same name to resume (default, CleanRL's:
    <exp_name>__<dataset>__<seed>__<unix time>)"""
    stages: tuple[Literal["sft", "rl", "eval"], ...] = STAGES
    """which stages to run, in pipeline order; each reads what the earlier ones left in the run folder"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works) as well as runs/<run_name>/metrics.jsonl"""
    wandb_project: str = "cleancrs"
    """the W&B project"""
    wandb_entity: str | None = None
    """the W&B entity (team); None uses your default"""
    wandb_group: str | None = None
    """the W&B group of the run (e.g. one per sweep or per paper table)"""
    wandb_tags: tuple[str, ...] = ()
    """W&B tags of the run"""

    # ------------------------------------------------------------------------------------------- data
    dataset: Literal["demo", "inspired", "redial"] = "demo"
    """where episodes come from: demo (bundled), inspired (UniCRS train for RL, CFCRS valid/test for evaluation,
    the CFCRS KG) or redial (official train subsets for RL, iEvaLM valid / official test, the iEvaLM KG)"""
    data_dir: str = "../shared/data"
    """root of the real data (docs/data.md); unused for the demo"""
    eval_split: Literal["valid", "test"] = "valid"
    """valid for development; test is held out: use it only for final numbers"""
    sft_labels: Literal["auto", "demo", "inspired"] = "auto"
    """strategy-labelled dialogues for the warm-up: demo (bundled data/demo/strategy_dialogues.tsv) or inspired
    (INSPIRED's dev.tsv); auto: demo for --dataset demo, inspired otherwise (ReDial has no labels)"""
    sft_held_out: float = 0.2
    """share of the labelled dialogues held out from SFT to measure its accuracy; with --dataset inspired and the
    valid split, evaluation plays only these dialogues (they are INSPIRED's dev dialogues, which SFT trains on), and
    of them those that name a KG film after their opening (17 of the 20 at 0.2)"""
    num_test: int = 3
    """evaluated dialogues per planner; 0 = all that have a target (paper: 99; INSPIRED's test split has 84 with a
    target, of 99: the run prints the count)"""

    # ------------------------------------------------------------------------------------------- roles
    planner: str = "minilm"
    """the Planner's encoder: minilm (embedded all-MiniLM-L6-v2) or any Hugging Face encoder id or folder (paper:
    RoBERTa, size unstated; METHODS.md: roberta-large)"""
    planner_max_length: int = 512
    """the Planner's input, the history truncated from the left, in tokens (METHODS.md: 512)"""
    experts_llm: str = "hf:smollm2-135m"
    """backend of the network of experts: the Preference Reasoner and the Actor (paper: Qwen2.5-7B-Instruct)"""
    user_llm: str = "hf:smollm2-135m"
    """backend of the AILO user simulator (METHODS.md: Qwen2.5-7B-Instruct)"""
    rewarder_llm: str = "hf:smollm2-135m"
    """backend of the Rewarder during RL (paper: Qwen2.5-7B-Instruct)"""
    evaluator_llm: str | None = None
    """backend of the evaluation judge (its rewards end evaluated episodes and decide Conv-SR; WI, PRS, Cred);
    None reuses --rewarder-llm (paper: Qwen2.5-7B-Instruct)"""
    text_encoder: str = "minilm"
    """the Fact Retriever's entity embedder: minilm or a sentence-transformers folder (METHODS.md:
    BAAI/bge-base-en-v1.5)"""
    batch_size: int = 16
    """prompts per batched call of a local backend"""

    # ------------------------------------------------------------------------------------------- experts
    num_entities: int = 5
    """K: entities the Fact Retriever returns per turn (METHODS.md: 5)"""
    expert_temperature: float = 0.7
    """sampling temperature of the Reasoner and the Actor (METHODS.md: 0.7)"""
    reasoner_max_tokens: int = 24
    """length cap of C1, the Reasoner's preference summary (paper: unstated)"""
    actor_max_tokens: int = 40
    """length cap of a_t, the Actor's reply (paper: unstated)"""
    user_max_tokens: int = 48
    """length cap of each AILO call (policy, content, expectation confirmation)"""
    user_parse_tries: int = 1
    """tries per AILO call before its fallback (ailo_sim's default: 3; one keeps the demo inside its CPU budget)"""
    max_parse_tries: int = 2
    """tries per judge call before a score counts as missing (each retry samples hotter); only with --judge-scoring
    sampled (an expected score is read, never parsed)"""

    # ------------------------------------------------------------------------------------------- rewarder
    judge_scoring: JudgeScoring = "expected"
    """how the rewarder's and the evaluator's 1-5 scores are read: "expected", E[s] under the judge's answer
    distribution over the tokens 1-5, one forward pass per score, deterministic (common/judging.py); "sampled", the
    paper's: the mean of --reward-samples sampled scores for the rewarder, one greedy score for the evaluator"""
    reward_samples: int = 10
    """with --judge-scoring sampled: rewarder scores per turn, drawn in one call with n = K and averaged (paper: 10)"""
    reward_temperature: float = 1.0
    """sampling temperature of the rewarder (METHODS.md: 1.0); only with --judge-scoring sampled (expected scoring
    samples nothing)"""
    judge_max_tokens: int = 3
    """length cap of one sampled score; the answer is pre-filled with "Score: " on local backends; only with
    --judge-scoring sampled (expected scoring generates nothing)"""
    tau: float = 0.75
    """the user accepts, and the episode ends, when r_t > tau on the [0, 1] scale (METHODS.md: 0.75)"""

    # ------------------------------------------------------------------------------------------- SFT (Eq. 6)
    sft_epochs: int = 5
    """SFT epochs (paper: 10; the demo's 5 keep the no-flag run inside its CPU budget)"""
    sft_lr: float = 1e-4
    """SFT learning rate, AdamW with linear decay (paper: 6e-6; the demo's 72 examples and 25 steps need a larger
    step to move a freshly initialised head)"""
    sft_batch_size: int = 16
    """SFT global batch, over all ranks and accumulation steps (paper: 16)"""
    micro_batch_size: int = 16
    """SFT examples per rank per forward pass"""
    sft_max_grad_norm: float = 1.0
    """gradient clipping of SFT (inf: none; paper: unstated)"""
    save_every: int = 10
    """SFT optimizer steps between resumable checkpoints (RL's: --rl-save-every)"""

    # ------------------------------------------------------------------------------------------- RL (Eq. 7-9)
    rl_episodes: int = 6
    """RL episodes in all (paper: 10 epochs x 100 dialogues)"""
    max_turns: int = 3
    """T_max: system turns per episode (paper: 10)"""
    num_envs: int = 1
    """episodes per policy-gradient update, played together by the current Planner (the experts, the user and the
    rewarder answer all of them in one batched call per turn, like a vectorized environment), so that every update
    is on-policy; under accelerate launch the ranks share them (paper: 1, an update at the end of each dialogue;
    METHODS.md 4.8.5 mentions 16)"""
    rl_lr: float = 1e-4
    """RL learning rate, AdamW with linear decay (paper: 1e-4)"""
    gamma: float = 0.99
    """discount of the returns (paper: 0.99)"""
    beta_ent: float = 0.01
    """weight of the entropy bonus in Eq. 7 (METHODS.md: 0.01)"""
    baseline: Literal["ema", "batch", "none"] = "ema"
    """what Eq. 7 subtracts from each R_t: ema, a running mean of the returns at turn t over the earlier updates
    (works with one episode per update); batch, the mean R_t of the update's own episodes (needs 2 or more per
    update); none, the paper's Eq. 7, where rewards in [0, 1] reinforce every sampled strategy (docs/rso.md has the
    measurements behind the default)"""
    baseline_decay: float = 0.9
    """weight of the old value in the ema baseline, per update: b_t <- decay b_t + (1 - decay) mean R_t (ours)"""
    accept_credit: Literal["remaining", "none"] = "remaining"
    """remaining (ours, the default): an accepted episode's turns left up to --max-turns count at r = 1 (the accepted
    state persists to the horizon), so accepting sooner always returns more than stalling; none: Eq. 8 as printed
    (paper), which pays stalling: ten turns at r = 0.75 return 7.17, accepting at the first turn 1.0 (docs/rso.md)"""
    rl_save_every: int = 100
    """RL updates between resumable checkpoints (and after the last); a rerun replays the updates since the newest
    one from their recorded episodes, without an LLM call. Each checkpoint holds the Planner and its AdamW state:
    4.3 GB for roberta-large"""
    rl_max_grad_norm: float = math.inf
    """gradient clipping of the RL update (paper: none; inf, the default, is off). A bound that binds rescales every
    update to the same norm, which erases the size of the return, the only signal rewards in [0, 1] carry without a
    baseline (docs/rso.md)"""

    # ------------------------------------------------------------------------------------------- evaluation
    planners: tuple[Literal["random", "sft", "rl"], ...] = PLANNERS
    """which planners to evaluate side by side (random: uniform over the 13 strategies, the floor)"""
    greedy_planner: bool = False
    """evaluate the planners' most likely strategy instead of a sample from them (ties, as every strategy of the
    uniform random planner, broken at random)"""
    eval_num_envs: int = 16
    """evaluated conversations played together (evaluation does not update the planner, so any number is fine)"""
    progress_bins: int = 3
    """bins of conversation progress (turn / episode length) in the strategy-distribution plot"""
    dry_run: int = 0
    """validate the flags, every batch division for this many processes, and the data files, then exit without
    loading a model (0: run)"""


# The paper's Tables IV and V (Sec. IV-D, the rest of Sec. III-IV), selected by `python rso.py paper ...`
# (common/presets.py); where the paper is silent the source says so and gives our reading. Two of our readings
# depart from the paper as printed, both measured in docs/rso.md: the ema baseline (Eq. 7 has none) and the
# acceptance credit (Eq. 8 as printed pays stalling).
PAPER = Preset(
    "the paper's Tables IV and V setting (Sec. IV-D; METHODS.md 4.5's defaults and our readings where the paper is "
    "silent); state the models, the data and the scale",
    values={
        "sft_labels": ("inspired", 'Sec. IV-D: "we first perform SFT on Inspired" (its dev.tsv: the data mirror has '
                       "no train.tsv)"),
        "sft_held_out": (0.2, "not in the paper (it reports no SFT accuracy): ours, 20% of the labelled dialogues "
                         "held out to measure it"),
        "num_test": (99, "Tables IV-V: every score a multiple of 1/99, 99 test dialogues per dataset (METHODS.md "
                     "4.6); INSPIRED's test split has 84 with a target (docs/rso.md, Data)"),
        "planner_max_length": (512, "not in the paper: RoBERTa's 512 positions, the history cut from the left "
                               "(METHODS.md 4.4)"),
        "num_entities": (5, "Sec. III-C2: top-K, K not given; METHODS.md 4.5's 5 (Table V's Recall@5 reads 5)"),
        "expert_temperature": (0.7, "not in the paper: METHODS.md 4.5's default"),
        "reasoner_max_tokens": (128, "not in the paper: ours, room for the Reasoner's preference summary"),
        "actor_max_tokens": (128, "not in the paper: ours, room for the Actor's one or two sentences"),
        "user_max_tokens": (256, "not in the paper (its user simulator is unspecified, METHODS.md 4.8.3): ours, room "
                            "for each AILO call"),
        "user_parse_tries": (3, "not in the paper: ailo_sim's default"),
        "max_parse_tries": (2, "not in the paper: ours, one retry (hotter) per judge call"),
        "judge_scoring": ("sampled", 'Sec. IV-D: "sampling each reward computation 10 times and averaging"; the '
                          "evaluator's scores one greedy answer each (not in the paper)"),
        "reward_samples": (10, 'Sec. IV-D: "sampling each reward computation 10 times"'),
        "reward_temperature": (1.0, "not in the paper: METHODS.md 4.5's default"),
        "judge_max_tokens": (4, "not in the paper: ours, a cap on the single digit the rubric asks for"),
        "tau": (0.75, 'Sec. III-D2: "a predefined threshold", not given; METHODS.md 4.5: 0.75, a mean score above 4'),
        "sft_epochs": (10, 'Sec. IV-D: "The SFT stage is trained for 10 epochs"'),
        "sft_lr": (6e-6, "Sec. IV-D: 6e-6 for SFT, AdamW with linear decay"),
        "sft_batch_size": (16, 'Sec. IV-D: "AdamW optimizer with a batch size of 16"'),
        "sft_max_grad_norm": (1.0, "not in the paper (it states no clipping): ours, docs/rso.md, Deviations"),
        "rl_episodes": (1000, "Sec. IV-D: 10 epochs of 100 dialogue generations"),
        "max_turns": (10, 'Sec. IV-D: "a maximum of 10 turns"'),
        "num_envs": (1, 'Sec. III-D2: "updating the Planner at the end of each conversation"'),
        "rl_lr": (1e-4, "Sec. IV-D: 1e-4 for RL, AdamW with linear decay"),
        "gamma": (0.99, "Sec. IV-D; Eq. 8"),
        "beta_ent": (0.01, "Eq. 7's beta, not given: METHODS.md 4.5's default"),
        "baseline": ("ema", "ours, a deviation: Eq. 7 has no baseline (--baseline none); docs/rso.md, The RL update "
                     "at the paper's regime"),
        "baseline_decay": (0.9, "not in the paper: ours, the ema baseline's"),
        "accept_credit": ("remaining", "ours, a deviation from Eq. 8 as printed (--accept-credit none), which pays "
                          "stalling; docs/rso.md, Rewards that favour stalling"),
        "rl_max_grad_norm": (math.inf, "Eq. 7, Sec. IV-D: no clipping stated; inf clips nothing (docs/rso.md, The RL "
                             "update at the paper's regime)"),
        "planners": (PLANNERS, "Tables IV-V (RSO), Fig. 3 (the SFT planner before RL); random: ours, the floor"),
        "greedy_planner": (False, "Eq. 2: h_t ~ pi; evaluation samples as training does (not in the paper)"),
        "progress_bins": (3, "Fig. 3's conversation progress; its bins are not in the text: ours"),
    },
    recipe=(
        "exp_name", "seed", "run_name", "stages", "track", "wandb_project", "wandb_entity", "wandb_group", "wandb_tags",
        "dataset", "data_dir", "eval_split", "planner", "experts_llm", "user_llm", "rewarder_llm", "evaluator_llm",
        "text_encoder", "batch_size", "micro_batch_size", "save_every", "rl_save_every", "eval_num_envs", "dry_run",
    ),
)  # fmt: skip
PRESETS = {"paper": PAPER}


# =============================================================================================== strategies (Table I)

STRATEGIES = {
    "Credibility": "provide factual information about the movie's attributes to show expertise",
    "Personal Opinion": "express your own opinion about the movie without contradicting the facts",
    "Encouragement": "compliment the user's taste and encourage them to try the recommended movie",
    "Acknowledgment": "give a short, cheerful response that shows excitement or appreciation",
    "Similarity": "express similar preferences or opinions, or agree with the user's views",
    "Offer Help": "offer to help the user find suitable movies",
    "Personal Experience": "share your own experience with the recommended movie",
    "Self Modeling": "state your own positive reaction to the recommended movie",
    "Transparency": "be open about why you recommend it, or confirm the user's preferences before recommending",
    "Opinion Inquiry": "ask the user's opinion on specific movie attributes",
    "Experience Inquiry": "ask about the user's past experiences with movies to learn their preferences",
    "Rephrase Preference": "rephrase the user's preferences as you understand them, to confirm",
    "No Strategy": "chat naturally, without any particular strategy",
}
NAMES = list(STRATEGIES)
KEYS = [name.lower().replace(" ", "_") for name in NAMES]  # metric names: rollout/strategy/<key>

# INSPIRED's 14 expert_label values onto the 13 classes: Preference Confirmation is not in Table I and becomes
# Rephrase Preference (METHODS.md 4.8.2); the rest keep their names.
INSPIRED_LABELS = dict(zip(KEYS, NAMES)) | {"preference_confirmation": "Rephrase Preference"}


def strategy_index(label: str, where: str) -> int:
    """The class of an INSPIRED label; an unknown label is a data error."""
    if label not in INSPIRED_LABELS:
        raise InputError(f"{where}: unknown strategy label {label!r}; expected one of {sorted(INSPIRED_LABELS)}")
    return NAMES.index(INSPIRED_LABELS[label])


# =============================================================================================== data


@dataclass
class Task:
    """What an episode starts from (METHODS.md 4.8.3): a real dialogue's opening, its target and a persona."""

    key: str
    opening: list[dict]  # the first turns, chat roles from the CRA's side, ending with the user's first words
    target: Item
    persona: Persona


@dataclass
class Data:
    sft_train: list[dict]  # {"key", "text", "label"}: s_t and h'_t of every labelled system turn
    sft_held_out: list[dict]
    rl: list[Task]
    evaluated: list[Task]  # the --eval-split dialogues evaluation plays
    catalog: Catalog
    held_out_dialogues: set[str] = field(default_factory=set)
    evaluable: tuple[int, int] = (0, 0)  # (evaluated split's dialogues with a target, dialogues in it)


def evaluated_count(data: Data, args: Args) -> str:
    """How many dialogues evaluation plays, of how many, and why (the paper's Tables are over 99 per dataset): a
    dialogue that names no film of the KG after its opening has no target for the simulated user to want."""
    with_target, dialogues = data.evaluable
    split = f"{args.dataset} {'test' if args.dataset == 'demo' else args.eval_split} dialogues"  # the demo has one
    if args.dataset == "inspired" and args.eval_split == "valid" and args.sft_labels != "demo":
        split += " held out from SFT"
    return (
        f"evaluation plays {len(data.evaluated)} dialogues: {with_target} of the {dialogues} {split} name a film of "
        f"the KG after their opening (their target), {dialogues - with_target} name none and cannot be played; "
        f"--num-test {args.num_test} takes {len(data.evaluated)}"
    )


def episode_tasks(dialogues: list[Dialogue], catalog: Catalog, personas: dict[str, Persona], cycle: list[Persona]):
    """One task per dialogue whose recommender names a catalog item after the opening (the turns up to the user's
    first words): the target is the first new item of the last recommender turn that names one, usually the
    recommendation the dialogue ends with. Its persona is the demo user's with that target, else one of ``cycle``
    (behaviour and language only: the target carries the taste)."""
    tasks = []
    for dialogue in dialogues:
        first = next((i for i, t in enumerate(dialogue.turns) if t.role == "seeker" and t.text.strip()), None)
        if first is None:
            continue
        opening, said = dialogue.turns[: first + 1], {m for t in dialogue.turns[: first + 1] for m in t.items}
        named = [
            [m for m in t.items if m in catalog.by_title and m not in said]
            for t in dialogue.turns[first + 1 :]
            if t.role == "recommender"
        ]
        named = [n for n in named if n]
        if not named:
            continue
        target = catalog.by_title[named[-1][0]]
        persona = personas.get(target.title) or cycle[len(tasks) % len(cycle)]
        tasks.append(Task(dialogue.dialog_id, chat_roles(opening, one_line=True), target, persona))
    return tasks


def labelled_turns(path: Path) -> list[dict]:
    """(s_t, h'_t) for every labelled recommender utterance of an INSPIRED-format TSV: the history before it,
    rendered as the Planner reads it, and its class."""
    examples = []
    for dialogue in load_inspired_tsv(path):
        for i, turn in enumerate(dialogue.turns):
            if turn.role == "recommender" and turn.strategy:
                label = strategy_index(turn.strategy, f"{path}: dialogue {dialogue.dialog_id}")
                text = render_history(chat_roles(dialogue.turns[:i], one_line=True))
                examples.append({"key": f"{dialogue.dialog_id}:{i}", "dialog": dialogue.dialog_id, "text": text,
                                 "label": label})  # fmt: skip
    if not examples:
        raise InputError(f"{path}: no recommender utterance with a strategy label")
    return examples


def whole_conversations(dataset: CRSDataset, args: Args) -> list[Dialogue]:
    """The evaluated split as whole dialogues, whose openings and targets episodes start from. The demo's and
    INSPIRED's already are. ReDial's is iEvaLM's processed recommendation turns (one Dialogue per turn): its
    conversations are read whole in the official format (iEvaLM's valid_data.jsonl, the official test_data.jsonl),
    those the processed file holds (it leaves out the conversations with no recommendation turn). They are the
    conversations, by id, that ``load_crs_dataset`` kept out of training."""
    if args.dataset != "redial":
        return dataset.evaluated
    root = Path(args.data_dir) / "redial"
    whole = (
        root / "ievalm" / "valid_data.jsonl" if args.eval_split == "valid" else root / "official" / "test_data.jsonl"
    )
    conversations = {d.conversation_id for d in dataset.evaluated}
    return [d for d in load_redial_official(whole) if d.dialog_id in conversations]


def load_data(args: Args) -> Data:
    """The labelled turns (split by dialogue), the RL tasks and the evaluated tasks, and the catalog with the KG's
    facts. The held-out split (--eval-split test) is read only when asked for."""
    root, demo = Path(args.data_dir), Path(__file__).parent / "data" / "demo"
    source = args.sft_labels if args.sft_labels != "auto" else ("demo" if args.dataset == "demo" else "inspired")
    path = demo / "strategy_dialogues.tsv" if source == "demo" else root / "inspired" / "sweetpeach" / "dev.tsv"
    examples = labelled_turns(path)
    dialogues = sorted({e["dialog"] for e in examples})
    random.Random(args.seed).shuffle(dialogues)
    held_out = set(dialogues[: max(1, round(args.sft_held_out * len(dialogues)))])
    dataset = load_crs_dataset(args.dataset, args.data_dir, args.eval_split)
    train, evaluated = dataset.train, whole_conversations(dataset, args)
    if args.dataset == "inspired" and args.eval_split == "valid" and source == "inspired":
        evaluated = [d for d in evaluated if d.dialog_id in held_out]  # dev.tsv's dialogues: play those SFT never saw
    catalog = Catalog(dataset.items, encoder=args.text_encoder)
    demo_tasks = load_demo_tasks()
    personas = {t.target.title: t.persona for t in demo_tasks} if args.dataset == "demo" else {}
    cycle = [Persona(t.persona.user_id, t.persona.activities, "", t.persona.language) for t in demo_tasks]
    rl = episode_tasks(train, catalog, personas, cycle)
    random.Random(args.seed).shuffle(rl)
    playable = episode_tasks(evaluated, catalog, personas, cycle)
    played = playable[: args.num_test or None]
    if not rl or not played:
        raise InputError(f"{args.dataset}: {len(rl)} training and {len(played)} evaluated dialogues with a target")
    sft_train = [e for e in examples if e["dialog"] not in held_out]
    sft_held_out = [e for e in examples if e["dialog"] in held_out]
    return Data(sft_train, sft_held_out, rl, played, catalog, held_out, (len(playable), len(evaluated)))


def check_args(args: Args, world: int) -> list[str]:
    """Flags that cannot work on ``world`` ranks, refused before anything loads. Returns the SFT batch's split over
    the ranks, for the dry run's plan (RL pads its episodes to fit)."""
    updates = math.ceil(args.rl_episodes / max(args.num_envs, 1))
    problems = [
        (args.num_envs < 1, "--num-envs must be at least 1"),
        (args.eval_num_envs < 1, "--eval-num-envs must be at least 1"),
        (args.rl_episodes < 1, "--rl-episodes must be at least 1"),
        (
            args.baseline == "batch" and min(args.num_envs, args.rl_episodes - (updates - 1) * args.num_envs) < 2,
            f"--baseline batch needs at least 2 episodes in every update, but --num-envs {args.num_envs} with "
            f"--rl-episodes {args.rl_episodes} gives an update of "
            f"{min(args.num_envs, args.rl_episodes - (updates - 1) * args.num_envs)}: use --baseline ema (a running "
            "mean across updates) or more episodes per update",
        ),
        (not 0 <= args.baseline_decay < 1, "--baseline-decay must lie in [0, 1)"),
        (not args.rl_max_grad_norm > 0, "--rl-max-grad-norm must be positive (inf turns clipping off)"),
        (  # the engine fixes its accumulation steps at prepare: a short last update could not step
            launched_with_deepspeed() and args.rl_episodes % max(args.num_envs, 1) > 0,
            f"under DeepSpeed --rl-episodes ({args.rl_episodes}) must be a multiple of --num-envs ({args.num_envs})",
        ),
        (args.max_turns < 1, "--max-turns must be at least 1"),
        (min(args.save_every, args.rl_save_every) < 1, "--save-every and --rl-save-every must be at least 1"),
        (args.reward_samples < 1, "--reward-samples must be at least 1"),
        (not 0 <= args.tau < 1, f"--tau {args.tau} must lie in [0, 1): rewards are rescaled to [0, 1]"),
        (not 0 < args.sft_held_out < 1, "--sft-held-out must lie strictly between 0 and 1"),
        (not 0 <= args.gamma <= 1, "--gamma must lie in [0, 1]"),
        (args.num_entities < 1, "--num-entities must be at least 1"),
        (min(args.user_parse_tries, args.max_parse_tries) < 1, "--user-parse-tries and --max-parse-tries must be >= 1"),
    ]
    for bad, message in problems:
        if bad:
            raise InputError(message)
    if "sft" not in args.stages:
        return []
    return [check_division(world, args.sft_batch_size, args.micro_batch_size, "--sft-batch-size")]


# =============================================================================================== prompts

REASONER_PROMPT = """You are the Preference Reasoner of a movie recommender. Read the whole conversation and infer what the user wants now: genres, moods, people and movies they liked or disliked, and how their wishes changed.

Conversation:
{history}

In one sentence, describe the user's current movie preferences."""  # noqa: E501  (prompt text, kept verbatim)

ACTOR_PROMPT = """You are a friendly movie recommender chatting with a user. Write your next message.

Strategy for this message: {strategy}: {description}.
What the user wants: {preference}
Facts you may use:
{facts}

Conversation:
{history}

Follow the strategy. State only facts from the list above, and name a movie by its exact title when you recommend one. Write one or two sentences, as the recommender."""  # noqa: E501  (prompt text, kept verbatim)

REWARD_PROMPT = """You judge a conversation between a movie recommender (System) and a user (User). Rate the latest exchange from 1 to 5:
5: the user accepts a recommended movie (says they will watch it), after a helpful and engaging conversation.
4: the user is clearly interested in a recommended movie but has not accepted it yet.
3: the conversation makes progress toward a movie that suits the user.
2: the system's message is vague, unhelpful or off-topic.
1: the system ignores the user, repeats itself or says something false.

Conversation:
{history}

Answer with the score only, a single digit from 1 to 5."""  # noqa: E501  (prompt text, kept verbatim)

WI_PROMPT = """You judge a conversation between a movie recommender (System) and a user (User). After the whole conversation, how willing is the user to accept the recommendation and watch the movie?
1 = not at all, 2 = unlikely, 3 = maybe, 4 = likely, 5 = certainly.

Conversation:
{history}

Answer with the score only, a single digit from 1 to 5."""  # noqa: E501  (prompt text, kept verbatim)

INTENTION_PROMPT = """You are a movie viewer. {persona}
You asked a recommender: "{request}"
{evidence}
How much do you want to watch {title}? 1 = not at all, 2 = a little, 3 = somewhat, 4 = a lot, 5 = I will certainly watch it.

Answer with the score only, a single digit from 1 to 5."""  # noqa: E501  (prompt text, kept verbatim)

EVIDENCE = {
    "i_pre": "All you know about the movie is its title.",
    "i_true": "Here is everything about the movie: {card}.",
    "i_post": "Then you had this conversation with the recommender:\n{history}",
}

CRED_PROMPT = """You check a movie recommender's messages against the facts. Rate from 1 to 5 how consistent every factual statement in the messages is with the facts (5 = all consistent, 3 = some unsupported claims, 1 = several false statements).

Facts:
{facts}

Recommender's messages:
{messages}

Answer with the score only, a single digit from 1 to 5."""  # noqa: E501  (prompt text, kept verbatim)


# =============================================================================================== the experts (Eq. 3-5)


def kg_facts(catalog: Catalog, title: str) -> list[str]:
    """KG_retrieve (Eq. 4): an entity's facts from the dataset's KG, one "relation: value" per line."""
    item = catalog.by_title[title]
    return [
        f"{relation}: {', '.join(map(str, value)) if isinstance(value, list) else value}"
        for relation in ("year", "genre", "director", "star", "writer")
        if (value := item.attributes.get(relation)) not in (None, "", [])
    ]


def fact_retriever(catalog: Catalog, histories: list[list[dict]], preferences: list[str], k: int) -> list[list[dict]]:
    """C2_t = KG_retrieve(entity_retrieve(s_t, C1_t); G) (Eq. 4): the top-K entities (the catalog's movies) by
    cosine similarity of the encoder's embeddings of (C1_t, the user's words) to each entity's card, then their
    facts. The ranked entities double as the recommendation list that Recall@k reads."""
    queries = [
        f"{preference} {' '.join(m['content'] for m in history if m['role'] == 'user')}"
        for history, preference in zip(histories, preferences)
    ]
    return [[{"entity": t, "facts": kg_facts(catalog, t)} for t in titles] for titles in catalog.search(queries, k)]


def facts_text(entities: list[dict]) -> str:
    return "\n".join(f"- {e['entity']}: {'; '.join(e['facts'])}" for e in entities) or "(none)"


def one_line(text: str) -> str:
    return " ".join(text.split())


def ask_expert(llm, prompts: list[str], max_tokens: int, fallback: str, args: Args, stats: ParseStats) -> list[str]:
    """One batched call of a frozen LLM expert (the Reasoner or the Actor); an empty answer becomes ``fallback``
    and is counted."""
    outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], temperature=args.expert_temperature,
                       max_tokens=max_tokens)  # fmt: skip
    texts = [one_line(text) for (text,) in outputs]
    stats.attempts += len(texts)
    stats.failures += sum(not t for t in texts)
    return [t or fallback for t in texts]


@torch.no_grad()
def strategy_distribution(planner, tokenizer, states: list[str], max_length: int) -> torch.Tensor:
    """pi(. | s_t; H) for each state, with dropout off: the distribution the update's log-probabilities are taken
    from, so the sampled strategies are on-policy. Uniform over H without a planner (the random floor)."""
    if planner is None:
        return torch.full((len(states), len(NAMES)), 1 / len(NAMES))
    was_training = planner.training
    planner.eval()
    probs = planner_logits(planner, tokenizer, states, max_length).softmax(-1).cpu()
    planner.train(was_training)
    return probs


# =============================================================================================== the rewarder (Eq. 9)

SCORE = re.compile(r"^\W*([1-5])(?![\d])")


def parse_score(text: str) -> int | None:
    """A 1-5 score at the start of the answer ("4", "4 stars", "**5**"); anything else is malformed."""
    match = SCORE.match(text)
    return int(match.group(1)) if match else None


def sample_scores(llm, prompts: list[str], n: int, temperature: float, args: Args, stats: ParseStats) -> list[list]:
    """``n`` scores per prompt from one batched ``llm.chat(n=n)`` call. Malformed samples are drawn again (hotter),
    at most --max-parse-tries calls in all; samples still missing are counted as failures and left out. Local
    backends pre-fill "Score: ", so the first token is the answer."""
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    extra = {"prefix": "Score: "} if getattr(llm, "can_prefill", False) else {}
    scores: list[list[int]] = [[] for _ in prompts]
    for attempt in range(args.max_parse_tries):
        pending = [i for i in range(len(prompts)) if len(scores[i]) < n]
        if not pending:
            break
        missing = [n - len(scores[i]) for i in pending]
        stats.attempts += sum(missing)
        stats.retries += sum(missing) if attempt else 0
        heat = temperature if attempt == 0 else max(temperature, 0.7) + 0.3 * (attempt - 1)
        outputs = llm.chat(
            [conversations[i] for i in pending],
            n=max(missing),
            temperature=heat,
            max_tokens=args.judge_max_tokens,
            **extra,
        )
        for i, want, texts in zip(pending, missing, outputs):
            scores[i] += [s for s in map(parse_score, texts) if s is not None][:want]
    stats.failures += sum(n - len(s) for s in scores)
    return scores


def reward_of(score: float | None) -> float | None:
    """r_t of Eq. 9 on [0, 1]: (s - 1) / 4, s being the mean of the K sampled scores or E[s]; None if unscored."""
    return None if score is None else (score - 1) / 4


SCORE_VALUES = {str(s): float(s) for s in range(1, 6)}


def judge_scores(llm, prompts: list[str], n: int, temperature: float, args: Args, stats: ParseStats) -> list[dict]:
    """Each prompt's 1-5 score as {"score": the number or None, "scores": the sampled ones, "written",
    "mass_outside"}. With --judge-scoring expected: E[s] over the tokens 1-5 after "Score: " (pre-filled where the
    backend can; an API judge's first answer token), in one forward pass, and the probability left outside them.
    With sampled: the mean of ``n`` scores sampled at ``temperature`` (the paper's Eq. 9 for the rewarder, n = K).
    ``written`` is the integer a judge answering once writes: under expected the most probable of the tokens 1-5
    (what greedy decoding writes when it writes a score), under sampled the first sample."""
    if args.judge_scoring == "expected":
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        prefix = "Score: " if getattr(llm, "can_prefill", False) else ""
        read = expected_scores(llm, conversations, SCORE_VALUES, prefix)
        return [{"score": e.value, "scores": [], "written": None if e.greedy is None else int(e.greedy),
                 "mass_outside": e.mass_outside} for e in read]  # fmt: skip
    sampled = sample_scores(llm, prompts, n, temperature, args, stats)
    return [{"score": sum(s) / len(s) if s else None, "scores": s, "written": s[0] if s else None,
             "mass_outside": None} for s in sampled]  # fmt: skip


# ========================================================================================= the rollout (Algorithm 1)


@dataclass
class Roles:
    """The frozen network around the Planner: the experts' LLM (the Preference Reasoner and the Actor), the catalog
    that the Fact Retriever searches, the AILO user and the Rewarder (the evaluator at evaluation), with the experts'
    and the rewarder's parse counts."""

    experts: object
    catalog: Catalog
    user: AILO
    rewarder: object
    stats: dict[str, ParseStats] = field(default_factory=lambda: {"expert": ParseStats(), "rewarder": ParseStats()})


def rollout(
    tasks: list[Task], *, planner, tokenizer, roles: Roles, args: Args, generator: torch.Generator, greedy: bool = False
) -> Iterator[dict]:
    """Algorithm 1 for every task, played together like a vectorized environment: each step below is one batched
    call over the episodes still running. An episode starts from its real dialogue's opening (METHODS.md 4.8.3) with
    the AILO user holding its target and persona, and ends when the user accepts (r_t > tau, or AILO's user leaves
    after its target was recommended: r_t = 1), when AILO's user leaves otherwise, or after --max-turns turns
    (``ends_here``). ``planner`` None samples uniformly (the random floor); ``greedy`` takes the most likely strategy.
    Yields each episode as it ends."""
    users = [SimUser(UserTask(task.key, task.persona, task.target), [dict(m) for m in task.opening]) for task in tasks]
    episodes = [{"key": task.key, "target": task.target.title, "turns": [], "accepted": False, "success": False}
                for task in tasks]  # fmt: skip
    for t in range(1, args.max_turns + 1):
        live = [i for i, user in enumerate(users) if not user.ended]
        if not live:
            break
        histories = [users[i].history for i in live]
        states = [render_history(history) for history in histories]  # s_t as the Planner reads it
        # (1) macro-level strategy planning: h_t ~ pi(h | s_t; H)
        probs = strategy_distribution(planner, tokenizer, states, args.planner_max_length)
        strategies = (most_likely(probs, generator) if greedy else torch.multinomial(probs, 1, generator=generator)
                      .squeeze(1)).tolist()  # fmt: skip
        # (2) micro-level strategy adaptation: C1_t = PrefReasoner(s_t) (Eq. 3), C2_t = Retriever(s_t, C1_t; G)
        # (Eq. 4), a_t = Actor(h_t; C1_t, C2_t) with the history (Eq. 5)
        preferences, facts, replies = adapt(roles, args, histories, states, strategies)
        # (3) state transition and rewarding: the user's reply gives s_{t+1}, then r_t = Rewarder(s_{t+1}) (Eq. 9).
        # The user replies on the last turn too (not AILO's final=True), so every r_t judges a state that ends on
        # the user's words.
        answers = roles.user.step([users[i] for i in live], replies)
        judged = [REWARD_PROMPT.format(history=render_history(users[i].history)) for i in live]
        scores = judge_scores(roles.rewarder, judged, args.reward_samples, args.reward_temperature, args,
                              roles.stats["rewarder"])  # fmt: skip
        for k, i in enumerate(live):
            reward = reward_of(scores[k]["score"])
            episodes[i]["turns"].append(
                {
                    "turn": t,
                    "state": states[k],
                    "strategy": strategies[k],
                    "strategy_name": NAMES[strategies[k]],
                    "logprob": math.log(max(probs[k, strategies[k]].item(), 1e-12)),
                    "entropy": -(probs[k] * probs[k].clamp_min(1e-12).log()).sum().item(),
                    "preference": preferences[k],
                    "facts": facts[k],
                    "system": replies[k],
                    "retrieved": [entity["entity"] for entity in facts[k]],
                    "user_policy": answers[k].policy,
                    "user": answers[k].response,
                    "user_guard": answers[k].guard,
                    "scores": scores[k]["scores"],
                    "score": scores[k]["score"],
                    "reward_mass_outside": scores[k]["mass_outside"],
                    "reward": 0.0 if reward is None else reward,  # an unscored turn earns nothing (counted)
                }
            )
            episodes[i]["success"] |= mentions_title(replies[k], episodes[i]["target"])
            if ends_here(episodes[i], users[i], reward, t, args):
                yield episodes[i]


def adapt(roles: Roles, args: Args, histories: list[list[dict]], states: list[str], strategies: list[int]):
    """Algorithm 1's step (2), the experts at work on each state: C1_t, the Preference Reasoner's reading of the
    user (Eq. 3); C2_t, the Fact Retriever's entities and their KG facts (Eq. 4); a_t, the Actor's reply written
    under the strategy h_t with C1_t, C2_t and the history (Eq. 5)."""
    reasoner_prompts = [REASONER_PROMPT.format(history=state) for state in states]
    preferences = ask_expert(roles.experts, reasoner_prompts, args.reasoner_max_tokens, "(no clear preference yet)",
                             args, roles.stats["expert"])  # fmt: skip
    facts = fact_retriever(roles.catalog, histories, preferences, args.num_entities)
    actor_prompts = [
        ACTOR_PROMPT.format(
            strategy=NAMES[h], description=STRATEGIES[NAMES[h]], preference=c1, facts=facts_text(c2), history=state
        )
        for h, c1, c2, state in zip(strategies, preferences, facts, states)
    ]
    replies = ask_expert(roles.experts, actor_prompts, args.actor_max_tokens,
                         "Could you tell me more about what you like?", args, roles.stats["expert"])  # fmt: skip
    return preferences, facts, replies


def ends_here(episode: dict, user: SimUser, reward: float | None, t: int, args: Args) -> bool:
    """Stop(r_t): whether the episode ends at turn t, and if so how (its "end", "accepted" and "num_turns"). The user
    accepts when r_t > tau (d_t = 1[r_t > tau]). AILO's user leaves once its target has been recommended (an
    Efficiency-seeking user at once): its goodbye then is its acceptance, scored as the judge scores acceptance (5,
    r = 1), whatever the judge made of a one-line goodbye, so that the return, Conv-SR and Rec-SR count the same
    success."""
    passed = reward is not None and reward > args.tau
    took_target = user.ended and episode["success"] and not passed
    if took_target:
        episode["turns"][-1]["reward"] = 1.0
    if not (passed or user.ended or t == args.max_turns):
        return False
    end = (
        "accepted" if passed else "left with its target" if took_target else "user left" if user.ended else "turn limit"
    )
    user.ended = True
    episode |= {"accepted": passed or took_target, "end": end, "num_turns": t}
    return True


def most_likely(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The most likely strategy of each row, ties broken at random: the uniform random planner's greedy choice is
    any strategy, not always the first (Credibility)."""
    ties = probs >= probs.max(-1, keepdim=True).values
    return torch.multinomial(ties.float(), 1, generator=generator).squeeze(1)


# ==================================================================================== returns and the loss (Eq. 7-8)


def discounted_returns(rewards: list[float], gamma: float) -> list[float]:
    """Eq. 8: R_t = sum_{i=0}^{T-t} gamma^i r_{t+i}."""
    returns, running = [], 0.0
    for reward in reversed(rewards):
        running = reward + gamma * running
        returns.append(running)
    return returns[::-1]


def episode_returns(episode: dict, args: Args) -> list[float]:
    """R_t (Eq. 8) of every played turn. Eq. 8 as printed (--accept-credit none) pays a planner for stalling: an
    episode ends at the first r_t > tau, so ten turns just short of acceptance (r = 0.75) return 7.17 where
    accepting at once returns 1.0, and a planner trained on it learns to keep the user from accepting. The default,
    --accept-credit remaining, counts the turns left after an acceptance, up to --max-turns, at r = 1: acceptance
    is a state that persists to the horizon, and since no reward exceeds 1, accepting at a turn always returns more
    than not accepting there."""
    rewards = [turn["reward"] for turn in episode["turns"]]
    if args.accept_credit == "remaining" and episode["accepted"]:
        rewards += [1.0] * (args.max_turns - len(rewards))
    return discounted_returns(rewards, args.gamma)[: len(episode["turns"])]


def subtract_baseline(
    returns: list[list[float]], args: Args, running: dict[int, float]
) -> tuple[list[list[float]], list[list[float]]]:
    """(R_t - b_t, b_t) for every turn of the update's episodes (our addition: the paper's Eq. 7 has no baseline).
    The rewards are all positive, so without a baseline every sampled strategy is reinforced and only the size of
    R_t tells good from bad. b_t depends on the turn index t alone, never on the strategy sampled there, so the
    gradient stays unbiased:
      none   b_t = 0, the paper's Eq. 7;
      batch  the mean R_t over the update's episodes that reached turn t (an episode alone there gets 0);
      ema    a running mean of R_t over earlier updates, b_t <- decay b_t + (1 - decay) mean R_t, read before this
             update's episodes join it; a turn index seen for the first time uses the update's own mean (0 for
             one episode). ``running`` holds it ({t: b_t}) and is advanced here."""
    baselines = [[0.0] * len(r) for r in returns]
    for t in range(max(map(len, returns), default=0)):
        reached = [k for k, r in enumerate(returns) if len(r) > t]
        mean = sum(returns[k][t] for k in reached) / len(reached)
        if args.baseline == "ema":
            baseline = running.get(t, mean)
            running[t] = args.baseline_decay * running[t] + (1 - args.baseline_decay) * mean if t in running else mean
        else:
            baseline = mean if args.baseline == "batch" else 0.0
        for k in reached:
            baselines[k][t] = baseline
    advantages = [[r - b for r, b in zip(rs, bs)] for rs, bs in zip(returns, baselines)]
    return advantages, baselines


def rso_loss(logits: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor, beta: float):
    """Eq. 7 as a loss to minimize, for one episode's T turns: L = -sum_t log pi(h_t|s_t) A_t - beta (1/T) sum_t
    H(pi(.|s_t)), with A_t = R_t - b_t (b_t = 0 under --baseline none, the paper's) and H(p) = -sum_h p(h) log
    p(h). Descending L ascends the return and the entropy: the paper's update, with the sign typo of its Eq. 7
    corrected (METHODS.md 4.3). Returns (L, the mean entropy)."""
    log_probs = logits.log_softmax(-1)
    chosen = log_probs.gather(-1, actions[:, None]).squeeze(-1)  # log pi(h_t | s_t)
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # H(pi(. | s_t))
    return -(chosen * advantages).sum() - beta * entropy.mean(), entropy.mean()


# =============================================================================================== the planner


def load_planner(spec: str, device, seed: int, trainable: bool = False):
    """(model, tokenizer): an encoder with a 13-way linear head over its first token ([CLS] / <s>) (METHODS.md 4.8.1),
    from ``minilm``, a hub id or a folder (a saved planner loads its head too). The tokenizer truncates from the
    left, so the newest turns are kept."""
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = encoder_path(spec)
    transformers.logging.set_verbosity_error()  # the fresh head's "newly initialized" warning is expected
    torch.manual_seed(seed)  # the same head on every rank and rerun
    try:
        with whole_weights():  # ZeRO-3 shards the trained Planner at accelerator.prepare, never the frozen SFT one
            model = AutoModelForSequenceClassification.from_pretrained(
                path,
                dtype=torch.float32,  # a small encoder that trains whole, and is compared with its SFT self
                num_labels=len(NAMES),
                id2label=dict(enumerate(NAMES)),
                label2id={n: i for i, n in enumerate(NAMES)},
            )
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelSpecError(f"could not load the planner encoder {spec!r}: {err}") from None
    tokenizer.truncation_side = "left"
    model.train(trainable)
    return model.to(device), tokenizer


def planner_logits(model, tokenizer, states: list[str], max_length: int) -> torch.Tensor:
    config = getattr(model, "module", model).config  # a DDP or DeepSpeed wrapper holds the model as .module
    limit = min(max_length, getattr(config, "max_position_embeddings", max_length))
    device = next(model.parameters()).device
    batch = tokenizer(states, truncation=True, max_length=limit, padding=True, return_tensors="pt").to(device)
    return model(**batch).logits.float()


def planner_folder(run: Run, name: str) -> Path:
    folder = run.dir / f"{name}_planner"
    if not run.finished(f"{name}_planner"):
        raise InputError(f"no {folder}: run the {name} stage first")
    return folder


def classification_report(predictions: list[int], labels: list[int]) -> dict[str, float]:
    """Accuracy and macro-F1 over the classes that occur in the labels or the predictions."""
    classes = sorted(set(labels) | set(predictions))
    f1s = []
    for c in classes:
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        fp, fn = sum(p == c for p in predictions) - tp, sum(y == c for y in labels) - tp
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    accuracy = sum(p == y for p, y in zip(predictions, labels)) / max(len(labels), 1)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / max(len(f1s), 1)}


# =============================================================================================== stages


def sft_warmup(run: Run, args: Args, data: Data) -> dict:
    """Sec. III-D1, Eq. 6: L_SFT = -sum log pi(h'_t | s_t), softmax cross-entropy over the 13 classes, on the
    labelled dialogues not held out; AdamW with linear decay. Then the accuracy and macro-F1 on the held-out
    dialogues, beside the majority class of the training turns (``sft_report``)."""
    from transformers import get_linear_schedule_with_warmup

    if run.finished("sft_planner"):
        return json.loads((run.dir / "sft_planner" / "steps.json").read_text())["metrics"]
    accelerator, examples = run.accelerator, data.sft_train
    labelled = [{"text": e["text"], "label": e["label"], "strategy": NAMES[e["label"]]} for e in examples]
    run.save_dataset("planner_sft", labelled)  # s_t and h'_t, as a text-classification dataset
    model, tokenizer = load_planner(args.planner, run.device, args.seed, trainable=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.sft_lr)
    steps, accum = training_steps(
        accelerator, len(examples), args.sft_batch_size, args.micro_batch_size, args.sft_epochs, args.seed
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, len(steps))
    model, optimizer, start = resume_and_prepare(accelerator, model, optimizer, scheduler, run.dir / "sft")
    logged = run.steps_logged("train_sft", start, "sft steps")
    for step in tqdm(range(start, len(steps)), desc="sft", initial=start, total=len(steps), disable=not run.main):
        started, loss_sum = time.time(), 0.0
        for chunk, weights in micro_batches(examples, steps[step], accelerator, args.micro_batch_size, accum):
            # ALGO LOGIC: Eq. 6 on the micro-batch, its share of the global batch's mean, an (accumulated) step
            with accelerator.accumulate(model):
                logits = planner_logits(model, tokenizer, [e["text"] for e in chunk], args.planner_max_length)
                labels = torch.tensor([e["label"] for e in chunk], device=logits.device)
                losses = F.cross_entropy(logits, labels, reduction="none")  # Eq. 6, per turn
                loss = share_of_global_mean(losses, weights, len(steps[step]), run.world, accum)
                backward_and_step(accelerator, model, optimizer, loss, args.sft_max_grad_norm)
            loss_sum += loss.item() / (run.world * accum)  # this rank's share of the step's loss
        scheduler.step()
        # bookkeeping: the step's curve point (a step a killed launch logged is redone, not logged again), checkpoint
        if step >= logged:
            run.log_step({"train_sft/lr": scheduler.get_last_lr()[0]}, time.time() - started,
                         sums={"train_sft/loss": loss_sum}, show=f"sft step {step + 1}/{len(steps)}")  # fmt: skip
        if (step + 1) % args.save_every == 0 or step + 1 == len(steps):
            save_resumable(accelerator, model, run.dir / "sft", step + 1, optimizer, scheduler)
    metrics = sft_report(run, args, data, model, tokenizer)
    save_final(accelerator, model, run.dir / "sft_planner", {"steps": len(steps), "metrics": metrics}, tokenizer)
    return metrics


def sft_report(run: Run, args: Args, data: Data, model, tokenizer) -> dict[str, float]:
    """The warmed-up Planner's accuracy and macro-F1 on the held-out dialogues' turns, beside the majority class of
    the training turns. Every rank must call it (ZeRO-3 gathers the Planner)."""
    with torch.no_grad(), generation_weights(run.accelerator, model) as planner:
        planner.eval()
        texts = [e["text"] for e in data.sft_held_out]
        predicted = [
            planner_logits(planner, tokenizer, texts[i : i + 32], args.planner_max_length).argmax(-1).tolist()
            for i in range(0, len(texts), 32)
        ]
    gold = [e["label"] for e in data.sft_held_out]
    majority = max(range(len(NAMES)), key=lambda c: sum(e["label"] == c for e in data.sft_train))
    report = classification_report([p for chunk in predicted for p in chunk], gold)
    floor = classification_report([majority] * len(gold), gold)
    metrics = {f"sft/{k}": v for k, v in report.items()} | {f"sft/majority_{k}": v for k, v in floor.items()}
    return metrics | {"sft/train_turns": len(data.sft_train), "sft/held_out_turns": len(gold)}


def planner_update(
    run: Run, args: Args, *, model, tokenizer, optimizer, episodes: list[dict], running: dict[int, float]
) -> tuple[dict[str, float], dict]:
    """One AdamW step on Eq. 7 averaged over the update's episodes (the global batch split over ranks, one episode
    per micro-batch): R_t of Eq. 8, minus the baseline, weights log pi(h_t|s_t). Dropout stays off, so log pi is
    the distribution that sampled the strategies. Gradients are clipped at --rl-max-grad-norm. Returns the update's
    metrics (the gradient norm before clipping, the mean R_1 and the mean b_1) and this rank's share of its loss and
    of its per-turn entropy (``run.log_step``'s sums)."""
    accelerator = run.accelerator
    returns = [episode_returns(episode, args) for episode in episodes]
    advantages, baselines = subtract_baseline(returns, args, running)
    rows = [
        {"states": [t["state"] for t in e["turns"]], "actions": [t["strategy"] for t in e["turns"]], "advantages": a}
        for e, a in zip(episodes, advantages)
    ]
    steps, accum = training_steps(accelerator, len(rows), len(rows) + (-len(rows)) % run.world, 1, 1, args.seed)
    model.eval()
    loss_sum, entropy_sum, turns, grad_norm = 0.0, 0.0, 0.0, float("nan")
    for chunk, weights in micro_batches(rows, steps[0], accelerator, 1, accum):
        (row,), weight = chunk, weights[0]
        # ALGO LOGIC: Eq. 7 on one episode, its share of the update's mean, an (accumulated) step
        with accelerator.accumulate(model):
            logits = planner_logits(model, tokenizer, row["states"], args.planner_max_length)
            actions = torch.tensor(row["actions"], device=logits.device)
            advantage = torch.tensor(row["advantages"], device=logits.device, dtype=torch.float32)
            episode_loss, entropy = rso_loss(logits, actions, advantage, args.beta_ent)
            loss = share_of_global_mean(episode_loss, weight, len(rows), run.world, accum)  # mean over the episodes
            grad_norm = backward_and_step(accelerator, model, optimizer, loss, args.rl_max_grad_norm)  # the last counts
        # bookkeeping: this rank's share of the loss, and of the entropy over the update's turns
        loss_sum += loss.item() / (run.world * accum)
        entropy_sum += entropy.item() * len(row["actions"]) * weight.item()
        turns += len(row["actions"]) * weight.item()
    metrics = {"train/grad_norm": grad_norm, "train/baseline": float(np.mean([b[0] for b in baselines])),
               "rollout/return": float(np.mean([r[0] for r in returns]))}  # fmt: skip
    return metrics, {"train/loss": loss_sum, "train/entropy": (entropy_sum, turns)}


def planner_movement(run: Run, model, tokenizer, args: Args, states: list[str]) -> dict[str, float]:
    """How far RL moved the Planner from the SFT one: the L2 distance and the largest change of the weights, and
    the mean total variation between the two strategy distributions on ``states`` (printed). Every rank must call
    it."""
    from safetensors.torch import load_file

    weights = run.accelerator.get_state_dict(model)
    sft, _ = load_planner(str(run.dir / "sft_planner"), run.device, args.seed)
    variation = []
    with generation_weights(run.accelerator, model) as rl:  # ZeRO-3: every rank holds the whole Planner here
        for start in range(0, len(states), 16):
            chunk = states[start : start + 16]
            p = strategy_distribution(sft, tokenizer, chunk, args.planner_max_length)
            q = strategy_distribution(rl, tokenizer, chunk, args.planner_max_length)
            variation += (0.5 * (p - q).abs().sum(-1)).tolist()
    if not run.main:
        return {}
    before = load_file(run.dir / "sft_planner" / "model.safetensors")
    distance = torch.cat([(weights[k].float().cpu() - before[k].float()).flatten() for k in before if k in weights])
    moved = {
        "train/weight_distance": distance.norm().item(),
        "train/weight_change_max": distance.abs().max().item(),
        "train/weights": distance.numel(),
        "train/policy_tv_from_sft": float(np.mean(variation)) if variation else float("nan"),
        "train/policy_tv_from_sft_max": max(variation, default=float("nan")),
    }
    print(
        f"rl: the planner moved {moved['train/weight_distance']:.4g} from the SFT planner (L2 over "
        f"{moved['train/weights']:,} weights, largest change {moved['train/weight_change_max']:.3g}); on the "
        f"{len(states)} states it played, its strategy distribution moved by a total variation of "
        f"{moved['train/policy_tv_from_sft']:.4f} on average ({moved['train/policy_tv_from_sft_max']:.4f} at most)"
    )
    return moved


def reinforce(run: Run, args: Args, data: Data) -> dict:
    """Algorithm 1 and Sec. III-D2, top to bottom: --rl-episodes episodes seeded from the training dialogues (in a
    seeded order, cycled), --num-envs per update. Each update plays its --num-envs episodes together with the
    current Planner (rollout), then takes one step on their Eq. 7 loss (planner_update), so no update learns from an
    older Planner's episodes. Episodes are recorded as they finish and the Planner is checkpointed every
    --rl-save-every updates and after the last: a rerun replays the recorded returns of the checkpointed updates into
    the running baseline, then redoes the updates since the checkpoint on their recorded episodes (the same Planner
    played them: it was restored, then stepped on the same episodes), playing only the episodes never recorded."""
    from transformers import get_linear_schedule_with_warmup

    if run.finished("rl_planner"):
        return json.loads((run.dir / "rl_planner" / "steps.json").read_text()).get("metrics", {})
    accelerator = run.accelerator
    model, tokenizer = load_planner(str(planner_folder(run, "sft")), run.device, args.seed, trainable=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.rl_lr)
    updates = math.ceil(args.rl_episodes / args.num_envs)
    configure_batches(accelerator, args.num_envs, args.num_envs + (-args.num_envs) % run.world, 1)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, updates)
    model, optimizer, start = resume_and_prepare(accelerator, model, optimizer, scheduler, run.dir / "rl")
    tasks = rl_tasks(data, args)
    experts, rewarder = run.llm(args.experts_llm, args.batch_size), run.llm(args.rewarder_llm, args.batch_size)
    ailo = AILO(run.llm(args.user_llm, args.batch_size), "movie", args.user_max_tokens, args.user_parse_tries)
    roles = Roles(experts, data.catalog, ailo, rewarder)
    running, played = {}, {}  # the ema baseline, {t: b_t}; the stage's episodes by key, recorded or played
    logged = run.steps_logged("train", start, "rl updates")
    for update in tqdm(range(updates), desc="rl", total=updates, disable=not run.main):
        started, window = time.time(), tasks[update * args.num_envs : (update + 1) * args.num_envs]
        generator = torch.Generator().manual_seed(args.seed + 1000 * update + run.rank)
        play = on_policy(run, args, model=model, tokenizer=tokenizer, roles=roles, generator=generator)
        played |= {e["key"]: e for e in run.map("rl_episodes.jsonl", window, play, desc="episodes", every_rank=True)}
        episodes = [played[task.key] for task in window]  # as recorded, or as the current Planner played them
        if update < start:  # resumed: the checkpointed updates' recorded returns advance the running baseline
            subtract_baseline([episode_returns(episode, args) for episode in episodes], args, running)
            continue
        # ALGO LOGIC: one step on Eq. 7 over the update's episodes, their returns (Eq. 8) minus the baseline
        metrics, sums = planner_update(run, args, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                       episodes=episodes, running=running)  # fmt: skip
        scheduler.step()
        # bookkeeping: the update's curve point (once: what a killed launch logged is redone, not logged), checkpoint
        if update >= logged:
            run.log_step(metrics | rollout_metrics(episodes) | {"train/lr": scheduler.get_last_lr()[0]},
                         time.time() - started, sums=sums, show=f"rl update {update + 1}/{updates}")  # fmt: skip
        if (update + 1) % args.rl_save_every == 0 or update + 1 == updates:
            save_resumable(accelerator, model, run.dir / "rl", update + 1, optimizer, scheduler)
    count_rollouts(run, roles, list(played.values()))
    states = [turn["state"] for task in tasks for turn in played[task.key]["turns"]][:256]
    metrics = planner_movement(run, model, tokenizer, args, states)
    metrics |= {"rollout/episodes": args.rl_episodes, "rollout/updates": updates}
    save_final(accelerator, model, run.dir / "rl_planner", {"updates": updates, "metrics": metrics}, tokenizer)
    return metrics


def rl_tasks(data: Data, args: Args) -> list[Task]:
    """The tasks of the --rl-episodes episodes: the training dialogues in their seeded order, cycled, each keyed by
    its episode's index and its dialogue."""
    tasks = [data.rl[e % len(data.rl)] for e in range(args.rl_episodes)]
    return [replace(task, key=f"{e:05d}|{task.key}") for e, task in enumerate(tasks)]


def on_policy(run: Run, args: Args, *, model, tokenizer, roles: Roles, generator: torch.Generator):
    """``run.map``'s work for one update: the current Planner plays this rank's share of the update's episodes.
    Every rank enters (``every_rank``), even with no episode to play: ZeRO-3 gathers the Planner on all of them."""

    def play(tasks: list[Task]) -> Iterator[dict]:
        with generation_weights(run.accelerator, model) as planner:
            yield from rollout(tasks, planner=planner, tokenizer=tokenizer, roles=roles, args=args, generator=generator)

    return play


def rollout_metrics(episodes: list[dict]) -> dict[str, float]:
    """The update's episodes at a glance: their mean reward and length, the share the user accepted, and each
    strategy's share of their turns."""
    chosen = [turn["strategy"] for episode in episodes for turn in episode["turns"]]
    return {
        "rollout/reward_mean": float(np.mean([turn["reward"] for episode in episodes for turn in episode["turns"]])),
        "rollout/turns": float(np.mean([len(episode["turns"]) for episode in episodes])),
        "rollout/accepted": success_rate([episode["accepted"] for episode in episodes]),
        **{f"rollout/strategy/{key}": chosen.count(c) / len(chosen) for c, key in enumerate(KEYS)},
    }


def count_rollouts(run: Run, roles: Roles, episodes: list[dict]) -> None:
    """RL's counters: the experts', the rewarder's and the AILO user's parse counts (this rank's), and on rank 0,
    over ``episodes`` (every rank's and launch's, counted once), the rewarder's unscored turns and the mass its
    expected scores put outside 1-5 (``mass_metrics``)."""
    run.count({f"rollout/{k}": v for name, s in roles.stats.items() for k, v in s.metrics(f"{name}_").items()})
    run.count(roles.user.metrics())
    if run.main:
        turns = [turn for episode in episodes for turn in episode["turns"]]
        outside = [turn["reward_mass_outside"] for turn in turns if turn.get("reward_mass_outside") is not None]
        run.count(
            {"rollout/rewarder_unscored": sum(turn.get("score") is None and not turn["scores"] for turn in turns)}
        )
        run.count(mass_metrics(outside, "rollout/rewarder"))


# =============================================================================================== evaluation (Sec. IV-C)


def persuasiveness(i_pre: int | None, i_post: int | None, i_true: int | None) -> float | None:
    """PRS = 1 - (i_true - i_post) / (i_true - i_pre), with i_post clipped to at most i_true and the result to
    [0, 1] (METHODS.md 4.6). None, left out of the mean, when a score is missing or i_true <= i_pre: the full card
    did not raise the intention above the title's, so there is no gap to persuade across (with i_true < i_pre the
    formula would give 1 for any conversation)."""
    if i_pre is None or i_post is None or i_true is None or i_true <= i_pre:
        return None
    return min(1.0, max(0.0, 1 - (i_true - min(i_post, i_true)) / (i_true - i_pre)))


def recommended_item(episode: dict, catalog: Catalog) -> str:
    """The movie the system named last (among its retrieved entities and the target), else the target."""
    candidates = {episode["target"]} | {e for t in episode["turns"] for e in t["retrieved"]}
    for turn in reversed(episode["turns"]):
        named = [c for c in candidates if c in catalog.by_title and mentions_title(turn["system"], c)]
        if named:
            return max(named, key=lambda c: turn["system"].lower().rfind(c.split(" (")[0].lower()))
    return episode["target"]


def user_taste(task: Task, catalog: Catalog) -> str:
    """What the simulated user wants, as the intention judges are told it: the persona's interests where it has
    them (the demo's), and on every dataset the KG features of its hidden target, its title left out. The target is
    the taste the AILO user plays: INSPIRED's and ReDial's personas carry no interests of their own."""
    likes = f"What you like: {task.persona.interests} " if task.persona.interests else ""
    features = "; ".join(kg_facts(catalog, task.target.title)) or "(none known)"
    return f"{likes}The movie you are looking for has these features: {features}."


def judge_prompts(episode: dict, task: Task, catalog: Catalog) -> dict[str, str]:
    """The evaluator's five questions about one finished conversation (METHODS.md 4.8.7): WI after it; the user's
    intention to watch the recommended movie, the user knowing what it wants (``user_taste``), from the movie's title
    only (i_pre), from its full card (i_true, the paper's "real intention") and after the conversation (i_post); and
    the consistency of the system's messages with the facts (Cred)."""
    history = [*task.opening]
    for turn in episode["turns"]:
        history += [{"role": "assistant", "content": turn["system"]}, {"role": "user", "content": turn["user"]}]
    item = recommended_item(episode, catalog)
    persona = user_taste(task, catalog)
    request = " ".join(m["content"] for m in task.opening if m["role"] == "user")
    named = [t for t in catalog.titles if any(mentions_title(turn["system"], t) for turn in episode["turns"])]
    cards = "\n".join(f"- {item_card(catalog.by_title[t])}" for t in (named or [episode["target"]])[:5])
    prompts = {"wi": WI_PROMPT.format(history=render_history(history))}
    for name, evidence in EVIDENCE.items():
        evidence = evidence.format(card=item_card(catalog.by_title[item]), history=render_history(history))
        prompts[name] = INTENTION_PROMPT.format(persona=persona, request=request, evidence=evidence, title=item)
    messages = "\n".join(f"- {t['system']}" for t in episode["turns"])
    return prompts | {"cred": CRED_PROMPT.format(facts=cards, messages=messages), "item": item}


INTENTIONS = ("i_pre", "i_true", "i_post")


JUDGED = ("wi", "i_pre", "i_true", "i_post", "cred")


def judge_conversations(run: Run, args: Args, data: Data, *, evaluator, episodes: list[dict], name: str) -> dict:
    """The evaluator's scores of every conversation (greedy, --batch-size conversations per batched call), recorded
    per planner. WI and Cred are the scores as read (E[s] under expected scoring); the intentions behind PRS are the
    integers the judge writes (``judge_scores``'s ``written``), so that PRS compares scores as the paper's judge
    gives them, ties included (the scores as read, E[s] under expected scoring, are kept under
    ``intentions_read``)."""
    stats, tasks = ParseStats(), {task.key: task for task in data.evaluated}

    def judge(todo: list[dict]) -> Iterator[dict]:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start : start + args.batch_size]
            questions = [judge_prompts(episode, tasks[episode["key"]], data.catalog) for episode in batch]
            scores = judge_scores(evaluator, [q[score] for q in questions for score in JUDGED], 1, 0.0, args, stats)
            for k, (episode, question) in enumerate(zip(batch, questions)):
                read = dict(zip(JUDGED, scores[k * len(JUDGED) : (k + 1) * len(JUDGED)]))
                row = {score: read[score]["written" if score in INTENTIONS else "score"] for score in JUDGED}
                yield {"key": episode["key"], "item": question["item"], **row,
                       "mass_outside": [read[score]["mass_outside"] for score in JUDGED],
                       "intentions_read": {score: read[score]["score"] for score in INTENTIONS}}  # fmt: skip

    judged = run.map(f"judged_{name}.jsonl", episodes, judge, desc=f"judge {name}")
    run.count(stats.metrics(f"rollout/evaluator_{name}_"))
    return {r["key"]: r for r in judged}


def recalled(episode: dict, k: int, last_turn: bool = False) -> bool:
    """Recall@k of one conversation: the target among the Fact Retriever's top k at any turn (the lists pooled,
    METHODS.md 4.6), or with ``last_turn`` in the last turn's list alone (the list the conversation ended on)."""
    turns = episode["turns"][-1:] if last_turn else episode["turns"]
    return any(episode["target"] in turn["retrieved"][:k] for turn in turns)


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Dist-n: distinct n-grams over all n-grams, pooled across ``texts`` (whitespace tokens)."""
    grams = [
        tuple(tokens[i : i + n]) for text in texts for tokens in [text.split()] for i in range(len(tokens) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def distinct_2_per_response(texts: list[str]) -> float:
    """Dist-2 of each response on its own (distinct bigrams over bigrams), averaged over the responses that have a
    bigram; 0 if none has."""
    values = [distinct_n([text], 2) for text in texts if len(text.split()) >= 2]
    return float(np.mean(values)) if values else 0.0


def conversation_metrics(episodes: list[dict], judged: dict[str, dict]) -> dict[str, float]:
    """Table IV and V for one planner: Conv-SR (the evaluator's reward passed tau), WI, PRS, Cred (means over the
    conversations the evaluator scored; PRS leaves out and counts those with i_true <= i_pre), Dist-2 (the mean
    over system responses of each one's Dist-2, the headline, and corpus level over all of them), Rec-SR (a
    system utterance names the target), Recall@k (the target among the Fact Retriever's top k at any turn, and
    in the last turn's list alone) and H(pi), the mean entropy of the planner's strategy distribution at the turns
    it played (what Fig. 3 says the entropy-regularized RL changes; log 13 = 2.565 for the random planner)."""

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else float("nan")

    rows = [judged.get(e["key"], {}) for e in episodes]
    intentions = [(r.get("i_pre"), r.get("i_post"), r.get("i_true")) for r in rows]
    complete = [(pre, post, true) for pre, post, true in intentions if None not in (pre, post, true)]
    responses = [turn["system"] for e in episodes for turn in e["turns"]]
    return {
        "sr": success_rate([e["accepted"] for e in episodes]),
        "wi": mean(r.get("wi") for r in rows),
        "prs": mean(persuasiveness(*scores) for scores in intentions),
        "prs_scored": sum(persuasiveness(*scores) is not None for scores in intentions),
        "prs_left_out": sum(true <= pre for pre, _, true in complete),  # i_true <= i_pre
        "prs_unscored": len(intentions) - len(complete),  # a score missing
        "cred": mean(r.get("cred") for r in rows),
        "dist2": distinct_2_per_response(responses),
        "dist2_corpus": distinct_n(responses, 2),
        "rec_sr": success_rate([e["success"] for e in episodes]),
        "recall@1": success_rate([recalled(e, 1) for e in episodes]),
        "recall@5": success_rate([recalled(e, 5) for e in episodes]),
        "recall@1_last": success_rate([recalled(e, 1, last_turn=True) for e in episodes]),
        "recall@5_last": success_rate([recalled(e, 5, last_turn=True) for e in episodes]),
        "turns": mean(len(e["turns"]) for e in episodes),
        "planner_entropy": mean(turn["entropy"] for e in episodes for turn in e["turns"]),
    }


def strategy_by_progress(episodes: list[dict], bins: int) -> np.ndarray:
    """[bins, 13]: the share of each strategy among the turns in each bin of progress (turn - 1) / episode length."""
    counts = np.zeros((bins, len(NAMES)))
    for episode in episodes:
        for k, turn in enumerate(episode["turns"]):
            counts[min(bins - 1, k * bins // len(episode["turns"])), turn["strategy"]] += 1
    return counts / counts.sum(1, keepdims=True).clip(min=1)


def plot_strategies(path: Path, shares: dict[str, np.ndarray]) -> None:
    """Fig. 3: stacked bars of the strategy shares by conversation progress, one panel per planner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(shares), figsize=(4.2 * len(shares) + 2.6, 4), sharey=True, squeeze=False)
    colors = plt.get_cmap("tab20")(np.arange(len(NAMES)))
    for axis, (name, share) in zip(axes[0], shares.items()):
        bottom = np.zeros(len(share))
        labels = [f"{100 * k // len(share)}-{100 * (k + 1) // len(share)}%" for k in range(len(share))]
        for c, strategy in enumerate(NAMES):
            axis.bar(labels, share[:, c], bottom=bottom, color=colors[c], label=strategy)
            bottom += share[:, c]
        axis.set_title(f"{name} planner")
        axis.set_xlabel("conversation progress")
    axes[0][0].set_ylabel("share of turns")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def evaluate(run: Run, args: Args, data: Data) -> dict:
    """Sec. IV-C: each planner talks with the AILO user on the evaluated dialogues' openings and targets through
    the same rollout as RL, with the evaluator as the rewarder (so an episode ends, and counts for Conv-SR, when
    its reward passes tau); then the evaluator scores WI, PRS and Cred. The strategy distribution by progress is
    plotted for every planner."""
    evaluator = run.llm(args.evaluator_llm or args.rewarder_llm, args.batch_size)
    experts = run.llm(args.experts_llm, args.batch_size)
    ailo = AILO(run.llm(args.user_llm, args.batch_size), "movie", args.user_max_tokens, args.user_parse_tries)
    metrics, shares, rows = {}, {}, []
    if run.main:
        print(evaluated_count(data, args))
    for name in args.planners:
        if name != "random" and not run.finished(f"{name}_planner"):
            if run.main:
                print(f"eval: no {name} planner in this run, skipped")
            continue
        roles = Roles(experts, data.catalog, ailo, evaluator)
        episodes = evaluation_episodes(run, args, data, name, roles)
        run.count({f"rollout/{key}_{name}": value for role, s in roles.stats.items()
                   for key, value in s.metrics(f"{'evaluator' if role == 'rewarder' else role}_").items()})  # fmt: skip
        judged = judge_conversations(run, args, data, evaluator=evaluator, episodes=episodes, name=name)
        found = conversation_metrics(episodes, judged)
        prefix = "eval" if name == "rl" else f"eval_{name}"
        metrics |= {f"{prefix}/{k}": v for k, v in found.items()}
        outside = [o for r in judged.values() for o in r.get("mass_outside") or [] if o is not None]
        metrics |= mass_metrics(outside, f"{prefix}/judge")
        shares[name] = strategy_by_progress(episodes, args.progress_bins)
        rows.append([name, *[round(found[k], 4) for k in TABLE_COLUMNS]])
    run.count({f"{key}_eval": value for key, value in ailo.metrics().items()})  # apart from RL's
    run.table("eval_table", ["planner", *TABLE_COLUMNS], rows)
    if run.main and shares:
        path = run.dir / "strategy_by_progress.png"
        plot_strategies(path, shares)
        if run.tracker.wandb is not None:
            import wandb

            run.tracker.wandb.log({"eval/strategy_by_progress": wandb.Image(str(path))}, step=run.step)
        for name, share in shares.items():
            metrics |= {f"eval_strategies/{name}/{key}": float(share[:, c].mean()) for c, key in enumerate(KEYS)}
    with_target, dialogues = data.evaluable
    return metrics | {"eval/dialogues": len(data.evaluated), "eval/dialogues_with_target": with_target,
                      "eval/dialogues_in_split": dialogues}  # fmt: skip


def evaluation_episodes(run: Run, args: Args, data: Data, name: str, roles: Roles) -> list[dict]:
    """Planner ``name``'s conversations on the evaluated dialogues, --eval-num-envs played together, recorded in
    eval_<name>.jsonl. Every planner draws the same random numbers (the LLMs' samples and the strategy draws), so
    that their episodes differ only where their strategies do."""
    planner, tokenizer = (None, None) if name == "random" else load_planner(
        str(run.dir / f"{name}_planner"), run.device, args.seed
    )  # fmt: skip
    seed_everything(args.seed + run.rank)
    generator = torch.Generator().manual_seed(args.seed + run.rank)

    def play(tasks: list[Task]) -> Iterator[dict]:
        for start in range(0, len(tasks), args.eval_num_envs):
            yield from rollout(tasks[start : start + args.eval_num_envs], planner=planner, tokenizer=tokenizer,
                               roles=roles, args=args, generator=generator, greedy=args.greedy_planner)  # fmt: skip

    return run.map(f"eval_{name}.jsonl", data.evaluated, play, desc=f"eval {name}")


TABLE_COLUMNS = ("sr", "wi", "prs", "cred", "dist2", "dist2_corpus", "rec_sr", "recall@1", "recall@5",
                 "recall@1_last", "recall@5_last", "planner_entropy")  # fmt: skip
TABLE_HEADERS = ("Conv-SR", "WI", "PRS", "Cred", "Dist-2", "Dist-2c", "Rec-SR", "R@1", "R@5", "R@1 last", "R@5 last",
                 "H(pi)")  # fmt: skip


def print_table(metrics: dict) -> None:
    if "sft/accuracy" in metrics:
        print(
            f"\nplanner SFT on {metrics['sft/held_out_turns']} held-out turns: accuracy {metrics['sft/accuracy']:.3f}"
            f"  macro-F1 {metrics['sft/macro_f1']:.3f}   (majority class: accuracy "
            f"{metrics['sft/majority_accuracy']:.3f}  macro-F1 {metrics['sft/majority_macro_f1']:.3f})"
        )
    if "train/weight_distance" in metrics:
        print(
            f"RL moved the planner {metrics['train/weight_distance']:.4g} (L2 over its weights; largest change "
            f"{metrics['train/weight_change_max']:.3g}); its strategy distribution by a mean total variation of "
            f"{metrics['train/policy_tv_from_sft']:.4f} on the states it played"
        )
    if "eval/dialogues" in metrics:
        print(
            f"\nevaluated on {metrics['eval/dialogues']:.0f} dialogues ({metrics['eval/dialogues_with_target']:.0f} of "
            f"the split's {metrics['eval/dialogues_in_split']:.0f} have a target)"
        )
    print(f"\n{'planner':<10}" + "".join(f"{h:>9}" for h in TABLE_HEADERS))
    for label, prefix in (("random", "eval_random"), ("SFT", "eval_sft"), ("RL", "eval")):
        if f"{prefix}/sr" in metrics:
            print(f"{label:<10}" + "".join(f"{metrics[f'{prefix}/{c}']:>9.3f}" for c in TABLE_COLUMNS))
    print(
        "Dist-2: the mean over responses of each one's (the headline); Dist-2c: corpus level over all responses. "
        "R@k: the Fact Retriever's lists of every turn pooled; R@k last: the last turn's list alone. H(pi): the "
        "planner's mean strategy entropy at the turns it played. PRS over the dialogues scored: "
        + ", ".join(
            f"{label} {metrics[f'{prefix}/prs_scored']:.0f} ({metrics[f'{prefix}/prs_left_out']:.0f} left out with "
            f"i_true <= i_pre, {metrics[f'{prefix}/prs_unscored']:.0f} unscored)"
            for label, prefix in (("random", "eval_random"), ("SFT", "eval_sft"), ("RL", "eval"))
            if f"{prefix}/prs_scored" in metrics
        )
    )
    seconds = {k[5:-8]: v for k, v in metrics.items() if k.startswith("perf/") and k.endswith("_seconds")}
    print("\nstage seconds: " + "  ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


# =============================================================================================== main


# What runs/<run>/curves.png draws: the return, entropy and gradient norm of each update, and the evaluation
# beside the random and SFT planners.
CURVES = {
    "return R_1": ["rollout/return", "train/baseline"],
    "planner entropy": ["train/entropy"],
    "gradient norm (before clipping)": ["train/grad_norm"],
}
BARS = {"SR": ["eval_random/sr", "eval_sft/sr", "eval/sr"], "WI": ["eval_random/wi", "eval_sft/wi", "eval/wi"]}


def main(args: Args) -> None:
    check_specs(args)  # a wrong model or LLM spec stops here, not after minutes of an earlier stage
    batches = check_args(args, args.dry_run or launched_processes())
    data = load_data(args)
    if args.dry_run:
        sizes = {"SFT turns": len(data.sft_train), "held-out SFT turns": len(data.sft_held_out)}
        sizes |= {"RL dialogues": len(data.rl), "evaluated dialogues": len(data.evaluated), "items": len(data.catalog)}
        print_dry_run("rso.py", args.dry_run, batches, sizes)
        print(f"  {evaluated_count(data, args)}")
        return
    run = Run(args)  # runs/<run_name>/, ranks, seeding, metrics; each run.stage is timed and its LLM costs booked
    run.stage("sft", sft_warmup, args, data)  # Eq. 6: the Planner warmed up on strategy labels
    run.stage("rl", reinforce, args, data)  # Algorithm 1, Eq. 7-9: entropy-regularized policy gradient
    run.stage("eval", evaluate, args, data)  # Tables IV-V and Fig. 3: random, SFT and RL planners side by side
    run.log(run.costs())
    if run.main:  # every simulated user turn the run recorded, checked for its target's title
        audit = audit_leaks(run.dir)
        print_audit(*audit)
        run.log(audit[0])
    run.finish(print_table, CURVES, BARS)


if __name__ == "__main__":
    try:
        main(parse_args(Args, PRESETS))
    except (InputError, ModelSpecError, LLMBackendError) as err:
        raise SystemExit(f"error: {err}") from None
