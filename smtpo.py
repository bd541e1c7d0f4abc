"""SMTPO: Simulator-guided Multi-Turn Preference Optimization for a reasoning LLM recommender (METHODS.md Sec. 3).
Docs: docs/smtpo.md.

    python smtpo.py                                    # every stage on the embedded SmolLM2 + the bundled demo
    python smtpo.py --dataset inspired --num-test 20   # INSPIRED (validation split) from --data-dir
    accelerate launch smtpo.py --dataset redial        # rollouts, synthesis and training over ranks
    python smtpo.py --run-name <run> --stages eval --noisy-feedback   # Table 3's controls on a trained run
    python smtpo.py paper --dataset inspired --policy <8B> ...   # the paper's settings (PAPER below)
    bash benchmark/smtpo_table1.sh                     # the paper's Table 1 on GPUs

A reasoning LLM reranks the candidates a dual-view retriever recalls, over T turns with a simulated user who
answers each list with feedback. The pipeline (the paper's Fig. 2), one stage function each, writing under
runs/<run_name>/:

  simulator  the user simulator's three tasks over H+ / H- / S+ / S- lists (feedback written by a teacher that sees
             the target; the target and its attributes; Yes/No on one item), one LoRA SFT (Eq. 6)
                                                               -> simulator_data.jsonl, simulator_adapter/
  retriever  LightGCN on the item-entity graph, BPR (Eq. 8); the adapter and cross-attentions fusing the text and
             graph views (Eq. 9-11), InfoNCE (Eq. 12), early stopping on held-out Recall@20 -> retriever/
  sft        the teacher's five-step <think> reasoning and RANK LIST per training turn; LoRA SFT (Eq. 13)
                                                               -> recommender_data.jsonl, sft_adapter/
  grpo       multi-turn rollouts: retrieve, sample G outputs of one prompt, score them with the five rewards,
             continue with one format-valid sample and the simulator's feedback; GRPO (Eq. 14) -> grpo/, grpo_adapter/
  eval       the zero-shot backbone, the SFT recommender and SMTPO through T turns on the test dialogues;
             Recall@{1,10}, NDCG@10, MRR@10 per turn                  -> eval_<policy>.jsonl

A rerun with the same --run-name skips every finished record, checkpoint and model.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.catalog import Catalog
from common.checkpoints import resume_and_prepare, save_final, save_resumable
from common.conversations import chat_roles, render_history
from common.data import load_crs_dataset
from common.distributed import (
    backward_and_step,
    check_division,
    configure_batches,
    generation_weights,
    launched_processes,
    micro_batches,
    print_dry_run,
    share_of_global_mean,
    training_steps,
)
from common.formats import Dialogue, InputError
from common.llm import HFChat, LLMBackendError
from common.metrics import mrr_at_k, ndcg_at_k, recall_at_k
from common.models import ModelSpecError, check_specs, load_merged
from common.parsing import ParseStats, chat_parsed
from common.presets import Preset, parse_args
from common.run import Run, sft_row
from common.sft import supervised_finetuning
from common.tokens import (
    Fitted,
    collate,
    drop_utterances,
    droppable_utterances,
    encode_prompt_completion,
    fit_prompt,
    prompt_length,
    sequence_logprobs,
)

STAGES = ("simulator", "retriever", "sft", "grpo", "eval")
HEADS = ("both", "text", "graph")  # the fused retriever and its two single views, trained side by side


@dataclass
class Args:
    exp_name: str = "smtpo"
    """the name of this experiment (prefix of the default run name)"""
    seed: int = 1
    """seed of python, numpy and torch: negatives, LoRA init, data order, sampled outputs"""
    run_name: str | None = None
    """outputs go to runs/<run_name>/; rerun with the same name to resume (default, CleanRL's:
    <exp_name>__<dataset>__<seed>__<unix time>)"""
    stages: tuple[Literal["simulator", "retriever", "sft", "grpo", "eval"], ...] = STAGES
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
    """demo (bundled), inspired (UniCRS train, CFCRS valid/test, the CFCRS KG) or redial (official train, iEvaLM
    valid/test and KG)"""
    data_dir: str = "../shared/data"
    """root of the real data (docs/data.md); unused for the demo"""
    eval_split: Literal["valid", "test"] = "valid"
    """valid for development; test is held out: use it only for final numbers"""
    num_train: int = 2
    """training turns (a context ending at a recommendation turn) for the simulator and the recommender; 0 = all"""
    num_test: int = 2
    """test dialogues (conversations, the first in file order), each of their contexts that ends at a recommendation
    turn run through all --max-turns turns; 0 = all"""

    # ------------------------------------------------------------------------------------------- roles
    policy: str = "smollm2-135m"
    """the recommender (paper: deepseek-ai/DeepSeek-R1-Distill-Llama-8B)"""
    user_model: str = "smollm2-135m"
    """the user simulator to tune (paper: meta-llama/Llama-3.1-8B-Instruct)"""
    teacher_llm: str = "hf:smollm2-135m"
    """backend that writes the simulator's feedback, the reasoning and the reference preferences (paper:
    openai:gpt-3.5-turbo)"""
    text_encoder: str = "minilm"
    """the frozen text encoder E_T of the retriever and the preference reward: minilm (embedded all-MiniLM-L6-v2) or
    a sentence-transformers folder (paper: BAAI/bge-base-en-v1.5)"""
    batch_size: int = 16
    """prompts per batched call of a local backend"""

    # ------------------------------------------------------------------------------------------- simulator
    simulator_lists: int = 1
    """of the four lists (H+, H-, S+, S-) per training turn, how many get a feedback example, drawn per turn
    (paper: 4)"""
    simulator_predictions: int = 2
    """target-prediction examples per training turn: the target (Yes), then negatives drawn from the lists (No); 2
    balances the labels (paper: any item of the four lists, so about one Yes in 37)"""
    untrained_simulator: bool = False
    """let the base model give the feedback where this run has no tuned simulator (the ablation); without it, a
    missing simulator adapter is an error"""
    simulator_epochs: int = 5
    """simulator SFT epochs (paper: 5)"""
    simulator_lr: float = 1e-5
    """simulator SFT learning rate (paper: 1e-5)"""
    feedback_max_tokens: int = 48
    """length cap of one feedback"""

    # ------------------------------------------------------------------------------------------- retriever
    gcn_dim: int = 64
    """LightGCN embedding size Dim_c"""
    gcn_layers: int = 2
    """LightGCN propagation layers"""
    bpr_epochs: int = 50
    """BPR passes over the item-attribute pairs"""
    retriever_epochs: int = 50
    """fusion-head epochs, with early stopping on held-out Recall@20 (paper: up to 50)"""
    retriever_patience: int = 50
    """epochs without a better held-out Recall@20 before stopping; the best epoch's weights are kept (paper: unstated;
    on INSPIRED a patience of 5 stopped every view at half the recall it reached later, docs/smtpo.md)"""
    retriever_lr: float = 5e-5
    """fusion-head learning rate, Adam (paper: 5e-5)"""
    retriever_batch_size: int = 32
    """training turns per fusion-head step, shuffled every epoch (paper: unstated)"""
    retriever_inputs: Literal["all", "dialogue", "lists"] = "all"
    """all: the paper's inputs; dialogue: the dialogue text and I_D alone, without the simulator's feedback, the
    reference preference and the list R; lists: the dialogue, I_D and the list R_human, without F and P. The last two
    make no LLM call: they measure the retriever on real data on a CPU (only with --stages retriever)"""
    negatives: int = 64
    """InfoNCE negatives per example, excluding the target and the mentioned items (METHODS.md default: 64)"""
    num_candidates: int = 20
    """candidates the retriever recalls for the recommender (paper: 20)"""

    # ------------------------------------------------------------------------------------------- ablations
    ablations: tuple[Literal["no-rec", "no-pref", "no-feedback", "single-task-simulator"], ...] = ()
    """Table 2's ablations, each run under its own --run-name: no-rec (w/o Rec: the retriever never reads the list R,
    in training or at any turn), no-pref (w/o Pref: the retriever never reads the preference P), no-feedback (w/o
    Feedback, no simulator: no feedback F in the retriever's training, the SFT prompts or any turn, and no simulator
    stage), single-task-simulator (the simulator trained on feedback generation alone). w/o RL is the SFT
    recommender every evaluation reports beside SMTPO (eval_sft/)"""

    # ------------------------------------------------------------------------------------------- recommender
    list_length: int = 10
    """titles in the RANK LIST (paper: 10)"""
    max_turns: int = 2
    """T: recommender calls per dialogue, the first without feedback (paper: 5)"""
    rec_max_tokens: int = 192
    """length cap of one recommender output (reasoning and list; paper: 2048 in all)"""
    think_prefill: bool = True
    """open every recommender output with "<think>" pre-filled after the assistant header, as the chat template of
    the paper's DeepSeek-R1-Distill backbone does (a template that already ends with it gets no second one); the tag
    counts as part of the output for the format rewards"""
    step_max_tokens: int = 8
    """length cap of each reasoning step a local teacher writes"""
    lora_rank: int = 8
    """LoRA rank (paper: 8)"""
    lora_alpha: int = 16
    """LoRA alpha (METHODS.md default)"""
    sft_epochs: int = 8
    """recommender SFT epochs (paper: 8)"""
    sft_lr: float = 1e-3
    """recommender SFT learning rate (paper: 5e-5; the demo's 8 steps on a 135M model need a larger step for the
    five-step format to show up in sampled outputs)"""
    sft_batch_size: int = 4
    """SFT global batch, over all ranks and accumulation steps"""
    micro_batch_size: int = 1
    """sequences per rank per forward pass"""
    max_length: int = 2048
    """prompt + completion cutoff in tokens (paper: 2048)"""
    gradient_checkpointing: bool = True
    """recompute each layer's activations in the backward pass instead of storing them"""
    max_grad_norm: float = 1.0
    """gradient clipping of the SFT and GRPO updates (inf: none; paper: unstated)"""
    save_every: int = 50
    """SFT optimizer steps between resumable checkpoints (each SFT stage also saves when it ends)"""

    # ------------------------------------------------------------------------------------------- GRPO
    group_size: int = 4
    """G: outputs sampled from one shared prompt (paper: 4)"""
    grpo_steps: int = 3
    """GRPO steps; each rolls out training dialogues through their turns until it has --groups-per-step groups, then
    takes --grpo-iterations optimizer steps on them (the demo's 3 keep the no-flag run under 15 minutes on 2 CPU
    cores; benchmark/smtpo_table1.sh sets the paper-scale count)"""
    grpo_epochs: float = 0.0
    """above 0: GRPO steps until every training dialogue was rolled out this many times, in place of --grpo-steps
    (paper: 3 epochs; benchmark/smtpo_table1.sh sets 3: a fixed number of steps is a different number of epochs on
    each dataset, e.g. 2,000 steps are several epochs of INSPIRED and a fraction of one of the full ReDial)"""
    grpo_save_every: int = 1
    """GRPO steps between resumable checkpoints: a step's rollouts take far longer than saving a LoRA adapter and
    its optimizer state. Above 1, a resume trains the recorded rollouts of the steps after the last checkpoint,
    which the lost, later policy sampled: they are then slightly off-policy"""
    groups_per_step: int = 2
    """groups (one turn's prompt and its G outputs) per optimizer step, however many turns the dialogues ran (paper:
    gradient accumulation 8 over one group each, i.e. 8)"""
    grpo_iterations: int = 1
    """mu: optimizer steps on each step's groups, pi_old frozen at sampling, so that the clip acts from the second on
    (TRL's num_iterations; paper: unstated, 1 reads Eq. 14's pi_old as the sampling policy of a single update)"""
    grpo_lr: float = 3e-4
    """GRPO learning rate (paper: 1e-5; the demo's 3 steps of 2 groups on a 135M model need a larger step to move the
    policy measurably; at 1e-3 each step moved the sampled outputs by about 0.1 nat per token and the format reward
    fell)"""
    epsilon: float = 0.2
    """clipping range of the probability ratio (METHODS.md default: 0.2)"""
    kl_beta: float = 0.04
    """weight of the k3 KL to the SFT reference (METHODS.md default: 0.04)"""
    temperature: float = 1.0
    """sampling temperature of the rollouts (evaluation is greedy)"""
    rollout_backend: Literal["hf", "vllm"] = "hf"
    """how GRPO's rollouts sample the policy: hf (the training model itself, its G samples sharing one prefill) or
    vllm (a vLLM engine on pi_sft that loads the current LoRA after every update; CUDA only)"""
    vllm_memory: float = 0.3
    """the share of GPU memory the rollouts' vLLM engine may take (the rest trains)"""
    continuation: Literal["random", "best"] = "random"
    """which sample continues the dialogue: a random format-valid one (the default reading) or the best-rewarded"""

    # ------------------------------------------------------------------------------------------- evaluation
    policies: tuple[Literal["zero-shot", "sft", "smtpo"], ...] = ("zero-shot", "sft", "smtpo")
    """which recommenders to evaluate side by side"""
    blind_simulator: bool = False
    """Table 3's control: the simulator sees the dialogue only, never the recommender's lists"""
    noisy_feedback: bool = False
    """Table 3's control: every feedback is replaced by irrelevant chat"""
    dry_run: int = 0
    """validate the flags, every batch division for this many processes, and the data files, then exit without
    loading a model (0: run)"""


# The paper's Table 1 setting (Sec. 4.1.4, the rest of Sec. 3-4), selected by `python smtpo.py paper ...`
# (common/presets.py; docs/smtpo.md shows this table). SMTPO has no released code: where the paper is silent, the
# source says so and gives METHODS.md's default or our reading.
PAPER = Preset(
    "the paper's Table 1 setting (Sec. 4.1.4; METHODS.md 3.6's defaults and our readings where the paper is silent); "
    "state the models, the data and the scale",
    values={
        "num_train": (0, "Sec. 3.8 (METHODS.md): a training turn per recommendation of the training split; 0 = all"),
        "num_test": (0, 'Sec. 4.1.3: "the same fixed and complete test set"; 0 = every test dialogue'),
        "simulator_lists": (4, "Sec. 3.2.1: feedback on each of the four lists H+, H-, S+, S-"),
        "simulator_predictions": (2, "Sec. 3.2.3: any item of the four lists (about one Yes in 37); ours: the target "
                                  "and one negative, balanced (docs/smtpo.md)"),
        "untrained_simulator": (False, "Sec. 3.2: the simulator is trained (the base model's feedback is our "
                                "ablation)"),
        "simulator_epochs": (5, 'Sec. 4.1.4: "SFT-trained for 5 epochs"'),
        "simulator_lr": (1e-5, "Sec. 4.1.4: lr 1e-5, LoRA rank 8, AdamW"),
        "feedback_max_tokens": (128, "not in the paper: ours, room for one or two sentences of feedback"),
        "gcn_dim": (64, "not in the paper (Dim_c unstated): ours, LightGCN's usual 64"),
        "gcn_layers": (2, "not in the paper (LightGCN's layers unstated): ours"),
        "bpr_epochs": (50, "not in the paper (Eq. 8's pretraining length unstated): ours"),
        "retriever_epochs": (50, 'Sec. 4.1.4: "up to 50 epochs with early stopping"'),
        "retriever_patience": (50, "not in the paper (early stopping's patience unstated): ours; a patience of 5 "
                               "stopped every view at half the recall it reached later (docs/smtpo.md)"),
        "retriever_lr": (5e-5, "Sec. 4.1.4: lr 5e-5, Adam"),
        "retriever_batch_size": (32, "not in the paper: ours"),
        "retriever_inputs": ("all", "Sec. 3.3, Eq. 7-8: the dialogue, the feedback, the preference, I_D and R"),
        "negatives": (64, "Eq. 12's N, not given: METHODS.md 3.6's default"),
        "num_candidates": (20, 'Sec. 4.1.4: "The recommender receives 20 candidates"'),
        "ablations": ((), "Table 1's SMTPO: none; each of Table 2's rows a run of its own"),
        "list_length": (10, 'Sec. 4.1.4: "outputs a final top-10 list"'),
        "max_turns": (5, 'Sec. 4.1.4: "5 interaction turns"; Table 1 reports turn 5'),
        "rec_max_tokens": (1024, "not in the paper (its max length 2048 holds prompt and output): ours, half of it "
                           "for the reasoning and the list"),
        "think_prefill": (True, "not in the paper: the chat template of its DeepSeek-R1-Distill backbone opens the "
                          "output with <think> (a template that has it gets no second one)"),
        "step_max_tokens": (64, "not in the paper: ours, a sentence or two per reasoning step of a local teacher "
                            "(an API teacher, the paper's, writes the whole reasoning)"),
        "lora_rank": (8, "Sec. 4.1.4: LoRA rank 8 for the simulator and the recommender"),
        "lora_alpha": (16, "not in the paper: METHODS.md 3.6's default"),
        "sft_epochs": (8, 'Sec. 4.1.4: "SFT-trained for 8 epochs"'),
        "sft_lr": (5e-5, "Sec. 4.1.4: lr 5e-5, AdamW"),
        "sft_batch_size": (8, "not in the paper: ours, the simulator's and the recommender's SFT batch (it splits "
                           "over 1, 2, 4 or 8 ranks)"),
        "max_length": (2048, 'Sec. 4.1.4: "max length 2048"'),
        "max_grad_norm": (1.0, "not in the paper (no clipping stated): ours, transformers' and TRL's default; inf "
                          "turns clipping off"),
        "group_size": (4, 'Sec. 4.1.4: "The group size of GRPO is 4"'),
        "grpo_steps": (3, "unused: --grpo-epochs sets GRPO's length (Sec. 4.1.4 counts epochs)"),
        "grpo_epochs": (3.0, 'Sec. 4.1.4: "multi-turn GRPO optimization for 3 epochs"'),
        "groups_per_step": (8, 'Sec. 4.1.4: "gradient accumulation 8", a group per micro-step (METHODS.md 3.9.10)'),
        "grpo_iterations": (1, "not in the paper: METHODS.md 3.5's mu = 1, Eq. 14's pi_old the sampling policy"),
        "grpo_lr": (1e-5, "Sec. 4.1.4: lr 1e-5"),
        "epsilon": (0.2, "Eq. 14's epsilon, not given: METHODS.md 3.6's default"),
        "kl_beta": (0.04, "Eq. 14's beta, not given: METHODS.md 3.6's default"),
        "temperature": (1.0, "not in the paper: METHODS.md 3.6's default (evaluation is greedy)"),
        "continuation": ("random", "not in the paper: a random format-valid output (METHODS.md 3.9.2; best is "
                         "biased)"),
        "blind_simulator": (False, "Table 1: the simulator sees the lists (Table 3's control: True)"),
        "noisy_feedback": (False, "Table 1: the simulator's feedback (Table 3's control: True)"),
    },
    ablations={"ablations": "Table 2", "blind_simulator": "Table 3", "noisy_feedback": "Table 3"},
    recipe=(
        "exp_name", "seed", "run_name", "stages", "track", "wandb_project", "wandb_entity", "wandb_group", "wandb_tags",
        "dataset", "data_dir", "eval_split", "policy", "user_model", "teacher_llm", "text_encoder", "batch_size",
        "micro_batch_size", "gradient_checkpointing", "save_every", "grpo_save_every", "rollout_backend",
        "vllm_memory", "policies", "dry_run",
    ),
)  # fmt: skip
PRESETS = {"paper": PAPER}


# =============================================================================================== data


@dataclass
class Task:
    """What the recommender is given: a conversation context ending at a recommendation turn; the item recommended
    there is the target i*."""

    key: str
    history: list[dict]  # chat roles: "user" the seeker, "assistant" the recommender
    mentioned: list[str]  # I_D: the items and entities the context mentions
    target: str
    conversation: str = ""  # the conversation the context is cut from (several contexts share one)


@dataclass
class Data:
    train: list[Task]
    held_out: list[Task]  # a tenth of the training turns, for the retriever's early stopping
    evaluated: list[Task]  # the --eval-split turns
    catalog: Catalog
    domain: str = "movie"


class EntityLinker:
    """The KG's attribute entities (genres, people) that a text names, in the order it names them: one linker for a
    dataset's training and evaluated dialogues alike, where their releases annotate entities differently (ReDial's
    official training format annotates none, iEvaLM's evaluated split genres and people). A name matches as whole
    words, case and punctuation aside ("j.d. salinger"); a genre also in the plural ("comedies", "thrillers"). A
    person is linked by a name of two words or more: one-word names ("Prince", "Drake") are common words."""

    def __init__(self, genres, people):
        self.vocabulary = set(genres) | set(people)  # every attribute entity, linked or not
        self.names: dict[tuple[str, ...], str] = {}
        for name in genres:
            self.names.setdefault(self.words(name), name)
        for name in people:
            if len(self.words(name)) >= 2:
                self.names.setdefault(self.words(name), name)
        self.longest = max((len(words) for words in self.names), default=0)
        self.seen: dict[str, list[str]] = {}

    @staticmethod
    def words(text: str) -> tuple[str, ...]:
        return tuple(w for w in (w.strip(".,;:!?\"'()[]{}").lower() for w in text.split()) if w)

    @staticmethod
    def singular(word: str) -> list[str]:
        return (
            [word[:-3] + "y"] * word.endswith("ies")
            + [word[:-2]] * word.endswith("es")
            + [word[:-1]] * word.endswith("s")
        )

    def __call__(self, text: str) -> list[str]:
        if text not in self.seen:  # a dialogue's utterances are read again at each of its later turns
            self.seen[text] = self.link(text)
        return self.seen[text]

    def link(self, text: str) -> list[str]:
        words, found, k = self.words(text), [], 0
        while k < len(words):
            for size in range(min(self.longest, len(words) - k), 0, -1):
                span = words[k : k + size]
                forms = [span] + ([(w,) for w in self.singular(span[0])] if size == 1 else [])
                name = next((self.names[f] for f in forms if f in self.names), None)
                if name is not None:
                    found.append(name)
                    k += size - 1
                    break
            k += 1
        return list(dict.fromkeys(found))


def make_tasks(dialogues: list[Dialogue], titles: set[str], linker: EntityLinker | None = None) -> list[Task]:
    """One task per recommender turn with history whose first recommended item is in the catalog and was not
    mentioned before (the retriever never recalls a mentioned item); I_D is what the dialogue annotates before the
    turn (items and entities, or iEvaLM's context annotations). With a ``linker``, I_D's attribute entities (genres,
    people) are what it finds in the earlier utterances, whatever the release annotates, and its items are the
    annotated ones (ReDial: the official format annotates no entity, iEvaLM's does; docs/smtpo.md)."""
    tasks = []
    for dialogue in dialogues:
        for i, turn in enumerate(dialogue.turns):
            history = chat_roles(dialogue.turns[:i])
            mentioned = dialogue.context_items
            if mentioned is None:
                mentioned = [m for t in dialogue.turns[:i] for m in t.items + t.entities]
            if linker is not None:
                items = [m for m in mentioned if m not in linker.vocabulary]
                mentioned = items + [e for t in dialogue.turns[:i] for e in linker(t.text)]
            targets = [t for t in turn.items if t in titles and t not in mentioned]  # a new item: never a repeat
            if turn.role != "recommender" or not targets or not history:
                continue
            conversation = dialogue.conversation_id or dialogue.dialog_id
            key = f"{dialogue.dialog_id}:{i}"
            tasks.append(Task(key, history, list(dict.fromkeys(mentioned)), targets[0], conversation))
    return tasks


def entity_linker(catalog: Catalog) -> EntityLinker:
    """One linker for the KG's genres and people (directors, stars, writers)."""
    values = {k: {v for item in catalog.items for v in item.attributes.get(k) or []} for k in CARD_FIELDS + ("writer",)}
    return EntityLinker(values["genre"], values["director"] | values["star"] | values["writer"])


def load_data(args: Args) -> Data:
    """Training turns (in order; a tenth held out for the retriever), the evaluated split's turns, and the catalog
    with the attributes of the dataset's KG (common/data.py's ``load_crs_dataset``: no evaluated conversation
    trains)."""
    dataset = load_crs_dataset(args.dataset, args.data_dir, args.eval_split)
    catalog = Catalog(dataset.items, encoder=args.text_encoder)
    titles = set(catalog.titles)
    linker = entity_linker(catalog) if args.dataset == "redial" else None  # one I_D for training and test
    tasks = make_tasks(dataset.train, titles, linker)
    random.Random(args.seed).shuffle(tasks)
    if args.num_train:  # a tenth more than --num-train, held out: every held-out turn costs teacher calls
        tasks = tasks[: args.num_train + max(1, args.num_train // 10)]
    held_out = tasks[: max(1, len(tasks) // 10)]
    train_tasks = tasks[len(held_out) :]
    evaluated = first_conversations(make_tasks(dataset.evaluated, titles, linker), args.num_test)
    if not train_tasks or not evaluated:
        raise InputError(f"{args.dataset}: {len(train_tasks)} training and {len(evaluated)} test turns with a target")
    return Data(train_tasks, held_out, evaluated, catalog)


def first_conversations(tasks: list[Task], count: int) -> list[Task]:
    """Every context of the first ``count`` conversations, in file order (0: all): --num-test counts dialogues, and
    a dialogue with several recommendation turns brings each of them."""
    kept = set(list(dict.fromkeys(s.conversation for s in tasks))[: count or None])
    return [s for s in tasks if s.conversation in kept]


def check_args(args: Args, world: int) -> list[str]:
    """Flags that cannot work on ``world`` ranks, refused before anything loads: the SFT batch of the simulator and
    of the recommender must split evenly into ranks x micro-batches (GRPO pads its outputs to fit). Returns the
    splits, for the dry run's plan."""
    batches = []
    for stage in ("simulator", "sft"):
        if stage in args.stages:
            split = check_division(world, args.sft_batch_size, args.micro_batch_size, "--sft-batch-size")
            batches.append(f"{stage} stage: {split}")
    if args.retriever_inputs != "all" and set(args.stages) != {"retriever"}:
        raise InputError(
            f"--retriever-inputs {args.retriever_inputs} measures the retriever alone: use it with --stages retriever"
        )
    if "retriever" in args.stages:
        heads = {views: k % world for k, views in enumerate(HEADS)}
        batches.append(
            f"retriever stage: the training turns' text encoding shared over {world} ranks, each on its device; the "
            + ", ".join(f"{views} head on rank {rank}" for views, rank in heads.items())
        )
    if "grpo" in args.stages:
        dialogues = round_size(args, 0, world)
        batches.append(
            f"grpo stage: each step's first round rolls out {dialogues} dialogues, {dialogues // world} per rank "
            f"(up to {args.max_turns} turns, a group of G = {args.group_size} outputs each), for --groups-per-step "
            f"{args.groups_per_step}"
        )
    problems = [
        (args.grpo_iterations < 1, "--grpo-iterations must be at least 1"),
        (args.groups_per_step < 1, "--groups-per-step must be at least 1"),
        (args.group_size < 2, "--group-size must be at least 2: Eq. 14's advantages compare the outputs of a group"),
        (
            args.max_length <= args.rec_max_tokens,
            f"--max-length {args.max_length} leaves no room for a prompt beside --rec-max-tokens {args.rec_max_tokens}",
        ),
    ]
    for bad, message in problems:
        if bad:
            raise InputError(message)
    return batches


def attributes_of(catalog: Catalog, title: str) -> set[str]:
    item = catalog.by_title.get(title)
    if item is None:
        return set()
    return {f"{k}: {v}" for k in ("genre", "director", "star", "writer") for v in item.attributes.get(k) or []}


CARD_FIELDS = ("genre", "director", "star")  # an item as the paper's prompts show it


# =============================================================================================== prompts

STEPS = ("Preference Inference", "Attribute Matching", "Scoring", "Ranking", "Recommendation Explanation")

RECOMMENDER_PROMPT = """You are a movie recommender. Read the conversation and the user's feedback, reason about what the user wants, and rerank the candidate movies.

Conversation:
{history}
Mentioned: {mentioned}
{context}User feedback: {feedback}

Candidates:
{candidates}

Think step by step inside <think> and </think>, in five steps: "Step 1: Preference Inference", "Step 2: Attribute Matching", "Step 3: Scoring", "Step 4: Ranking", "Step 5: Recommendation Explanation". Then answer with exactly {n} candidate titles, best first, as
RANK LIST: [Title, Title, ...]"""  # noqa: E501  (prompt text, kept verbatim)

TEACHER_NOTE = """

(For the teacher only: the user's target is {target}; {attributes}. Reason towards it without saying you were told, and rank it first.)"""  # noqa: E501  (prompt text, kept verbatim)

FEEDBACK_PROMPT = """You are the user in this movie-recommendation conversation. Give the system short, specific feedback on its latest recommendations: what fits what you want and what does not, by genre, director or actors.

Conversation:
{history}
Mentioned: {mentioned}

Recommendations:
{recommendations}

Your feedback (one or two sentences, as the user):"""  # noqa: E501  (prompt text, kept verbatim)

FEEDBACK_TARGET_NOTE = """

(For the teacher only: the movie you really want is {target}; {attributes}. Never name it; steer towards its attributes.)"""  # noqa: E501  (prompt text, kept verbatim)

ALIGNMENT_PROMPT = """You are the user in this movie-recommendation conversation. Which movie do you really want, and what are its attributes?

Conversation:
{history}
Mentioned: {mentioned}"""  # noqa: E501  (prompt text, kept verbatim)

PREDICTION_PROMPT = """You are the user in this movie-recommendation conversation. Is this movie the one you really want? Answer Yes or No.

Conversation:
{history}
Mentioned: {mentioned}

Movie: {item}"""  # noqa: E501  (prompt text, kept verbatim)

PREFERENCE_PROMPT = """Summarize in one sentence what this user is looking for, from the conversation and the movie they end up wanting, {target} ({attributes}). Describe the taste, not the title.

Conversation:
{history}"""  # noqa: E501  (prompt text, kept verbatim)

STOCK_FEEDBACK = "Hmm, not quite what I want."  # where the simulator wrote nothing

IRRELEVANT_CHAT = (
    "By the way, the weather has been lovely this week.",
    "I had pasta for dinner yesterday.",
    "My cat keeps sitting on my keyboard.",
    "I need to buy new running shoes soon.",
)


def mentioned_text(task: Task) -> str:
    return ", ".join(task.mentioned) or "(nothing)"


def feedback_prompt(task: Task, recommendations: list[str], catalog: Catalog, target_note: bool = False) -> str:
    """Task 1, feedback generation (D, I_D, R) -> F; the teacher's version also shows the target (Eq. 3)."""
    listing = (
        "\n".join(f"{k}. {catalog.card(t, CARD_FIELDS)}" for k, t in enumerate(recommendations, 1)) or "(none yet)"
    )
    prompt = FEEDBACK_PROMPT.format(
        history=render_history(task.history), mentioned=mentioned_text(task), recommendations=listing
    )
    if target_note:
        attributes = "; ".join(sorted(attributes_of(catalog, task.target))) or "no attributes"
        prompt += FEEDBACK_TARGET_NOTE.format(target=task.target, attributes=attributes)
    return prompt


def candidate_line(catalog: Catalog, title: str) -> str:
    """A candidate as the paper's Fig. 1 shows one to the recommender: its title, then "{Attribute: ...}" (genres)."""
    item = catalog.by_title.get(title)
    genres = (item.attributes.get("genre") or []) if item else []
    return f"{title} {{Attribute: {', '.join(genres)}}}" if genres else title


def recommender_prompt(
    task: Task, candidates: list[str], feedback: str, turns: list[dict], n: int, catalog: Catalog, drop: int = 0
) -> str:
    """Q = {Inst, D, I_D, I_cand, F}, with the earlier turns compressed to their feedback and lists (METHODS 3.9.8).
    ``drop`` leaves out that many of the prompt's droppable parts (``droppable_parts``), the oldest first: the
    dialogue's utterances before its latest user utterance, then the earlier turns' lines, the latest one last. The
    instruction, I_D, the candidates, the latest user utterance and what follows it in the dialogue, the latest
    preference, the feedback and the generation header always stay."""
    history = render_history(task.history)
    in_dialogue = droppable_utterances(history)
    return RECOMMENDER_PROMPT.format(
        history=drop_utterances(history, min(drop, in_dialogue)),
        mentioned=mentioned_text(task),
        context=turn_context(turns, max(drop - in_dialogue, 0)),
        feedback=feedback or "(none yet)",
        candidates="\n".join(f"- {candidate_line(catalog, t)}" for t in candidates),
        n=n,
    )


def droppable_parts(task: Task, turns: list[dict]) -> int:
    """How many parts of a recommender prompt may be left out to fit it: the dialogue's utterances before its latest
    user utterance, and the earlier turns' lines."""
    return droppable_utterances(render_history(task.history)) + len(turns)


def fitted_recommender_prompt(
    tokenizer, task: Task, candidates: list[str], feedback: str, turns: list[dict], args: Args, catalog: Catalog
) -> Fitted:
    """The recommender prompt that fits the policy's window beside its output (--max-length minus --rec-max-tokens,
    counted in the policy's chat template with its generation header and pre-filled tag), the oldest dialogue lines
    and then the oldest earlier turns left out first (``recommender_prompt``). The sampler cuts nothing more off."""
    prefix = output_prefix(args)
    return fit_prompt(
        lambda text: prompt_length(tokenizer, [{"role": "user", "content": text}], prefix),
        lambda k: recommender_prompt(task, candidates, feedback, turns, args.list_length, catalog, k),
        droppable_parts(task, turns),
        args.max_length - args.rec_max_tokens,
    )


def turn_context(turns: list[dict], drop: int = 0) -> str:
    """The compressed C_{t-1} (METHODS.md 3.9.8): each earlier turn's feedback and list (titles only) and the latest
    preference inference P_{t-1}; the earlier reasoning is dropped, so that T turns fit the context. ``drop`` leaves
    out the oldest turns' lines, a note in their place (the latest preference stays)."""
    drop = min(drop, len(turns))
    lines = [f"({drop} earlier turn{'s' if drop > 1 else ''} left out)\n"] if drop else []
    lines += [
        f"Turn {t['turn']}: feedback: {t['feedback'] or '-'}; list: {', '.join(listed_titles(t['ranked'])) or '-'}\n"
        for t in turns[drop:]
    ]
    if turns and turns[-1]["preference"]:
        lines.append(f"Latest preference: {turns[-1]['preference']}\n")
    return "".join(lines)


# =============================================================================================== parsing

THINK_PREFIX = "<think>\n"
# METHODS.md 3.9.6, read as a header: a line that opens with "Step <k>:" or "Step <k>." (markdown marks such as #, *,
# -, > before it, or * and _ around it, allowed). "as said in step 2." inside a sentence is not a header.
STEP_HEADER = re.compile(r"^[ \t>#*_\-]*Step[ \t]*(\d+)[ \t]*[*_]*[ \t]*[:.]", re.IGNORECASE | re.MULTILINE)
RANK_LIST_OPENING = re.compile(r"RANK LIST:\s*\[")
YEAR = re.compile(r"\((\d{4})\)")


def split_output(text: str) -> tuple[str, str]:
    """(the reasoning inside <think>...</think>, the text after it); a missing </think> leaves no answer."""
    start = text.find("<think>")
    end = text.find("</think>")
    if end == -1:
        return text[start + 7 if start != -1 else 0 :], ""
    return text[start + 7 if -1 < start < end else 0 : end], text[end + len("</think>") :]


def preference_text(text: str) -> str:
    """P_t: the text under the Step 1 header of the reasoning, up to the next header (empty without one)."""
    thought, _ = split_output(text)
    headers = list(STEP_HEADER.finditer(thought))
    for k, header in enumerate(headers):
        if int(header.group(1)) == 1:
            body = thought[header.end() : headers[k + 1].start() if k + 1 < len(headers) else len(thought)]
            body = re.sub(r"^\s*[*_]*\s*(Preference Inference)?\s*[*_]*\s*[:.\-]?", "", body, flags=re.IGNORECASE)
            return " ".join(body.split())
    return ""


def rank_list_text(answer: str) -> str | None:
    """What the bracketed list right after "RANK LIST:" holds, up to its matching bracket (titles such as
    "Up [3D] (2009)" hold brackets); None without a closed list. Text after the list is not part of it."""
    opening = RANK_LIST_OPENING.search(answer)
    if opening is None:
        return None
    depth = 1
    for k in range(opening.end(), len(answer)):
        depth += {"[": 1, "]": -1}.get(answer[k], 0)
        if depth == 0:
            return answer[opening.end() : k]
    return None


# Where one entry of a list ends: a comma, a semicolon or a line break, or a number or bullet that opens the next
# entry ("1. ", "2) ", "- ", "* ", "• "), always outside brackets.
ENTRY_MARK = re.compile(r"(?:^|(?<=\s))(?:\d{1,3}[.)]|[-*\u2022])\s+")


def top_level_pieces(text: str) -> list[str]:
    """``text`` split into the entries of a list, whatever its layout: at the commas, semicolons and line breaks
    outside any brackets ("Alien (1979) (sci-fi, horror)" stays one piece), and before an entry's number or bullet
    ("1. Alien 2. Up" is two pieces, as is one title a line)."""
    depth, depths = 0, []
    for char in text:
        depth += 1 if char in "([{" else 0
        depths.append(depth)
        depth = max(depth - (char in ")]}"), 0)  # the ")" of a "1)" closes nothing
    cuts = [(k, k + 1) for k, char in enumerate(text) if char in ",;\n" and depths[k] == 0]
    cuts += [m.span() for m in ENTRY_MARK.finditer(text) if depths[m.start()] == 0]
    pieces, start = [], 0
    for cut_start, cut_end in sorted(cuts):
        if cut_start >= start:
            pieces.append(text[start:cut_start])
            start = cut_end
    return pieces + [text[start:]]


def fuzzy_candidate(piece: str, candidates: list[str]) -> str | None:
    """The candidate a written title that is no exact mention stands for (rapidfuzz QRatio >= 85, METHODS.md 3.9.7);
    a title written with a year matches only a candidate of that year (a remake is another film)."""
    from rapidfuzz import fuzz, process, utils

    year = YEAR.search(piece)
    if year:
        candidates = [c for c in candidates if (YEAR.search(c) or year).group(1) == year.group(1)]
    best = process.extractOne(piece, candidates, scorer=fuzz.QRatio, processor=utils.default_process, score_cutoff=85)
    return best[0] if best else None


def parse_rank_list(text: str, candidates: list[str]) -> list[str | None] | None:
    """R_t: the entries of the answer's RANK LIST in order, each the candidate it names, or None for an entry that
    names no candidate or repeats an earlier one; None without a list. Titles can hold commas and brackets, so the
    candidates' titles are found first (whole words, longest first); the entries are what ``top_level_pieces``
    separates, in every layout a model writes (commas, semicolons, one title a line, numbered or bulleted), and an
    entry with no exact title is fuzzy-matched to the unnamed candidates. An entry that is None keeps its place:
    Eq. 18's position counts every entry written above the target (docs/smtpo.md)."""
    _, answer = split_output(text)
    inside = rank_list_text(answer)
    if inside is None:
        return None
    mentions: list[tuple[int, int, str]] = []
    for title in sorted(candidates, key=len, reverse=True):  # "Aliens (1986)" before "Alien"
        for m in re.finditer(rf"(?<!\w){re.escape(title)}(?!\w)", inside, re.IGNORECASE):
            if not any(start < m.end() and m.start() < end for start, end, _ in mentions):
                mentions.append((m.start(), m.end(), title))
    mentions.sort()
    masked, last = "", 0  # each mention becomes a marker without commas
    for k, (start, end, _) in enumerate(mentions):
        masked, last = masked + inside[last:start] + f"\0{k}\0", end
    masked += inside[last:]
    named = {title for _, _, title in mentions}
    entries: list[str | None] = []
    for piece in top_level_pieces(masked):
        markers = re.findall(r"\0(\d+)\0", piece)
        if markers:
            entries += [mentions[int(k)][2] for k in markers]
        elif piece.strip(" \t\n'\"*`"):
            unnamed = [c for c in candidates if c not in named and c not in entries]
            entries.append(fuzzy_candidate(piece.strip(" \t\n'\"*`"), unnamed))
    return [title if title not in entries[:k] else None for k, title in enumerate(entries)]


def listed_titles(ranked: list[str | None]) -> list[str]:
    """The candidates a parsed list names, in order (what the simulator and the retriever are shown)."""
    return [title for title in ranked if title is not None]


def continuable(texts: list[str], candidates: list[str]) -> list[int]:
    """The sampled outputs a dialogue may continue with: a well-formed answer whose RANK LIST names at least one
    candidate, since the next turn shows that list to the simulated user (a list of made-up titles shows nothing)."""
    return [k for k, text in enumerate(texts) if listed_titles(parse_rank_list(text, candidates) or [])]


# =============================================================================================== rewards (Sec. 3.4.2)


def process_format_reward(text: str) -> float:
    """Eq. 15: r_think = 1 - |N_match - 5| / 5 if 1 <= N_match <= 7, else 0; N_match counts the step headers (lines
    that open with "Step k:") inside <think>, repeated ones too."""
    thought, _ = split_output(text)
    matches = len(STEP_HEADER.findall(thought)) if "<think>" in text else 0
    return 1 - abs(matches - 5) / 5 if 1 <= matches <= 7 else 0.0


def answer_format_reward(text: str) -> float:
    """Eq. 16: r_answer = 1 if the text after </think> holds RANK LIST: [...] with something inside, else 0."""
    _, answer = split_output(text)
    inside = rank_list_text(answer)
    return float(bool(inside and inside.strip()))


def hit_reward(ranked: list[str | None], target: str) -> float:
    """Eq. 17: r_hit = 1 if i* is in R_t."""
    return float(target in ranked)


def rank_reward(ranked: list[str | None], target: str) -> float:
    """Eq. 18: r_rank = 1 - (pos(i*) - 1) / len(R_t) for i* in R_t, else 0. pos is 1-based and counts every entry
    written above the target, made-up and repeated titles too (they are None in ``ranked``): listing titles that
    are not candidates above the target is not free."""
    return 1 - ranked.index(target) / len(ranked) if target in ranked else 0.0


def preference_reward(preference: np.ndarray | None, reference: np.ndarray) -> float:
    """Eq. 19: r_pref = cos(E_T(P_t), E_T(P_gold)) (embeddings are normalized); 0 without a Step 1."""
    return float(preference @ reference) if preference is not None else 0.0


def output_rewards(text: str, candidates: list[str], target: str, preference, reference, n: int) -> dict[str, float]:
    """The five rewards of one output and their unweighted sum (the paper gives no weights; METHODS.md 3.9.1)."""
    ranked = (parse_rank_list(text, candidates) or [])[:n]
    rewards = {
        "think": process_format_reward(text),
        "answer": answer_format_reward(text),
        "hit": hit_reward(ranked, target),
        "rank": rank_reward(ranked, target),
        "pref": preference_reward(preference, reference),
    }
    return rewards | {"total": sum(rewards.values())}


# =============================================================================================== GRPO loss (Eq. 14)


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = (r_i - mean(r)) / (std(r) + 1e-6) within one group of G outputs of the same prompt."""
    return (rewards - rewards.mean()) / (rewards.std() + 1e-6)


def grpo_loss(policy_logps, old_logps, ref_logps, advantages, mask, epsilon: float, beta: float) -> torch.Tensor:
    """Eq. 14, per output: -(1/|o_i|) sum_k [min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) - beta KL_k], with the
    per-token ratio rho = pi_theta / pi_old and the k3 estimate KL = exp(l_ref - l) - (l_ref - l) - 1 of
    KL(pi_theta || pi_ref). Inputs are per-token log-probs [B, L] (zero off the output), advantages [B] and the
    output mask [B, L]; the caller averages over the outputs (the 1/G of Eq. 14, over the global batch)."""
    ratio = torch.exp(policy_logps - old_logps)
    unclipped = ratio * advantages[:, None]
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages[:, None]
    kl = torch.exp(ref_logps - policy_logps) - (ref_logps - policy_logps) - 1
    per_token = -(torch.minimum(unclipped, clipped) - beta * kl)
    return (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@torch.no_grad()
def grpo_diagnostics(policy_logps, old_logps, ref_logps, advantages, token_weights, epsilon: float) -> dict:
    """What Eq. 14's terms did on a micro-batch, from the update's own log-probs, summed over the output tokens
    (``token_weights``: the output mask times the padding weights): the k3 KL, the tokens, and TRL's clipped tokens
    (the ratio below 1 - eps where A < 0, above 1 + eps where A > 0)."""
    ratio = torch.exp(policy_logps - old_logps)
    kl = torch.exp(ref_logps - policy_logps) - (ref_logps - policy_logps) - 1
    low = (ratio < 1 - epsilon) & (advantages[:, None] < 0)
    high = (ratio > 1 + epsilon) & (advantages[:, None] > 0)
    return {
        "kl": (kl * token_weights).sum().item(),
        "tokens": token_weights.sum().item(),
        "low": (low * token_weights).sum().item(),
        "high": (high * token_weights).sum().item(),
    }


# =============================================================================================== retriever (Sec. 3.3)


def item_graph(catalog: Catalog) -> tuple[list[str], torch.Tensor]:
    """(node names, edges [2, E]): the dataset's KG as an item-entity graph, every item linked to its genres,
    directors, stars and writers (the KG's relations)."""
    nodes = list(catalog.titles)
    index = {name: k for k, name in enumerate(nodes)}
    edges = []
    for title in catalog.titles:
        for attribute in sorted(attributes_of(catalog, title)):
            entity = attribute.split(": ", 1)[1]
            if entity not in index:
                index[entity] = len(nodes)
                nodes.append(entity)
            edges.append((index[title], index[entity]))
    return nodes, torch.tensor(edges, dtype=torch.long).T.reshape(2, -1)


def normalized_adjacency(num_nodes: int, edges: torch.Tensor) -> torch.Tensor:
    """LightGCN's D^-1/2 A D^-1/2 of the undirected graph, sparse."""
    both = torch.cat([edges, edges.flip(0)], dim=1)
    degree = torch.zeros(num_nodes).index_add_(0, both[0], torch.ones(both.shape[1]))
    values = degree[both[0]].clamp(min=1).rsqrt() * degree[both[1]].clamp(min=1).rsqrt()
    return torch.sparse_coo_tensor(both, values, (num_nodes, num_nodes)).coalesce()


def lightgcn(embeddings: torch.Tensor, adjacency: torch.Tensor, layers: int) -> torch.Tensor:
    """E = mean_{k=0..K} A^k E_0: propagation without weights or nonlinearity, the layers averaged."""
    out, current = embeddings, embeddings
    for _ in range(layers):
        current = torch.sparse.mm(adjacency, current)
        out = out + current
    return out / (layers + 1)


def bpr_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Eq. 8: -log sigma(e_i . e_a+ - e_i . e_a-) for a movie, an attribute it has and one it does not."""
    return -F.logsigmoid((anchor * positive).sum(-1) - (anchor * negative).sum(-1)).mean()


def info_nce_loss(scores: torch.Tensor) -> torch.Tensor:
    """Eq. 12: -log(exp(P_{D,i*}) / (exp(P_{D,i*}) + sum_k exp(P_{D,neg_k}))), the target's score in column 0."""
    return -F.log_softmax(scores, dim=-1)[:, 0].mean()


class FusionHead(torch.nn.Module):
    """The dual-view fusion (Eq. 9-11). The adapter maps text embeddings to the graph's size, e_s' = W2 (W1 e_s + b1)
    + b2. With ``views="both"`` (SMTPO's retriever) the collaborative view attends from e_s' over the entity
    embeddings of I_D and the list R, the semantic view from their mean over the adapted embeddings of the dialogue,
    the feedback and the preference; the conversation is e = [e_c^ ; e_s^] and an item [i_c ; i_s], the score their
    dot product (Eq. 11). ``views="graph"`` is the collaborative view alone (its attention queried from the pooled
    entities: no text reaches it) and ``views="text"`` the semantic view alone (queried from the pooled adapted
    texts): the single-view retrievers the fused one is compared with (docs/benchmarks.md), not Table 2's w/o Rec or
    w/o Pref, which take an input away from the fused retriever (--ablations).

    Two choices the paper leaves open make the fused head at least as good as its better view (docs/smtpo.md): the
    graph embeddings enter at unit length, as the text encoder's do, so neither view's score outweighs the other by
    its encoder's scale; and the value projections W_V start at the identity, so each view's score starts as its
    encoder's own similarity (mean entity . item, adapted text . adapted item) and training refines it. From a
    random W_V each view starts as noise, and a view without information then drowns the other (on INSPIRED the
    fused head fell to the text view's recall)."""

    def __init__(self, text_dim: int, graph_dim: int, views: str = "both"):
        super().__init__()
        self.adapter = torch.nn.Sequential(
            torch.nn.Linear(text_dim, text_dim // 2), torch.nn.Linear(text_dim // 2, graph_dim)
        )
        self.graph_q, self.graph_k, self.graph_v = (torch.nn.Linear(graph_dim, graph_dim, bias=False) for _ in range(3))
        self.text_q, self.text_k, self.text_v = (torch.nn.Linear(graph_dim, graph_dim, bias=False) for _ in range(3))
        for value in (self.graph_v, self.text_v):
            torch.nn.init.eye_(value.weight)
        self.views = views
        # (w_c, w_s): each view's weight in the score; the fused head's are picked on held-out turns (VIEW_WEIGHTS)
        self.register_buffer(
            "view_weights", torch.tensor({"both": [1.0, 1.0], "graph": [1.0, 0.0]}.get(views, [0, 1.0]))
        )

    @staticmethod
    def attend(query, keys, values, mask):
        scores = (query[:, None, :] * keys).sum(-1) / math.sqrt(query.shape[-1])
        weights = scores.masked_fill(~mask, -1e9).softmax(-1)
        return (weights[:, :, None] * values).sum(1)

    def forward(self, texts, text_mask, entities, entity_mask):
        """texts [B, 3, Ds] (dialogue, feedback, preference), entities [B, M, Dc] -> e [B, 2 Dc]."""
        entities = F.normalize(entities, dim=-1)
        adapted = self.adapter(texts)
        pooled_text = (adapted * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True).clamp(min=1)
        pooled_graph = (entities * entity_mask[..., None]).sum(1) / entity_mask.sum(1, keepdim=True).clamp(min=1)
        graph_query = pooled_graph if self.views == "graph" else pooled_text  # Eq. 10: each view queried by the other
        text_query = pooled_text if self.views == "text" else pooled_graph
        graph = self.attend(self.graph_q(graph_query), self.graph_k(entities), self.graph_v(entities), entity_mask)
        text = self.attend(self.text_q(text_query), self.text_k(adapted), self.text_v(adapted), text_mask)
        return torch.cat([graph * self.view_weights[0], text * self.view_weights[1]], dim=-1)

    def items(self, item_graph_embeddings, item_text_embeddings):
        """[i_c ; i_s] for every item [I, 2 Dc]; i_c at unit length, i_s through the same adapter (METHODS.md 3.3)."""
        return torch.cat([F.normalize(item_graph_embeddings, dim=-1), self.adapter(item_text_embeddings)], dim=-1)


class Retriever:
    """The trained retriever at inference: the frozen encoders, the fusion head, and top-k recall over the catalog
    with the target never forced in and the mentioned items excluded. The text encoder runs on ``device``."""

    def __init__(
        self, head: FusionHead, nodes: list[str], node_embeddings: torch.Tensor, catalog: Catalog, device=None
    ):
        self.head, self.catalog, self.device = head.eval(), catalog, device
        self.node_index = {name: k for k, name in enumerate(nodes)}
        self.node_embeddings = node_embeddings
        item_graph_embeddings = node_embeddings[: len(catalog)]
        with torch.no_grad():
            self.item_matrix = head.items(item_graph_embeddings, torch.from_numpy(catalog.embeddings()))

    def embed_texts(self, texts: list[list[str]], encode=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [B, 3, Ds], mask [B, 3]) of each turn's three texts: the dialogue, the feedback, the
        preference (an empty one masked). The dialogue keeps its end where it is longer than the encoder's window
        (its latest utterances); ``encode(texts, keep_end)`` embeds (default: the catalog's encoder, here)."""
        encode = encode or (lambda batch, keep_end: self.catalog.encode(batch, keep_end, self.device))
        dialogues = encode([row[0] or " " for row in texts], True)
        others = encode([t or " " for row in texts for t in row[1:]], False).reshape(len(texts), 2, -1)
        embeddings = torch.from_numpy(np.concatenate([dialogues[:, None], others], axis=1))
        return embeddings, torch.tensor([[bool(t) for t in row] for row in texts])

    def embed_entities(self, tasks: list[Task], lists) -> tuple[torch.Tensor, torch.Tensor]:
        """(entities [B, M, Dc], mask [B, M]): the graph embeddings of I_D and the list R."""
        names = [[n for n in s.mentioned + list(r) if n in self.node_index] for s, r in zip(tasks, lists)]
        width = max(1, max(len(n) for n in names))
        entities = torch.zeros(len(tasks), width, self.node_embeddings.shape[1])
        entity_mask = torch.zeros(len(tasks), width, dtype=torch.bool)
        for row, row_names in enumerate(names):
            for column, name in enumerate(row_names):
                entities[row, column] = self.node_embeddings[self.node_index[name]]
                entity_mask[row, column] = True
        entity_mask[:, 0] |= ~entity_mask.any(1)  # nothing known: attend to a zero vector
        return entities, entity_mask

    def conversation_inputs(self, tasks: list[Task], feedback: list[str], preference: list[str], lists, encode=None):
        """(texts, text_mask, entities, entity_mask) for a batch of turns."""
        texts = [[render_history(s.history), f, p] for s, f, p in zip(tasks, feedback, preference)]
        return *self.embed_texts(texts, encode), *self.embed_entities(tasks, lists)

    def training_turns(self, tasks: list[Task], feedback, preference, lists, first_turn, encode=None):
        """``tasks`` as the fusion head trains and early-stops on them: the frozen encoders' views, computed once
        (``encode``: over the ranks, in training)."""
        titles = {title: k for k, title in enumerate(self.catalog.titles)}
        mentioned = [[titles[t] for t in s.mentioned if t in titles] for s in tasks]
        targets = torch.tensor([titles[s.target] for s in tasks])
        views = self.conversation_inputs(tasks, feedback, preference, lists, encode)
        return RetrieverTurns(*views, targets, mentioned, torch.tensor(first_turn, dtype=torch.bool))

    @torch.no_grad()
    def retrieve(self, tasks, feedback, preference, lists, k: int) -> list[list[str]]:
        scores = self.head(*self.conversation_inputs(tasks, feedback, preference, lists)) @ self.item_matrix.T
        results = []
        for row, task in zip(scores, tasks):
            mentioned = set(task.mentioned)
            ranked = [self.catalog.titles[j] for j in row.argsort(descending=True).tolist()]
            results.append([t for t in ranked if t not in mentioned][:k])
        return results


@dataclass
class RetrieverTurns:
    """Turns as the fusion head reads them: the frozen encoders' views (Eq. 7-8), the target item and the mentioned
    items (never retrieved, never negatives), by catalog index, and which are in the turn-1 pattern (no F, P, R)."""

    texts: torch.Tensor  # [N, 3, Ds]: the dialogue, the feedback, the preference
    text_mask: torch.Tensor  # [N, 3]
    entities: torch.Tensor  # [N, M, Dc]: the entities of I_D and of the list R
    entity_mask: torch.Tensor  # [N, M]
    targets: torch.Tensor  # [N]
    mentioned: list[list[int]]
    first_turn: torch.Tensor | None = None  # [N]: the turn-1 pattern

    def __len__(self) -> int:
        return len(self.targets)

    def views(self, rows=slice(None)) -> tuple[torch.Tensor, ...]:
        return self.texts[rows], self.text_mask[rows], self.entities[rows], self.entity_mask[rows]

    def to(self, device) -> RetrieverTurns:
        tensors = (self.texts, self.text_mask, self.entities, self.entity_mask, self.targets)
        return RetrieverTurns(*(t.to(device) for t in tensors), self.mentioned, self.first_turn)

    def subset(self, rows: torch.Tensor) -> RetrieverTurns:
        """The turns at ``rows`` (a boolean mask or indices)."""
        rows = rows.nonzero().squeeze(1) if rows.dtype == torch.bool else rows
        first = self.first_turn[rows] if self.first_turn is not None else None
        picked = [self.mentioned[k] for k in rows.tolist()]
        return RetrieverTurns(
            *self.views(rows.to(self.texts.device)), self.targets[rows.to(self.texts.device)], picked, first
        )

    def excluded(self, rows: torch.Tensor, num_items: int) -> torch.Tensor:
        """[len(rows), I] on the CPU: True on each row's target and mentioned items."""
        mask = torch.zeros(len(rows), num_items, dtype=torch.bool)
        for row, k in enumerate(rows.tolist()):
            mask[row, self.mentioned[k]] = True
        mask[torch.arange(len(rows)), self.targets.cpu()[rows]] = True
        return mask


def sample_negatives(excluded: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Eq. 12's negatives: per row, ``count`` distinct items drawn uniformly from those not ``excluded`` [B, I] (the
    target and the mentioned items); fewer where fewer are left."""
    keys = torch.rand(excluded.shape, generator=generator).masked_fill(excluded, -1.0)
    count = min(count, int((~excluded).sum(1).min()))
    return keys.topk(count, dim=1).indices


@torch.no_grad()
def view_scores(head: FusionHead, turns: RetrieverTurns, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(collaborative, semantic) halves of ``head``'s score of every item for every turn [N, I] each, as weighted
    now, the mentioned items at -inf (never retrieved)."""
    was_training = head.training
    head.eval()
    conversations, width = head(*turns.views()), items.shape[-1] // 2
    head.train(was_training)
    halves = conversations[:, :width] @ items[:, :width].T, conversations[:, width:] @ items[:, width:].T
    for half in halves:
        for row, mentioned in enumerate(turns.mentioned):
            half[row, mentioned] = float("-inf")
    return halves


def ranked_recall(scores: torch.Tensor, targets: torch.Tensor, ks=(1, 10, 20)) -> dict[str, float]:
    """Recall@k of the ranking ``scores`` [N, I] for the ``targets`` [N]."""
    ranks = (scores > scores.gather(1, targets[:, None])).sum(1)  # 0-based rank of the target
    return {f"recall@{k}": float((ranks < k).float().mean()) for k in ks}


def held_out_recall(head: FusionHead, turns: RetrieverTurns, items: torch.Tensor, ks=(1, 10, 20)) -> dict[str, float]:
    """Recall@k of ``head`` over the whole catalog on ``turns``, the mentioned items never retrieved (as at
    inference)."""
    graph, text = view_scores(head, turns, items)
    return ranked_recall(graph + text, turns.targets, ks)


# The weights (w_c, w_s) of the collaborative and the semantic score that the fused head's early stopping tries on
# the held-out turns after every epoch: Eq. 11's plain sum first (kept on a tie), each view alone last.
VIEW_WEIGHTS = ((1.0, 1.0), (1.0, 0.5), (0.5, 1.0), (1.0, 0.25), (0.25, 1.0), (1.0, 0.0), (0.0, 1.0))


def random_recall(turns: RetrieverTurns, num_items: int, ks=(1, 10, 20)) -> dict[str, float]:
    """The expected Recall@k of a uniformly random ranking of the items a turn may retrieve: the chance level."""
    available = torch.tensor([num_items - len(set(m)) for m in turns.mentioned], dtype=torch.float)
    return {f"recall@{k}": float((k / available).clamp(max=1).mean()) for k in ks}


# =============================================================================================== the simulator


def simulator_lists(task: Task, catalog: Catalog, n: int, rng: random.Random) -> dict[str, list[str]]:
    """The four recommendation lists R_human_D (Sec. 3.2.1): hard negatives share the most attributes with the
    target, easy ones the fewest (ties broken at random); H+ and S+ hold the target, H- and S- do not."""
    wanted = attributes_of(catalog, task.target)
    pool = [t for t in catalog.titles if t != task.target and t not in set(task.mentioned)]
    overlap = {t: len(wanted & attributes_of(catalog, t)) for t in pool}
    hard = sorted(pool, key=lambda t: (-overlap[t], rng.random()))[:n]
    easy = sorted(pool, key=lambda t: (overlap[t], rng.random()))[:n]
    lists = {"H+": hard[: n - 1] + [task.target], "H-": hard, "S+": easy[: n - 1] + [task.target], "S-": easy}
    for items in lists.values():
        rng.shuffle(items)
    return lists


def simulator_jobs(task: Task, catalog: Catalog, args: Args) -> tuple[list[dict], list[dict]]:
    """(feedback jobs for the teacher, finished examples) of one training turn, seeded by the turn so that every
    rank and rerun draws the same lists: task 1 (feedback on each list), task 2 (the target and its attributes),
    task 3 (Yes/No on the target and on negatives from the lists)."""
    rng = random.Random(f"{args.seed}:{task.key}")
    lists = simulator_lists(task, catalog, args.list_length, rng)
    jobs = [
        {
            "key": f"{task.key}|feedback|{kind}",
            "task": "feedback",
            "list": kind,
            "teacher_prompt": feedback_prompt(task, items, catalog, target_note=True),
            "prompt": feedback_prompt(task, items, catalog),
        }
        for kind, items in rng.sample(sorted(lists.items()), args.simulator_lists)
    ]
    if "single-task-simulator" in args.ablations:  # feedback generation alone
        return jobs, []
    history, mentioned = render_history(task.history), mentioned_text(task)
    attributes = "; ".join(sorted(attributes_of(catalog, task.target))) or "no attributes"
    examples = [
        {
            "key": f"{task.key}|alignment",
            "task": "alignment",
            "prompt": ALIGNMENT_PROMPT.format(history=history, mentioned=mentioned),
            "completion": f"{task.target}; {attributes}",
        }
    ]
    negatives = list(dict.fromkeys(t for items in lists.values() for t in items if t != task.target))
    for title in ([task.target] + negatives)[: args.simulator_predictions]:
        prompt = PREDICTION_PROMPT.format(history=history, mentioned=mentioned, item=catalog.card(title, CARD_FIELDS))
        answer = "Yes" if title == task.target else "No"
        examples.append(
            {"key": f"{task.key}|prediction|{title}", "task": "prediction", "prompt": prompt, "completion": answer}
        )
    return jobs, examples


def simulate_feedback(
    simulator,
    tasks: list[Task],
    lists: list[list[str]],
    catalog: Catalog,
    args: Args,
    rng: random.Random,
    controls: bool = True,
) -> tuple[list[str], list[bool]]:
    """The simulator's task 1 at inference: F_t from (D, I_D, R_{t-1}), greedy, and for each whether it was empty and
    the stock line STOCK_FEEDBACK stands in for it (counted: a run whose simulator says nothing learns from no
    feedback). With ``controls``, Table 3's: a blind simulator never sees the list (--blind-simulator); noisy
    feedback is irrelevant chat (--noisy-feedback)."""
    if controls and args.noisy_feedback:
        return [rng.choice(IRRELEVANT_CHAT) for _ in tasks], [False] * len(tasks)
    blind = controls and args.blind_simulator
    prompts = [feedback_prompt(s, [] if blind else items, catalog) for s, items in zip(tasks, lists)]
    outputs = simulator.chat([[{"role": "user", "content": p}] for p in prompts], max_tokens=args.feedback_max_tokens)
    texts = [" ".join(text.split()) for (text,) in outputs]
    return [text or STOCK_FEEDBACK for text in texts], [not text for text in texts]


# =============================================================================================== the teacher


def teacher_reasoning(teacher, prompts: list[str], args: Args, stats: ParseStats) -> list[str | None]:
    """The gold <think> block for each prompt (the prompt shows the teacher the target). An API teacher writes it
    whole, checked for the five step headers, retried. A local teacher cannot hold the format, so each step is
    written after its pre-filled header, one batched call per step, as ECPO decodes actions for local models."""
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    if not getattr(teacher, "can_prefill", False):

        def five_steps(text: str) -> str | None:
            thought, _ = split_output(text)
            return f"<think>{thought}</think>\n" if process_format_reward(text) == 1.0 else None

        parsed, _ = chat_parsed(teacher, conversations, five_steps, stats, max_tries=3, max_tokens=args.rec_max_tokens)
        return parsed
    thoughts = ["<think>\n"] * len(prompts)
    for k, name in enumerate(STEPS, 1):
        headers = [f"{thought}Step {k}: {name}:" for thought in thoughts]
        outputs = teacher.chat(conversations, max_tokens=args.step_max_tokens, stop=["\n", "Step "], prefix=headers)
        thoughts = [f"{h} {' '.join(text.split())}\n" for h, (text,) in zip(headers, outputs)]
    stats.attempts += len(prompts)
    return [f"{thought}</think>\n" for thought in thoughts]


def sft_candidates(retrieved: list[str], target: str, rng: random.Random) -> list[str]:
    """The candidates of an SFT prompt: the retriever's, with the target put in at a random slot (in place of the
    last candidate) where the retriever missed it. A fixed slot would teach "move that slot to rank 1", a shortcut
    that never holds in GRPO or evaluation, where the target is wherever the retriever put it."""
    if target in retrieved:
        return list(retrieved)
    candidates = retrieved[:-1]
    candidates.insert(rng.randrange(len(candidates) + 1), target)
    return candidates


def gold_answer(target: str, candidates: list[str], n: int) -> str:
    """The gold RANK LIST: the target first (the teacher sees it), then the others in the retriever's order."""
    ranked = [target] + [c for c in candidates if c != target]
    return f"RANK LIST: [{', '.join(ranked[:n])}]"


# =============================================================================================== the rollout


@dataclass
class Roles:
    """What a multi-turn rollout needs: the recommender, the simulator, the retriever and the reference preferences."""

    policy: object  # GRPO's vLLM engine, or None where the training model samples (``training_episodes``)
    simulator: object
    retriever: Retriever
    references: dict[str, np.ndarray]  # task key -> E_T(P_gold); empty at evaluation (no rewards)


def rollout(
    *,
    tasks: list[Task],
    roles: Roles,
    data: Data,
    args: Args,
    n: int,
    temperature: float,
    training: bool,
    rng: random.Random,
):
    """T turns of each task's interaction (METHODS.md 3.5), batched across tasks: retrieve the candidates from
    (D, F_t, P_{t-1}, I_D, R_{t-1}), sample ``n`` outputs of one shared prompt (one prefill), score each output
    with the five rewards, continue with one format-valid output (random, or the best with --continuation best),
    and ask the simulator for F_{t+1}. Training rollouts stop once the target is ranked first (METHODS.md 3.9.3);
    evaluation runs all T turns, under Table 3's controls if asked. Yields (k, turns) for ``tasks[k]`` as its
    episode ends."""
    feedback, preference, lists = [""] * len(tasks), [""] * len(tasks), [[] for _ in tasks]
    substituted = [False] * len(tasks)  # F_t is the stock line: the simulator wrote nothing
    episodes: list[list[dict]] = [[] for _ in tasks]  # each task's turns so far
    live = list(range(len(tasks)))
    for t in range(1, args.max_turns + 1):
        if not live:
            break
        batch = [tasks[i] for i in live]
        reads = [retriever_reads(args, feedback[i], preference[i], lists[i]) for i in live]
        candidates = roles.retriever.retrieve(batch, *[list(column) for column in zip(*reads)], args.num_candidates)
        fitted = [
            fitted_recommender_prompt(roles.policy.tokenizer, s, c, feedback[i], episodes[i], args, data.catalog)
            for i, s, c in zip(live, batch, candidates)
        ]
        completions = roles.policy.complete(
            [[{"role": "user", "content": f.text}] for f in fitted],
            n=n,
            temperature=temperature,
            max_tokens=args.rec_max_tokens,
            prefix=output_prefix(args),
            max_prompt_tokens=args.max_length - args.rec_max_tokens,
        )
        for i, task, fit, cands, outputs in zip(live, batch, fitted, candidates, completions):
            turn = played_turn(
                t, task, fit=fit, candidates=cands, outputs=outputs, feedback=feedback[i], substituted=substituted[i],
                roles=roles, data=data, args=args, rng=rng,
            )  # fmt: skip
            lists[i], preference[i] = listed_titles(turn["ranked"]), turn["preference"]
            if training:  # the update trains exactly the ids that were sampled
                turn |= {"prompt_ids": outputs[0].prompt_ids, "completion_ids": [c.completion_ids for c in outputs]}
            episodes[i].append(turn)
        if training:
            yield from ((i, episodes[i]) for i in live if episodes[i][-1]["ranked"][:1] == [tasks[i].target])
            live = [i for i in live if not (episodes[i][-1]["ranked"][:1] == [tasks[i].target])]
        if t < args.max_turns and live and "no-feedback" not in args.ablations:  # w/o Feedback: no simulator
            batch, batch_lists = [tasks[i] for i in live], [lists[i] for i in live]
            new, stock = simulate_feedback(
                roles.simulator, batch, batch_lists, data.catalog, args, rng, controls=not training
            )
            for i, text, flag in zip(live, new, stock):
                feedback[i], substituted[i] = text, flag
    yield from ((i, episodes[i]) for i in live)


def played_turn(t: int, task: Task, *, fit, candidates, outputs, feedback, substituted, roles, data, args, rng) -> dict:
    """Turn ``t`` of one task's episode, its ``outputs`` sampled: each output's five rewards (training: the task
    has a reference preference), the output the dialogue continues with, its parsed list and preference P_t."""
    texts = [output_prefix(args) + c.text for c in outputs]  # the pre-filled tag belongs to the output's format
    rewards = []
    if task.key in roles.references:
        rewards = sampled_rewards(texts, candidates, task.target, roles.references[task.key], data.catalog, args)
    valid = continuable(texts, candidates)
    if args.continuation == "best" and rewards:
        chosen = max(range(len(texts)), key=lambda k: rewards[k]["total"])
    else:
        chosen = rng.choice(valid) if valid else 0
    ranked = (parse_rank_list(texts[chosen], candidates) or [])[: args.list_length]
    return {
        "turn": t,
        "feedback": feedback,
        "feedback_substituted": substituted,
        "candidates": candidates,
        "target_in_candidates": task.target in candidates,
        "prompt": fit.text,
        "prompt_parts_dropped": fit.dropped_parts,  # dialogue lines and earlier turns left out to fit
        "prompt_tokens_dropped": fit.dropped_tokens,
        "prompt_over_budget": fit.tokens > args.max_length - args.rec_max_tokens,  # the sampler cuts it
        "outputs": texts,
        "rewards": rewards,
        "chosen": chosen,
        "fallback": not valid,  # no output named a candidate: the dialogue went on with output 0
        "ranked": ranked,
        "preference": preference_text(texts[chosen]),
    }


def sampled_rewards(texts: list[str], candidates: list[str], target: str, reference, catalog: Catalog, args: Args):
    """The five rewards of each sampled output (Eq. 15-19), its Step 1 embedded for Eq. 19's preference reward."""
    steps = [preference_text(text) for text in texts]
    vectors = catalog.encode([p or " " for p in steps])
    return [
        output_rewards(text, candidates, target, vector if step else None, reference, args.list_length)
        for text, step, vector in zip(texts, steps, vectors)
    ]


# =============================================================================================== stages (Fig. 2)


def encode_example(tokenizer, prompt: str, completion: str, max_length: int, prefix: str = "") -> dict:
    """Token ids and completion mask of one example; a pre-filled ``prefix`` of the completion goes to the prompt.
    The prompt is fitted beside the completion within ``max_length`` as a rollout's prompt is: the oldest dialogue
    lines go first (common/tokens.py's ``fit_prompt``), never the instruction, the latest user utterance or the
    generation header. ``prompt_tokens_dropped`` counts what the fit left out; ``cut`` marks an example that still
    did not fit (its oldest tokens cut: a completion longer than the room left)."""
    if prefix and completion.startswith(prefix):
        completion = completion[len(prefix) :]
    else:
        prefix = ""
    completion_tokens = len(tokenizer(completion, add_special_tokens=False)["input_ids"]) + 1  # and the eos
    fit = fit_prompt(
        lambda text: prompt_length(tokenizer, [{"role": "user", "content": text}], prefix),
        lambda k: drop_utterances(prompt, k),
        droppable_utterances(prompt),
        max_length - completion_tokens,
    )
    messages = [{"role": "user", "content": fit.text}]
    ids, mask = encode_prompt_completion(tokenizer, messages, completion, max_length, prefix)
    cut = fit.tokens + completion_tokens > max_length
    return {"input_ids": ids, "completion_mask": mask, "prompt_tokens_dropped": fit.dropped_tokens, "cut": cut}


def fitting_metrics(examples: list[dict], prefix: str) -> dict[str, int]:
    """How many training examples lost dialogue lines to fit --max-length, the tokens they lost, and how many still
    had to be cut (0 unless a completion alone fills the window)."""
    return {
        f"{prefix}/truncated_examples": sum(e["prompt_tokens_dropped"] > 0 for e in examples),
        f"{prefix}/prompt_tokens_dropped": sum(e["prompt_tokens_dropped"] for e in examples),
        f"{prefix}/examples_cut": sum(e["cut"] for e in examples),
    }


def output_prefix(args: Args) -> str:
    return THINK_PREFIX if args.think_prefill else ""


def teacher_completions(run: Run, args: Args, jobs: list[dict], max_tokens: int, fallback=None):
    """Each job with the teacher's answer to its ``teacher_prompt`` as its completion (not empty; retried once, else
    ``fallback(job)`` or dropped); a job without a ``teacher_prompt`` is finished as it is. A collective (``run.map``
    with ``every_rank``): the ranks build a vllm: teacher together, those without jobs too."""
    yield from (job for job in jobs if "teacher_prompt" not in job)
    jobs = [job for job in jobs if "teacher_prompt" in job]
    if not any(run.gather([bool(jobs)])):
        return
    teacher, stats = run.llm(args.teacher_llm, args.batch_size), ParseStats()
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start : start + args.batch_size]
        conversations = [[{"role": "user", "content": j["teacher_prompt"]}] for j in batch]
        texts, _ = chat_parsed(
            teacher, conversations, lambda t: " ".join(t.split()) or None, stats, max_tries=2, max_tokens=max_tokens
        )
        for job, text in zip(batch, texts):
            text = text or (fallback(job) if fallback else None)
            if text:
                yield {k: v for k, v in job.items() if k != "teacher_prompt"} | {"completion": text}
    run.count(stats.metrics("rollout/teacher_"))


def load_simulator(run: Run, args: Args):
    """The tuned simulator (its adapter merged), as an LLM for feedback; the base model only if asked for."""
    if "no-feedback" in args.ablations:  # w/o Feedback: no simulator anywhere
        return None
    adapters = [run.dir / "simulator_adapter"] if run.finished("simulator_adapter") else []
    if not adapters and not args.untrained_simulator:
        raise InputError(
            f"no {run.dir / 'simulator_adapter'}: run the simulator stage first, or pass --untrained-simulator to "
            "let the base model give the feedback (an ablation)"
        )
    if not adapters and run.main:
        print("--untrained-simulator: the base model gives the feedback")
    model, tokenizer = load_merged(args.user_model, adapters, run.device)
    return run.count_costs(HFChat(model, tokenizer, args.batch_size))


def train_simulator(run: Run, args: Args, data: Data) -> dict:
    """Sec. 3.2: the simulator's three tasks mixed into one instruction set, then LoRA SFT with the masked NLL of the
    outputs (Eq. 6, common/sft.py). Inference uses the feedback task alone."""
    if run.finished("simulator_adapter"):
        return {}
    if "no-feedback" in args.ablations:
        print("--ablations no-feedback: no simulator is trained") if run.main else None
        return {}
    jobs, examples = zip(*(simulator_jobs(task, data.catalog, args) for task in data.train))
    rows = run.map(
        "simulator_data.jsonl",
        [example for part in examples for example in part] + [job for part in jobs for job in part],
        lambda todo: teacher_completions(run, args, todo, args.feedback_max_tokens),
        every_rank=True,
    )
    rows.sort(key=lambda r: r["key"])
    run.save_dataset("simulator", [sft_row(r["prompt"], r["completion"]) | {"task": r["task"]} for r in rows])
    model, tokenizer = load_merged(
        args.user_model, [], run.device, (args.lora_rank, args.lora_alpha), args.seed, args.gradient_checkpointing
    )
    examples = [encode_example(tokenizer, r["prompt"], r["completion"], args.max_length) for r in rows]
    model = supervised_finetuning(
        run,
        args,
        model,
        tokenizer,
        examples,
        "simulator",
        lr=args.simulator_lr,
        batch_size=args.sft_batch_size,
        epochs=args.simulator_epochs,
        warmup_ratio=0.1,
        metric_prefix="train_simulator",
    )
    save_final(run.accelerator, model, run.dir / "simulator_adapter", {"examples": len(examples)})
    kinds = [r["task"] for r in rows]
    counts = {f"simulator/{kind}_examples": kinds.count(kind) for kind in ("feedback", "alignment", "prediction")}
    return counts | fitting_metrics(examples, "simulator")


def reference_preferences(run: Run, args: Args, data: Data, tasks: list[Task]) -> dict[str, str]:
    """P_gold per training turn: the teacher's one-sentence summary of the user's taste, shown the target and its
    attributes (METHODS.md 3.9.4); "The user likes <attributes>" where the teacher writes nothing."""

    def job(task: Task) -> dict:
        attributes = ", ".join(sorted(attributes_of(data.catalog, task.target))) or "movies like it"
        prompt = PREFERENCE_PROMPT.format(
            history=render_history(task.history), target=task.target, attributes=attributes
        )
        return {"key": task.key, "teacher_prompt": prompt, "fallback": f"The user likes {attributes}."}

    records = run.map(
        "preferences.jsonl",
        [job(s) for s in tasks],
        lambda todo: teacher_completions(run, args, todo, args.feedback_max_tokens, lambda j: j["fallback"]),
        every_rank=True,
    )
    return {r["key"]: r["completion"] for r in records}


def human_list(task: Task, catalog: Catalog, args: Args) -> tuple[str, list[str]]:
    """(kind, items): the one of a training turn's four lists R_human that the retriever and the SFT prompt read,
    with the simulator's feedback on it, drawn seeded by the turn."""
    rng = random.Random(f"{args.seed}:{task.key}")
    return rng.choice(sorted(simulator_lists(task, catalog, args.list_length, rng).items()))


def human_list_feedback(run: Run, args: Args, data: Data, tasks: list[Task]) -> dict[str, dict]:
    """The tuned simulator's feedback F on one of each turn's four lists R_human (seeded by the turn), the retriever's
    and the SFT prompts' feedback input (METHODS.md 3.3)."""
    records = run.map("human_list_feedback.jsonl", tasks, lambda todo: list_feedback(run, args, data, todo))
    return {r["key"]: r for r in records}


def list_feedback(run: Run, args: Args, data: Data, tasks: list[Task]):
    """The records of ``human_list_feedback``: each turn's list, its kind, and the simulator's feedback on it."""
    simulator, lists = load_simulator(run, args), [human_list(task, data.catalog, args) for task in tasks]
    for start in range(0, len(tasks), args.batch_size):
        chunk, chunk_lists = tasks[start : start + args.batch_size], lists[start : start + args.batch_size]
        items = [items for _, items in chunk_lists]
        texts, stock = simulate_feedback(simulator, chunk, items, data.catalog, args, random.Random(args.seed), False)
        for task, (kind, items), text, substituted in zip(chunk, chunk_lists, texts, stock):
            yield {"key": task.key, "list": kind, "items": items, "feedback": text, "substituted": substituted}


def retriever_reads(args: Args, feedback: str, preference: str, items: list[str], target: str | None = None):
    """(F, P, R) as the retriever reads them under --ablations: w/o Rec (no-rec) never reads the list R, w/o Pref
    (no-pref) never the preference P, w/o Feedback (no-feedback) has no F. With a ``target``, R loses it: a
    training turn's list R_human holds the target in half the turns (H+, S+), and the head would learn to find the
    answer among its inputs, which no turn gives it."""
    items = [t for t in items if t != target] if "no-rec" not in args.ablations else []
    preference = "" if "no-pref" in args.ablations else preference
    return ("" if "no-feedback" in args.ablations else feedback), preference, items


def retriever_texts(run: Run, args: Args, data: Data, tasks: list[Task]) -> dict[str, tuple[str, str, list]]:
    """Each training turn's (F, P, R_human) for the retriever: the simulator's feedback on the turn's list and the
    teacher's reference preference (--retriever-inputs all), nothing but the list (lists) or nothing (dialogue):
    the last two make no LLM call."""
    if args.retriever_inputs == "dialogue":
        return {s.key: ("", "", []) for s in tasks}
    if args.retriever_inputs == "lists":
        return {s.key: ("", "", human_list(s, data.catalog, args)[1]) for s in tasks}
    preferences = reference_preferences(run, args, data, tasks)
    if "no-feedback" in args.ablations:  # no simulator: the list alone
        return {s.key: ("", preferences[s.key], human_list(s, data.catalog, args)[1]) for s in tasks}
    feedback = human_list_feedback(run, args, data, tasks)
    return {s.key: (feedback[s.key]["feedback"], preferences[s.key], feedback[s.key]["items"]) for s in tasks}


def retriever_examples(tasks: list[Task], texts: dict, args: Args) -> tuple[list, list, list, list, list]:
    """(tasks, F, P, R, first turn?) of the fusion head's examples, in the two patterns it meets at inference:
    every training turn as at turn 1 (no F, P or R: the cold start) and, where it has any of them, as at a later
    turn (F, P and R with the target taken out, ``retriever_reads``)."""
    rows = []
    for task in tasks:
        feedback, preference, items = retriever_reads(args, *texts[task.key], target=task.target)
        rows.append((task, "", "", [], True))
        if feedback or preference or items:
            rows.append((task, feedback, preference, items, False))
    return tuple(list(column) for column in zip(*rows))


def encode_over_ranks(run: Run, catalog: Catalog, texts: list[str], keep_end: bool) -> np.ndarray:
    """``catalog.encode`` of ``texts``, shared over the ranks: each encodes its share of the distinct texts on its
    own device and every rank gets them all. On one CPU thread, rank 0 alone would take hours on the full ReDial
    split while the others wait at a barrier (docs/smtpo.md). A collective: every rank calls it with the same
    texts."""
    distinct = list(dict.fromkeys(texts))
    share = run.shard(list(range(len(distinct))))
    vectors = catalog.encode([distinct[k] for k in share], keep_end, run.device) if share else []
    table = {}
    for indices, block in run.gather([(share, vectors)]):
        table |= {distinct[k]: vector for k, vector in zip(indices, block)}
    return np.stack([table[text] for text in texts])


def train_retriever(run: Run, args: Args, data: Data) -> dict:
    """Sec. 3.3: LightGCN on the item-entity graph pretrained with BPR (Eq. 8) and frozen; then the fusion head
    (Eq. 9-11) trained with InfoNCE (Eq. 12) on the training turns, early-stopped on the held-out turns' recall. Each
    turn is an example as at turn 1 (the dialogue and I_D alone) and as at a later turn (with the simulator's
    feedback on a list R_human, the teacher's reference preference and that list without the target as entities),
    ``retriever_examples``. The text-only and graph-only heads (the single views, FusionHead) are trained beside it,
    and a random ranking gives the chance level; held-out recall is logged over all turns and for each pattern
    (turn1/, later/). The ranks share the text encoding, on their own devices, and the three heads (each is small);
    rank 0 saves them."""
    if run.finished("retriever"):
        return json.loads((run.dir / "retriever" / "metrics.json").read_text())
    texts = retriever_texts(run, args, data, data.train + data.held_out)
    torch.manual_seed(args.seed)
    nodes, edges = item_graph(data.catalog)
    node_embeddings = run.gather([pretrain_lightgcn(nodes, edges, len(data.catalog), args) if run.main else None])[0]
    embedder = Retriever(  # the frozen encoders, its head untrained: they embed the turns once
        FusionHead(data.catalog.encode(["x"]).shape[1], args.gcn_dim), nodes, node_embeddings, data.catalog
    )
    started = time.time()

    def encode(batch: list[str], keep_end: bool) -> np.ndarray:
        return encode_over_ranks(run, data.catalog, batch, keep_end)

    train = embedder.training_turns(*retriever_examples(data.train, texts, args), encode=encode)
    held_out = embedder.training_turns(*retriever_examples(data.held_out, texts, args), encode=encode)
    encoding = {"perf/retriever_encode_seconds": time.time() - started}
    items = (node_embeddings[: len(data.catalog)], torch.from_numpy(data.catalog.embeddings()))
    on_device = [t.to(run.device) for t in items]
    fitted = {}
    for views in [v for k, v in enumerate(HEADS) if k % run.world == run.rank]:  # the heads over the ranks
        state, found, history = fit_fusion_head(train.to(run.device), held_out.to(run.device), *on_device, views, args)
        fitted[views] = (state, found | pattern_recall(state, views, held_out, *items), history)
    fitted = {views: result for part in run.gather([fitted]) for views, result in part.items()}
    metrics = encoding | {"retriever/training_examples": len(train), "retriever/held_out_examples": len(held_out)}
    metrics |= {"retriever/training_turns": len(data.train), "retriever/held_out_turns": len(data.held_out)}
    if run.main:
        for views in HEADS:
            for epoch in fitted[views][2]:
                run.log_step({f"train_retriever/{views}/{k}": v for k, v in epoch.items()}, epoch["seconds"])
            metrics |= {f"retriever/{views}/{k}": v for k, v in fitted[views][1].items()}
        metrics |= {f"retriever/random/{k}": v for k, v in random_recall(held_out, len(data.catalog)).items()}
        heads = {views: fitted[views][0] for views in HEADS}
        save_retriever(run, {"nodes": nodes, "node_embeddings": node_embeddings, "heads": heads}, metrics, data)
    run.barrier()
    return metrics


def save_retriever(run: Run, retriever: dict, metrics: dict, data: Data) -> None:
    """``runs/<run>/retriever/``: the graph embeddings and the three heads, the stage's metrics, and steps.json
    last (``run.finished``)."""
    folder = run.dir / "retriever"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(retriever, folder / "retriever.pt")
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "steps.json").write_text(json.dumps({"held_out": len(data.held_out)}))


def pattern_recall(state: dict, views: str, turns: RetrieverTurns, item_graph, item_text) -> dict[str, float]:
    """Held-out Recall@{1,10,20} of the head in ``state`` on the turns in the turn-1 pattern and on the others."""
    head = FusionHead(turns.texts.shape[-1], item_graph.shape[-1], views)
    head.load_state_dict(state)
    found = {}
    for pattern, rows in (("turn1", turns.first_turn), ("later", ~turns.first_turn)):
        if rows.any():
            part = turns.subset(rows)
            recall = held_out_recall(head, part, head.items(item_graph, item_text))
            found |= {f"{pattern}/{k}": v for k, v in recall.items()}
    return found


def pretrain_lightgcn(nodes: list[str], edges: torch.Tensor, num_items: int, args: Args) -> torch.Tensor:
    """Eq. 8: BPR over (movie, an attribute it has, one it does not), the embeddings propagated by LightGCN."""
    adjacency = normalized_adjacency(len(nodes), edges)
    embeddings = torch.nn.Parameter(torch.randn(len(nodes), args.gcn_dim) * 0.1)
    optimizer = torch.optim.Adam([embeddings], lr=1e-2)
    for _ in tqdm(range(args.bpr_epochs), desc="lightgcn (BPR)"):
        propagated = lightgcn(embeddings, adjacency, args.gcn_layers)
        negatives = bpr_negatives(edges, num_items, len(nodes))
        loss = bpr_loss(propagated[edges[0]], propagated[edges[1]], propagated[negatives])
        loss = loss + 1e-4 * embeddings.pow(2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return lightgcn(embeddings, adjacency, args.gcn_layers).detach()


def bpr_negatives(edges: torch.Tensor, num_items: int, num_nodes: int, max_draws: int = 100) -> torch.Tensor:
    """One negative attribute per (movie, attribute) edge: an entity node (they follow the items) drawn uniformly
    among those the movie is not linked to, so that BPR never pushes a movie away from its own attribute."""
    linked = edges[0] * num_nodes + edges[1]
    negatives = torch.randint(num_items, num_nodes, (edges.shape[1],))
    for _ in range(max_draws):
        hits = torch.isin(edges[0] * num_nodes + negatives, linked)
        if not hits.any():
            break
        negatives[hits] = torch.randint(num_items, num_nodes, (int(hits.sum()),))
    return negatives


def fit_fusion_head(
    train: RetrieverTurns, held_out: RetrieverTurns, item_graph: torch.Tensor, item_text: torch.Tensor, views, args
) -> tuple[dict, dict[str, float], list[dict]]:
    """(the best state, its held-out Recall@{1,10,20} and view weights, per-epoch history) of one fusion head
    trained with InfoNCE (Eq. 12, Adam): shuffled mini-batches of --retriever-batch-size turns, each target against
    --negatives random items that are neither the target nor mentioned. The fused head minimises Eq. 12 on its score
    and on each view's score alone, so that each half is a retriever by itself; after every epoch its held-out recall
    is read for each weighting of the two views in VIEW_WEIGHTS, and the best (epoch, weights) is kept. Stops after
    --retriever-patience epochs without a better held-out recall (Recall@20, then @10 and @1 on ties)."""
    device = train.texts.device  # the caller's: a rank's own GPU under accelerate
    torch.manual_seed(args.seed)  # each head starts the same on any rank, in any order
    head = FusionHead(train.texts.shape[-1], item_graph.shape[-1], views).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=args.retriever_lr)
    generator = torch.Generator().manual_seed(args.seed)
    best, best_found, best_key, waited, history = None, {}, None, 0, []
    for epoch in (bar := tqdm(range(args.retriever_epochs), desc=f"retriever ({views})")):
        started, losses = time.time(), []
        for rows in torch.randperm(len(train), generator=generator).split(args.retriever_batch_size):
            # ALGO LOGIC: Eq. 12 on a shuffled mini-batch, each target against --negatives random items, one Adam step
            negatives = sample_negatives(train.excluded(rows, len(item_graph)), args.negatives, generator)
            loss = fusion_loss(head, train, rows.to(device), negatives.to(device), item_graph, item_text)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        # bookkeeping: the epoch's held-out recall under its best view weighting; the best epoch kept; early stopping
        weights, found = best_weighting(head, held_out, item_graph, item_text)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), **found, "seconds": time.time() - started})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", recall_20=f"{found['recall@20']:.3f}")
        if best_key is None or recall_key(found) > best_key:
            best, best_key, waited = (
                {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
                recall_key(found),
                0,
            )
            best["view_weights"] = best["view_weights"] * torch.tensor(weights)
            best_found = found | dict(zip(("graph_weight", "text_weight"), best["view_weights"].tolist()))
        else:
            waited += 1
            if waited >= args.retriever_patience:
                break
    return best, best_found, history


def fusion_loss(head: FusionHead, turns: RetrieverTurns, rows, negatives, item_graph, item_text) -> torch.Tensor:
    """Eq. 12 on Eq. 11's score of the turns at ``rows``, the target in column 0 against its ``negatives``; the fused
    head adds Eq. 12 on each view's score alone, so that each half is a retriever by itself."""
    conversations = head(*turns.views(rows))
    items = head.items(item_graph, item_text)
    candidates = torch.cat([turns.targets[rows, None], negatives], dim=1)
    products = conversations[:, None, :] * items[candidates]
    width = item_graph.shape[-1]
    graph, text = products[..., :width].sum(-1), products[..., width:].sum(-1)
    loss = info_nce_loss(graph + text)
    if head.views == "both":
        loss = loss + info_nce_loss(graph) + info_nce_loss(text)
    return loss


def best_weighting(head: FusionHead, held_out: RetrieverTurns, item_graph, item_text):
    """(w_c, w_s), held-out Recall@{1,10,20}: the fused head's best weighting of its two views among VIEW_WEIGHTS
    (the first of equals); a single view has one."""
    graph, text = view_scores(head, held_out, head.items(item_graph, item_text))
    tried = {
        weights: ranked_recall(weights[0] * graph + weights[1] * text, held_out.targets)
        for weights in (VIEW_WEIGHTS if head.views == "both" else [(1.0, 1.0)])
    }
    return max(tried.items(), key=lambda pair: recall_key(pair[1]))


def recall_key(found: dict[str, float]) -> tuple[float, float, float]:
    """What early stopping compares: Recall@20, then @10 and @1 on ties."""
    return found["recall@20"], found["recall@10"], found["recall@1"]


def load_retriever(run: Run, data: Data, views: str = "both", device=None) -> Retriever:
    """The retriever the retriever stage saved (its fused head, or a single view's), encoding on ``device``."""
    if not run.finished("retriever"):
        raise InputError(f"no {run.dir / 'retriever'}: run the retriever stage first")
    saved = torch.load(run.dir / "retriever" / "retriever.pt", map_location="cpu", weights_only=False)
    head = FusionHead(data.catalog.encode(["x"]).shape[1], saved["node_embeddings"].shape[1], views)
    head.load_state_dict(saved["heads"][views])
    return Retriever(head, saved["nodes"], saved["node_embeddings"], data.catalog, device)


def recommender_sft(run: Run, args: Args, data: Data) -> dict:
    """Sec. 3.4.1 (Eq. 13): the teacher, shown the target, writes the five-step reasoning for each training turn
    (its candidates: the retriever's top-20 given the simulator's feedback on R_human, the target put in where the
    retriever missed it); the gold RANK LIST ranks the target first. LoRA SFT of the recommender (common/sft.py)."""
    if run.finished("sft_adapter"):
        return {}
    retriever = load_retriever(run, data, device=run.device)
    if "no-feedback" in args.ablations:  # no simulator: the list R_human alone
        feedback = {s.key: {"feedback": "", "items": human_list(s, data.catalog, args)[1]} for s in data.train}
    else:
        feedback = human_list_feedback(run, args, data, data.train)
    stats = ParseStats()
    rows = run.map(
        "recommender_data.jsonl",
        data.train,
        lambda todo: reasoning_examples(run, args, data, todo, retriever=retriever, feedback=feedback, stats=stats),
        desc="reasoning",
        every_rank=True,  # the ranks build a vllm: teacher together, those without turns to write too
    )
    run.count(stats.metrics("rollout/teacher_"))
    rows.sort(key=lambda r: r["key"])
    run.save_dataset("reasoning_sft", [sft_row(r["prompt"], r["completion"]) for r in rows])
    if not rows:
        raise InputError(
            f"{run.dir / 'recommender_data.jsonl'}: the teacher wrote no reasoning in the five-step format"
        )
    model, tokenizer = load_merged(
        args.policy, [], run.device, (args.lora_rank, args.lora_alpha), args.seed, args.gradient_checkpointing
    )
    prefix = output_prefix(args)
    examples = [encode_example(tokenizer, r["prompt"], r["completion"], args.max_length, prefix) for r in rows]
    model = supervised_finetuning(
        run,
        args,
        model,
        tokenizer,
        examples,
        "sft",
        lr=args.sft_lr,
        batch_size=args.sft_batch_size,
        epochs=args.sft_epochs,
        warmup_ratio=0.1,
        metric_prefix="train_sft",
    )
    save_final(run.accelerator, model, run.dir / "sft_adapter", {"examples": len(examples)})
    return {"rollout/sft_examples": len(examples)} | fitting_metrics(examples, "sft")


def reasoning_examples(run: Run, args: Args, data: Data, tasks: list[Task], *, retriever, feedback, stats):
    """The SFT example of each training turn the teacher reasons about in the five-step format (the others are left
    out): the prompt with the retriever's candidates (``sft_candidates``) and the simulator's feedback, the
    teacher's reasoning and the gold RANK LIST."""
    teacher = run.llm(args.teacher_llm, args.batch_size)
    for start in range(0, len(tasks), args.batch_size):
        batch = tasks[start : start + args.batch_size]
        feedback_texts = [feedback[s.key]["feedback"] for s in batch]
        reads = [
            retriever_reads(args, feedback[s.key]["feedback"], "", feedback[s.key]["items"], s.target) for s in batch
        ]
        retrieved = retriever.retrieve(batch, *[list(column) for column in zip(*reads)], args.num_candidates)
        candidates = [
            sft_candidates(c, s.target, random.Random(f"{args.seed}:{s.key}")) for s, c in zip(batch, retrieved)
        ]
        prompts = [
            recommender_prompt(s, c, text, [], args.list_length, data.catalog)
            for s, c, text in zip(batch, candidates, feedback_texts)
        ]
        attributes = ["; ".join(sorted(attributes_of(data.catalog, s.target))) or "no attributes" for s in batch]
        notes = [TEACHER_NOTE.format(target=s.target, attributes=a) for s, a in zip(batch, attributes)]
        thoughts = teacher_reasoning(teacher, [p + n for p, n in zip(prompts, notes)], args, stats)
        for task, prompt, cands, thought in zip(batch, prompts, candidates, thoughts):
            if thought:
                completion = thought + gold_answer(task.target, cands, args.list_length)
                yield {"key": task.key, "prompt": prompt, "completion": completion}


def load_policy(run: Run, args: Args, adapters: list[Path], trainable: bool = False):
    """(model, tokenizer): the recommender with ``adapters`` merged (SFT's gives pi_sft), plus a fresh LoRA if
    ``trainable``, so that "adapter disabled" is the reference pi_sft."""
    for adapter in adapters:
        if not (adapter / "steps.json").exists():
            raise InputError(f"no {adapter}: run the stage that writes it first")
    lora = (args.lora_rank, args.lora_alpha) if trainable else None
    return load_merged(args.policy, adapters, run.device, lora, args.seed, args.gradient_checkpointing)


def training_dialogue(data: Data, args: Args, position: int) -> Task:
    """The training dialogue at ``position`` of GRPO's stream: the training turns, reshuffled every epoch."""
    epoch, index = divmod(position, len(data.train))
    return random.Random(args.seed + epoch).sample(data.train, len(data.train))[index]


def episode_key(step: int, position: int, task: Task) -> str:
    return f"{step}|{position}|{task.key}"


def group_examples(groups: list[dict]) -> list[dict]:
    """Every sampled output of ``groups`` as a training example: the prompt's and the output's token ids exactly as
    they were sampled (eos only where it was sampled), the output masked in, and its group-normalized advantage."""
    examples = []
    for turn in groups:
        advantages = group_advantages(torch.tensor([r["total"] for r in turn["rewards"]]))
        for completion_ids, advantage in zip(turn["completion_ids"], advantages.tolist()):
            prompt_ids = turn["prompt_ids"]
            mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
            examples.append({"input_ids": prompt_ids + completion_ids, "completion_mask": mask, "advantage": advantage})
    return examples


GRPO_EPISODES = "grpo_episodes.jsonl"  # every GRPO step's episodes, keyed "<step>|<stream position>|<turn key>"


def multi_turn_grpo(run: Run, args: Args, data: Data) -> dict:
    """Sec. 3.4.1 (Eq. 14): per step, training dialogues are rolled out through T turns with the current policy
    (``rollout``: G outputs per turn, five rewards each) until the step has --groups-per-step groups (turns); the
    step trains on that many of them, drawn at random when the last dialogue brought more, so that every optimizer
    step weighs the same number of groups however many turns the dialogues ran. Then --grpo-iterations clipped-ratio
    updates against the SFT reference (the adapter switched off), pi_old being the policy that sampled. Episodes are
    recorded and resumed from."""
    if run.finished("grpo_adapter"):
        return reward_curve(run.records(GRPO_EPISODES).records()) if run.main else {}
    roles, model, tokenizer, optimizer, scheduler, start = grpo_learner(run, args, data)
    episodes = {r["key"]: r for r in run.records(GRPO_EPISODES).records()}  # an earlier launch's: the stream's place
    total = grpo_steps_planned(args, len(data.train), run.world)
    bar, step = tqdm(desc="grpo", initial=start, total=total, disable=not run.main), start
    logged = run.steps_logged("rollout", start, "grpo steps")
    while not grpo_finished(args, step, stream_position(episodes, step), len(data.train)):
        started = time.time()
        # ALGO LOGIC: roll out with the current policy until the step has its groups; Eq. 14 on --groups-per-step
        sampled = step_groups(
            run, args, data, roles=roles, model=model, tokenizer=tokenizer, step=step, episodes=episodes
        )
        trained = sorted(random.Random(f"{args.seed}:{step}").sample(range(len(sampled)), args.groups_per_step))
        iterations = grpo_update(run, args, model, optimizer, scheduler, group_examples([sampled[k] for k in trained]))
        # bookkeeping: the step's curve point and line, a resumable checkpoint every --grpo-save-every steps
        if step >= logged:  # a step a killed launch logged is redone, not logged again
            run.log_step(
                step_metrics(sampled, trained, iterations), time.time() - started, show=f"grpo step {step + 1}/{total}"
            )
        step += 1
        bar.update()
        if step % args.grpo_save_every == 0:
            save_resumable(run.accelerator, model, run.dir / "grpo", step, optimizer, scheduler)
    bar.close()
    if step > start and step % args.grpo_save_every:  # the last steps since a checkpoint
        save_resumable(run.accelerator, model, run.dir / "grpo", step, optimizer, scheduler)
    save_final(run.accelerator, model, run.dir / "grpo_adapter", {"steps": step})
    return reward_curve(list(episodes.values())) if run.main else {}


def grpo_learner(run: Run, args: Args, data: Data):
    """(roles, model, tokenizer, optimizer, scheduler, first step): the roles of the rollouts (their policy the vLLM
    engine with --rollout-backend vllm, else None: the training model samples), the trainable policy (a fresh LoRA on
    pi_sft) and its optimizer, resumed from the latest checkpoint."""
    from transformers import get_constant_schedule

    retriever, simulator = load_retriever(run, data, device=run.device), load_simulator(run, args)
    # The held-out turns' preferences too, as the retriever stage asked for them: the encoder batches the whole list
    # (sorted by length), so the training turns' embeddings are those of the same call.
    preferences = reference_preferences(run, args, data, data.train + data.held_out)
    references = dict(zip(preferences, data.catalog.encode(list(preferences.values()))))
    model, tokenizer = load_policy(run, args, [run.dir / "sft_adapter"], trainable=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.grpo_lr, weight_decay=0)
    scheduler = get_constant_schedule(optimizer)
    outputs = args.groups_per_step * args.group_size  # every step's global batch: DeepSpeed is told it up front
    configure_batches(run.accelerator, outputs, padded_batch(outputs, run, args), args.micro_batch_size)
    model, optimizer, start = resume_and_prepare(run.accelerator, model, optimizer, scheduler, run.dir / "grpo")
    engine = rollout_engine(run, args) if args.rollout_backend == "vllm" else None
    return Roles(engine, simulator, retriever, references), model, tokenizer, optimizer, scheduler, start


def step_groups(run: Run, args: Args, data: Data, *, roles: Roles, model, tokenizer, step: int, episodes: dict):
    """The groups (turns) of GRPO step ``step``, in stream order: rounds of training dialogues from where the stream
    stands, each played (``training_episodes``) and recorded in ``episodes``, until the step has --groups-per-step
    groups. A resumed step replays its rounds from the record, playing only what was not recorded."""
    if roles.policy is not None:  # vLLM samples with the adapter as it is now
        save_final(run.accelerator, model, run.dir / "grpo" / "sampler_adapter", {"step": step})
        roles.policy.use_adapter(run.dir / "grpo" / "sampler_adapter", version=step + 1)
    position, groups = stream_position(episodes, step), 0
    while groups < args.groups_per_step:
        count = round_size(args, groups, run.world)
        stream = [(step, p, training_dialogue(data, args, p)) for p in range(position, position + count)]
        rng = random.Random(f"{args.seed}:{step}:{position}")
        played = run.map(
            GRPO_EPISODES,
            stream,
            lambda todo, rng=rng: training_episodes(
                run, args, data, roles=roles, model=model, tokenizer=tokenizer, stream=todo, rng=rng
            ),
            key=lambda item: episode_key(*item),
            desc=f"grpo step {step + 1} episodes",
            every_rank=True,  # the policy samples with its current weights: under ZeRO-3 the ranks gather them
        )
        episodes |= {r["key"]: r for r in played}
        groups += sum(len(r["turns"]) for r in played)
        position += count
    step_episodes = sorted((r for k, r in episodes.items() if k.startswith(f"{step}|")), key=stream_order)
    return [turn for episode in step_episodes for turn in episode["turns"]]


def training_episodes(run: Run, args: Args, data: Data, *, roles: Roles, model, tokenizer, stream: list, rng):
    """The episode record of each (step, position, training turn) of ``stream``, sampled by the policy as it is
    now: G outputs of every turn, with their token ids and rewards."""

    def play(policy):
        for k, turns in rollout(
            tasks=[task for _, _, task in stream], roles=replace(roles, policy=policy), data=data,
            args=args, n=args.group_size, temperature=args.temperature, training=True, rng=rng,
        ):  # fmt: skip
            yield {"key": episode_key(*stream[k]), "turns": turns}

    if roles.policy is not None:
        yield from play(roles.policy)
    else:
        with generation_weights(run.accelerator, model) as current:  # the policy samples with its current weights
            yield from play(run.count_costs(HFChat(current, tokenizer, args.batch_size)))


def step_metrics(sampled: list[dict], trained: list[int], iterations: list[dict]) -> dict[str, float]:
    """A GRPO step's curve point: the update's loss and diagnostics (the mean over its iterations), the groups, the
    sampled outputs' mean rewards and the learning signal."""
    rewards = [r for turn in sampled for r in turn["rewards"]]
    means = {f"rollout/reward_{k}": float(np.mean([r[k] for r in rewards])) for k in rewards[0]}
    update = {f"train/{k}": float(np.mean([it[k] for it in iterations])) for k in iterations[0]}
    groups = {"train/groups": len(trained), "rollout/groups_sampled": len(sampled)}
    return update | groups | means | learning_signal(sampled)


def stream_order(episode: dict) -> tuple[int, int]:
    """(step, position in the stream of training dialogues) of a GRPO episode record."""
    step, position, _ = episode["key"].split("|", 2)
    return int(step), int(position)


def stream_position(episodes: dict, step: int) -> int:
    """Where GRPO step ``step`` starts in the stream of training dialogues: after the last an earlier step played."""
    return max((stream_order(e)[1] for e in episodes.values() if stream_order(e)[0] < step), default=-1) + 1


def round_size(args: Args, groups: int, world: int) -> int:
    """How many dialogues the next round of a GRPO step rolls out, ``groups`` of the step's --groups-per-step being
    there already: enough for the groups still missing were every dialogue to run all T turns, and at least one per
    rank (a multiple of the ranks), so that no rank idles while the others roll out."""
    count = math.ceil((args.groups_per_step - groups) / args.max_turns)
    return -(-count // world) * world


def grpo_finished(args: Args, step: int, position: int, dialogues: int) -> bool:
    """Whether GRPO has taken its steps: --grpo-epochs passes over the ``dialogues`` training dialogues (the stream
    ``position`` has reached them), or else --grpo-steps steps."""
    return position >= args.grpo_epochs * dialogues if args.grpo_epochs > 0 else step >= args.grpo_steps


def grpo_steps_planned(args: Args, dialogues: int, world: int) -> int:
    """The GRPO steps a run will take: --grpo-steps, or for --grpo-epochs the steps that many passes take when each
    step's first round brings its groups (it does when the ranks outnumber --groups-per-step; a step whose
    dialogues stop early takes another round, and the run then takes fewer steps)."""
    if args.grpo_epochs <= 0:
        return args.grpo_steps
    return math.ceil(args.grpo_epochs * dialogues / round_size(args, 0, world))


def learning_signal(groups: list[dict]) -> dict[str, float]:
    """What a GRPO step's groups give the update to learn from, beside their rewards: the share of groups whose G
    rewards are all equal (TRL's frac_reward_zero_std: their advantages are 0, they teach nothing), the share whose
    target was among the candidates (elsewhere r_hit and r_rank are 0 for every output, and the group learns from
    the format and preference rewards alone), the continuations that fell back to output 0 (no output named a
    candidate), the feedback lines the stock line stood in for (the simulator wrote nothing), and the prompts fitted
    to --max-length by leaving out dialogue lines or earlier turns, with the tokens left out and those still over."""
    totals = [[r["total"] for r in g["rewards"]] for g in groups]
    return {
        "rollout/frac_reward_zero_std": float(np.mean([np.isclose(np.std(t), 0.0) for t in totals])),
        "rollout/target_in_candidates": float(np.mean([g.get("target_in_candidates", False) for g in groups])),
        "rollout/fallback_continuations": sum(g.get("fallback", False) for g in groups),
        "rollout/substituted_feedback": sum(g.get("feedback_substituted", False) for g in groups),
        "rollout/truncated_prompts": sum(g.get("prompt_parts_dropped", 0) > 0 for g in groups),
        "rollout/prompt_tokens_dropped": sum(g.get("prompt_tokens_dropped", 0) for g in groups),
        "rollout/prompts_over_budget": sum(g.get("prompt_over_budget", False) for g in groups),
    }


def reward_curve(episodes: list[dict]) -> dict[str, float]:
    """The mean rewards of the first and the second half of the GRPO steps, over their episodes in stream order:
    what the update should raise."""
    episodes = sorted(episodes, key=stream_order)
    steps = 1 + max((stream_order(e)[0] for e in episodes), default=-1)
    halves = {}
    for name, part in (("first_half", range(steps // 2)), ("second_half", range(steps // 2, steps))):
        groups = [turn for e in episodes if stream_order(e)[0] in part for turn in e["turns"]]
        rewards = [r for t in groups for r in t["rewards"]]
        for k in ("total", "think", "answer", "pref") if rewards else ():
            halves[f"rollout/reward_{k}_{name}"] = float(np.mean([r[k] for r in rewards]))
        signal = learning_signal(groups) if rewards else {}
        for k in ("rollout/frac_reward_zero_std", "rollout/target_in_candidates") if signal else ():
            halves[f"{k}_{name}"] = signal[k]
    return halves


def rollout_engine(run: Run, args: Args):
    """A vLLM engine on pi_sft (the SFT adapter merged and saved once), for sampling with LoRA adapters, holding
    --max-length tokens per sequence (the rollouts' prompts are cut to leave room for --rec-max-tokens)."""
    from common.llm import VLLMChat

    base = run.dir / "sft_merged"
    if run.main and not (base / "config.json").exists():
        model, tokenizer = load_merged(args.policy, [run.dir / "sft_adapter"])
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
    run.barrier()
    engine = VLLMChat(
        str(base),
        args.seed,
        enable_lora=True,
        max_lora_rank=args.lora_rank,
        gpu_memory_utilization=args.vllm_memory,
        max_model_len=args.max_length,
    )
    return run.count_costs(engine)


def padded_batch(outputs: int, run: Run, args: Args) -> int:
    """The global batch that holds ``outputs`` on every rank's micro-batches (weight-0 rows pad it)."""
    return outputs + (-outputs) % (run.world * args.micro_batch_size)


def grpo_update(run: Run, args: Args, model, optimizer, scheduler, examples: list[dict]) -> list[dict[str, float]]:
    """--grpo-iterations (mu) optimizer steps on every output of the step (the global batch, split over ranks and
    micro-batches), each minimising Eq. 14 averaged over the outputs. pi_old is the policy that sampled: its
    per-token log-probs are read in the first iteration, before any update, and kept for the later ones, so the
    ratio is 1 in the first iteration and the clip can act from the second on (TRL's num_iterations). Returns, per
    iteration, the loss, the mean per-token KL, the gradient norm and TRL's clip ratios, with the mean per-token
    log-prob change that the whole update made to the outputs of positive and of negative advantage."""
    accelerator, micro = run.accelerator, args.micro_batch_size
    steps, accum = training_steps(
        accelerator, len(examples), padded_batch(len(examples), run, args), micro, 1, args.seed
    )
    frozen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # micro-batch -> (pi_old's, pi_ref's log-probs)
    iterations = []
    for _ in range(args.grpo_iterations):
        sums = dict.fromkeys(("loss", "kl", "tokens", "low", "high"), 0.0)
        for m, (chunk, weights) in enumerate(micro_batches(examples, steps[0], accelerator, micro, accum)):
            advantages, inputs = grpo_inputs(chunk, run.device)
            mask = inputs["completion_mask"][:, 1:].float()
            if m not in frozen:
                with torch.no_grad(), accelerator.unwrap_model(model).disable_adapter():  # the reference: pi_sft
                    _, _, ref_logps = sequence_logprobs(accelerator.unwrap_model(model), **inputs)
            # ALGO LOGIC: pi_theta's log-probs, Eq. 14's clipped loss with its KL term, an (accumulated) step
            with accelerator.accumulate(model):
                _, _, policy_logps = sequence_logprobs(model, **inputs)
                if m not in frozen:
                    frozen[m] = (policy_logps.detach(), ref_logps)
                old_logps, ref_logps = frozen[m]
                losses = grpo_loss(policy_logps, old_logps, ref_logps, advantages, mask, args.epsilon, args.kl_beta)
                loss = share_of_global_mean(losses, weights, len(examples), run.world, accum)  # Eq. 14's 1/G, over all
                grad_norm = backward_and_step(accelerator, model, optimizer, loss, args.max_grad_norm)
            # bookkeeping: this micro-batch's share of the step's loss, KL and clipped tokens, from the same forward
            sums["loss"] += loss.item() / (run.world * accum)
            token_weights = mask * weights[:, None]
            diagnostics = grpo_diagnostics(policy_logps, old_logps, ref_logps, advantages, token_weights, args.epsilon)
            for name, value in diagnostics.items():
                sums[name] += value
        scheduler.step()
        iterations.append(iteration_metrics(run.sum_over_ranks(sums), grad_norm))
    change = logprob_change(run, args, model, examples, batch=steps[0], accum=accum, frozen=frozen)
    return [iteration | change for iteration in iterations]


def grpo_inputs(chunk: list[dict], device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(advantages, padded token ids and completion mask) of a micro-batch of GRPO examples."""
    advantages = torch.tensor([e["advantage"] for e in chunk], device=device)
    rows = [(e["input_ids"], e["completion_mask"]) for e in chunk]
    return advantages, {k: v.to(device) for k, v in collate(rows, 0).items()}  # pads are masked: any id does


def iteration_metrics(totals: dict[str, float], grad_norm) -> dict[str, float]:
    """One GRPO iteration's loss, per-token KL, gradient norm and TRL's clip ratios, from its sums over ranks."""
    tokens = max(totals["tokens"], 1)
    return {
        "loss": totals["loss"],
        "kl": totals["kl"] / tokens,
        "grad_norm": grad_norm,
        "clip_ratio/low_mean": totals["low"] / tokens,
        "clip_ratio/high_mean": totals["high"] / tokens,
        "clip_ratio/region_mean": (totals["low"] + totals["high"]) / tokens,
    }


def logprob_change(run: Run, args: Args, model, examples: list[dict], *, batch: list[int], accum: int, frozen: dict):
    """What the update did to the sampled outputs, the signal it should move: the mean per-token log-prob change
    from pi_old (``frozen``) to the updated policy, over the outputs of positive and of negative advantage. It reads
    the updated policy: one more forward of the outputs, without gradients."""
    moved = dict.fromkeys(("up", "up_outputs", "down", "down_outputs"), 0.0)
    for m, (chunk, weights) in enumerate(micro_batches(examples, batch, run.accelerator, args.micro_batch_size, accum)):
        advantages, inputs = grpo_inputs(chunk, run.device)
        with torch.no_grad():
            _, lengths, new_logps = sequence_logprobs(model, **inputs)
        change = (new_logps - frozen[m][0]).sum(-1) / lengths.clamp(min=1)  # per-token log-prob change of each output
        for side, chosen in (("up", advantages > 0), ("down", advantages < 0)):
            moved[side] += (change * weights * chosen).sum().item()
            moved[f"{side}_outputs"] += (weights * chosen).sum().item()
    moved = run.sum_over_ranks(moved)
    return {
        "logp_change/positive_advantage": moved["up"] / max(moved["up_outputs"], 1),
        "logp_change/negative_advantage": moved["down"] / max(moved["down_outputs"], 1),
    }


def evaluate(run: Run, args: Args, data: Data) -> dict:
    """Sec. 3.7: every test dialogue through all T turns (greedy, no early stop), for the zero-shot backbone, the SFT
    recommender and SMTPO side by side; Recall@{1,10}, NDCG@10 and MRR@10 at every turn over the whole test set."""
    from accelerate.utils.memory import clear_device_cache

    retriever, simulator = load_retriever(run, data, device=run.device), load_simulator(run, args)
    adapters = {
        "zero-shot": [],
        "sft": [run.dir / "sft_adapter"],
        "smtpo": [run.dir / "sft_adapter", run.dir / "grpo_adapter"],
    }
    control = "_blind" if args.blind_simulator else "_noisy" if args.noisy_feedback else ""
    metrics, rows = {}, []
    for name in args.policies:
        if not all((a / "steps.json").exists() for a in adapters[name]):
            print(f"eval: no {name} recommender in this run, skipped") if run.main else None
            continue
        model, tokenizer = load_policy(run, args, adapters[name])
        roles = Roles(run.count_costs(HFChat(model, tokenizer, args.batch_size)), simulator, retriever, {})
        results = run.map(
            f"eval_{name.replace('-', '')}{control}.jsonl",
            data.evaluated,
            lambda todo, roles=roles: evaluation_episodes(todo, roles, data, args),
            desc=f"eval {name}",
        )
        prefix = "eval" if name == "smtpo" else f"eval_{name.replace('-', '')}"
        for t in range(1, args.max_turns + 1):
            turn = turn_scores(results, t)
            metrics |= {f"{prefix}{control}/turn{t}/{k}": float(v) for k, v in turn.items()}
            rows.append([name, t, *[round(float(v), 4) for v in turn.values()]])
            if t == args.max_turns:
                metrics |= {f"{prefix}{control}/{k}": float(v) for k, v in turn.items()}
        prompts = [turn for r in results for turn in r["turns"]]
        metrics[f"{prefix}{control}/truncated_prompts"] = sum(t.get("prompt_parts_dropped", 0) > 0 for t in prompts)
        metrics[f"{prefix}{control}/prompts_over_budget"] = sum(t.get("prompt_over_budget", False) for t in prompts)
        del model, roles  # gone before the next policy loads: one policy at a time beside the simulator
        clear_device_cache(garbage_collection=True)
    run.table(f"eval{control}_by_turn", ["policy", "turn", *TURN_METRICS], rows)
    dialogues = len({task.conversation for task in data.evaluated})
    return metrics | {"eval/examples": len(data.evaluated), "eval/dialogues": dialogues}


def evaluation_episodes(tasks: list[Task], roles: Roles, data: Data, args: Args):
    """Each task's greedy episode through all T turns, as an evaluation record: its target and what each turn
    keeps (EVAL_FIELDS). Batches of --batch-size tasks, each rollout seeded alike."""
    for start in range(0, len(tasks), args.batch_size):
        batch = tasks[start : start + args.batch_size]
        episodes = rollout(
            tasks=batch, roles=roles, data=data, args=args, n=1, temperature=0.0, training=False,
            rng=random.Random(args.seed),
        )  # fmt: skip
        for k, turns in episodes:
            turns = [{field: turn[field] for field in EVAL_FIELDS} for turn in turns]
            yield {"key": batch[k].key, "target": batch[k].target, "turns": turns}


# What an evaluation record keeps of each turn.
EVAL_FIELDS = (
    "turn", "feedback", "candidates", "ranked", "outputs", "prompt_parts_dropped", "prompt_over_budget", "fallback"
)  # fmt: skip
# The per-turn metrics: the recommender's list (Table 1, 3) and the retriever's 20 candidates (Fig. 4b).
TURN_METRICS = ("recall@1", "recall@10", "ndcg@10", "mrr@10", "retriever_recall@20", "retriever_ndcg@20")


def turn_scores(results: list[dict], t: int) -> dict[str, float]:
    """TURN_METRICS at turn ``t`` over every evaluated context (METHODS.md 3.7: a dialogue that stopped keeps its
    last list): Recall@{1,10}, NDCG@10 and MRR@10 of the recommender's list, and Recall@20 and NDCG@20 of the
    candidates the retriever recalled at that turn (the paper's Fig. 4b)."""
    latest = [(r["turns"][:t][-1] if r["turns"] else {"ranked": [], "candidates": []}, r["target"]) for r in results]
    lists = [(ranking_slots(turn["ranked"]), target) for turn, target in latest]
    recalled = [(turn["candidates"], target) for turn, target in latest]
    return {
        "recall@1": float(np.mean([recall_at_k(ranked, [target], 1) for ranked, target in lists])),
        "recall@10": float(np.mean([recall_at_k(ranked, [target], 10) for ranked, target in lists])),
        "ndcg@10": float(np.mean([ndcg_at_k(ranked, [target], 10) for ranked, target in lists])),
        "mrr@10": float(np.mean([mrr_at_k(ranked, [target], 10) for ranked, target in lists])),
        "retriever_recall@20": float(np.mean([recall_at_k(c, [target], 20) for c, target in recalled])),
        "retriever_ndcg@20": float(np.mean([ndcg_at_k(c, [target], 20) for c, target in recalled])),
    }


def ranking_slots(ranked: list[str | None]) -> list[str]:
    """A parsed list for the ranking metrics: an entry that names no new candidate keeps its slot as a placeholder
    that matches nothing, so a target written below made-up titles ranks where it was written."""
    return [title if title is not None else f"(entry {k + 1}: no candidate)" for k, title in enumerate(ranked)]


def print_tables(metrics: dict) -> None:
    per_turn = [k for k in metrics if re.match(r"eval[^/]*/turn\d+/", k)]
    steps = sorted({k.split("/")[1] for k in per_turn}, key=lambda t: int(t[4:]))
    names = {"eval_zeroshot": "zero-shot", "eval_sft": "SFT", "eval": "SMTPO"}  # the paper's order
    prefixes = {k.split("/")[0] for k in per_turn}
    for prefix in sorted(prefixes, key=lambda p: [*names, p].index(p.removesuffix("_blind").removesuffix("_noisy"))):
        label = f"{names.get(prefix.split('_blind')[0].split('_noisy')[0], prefix)} ({prefix}/)"
        columns = [c.replace("retriever_", "retriever ") for c in TURN_METRICS]
        print(f"\n{label:30}" + "".join(f"{c:>{len(c) + 3}}" for c in columns))
        for turn in steps:
            values = [metrics.get(f"{prefix}/{turn}/{c}", float("nan")) for c in TURN_METRICS]
            print(f"  {turn:28}" + "".join(f"{v:{len(c) + 3}.3f}" for c, v in zip(columns, values)))
    halves = [k[: -len("_first_half")] for k in metrics if k.endswith("_first_half")]
    if halves:
        print(
            "\nGRPO rewards and learning signal, the mean over the first half of the steps -> the second half "
            "(metrics.jsonl: per step)"
        )
        print(
            "  "
            + "  ".join(
                f"{k.removeprefix('rollout/').removeprefix('reward_')} {metrics[k + '_first_half']:.3f} -> "
                f"{metrics[k + '_second_half']:.3f}"
                for k in halves
            )
        )
    retrieved = {k: v for k, v in metrics.items() if k.startswith("retriever/")}
    if retrieved:
        print("\nretriever on held-out training turns: " + "  ".join(f"{k[10:]} {v:.3f}" for k, v in retrieved.items()))


# =============================================================================================== main


# What runs/<run>/curves.png draws: GRPO's five rewards and its learning signal per step, and the ranking beside
# zero-shot and SFT.
CURVES = {
    "GRPO rewards (Eq. 15-19)": [f"rollout/reward_{k}" for k in ("total", "think", "answer", "pref", "rank", "hit")],
    "GRPO learning signal (shares of groups)": ["rollout/frac_reward_zero_std", "rollout/target_in_candidates"],
    "GRPO rollouts (per step)": [
        "rollout/fallback_continuations",
        "rollout/substituted_feedback",
        "rollout/truncated_prompts",
    ],
    "GRPO loss (Eq. 14)": ["train/loss"],
    "SFT losses": ["train_simulator/loss", "train_sft/loss"],
}
BARS = {"Recall@10": ["eval_zeroshot/recall@10", "eval_sft/recall@10", "eval/recall@10"]}


def main(args: Args) -> None:
    check_specs(args)  # a wrong model or LLM spec stops here, not after minutes of an earlier stage
    batches = check_args(args, args.dry_run or launched_processes())
    data = load_data(args)
    if args.dry_run:
        sizes = {"training turns": len(data.train), "held-out turns": len(data.held_out)}
        sizes |= {"test turns": len(data.evaluated), "test dialogues": len({s.conversation for s in data.evaluated})}
        print_dry_run("smtpo.py", args.dry_run, batches, sizes | {"items": len(data.catalog)})
        if "grpo" in args.stages:
            steps = grpo_steps_planned(args, len(data.train), args.dry_run)
            epochs = steps * round_size(args, 0, args.dry_run) / len(data.train)
            print(f"  grpo: {steps} steps, about {epochs:.2f} passes over the {len(data.train)} training dialogues")
        return
    run = Run(args)  # runs/<run_name>/, ranks, seeding, metrics; each run.stage is timed and its LLM costs booked
    run.stage("simulator", train_simulator, args, data)  # Eq. 6: the multi-task simulator
    run.stage("retriever", train_retriever, args, data)  # Eq. 8-12: LightGCN + the dual-view fusion head
    run.stage("sft", recommender_sft, args, data)  # Eq. 13: the five-step reasoning, taught
    run.stage("grpo", multi_turn_grpo, args, data)  # Eq. 14 with the rewards of Eq. 15-19, over T turns
    run.stage("eval", evaluate, args, data)  # Recall / NDCG / MRR per turn, three recommenders side by side
    run.log(run.costs())
    run.finish(print_tables, CURVES, BARS)


if __name__ == "__main__":
    try:
        main(parse_args(Args, PRESETS))
    except (InputError, ModelSpecError, LLMBackendError) as err:
        raise SystemExit(f"error: {err}") from None
