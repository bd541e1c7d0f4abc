"""GRSU: a Generative Reward model based Simulated User that scores items by P(Yes) and critiques lists by their
attributes, steering a beam search over a zero-shot LLM recommender's lists (the GRSU paper; METHODS.md Sec. 5).
Docs: docs/grsu.md.

    python grsu.py                                   # every stage on the embedded SmolLM2 + the bundled demo dialogues
    python grsu.py --dataset inspired --num-test 20  # INSPIRED (validation split) from --data-dir
    accelerate launch grsu.py --dataset redial       # shard synthesis and test examples over ranks
    python grsu.py --stages search --search greedy --run-name <run>   # another search over the same simulated user
    bash benchmark/grsu_table3.sh                    # the paper's Table 3 on GPUs

The pipeline, one stage function each, writing under runs/<run_name>/:

  synth    instruction data from the training conversations: attribute critiques written by a teacher that
           sees the user's true preference (the student's input omits it), over lists with a subset of the
           ground truth and lists without; and one Yes / one No scoring instance per ground-truth item
                                                                           -> instructions.jsonl
  train    instruction tuning of the simulated user: masked NLL on response tokens (Eq. 4), LoRA or full
                                                                           -> user/checkpoints, user_model/
  search   per test recommendation turn: N^2 zero-shot CRS lists, then D rounds of (score every list by the
           mean P(accept) of its items (the reward, Eq. 2), keep the best B, sample N critiques each, let the CRS
           revise), then rank every item seen by its own score; Recall/NDCG/MRR@{10,50} for GRSU and the
           zero-shot CRS                                                   -> search_<strategy>.jsonl

A rerun with the same --run-name skips every finished record, checkpoint and model.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from itertools import combinations
from pathlib import Path
from typing import Literal

import torch

from common.catalog import Catalog
from common.checkpoints import save_final
from common.conversations import chat_roles, render_history
from common.data import load_crs_dataset
from common.distributed import check_division, launched_processes, print_dry_run
from common.formats import Dialogue, InputError, Item
from common.llm import HFChat, LLMBackendError
from common.metrics import mentions_title, mrr_at_k, ndcg_at_k, recall_at_k
from common.models import ModelSpecError, add_lora, check_specs, enable_gradient_checkpointing, load_model
from common.parsing import ParseStats, chat_parsed
from common.presets import Preset, parse_args
from common.run import Run, sft_row
from common.sft import supervised_finetuning
from common.tokens import encode_prompt_completion

STAGES = ("synth", "train", "search")


@dataclass
class Args:
    exp_name: str = "grsu"
    """the name of this experiment (prefix of the default run name)"""
    seed: int = 1
    """seed of python, numpy and torch: negative sampling, LoRA init, data order, sampled lists and critiques"""
    run_name: str | None = None
    """outputs go to runs/<run_name>/; rerun with the same name to resume (default, CleanRL's:
    <exp_name>__<dataset>__<seed>__<unix time>)"""
    stages: tuple[Literal["synth", "train", "search"], ...] = STAGES
    """which stages to run, in pipeline order; each reads what the earlier ones left in the run folder"""
    track: bool = False
    """log to Weights & Biases as well as runs/<run_name>/metrics.jsonl (offline, said once, where no W&B login is at
    hand and WANDB_MODE is unset)"""
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
    """whose test conversations are searched: demo (bundled), inspired (CFCRS split) or redial (iEvaLM split)"""
    train_datasets: tuple[Literal["demo", "inspired", "redial"], ...] = ()
    """whose training conversations build the instruction data; empty: --dataset's own"""
    data_dir: str = "../shared/data"
    """root of the real data (docs/data.md); unused for the demo"""
    eval_split: Literal["valid", "test"] = "valid"
    """valid for development; test is held-out: use it only for final numbers"""
    num_train_turns: int = 4
    """recommendation turns per training dataset that instruction data is built from; 0 = all"""
    num_test: int = 2
    """test recommendation turns to search (each is scored once per ground-truth item); 0 = all"""
    only_new: Literal["turn", "labels", "off"] = "turn"
    """repeated items, those the conversation mentioned before the turn (by its own item annotations): turn skips every
    turn with one (the released code's only_new); labels drops them and skips a turn left with none (a reading of
    the paper's "removes repeated items within each conversation"); off keeps them"""
    outside_catalog: Literal["drop", "miss"] = "drop"
    """labels that are not in the catalog: drop removes them, and a turn left without a label (the released code);
    miss keeps them, so they count as misses"""

    # ------------------------------------------------------------------------------------------- roles
    user_model: str = "smollm2-135m"
    """the simulated user to tune: smollm2-135m, a Hugging Face id or a local folder (paper: Llama-3.1-8B-Instruct)"""
    teacher_llm: str = "hf:smollm2-135m"
    """backend that writes the critique data, shown the true preference (paper: Llama-3.3-70B-Instruct)"""
    crs_llm: str = "hf:smollm2-135m"
    """backend of the frozen zero-shot CRS that generates item lists (paper: Phi-4)"""
    batch_size: int = 32
    """prompts per batched call of a local backend"""

    # ------------------------------------------------------------------------------------------- synthesis
    list_length: int = 10
    """l: items per recommendation list"""
    max_subsets: int = 4
    """ground-truth subsets per turn that get a critique list, smallest first; 0 = every subset of size < l"""
    no_gt_lists: int = 1
    """lists of negatives only, per turn"""
    scoring_negatives: int = 1
    """sampled No instances per ground-truth item"""
    critique_max_tokens: int = 128
    """length cap of a critique, teacher's and simulated user's"""
    max_resamples: int = 1
    """a CRS list with the wrong number of titles, or an empty critique, is resampled at most this often (each
    resample is a full CRS generation, so the CPU demo keeps one)"""

    # ------------------------------------------------------------------------------------------- training
    finetune: Literal["lora", "full"] = "lora"
    """LoRA adapters, or every weight"""
    lr: float | None = None
    """peak learning rate; None: 1e-4 for LoRA, 1e-6 for full fine-tuning (the paper's code)"""
    epochs: int = 3
    """passes over the instruction data (the demo's few examples take three for the loss to fall visibly)"""
    train_batch_size: int = 4
    """examples per optimizer step, over all ranks"""
    micro_batch_size: int = 2
    """examples per forward pass on one rank; gradients accumulate up to the global batch"""
    warmup_steps: int = 1000
    """linear warmup steps, at most --max-warmup-ratio of the run"""
    max_warmup_ratio: float = 0.1
    """the warmup takes at most this share of the run, so that short runs reach the peak; 1 = no cap"""
    min_lr_ratio: float = 0.1
    """the cosine decay ends at this fraction of the peak"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient-norm clip (inf: none)"""
    max_length: int = 1024
    """training sequences keep their last tokens up to this length"""
    gradient_checkpointing: bool = True
    """recompute each layer's activations in the backward pass instead of storing them"""
    lora_rank: int = 8
    """LoRA rank r (--finetune lora only)"""
    lora_alpha: int = 16
    """LoRA alpha (--finetune lora only)"""
    save_every: int = 0
    """optimizer steps between resumable checkpoints; 0: at the end of each epoch. A full fine-tune's checkpoint
    holds the weights and AdamW's state, about 14 bytes per parameter (112 GB for 8B)"""
    keep_checkpoints: int = 1
    """resumable checkpoints kept, the newest; an older one is deleted once a newer is complete"""

    # ------------------------------------------------------------------------------------------- search
    search: Literal["beam", "greedy", "greedy-small", "mc", "none"] = "beam"
    """beam; greedy (width 1, B*N lists per round: as many lists as beam); greedy-small (width 1, N per round);
    mc, Monte Carlo (depth 1, as many lists as beam); none (the zero-shot lists only). Table 6"""
    beam_width: int = 2
    """B: lists kept per round (2 keeps the CPU demo to minutes)"""
    expansion: int = 2
    """N: critiques sampled per kept list; the search starts from N^2 sampled lists"""
    depth: int = 3
    """D: search iterations, the N^2 initial lists being the first, so N^2 + (D - 1) B N lists in all (the released
    code's count: 80 lists at B = N = 4, D = 5; --depth 6 gives METHODS.md 5.7.1's reading, 96)"""
    critiques: bool = True
    """--no-critiques: the CRS revises without the user's critique (Fig. 2 ablation)"""
    critique_attributes: bool = True
    """--no-critique-attributes: lists shown to the simulated user by title only (Table 4 ablation)"""
    scoring: Literal["generative", "majority", "weighted-majority"] = "generative"
    """how the final ranking scores an item: P(accept); majority, the share of lists holding it; weighted-majority,
    that share times P(accept) (Table 4). The beam keeps the lists of highest reward (Eq. 2, P(accept)) under every
    scoring, as the released code does"""
    ranking: Literal["pooled", "best-list"] = "pooled"
    """pooled: every item seen, by its own score; best-list: the highest-reward list alone (Fig. 2 ablation)"""
    tuned_critic: bool = True
    """--no-tuned-critic: critiques come from the untuned model (Table 4 ablation)"""
    tuned_scorer: bool = True
    """--no-tuned-scorer: scores come from the untuned model (Table 4 ablation)"""
    crs_max_tokens: int = 160
    """length cap of one CRS list: ten "N. **Title (year)**" lines take about 100 tokens"""
    temperature: float = 1.0
    """sampling temperature of CRS lists and critiques"""
    examples_per_batch: int = 4
    """test turns searched together, so their calls share batches; each is saved when its batch ends"""
    ks: tuple[int, ...] = (10, 50)
    """cutoffs of Recall, NDCG and MRR"""
    remove_mentioned: bool = False
    """remove the items the conversation mentioned before the turn from every ranking before the metrics (neither
    the paper nor its released code does this)"""
    print_examples: bool = False
    """print every searched example's lists, critiques and rankings"""
    dry_run: int = 0
    """validate the flags, every batch division for this many processes, and the data files, then exit without
    loading a model (0: run)"""


# The paper's settings, each with its source: `python grsu.py paper --user-model ... --dataset ...` (common/presets.py;
# docs/grsu.md shows this table). Released files are RUCAIBox/GRSU's.
PAPER = Preset(
    "the paper's Table 3 setting (Sec. 4.1, the released code where the paper is silent); state the models, the data "
    "and the scale",
    values={
        "train_datasets": (("redial", "inspired"), "Sec. 4.1 (both training sets); released script/train/sft.sh"),
        "num_train_turns": (0, "Sec. 3.2.2: every training turn"),
        "num_test": (0, 'Sec. 4.1: "the average scores on all the test examples"'),
        "only_new": ("turn", "released src/task/{redial,inspired}.py with only_new: true (script/infer/*.yaml)"),
        "outside_catalog": ("drop", "released src/task/*.py keeps only labels in movie2info.json"),
        "list_length": (10, 'Sec. 4.1: "the length of all the item lists to 10"'),
        "max_subsets": (0, 'Sec. 4.1: "all possible subsets of ground-truth items with lengths less than 10"'),
        "no_gt_lists": (1, 'Sec. 4.1: "we sample one list per conversation history"'),
        "scoring_negatives": (1, 'Sec. 4.1: "one additional item as a negative sample for each ground-truth item"'),
        "critique_max_tokens": (1024, "released script/infer/*.yaml: feedback max_tokens 1024"),
        "max_resamples": (4, "released rec_model.py: a list is tried at most 5 times (a critique, 3)"),
        "finetune": ("full", "Sec. 4.1 (DeepSpeed ZeRO-3, no adapters); released sft.sh"),
        "lr": (1e-6, "released sft.sh learning_rate (Sec. 4.1's value is unreadable in the text)"),
        "epochs": (1, 'Sec. 4.1: "we train for one epoch"; released sft.sh num_train_epochs 1'),
        "train_batch_size": (16, 'Sec. 4.1: "a batch size of 4", per device in sft.sh: 16 on 4 GPUs'),
        "warmup_steps": (1000, 'Sec. 4.1: "a linear warmup over 1,000 steps"; sft.sh'),
        "max_warmup_ratio": (1.0, "released sft.sh: warmup_steps 1000, uncapped"),
        "min_lr_ratio": (0.1, 'Sec. 4.1: "decays to 10% of the peak learning rate"; sft.sh min_lr_rate'),
        "weight_decay": (0.01, "Sec. 4.1; sft.sh"),
        "max_grad_norm": (1.0, "Sec. 4.1; sft.sh"),
        "max_length": (3072, "released sft.sh max_seq_length"),
        "gradient_checkpointing": (True, "Sec. 4.1; sft.sh"),
        "lora_rank": (8, "not in the paper: read only under --finetune lora"),
        "lora_alpha": (16, "not in the paper: read only under --finetune lora"),
        "search": ("beam", "Sec. 3.3"),
        "beam_width": (4, 'Sec. 4.1: "beam width and expand width to 4"; script/infer/*.yaml num_beams 4'),
        "expansion": (4, "Sec. 4.1; script/infer/*.yaml actor n 4"),
        "depth": (5, "Sec. 4.1, counted as released beam_search_algo.py does: 80 lists (--depth 6: 96)"),
        "critiques": (True, "Sec. 3.2.1"),
        "critique_attributes": (True, 'Sec. 4.1: "genre, actor, writer, and director"'),
        "scoring": ("generative", "Sec. 3.2.1"),
        "ranking": ("pooled", 'Sec. 3.3: "efficient candidate ranking"'),
        "tuned_critic": (True, "Sec. 3.2.2"),
        "tuned_scorer": (True, "Sec. 3.2.2"),
        "crs_max_tokens": (256, "released script/infer/*.yaml: rec_model max_tokens 256"),
        "temperature": (1.0, "released script/infer/*.yaml: temperature 1"),
        "ks": ((10, 50), "Sec. 4.1: Recall, NDCG, MRR @ 10, 50"),
        "remove_mentioned": (False, "neither the paper nor the released code removes earlier mentions"),
    },
    ablations={
        "train_datasets": "Table 5",
        "search": "Table 6",
        "depth": "Fig. 3",
        "critiques": "Fig. 2",
        "critique_attributes": "Table 4",
        "scoring": "Fig. 2, Table 4",
        "ranking": "Fig. 2",
        "tuned_critic": "Table 4",
        "tuned_scorer": "Table 4",
    },
    recipe=(
        "exp_name", "seed", "run_name", "stages", "track", "wandb_project", "wandb_entity", "wandb_group", "wandb_tags",
        "dataset", "data_dir", "eval_split", "user_model", "teacher_llm", "crs_llm", "batch_size", "micro_batch_size",
        "save_every", "keep_checkpoints", "examples_per_batch", "print_examples", "dry_run",
    ),
)  # fmt: skip
PRESETS = {"paper": PAPER}


# =============================================================================================== data

DOMAIN = "movie"  # all three datasets are movie conversations


@dataclass
class Task:
    """A task the simulated user steers the CRS through: the conversation up to a recommendation turn, the turn's
    ground-truth items, and the items mentioned before it."""

    key: str  # <dialogue>:<turn index>
    conversation: str  # the source conversation (training on a conversation that is evaluated is not allowed)
    history: list[dict]  # chat roles: {"role": "user" (the seeker) | "assistant" (the recommender), "content": ...}
    labels: list[str]  # the items recommended here (under --only-new labels, those not mentioned before)
    mentioned: list[str]  # the items (and, for iEvaLM, entities) the conversation annotated before this turn


def make_tasks(
    dialogues: list[Dialogue], *, only_new: str = "turn", catalog: set[str] | None = None, dropped: dict | None = None
) -> list[Task]:
    """The evaluation protocol's examples: a recommender turn that names at least one item (in the dialogue's own
    annotations) and has a non-empty history. With a ``catalog`` (--outside-catalog drop, the released code), labels
    outside it are dropped first, and a turn left without one is no example; ``dropped`` counts both ("labels",
    "turns"). What the conversation mentioned before the turn also comes from its annotations: the earlier turns'
    items, or, where a format annotates the context as a whole, ``context_items`` (iEvaLM). Repeated items are
    handled by ``only_new`` (see Args)."""
    tasks = []
    for dialogue in dialogues:
        for i, turn in enumerate(dialogue.turns):
            history = chat_roles(dialogue.turns[:i])
            labels = list(dict.fromkeys(t for t in turn.items if t.strip()))
            if turn.role != "recommender" or not labels or not history:
                continue
            if catalog is not None:
                kept = [t for t in labels if t in catalog]
                if dropped is not None:
                    dropped["labels"] = dropped.get("labels", 0) + len(labels) - len(kept)
                    dropped["turns"] = dropped.get("turns", 0) + (not kept)
                labels = kept
            earlier = dialogue.context_items
            if earlier is None:
                earlier = [t for previous in dialogue.turns[:i] for t in previous.items]
            repeated = set(labels) & set(earlier)
            if only_new == "turn" and repeated:
                continue
            if only_new == "labels":
                labels = [t for t in labels if t not in repeated]
            if labels:
                conversation = dialogue.conversation_id or dialogue.dialog_id
                key = f"{dialogue.dialog_id}:{i}"
                tasks.append(Task(key, conversation, history, labels, list(dict.fromkeys(earlier))))
    return tasks


@dataclass
class Data:
    train: list[Task]  # training turns, every conversation of the evaluated split left out
    evaluated: list[Task]  # the evaluated split's turns (--eval-split)
    items: list[Item]  # the catalog: the KG's items plus those the (kept) training conversations name
    left_out: int  # training turns left out because their conversation is evaluated
    outside: dict[str, int]  # evaluated labels outside the catalog dropped, and the turns they left without one


def load_data(
    name: str, data_dir: str, eval_split: Literal["valid", "test"], *, only_new: str = "turn", outside_catalog="drop"
) -> Data:
    """The training and evaluated recommendation turns of dataset ``name`` (common/data.py's ``load_crs_dataset``:
    no evaluated conversation trains), and the catalog every ranking is drawn from: the KG's items, and the items the
    kept training conversations name that the KG lacks (without attributes), never the evaluated split's own. Under
    ``outside_catalog="drop"`` the labels outside that catalog are dropped (a training label is always in it)."""
    dataset = load_crs_dataset(name, data_dir, eval_split)
    known = {item.title for item in dataset.items}
    named = dict.fromkeys(t for dialogue in dataset.train for turn in dialogue.turns for t in turn.items)
    items = dataset.items + [Item(title, title) for title in named if title not in known]
    catalog = {item.title for item in items} if outside_catalog == "drop" else None
    outside = {"labels": 0, "turns": 0}
    evaluated = make_tasks(dataset.evaluated, only_new=only_new, catalog=catalog, dropped=outside)
    left_out = len(make_tasks(dataset.dropped, only_new=only_new))
    return Data(make_tasks(dataset.train, only_new=only_new, catalog=catalog), evaluated, items, left_out, outside)


def data_of(args: Args, name: str) -> Data:
    """``load_data`` of dataset ``name`` under the run's flags."""
    return load_data(name, args.data_dir, args.eval_split, only_new=args.only_new, outside_catalog=args.outside_catalog)


CARD_FIELDS = ("genre", "star", "director", "writer")  # an item as the simulated user sees it


# =============================================================================================== prompts

# The two behaviours share the context and differ in the instruction (d_s, d_c in the paper).
SCORE_INSTRUCTION = (
    "You are the user to look for recommendations. You need to provide feedback on the recommendations "
    "given by the system. For each recommendation, you should give feedback in the form of 'Accept the "
    "recommendation (Yes/No)? X', where X is either 'Yes' or 'No'."
)
CRITIQUE_INSTRUCTION = (
    "You are the user to look for recommendations. Read the conversation and provide feedback on the "
    "recommendations given by the system."
)
ANSWER_PREFIX = "Accept the recommendation (Yes/No)?"


def score_prompt(history: list[dict], item: str) -> str:
    """[C_{k-1}; one-item list with attributes; d_s]. The item comes last, so every item of one conversation
    shares the prompt up to it (the scorer computes that prefix once)."""
    return f"Conversation:\n{render_history(history)}\n\n{SCORE_INSTRUCTION}\n\nRecommendation:\n1. {item}"


def critique_prompt(history: list[dict], items: list[str], preference: list[str] | None = None) -> str:
    """[C_{k-1}; list; d_c], and for the teacher [C_{k-1}; list; p_k; d_c] (Sec. 3.2.2), p_k being the items the user
    really wants, with attributes. As in the paper, nothing tells the teacher to keep those titles to itself; the
    synth stage counts the critiques that name one (synth/critiques_naming_a_label)."""
    listing = "\n".join(f"{n}. {item}" for n, item in enumerate(items, 1))
    wanted = "\n\nWhat you really want:\n" + "\n".join(f"- {p}" for p in preference) if preference else ""
    return f"Conversation:\n{render_history(history)}\n\nRecommendations:\n{listing}{wanted}\n\n{CRITIQUE_INSTRUCTION}"


CRS_PROMPT = """You are a recommender chatting with a user to recommend {domain}s.

Conversation:
{history}

Recommend {n} {domain}s the user will like. Answer with exactly {n} lines, each formatted as "1. **Title (year)**", and nothing else."""  # noqa: E501  (prompt text, kept verbatim)

CRS_REVISE_PROMPT = """You are a recommender chatting with a user to recommend {domain}s.

Conversation:
{history}

You recommended:
{previous}
{feedback}
Recommend {n} {domain}s the user will like, all different from the ones above. Answer with exactly {n} lines, each formatted as "1. **Title (year)**", and nothing else."""  # noqa: E501  (prompt text, kept verbatim)


def crs_prompt(history: list[dict], n: int, *, previous: list[str] | None = None, critique: str | None = None) -> str:
    """Eq. 1: the history, and for a revision the previous list (with attributes) and the critique f_c."""
    if previous is None:
        return CRS_PROMPT.format(domain=DOMAIN, history=render_history(history), n=n)
    feedback = f"\nThe user's feedback on them: {critique}\n" if critique else ""
    return CRS_REVISE_PROMPT.format(
        domain=DOMAIN,
        history=render_history(history),
        n=n,
        feedback=feedback,
        previous="\n".join(f"{i}. {p}" for i, p in enumerate(previous, 1)),
    )


def parse_titles(text: str) -> list[str]:
    """The titles of a numbered list: per line the ``**bold**`` part (the paper's regex), else the line's text, since
    small models often drop the bold after the first line. Without numbered lines, every bold span."""
    lines = re.findall(r"^\s*\d+\s*[.)]\s*(.+?)\s*$", text, flags=re.M)
    if not lines:
        return [t.strip() for t in re.findall(r"\*\*(.*?)\*\*", text) if t.strip()]
    titles = []
    for line in lines:
        bold = re.search(r"\*\*(.+?)\*\*", line)
        title = (bold.group(1) if bold else line).strip(" *\"'")
        if title:
            titles.append(title)
    return titles


# ============================================================== reward: generative item scoring (Sec. 3.2.1, Eq. 2)
# The reward of a list is the simulated user's mean acceptance of its items. Each item is shown alone after the
# conversation (score_prompt); Phi_s reads the answer token after "Accept the recommendation (Yes/No)?".


def accept_probability(answer: dict[str, float]) -> float:
    """Phi_s: P(accept) = p(Yes) / (p(Yes) + p(No)) at the answer token, each answer summing its spellings
    (METHODS.md 5.7.2). The released code reads p(Yes) where "Yes" is the greedy token and 1 - p(No) where "No" is,
    which is p(Yes) + m, m being the probability of every other token: the two order items alike only where m is 0
    (a tuned user puts almost all its mass on the two answers; an untuned one may not)."""
    return answer["Yes"] / max(answer["Yes"] + answer["No"], 1e-12)


def list_reward(items: list[str], scores: dict[str, float]) -> float:
    """Eq. 2: f_s(I) = (1 / |I|) sum_{i in I} P(accept | C, i, d_s); an empty list gets 0."""
    return sum(scores[t] for t in items) / len(items) if items else 0.0


def score_items(user_llm, history: list[dict], cards: list[str]) -> list[float]:
    """P(accept) of each item card after ``history``, greedy, in batched forward passes. The items share the
    conversation, which a local backend computes once (``shared_prefix``)."""
    conversations = [[{"role": "user", "content": score_prompt(history, card)}] for card in cards]
    answers = user_llm.choice_probs(conversations, ("Yes", "No"), prefix=ANSWER_PREFIX, shared_prefix=True)
    return [accept_probability(answer) for answer in answers]


# =============================================================================================== synthesis


def sample_negatives(catalog_titles: list[str], exclude: set[str], k: int, rng: random.Random) -> list[str]:
    """k distinct titles from I minus I_k (and minus anything else in ``exclude``)."""
    pool = [t for t in catalog_titles if t not in exclude]
    return rng.sample(pool, min(k, len(pool)))


def synthesis_jobs(task: Task, catalog: Catalog, args: Args) -> tuple[list[dict], list[dict]]:
    """(critique jobs, scoring examples) for one training task (turn); negatives are seeded by the task, so every rank
    and every rerun draws the same ones.

    Critique lists: one per ground-truth subset of size < l (the smallest first, at most --max-subsets), filled
    with negatives and shuffled, plus --no-gt-lists lists of negatives only. Scoring: one Yes instance per
    ground-truth item and --scoring-negatives No instances each, every instance holding one item."""
    rng = random.Random(f"{args.seed}:{task.key}")
    exclude = set(task.labels) | set(task.mentioned)
    subsets = [
        list(s)
        for size in range(1, min(len(task.labels), args.list_length - 1) + 1)
        for s in combinations(task.labels, size)
    ][: args.max_subsets or None]
    lists = [s + sample_negatives(catalog.titles, exclude, args.list_length - len(s), rng) for s in subsets]
    lists += [sample_negatives(catalog.titles, exclude, args.list_length, rng) for _ in range(args.no_gt_lists)]
    preference = [catalog.card(t, CARD_FIELDS) for t in task.labels]
    critiques = []
    for j, items in enumerate(lists):
        rng.shuffle(items)
        shown = [catalog.card(t, CARD_FIELDS) for t in items]
        critiques.append(
            {
                "key": f"{task.key}|critique|{j}",
                "kind": "critique",
                "labels": task.labels,
                "items": items,
                "gt_in_list": sum(t in task.labels for t in items),
                "teacher_prompt": critique_prompt(task.history, shown, preference),
                "prompt": critique_prompt(task.history, shown),
            }
        )
    scoring = []
    for label in task.labels:
        negatives = sample_negatives(catalog.titles, exclude, args.scoring_negatives, rng)
        for title, answer in [(label, "Yes")] + [(t, "No") for t in negatives]:
            scoring.append(
                {
                    "key": f"{task.key}|score|{title}",
                    "kind": "score",
                    "item": title,
                    "prompt": score_prompt(task.history, catalog.card(title, CARD_FIELDS)),
                    "completion": f"{ANSWER_PREFIX} {answer}",
                }
            )
    return critiques, scoring


def synthesize(jobs: list[dict], *, teacher, args: Args, stats: ParseStats) -> Iterator[dict]:
    """Each job's instruction example as it is ready: a scoring example as it is; a critique job with the teacher's
    critique as the student's target (the student's prompt is the same without the preference). An empty critique
    is resampled, then dropped and counted in ``stats``."""
    yield from (job for job in jobs if job["kind"] == "score")
    critique_jobs = [job for job in jobs if job["kind"] == "critique"]
    for start in range(0, len(critique_jobs), args.batch_size):
        batch = critique_jobs[start : start + args.batch_size]
        # Greedy first; an empty critique is resampled at --temperature up to --max-resamples times.
        critiques, _ = chat_parsed(
            teacher,
            [[{"role": "user", "content": j["teacher_prompt"]}] for j in batch],
            lambda text: text or None,
            stats,
            max_tries=args.max_resamples + 1,
            temperature=0.0,
            retry_temperature=args.temperature,
            max_tokens=args.critique_max_tokens,
        )
        for job, text in zip(batch, critiques):
            if text is not None:
                named = any(mentions_title(text, label) for label in job["labels"])
                yield {**job, "completion": text, "names_label": named}


# =============================================================================================== ranking


def pooled_ranking(observations: list[tuple[str, float]]) -> list[str]:
    """Efficient candidate ranking: every item seen in the search, by its own score, the mean where it was scored
    more than once; ties keep the order of first appearance. ``observations`` are (item, score) in search order."""
    sums: dict[str, list[float]] = {}
    for title, score in observations:
        sums.setdefault(title, []).append(score)
    return sorted(sums, key=lambda t: -sum(sums[t]) / len(sums[t]))


def zero_shot_ranking(lists: list[list[str]]) -> list[str]:
    """The zero-shot CRS's ranking: its own greedy answer (``lists[0]``) first, then the search's N^2 initial
    samples merged rank by rank. @10 is exactly the greedy list; the merge only supplies the 50 items @50 needs.
    Neither the paper nor its released code says how Table 3's zero-shot @50 was computed (the code has no
    baseline and asks for 10 items), so this @50 is not comparable with the paper's."""
    merged = list(lists[0])
    for rank in range(max((len(items) for items in lists), default=0)):
        merged += [items[rank] for items in lists[1:] if rank < len(items)]
    return list(dict.fromkeys(merged))


# =============================================================================================== search


def search_shape(args: Args) -> tuple[int, int, int]:
    """(width, expansion, rounds) of each strategy, as in Table 6: ``rounds`` critique-and-revise rounds follow the
    N^2 initial lists, D - 1 of them for beam search, the initial lists being its first iteration (the released
    code: 16 + 4 x 16 = 80 lists at B = N = 4, D = 5). Monte Carlo and greedy keep beam's number of lists
    (B N (D - 1) after the initial ones; mc rounds up to a multiple of N^2): mc expands every initial list once;
    greedy keeps one list per round and expands it B N times ("greedy (large)", the paper's standard version);
    greedy-small keeps beam's expansion N, so it generates fewer lists ("greedy (small)")."""
    b, n, rounds = args.beam_width, args.expansion, args.depth - 1
    if args.search == "none":
        return 0, 0, 0
    if n * n < b:
        raise InputError(f"--beam-width {b} keeps more lists than the N^2 = {n * n} initial ones (--expansion {n})")
    if args.depth < 1:
        raise InputError(f"--depth {args.depth}: the search has at least its initial iteration (depth 1)")
    if args.search == "beam":
        return b, n, rounds
    if args.search == "greedy":
        return 1, b * n, rounds
    if args.search == "greedy-small":
        return 1, n, rounds
    return n * n, math.ceil(b * n * rounds / (n * n)), min(rounds, 1)  # mc


class Search:
    """The search-based interaction (Sec. 3.3) over a batch of tasks (test turns), level by level, so that every
    CRS, critique and scoring call of one level is one batched call across the tasks.

    A state is {items, reward, depth, parent, critique}; ``counts`` tallies the calls the bookkeeping test
    checks, per turn at beam search: crs_lists (the search's, N^2 + B N (D - 1)), zero_shot_lists (1, the
    baseline's greedy list), crs_calls (both, plus resamples), critiques (B N (D - 1)), lists_scored (N^2 + B N (D - 1))
    and items_scored (after the per-conversation cache)."""

    def __init__(self, *, crs, user_llm: HFChat, catalog: Catalog, args: Args):
        self.crs, self.user_llm, self.catalog, self.args = crs, user_llm, catalog, args
        counted = ("crs_lists", "zero_shot_lists", "crs_calls", "crs_resamples", "crs_wrong_count", "critiques")
        counted += ("critique_resamples", "critique_empty", "lists_scored", "items_scored")
        self.counts = dict.fromkeys(counted, 0)
        self.seen: list[list[dict]] = []  # per task, every state so far, in creation order (a state's id)

    def cost(self) -> tuple[int, int]:
        """(LLM calls, tokens) spent so far by the CRS and the simulated user."""
        usages = (self.crs.usage, self.user_llm.usage)
        return sum(u.calls for u in usages), sum(u.prompt_tokens + u.completion_tokens for u in usages)

    # ------------------------------------------------------------------ the CRS (transition function T)

    def generate_lists(self, prompts: list[str], temperatures: list[float]) -> list[list[str]]:
        """One list of catalog titles per prompt. Titles are fuzzy-matched to the catalog without repeats; a
        list with the wrong count is resampled (at --temperature) up to --max-resamples times, then the try
        closest to the right count is kept, cut to length."""
        n = self.args.list_length
        prefill = "1. **" if getattr(self.crs, "can_prefill", False) else ""  # start the format for small models
        best: list[list[str] | None] = [None] * len(prompts)
        pending = list(range(len(prompts)))
        for attempt in range(self.args.max_resamples + 1):
            if not pending:
                break
            if attempt:
                self.counts["crs_resamples"] += len(pending)
            self.counts["crs_calls"] += len(pending)
            temperature_of = {i: temperatures[i] if attempt == 0 else self.args.temperature for i in pending}
            still = []
            for temperature in sorted(set(temperature_of.values())):
                group = [i for i in pending if temperature_of[i] == temperature]
                outputs = self.crs.chat(
                    [[{"role": "user", "content": prompts[i]}] for i in group],
                    temperature=temperature,
                    max_tokens=self.args.crs_max_tokens,
                    prefix=prefill,
                )
                for i, (text,) in zip(group, outputs):
                    generated = parse_titles(prefill + text)
                    titles = self.catalog.match_all(generated)[:n]
                    if best[i] is None or abs(len(titles) - n) < abs(len(best[i]) - n):
                        best[i] = titles
                    if len(generated) != n:
                        still.append(i)
            pending = still
        self.counts["crs_wrong_count"] += len(pending)
        return [b or [] for b in best]

    def critique(self, histories: list[list[dict]], lists: list[list[str]], k: int) -> list[list[str]]:
        """k critiques f_c per list, sampled from the simulated user (temperature --temperature)."""
        if not self.args.critiques:
            return [[""] * k for _ in lists]
        convs = [
            [
                {
                    "role": "user",
                    "content": critique_prompt(
                        h, [self.catalog.card(t, CARD_FIELDS if self.args.critique_attributes else ()) for t in items]
                    ),
                }
            ]
            for h, items in zip(histories, lists)
            for _ in range(k)
        ]
        stats = ParseStats()
        with adapter_off(self.user_llm.model, not self.args.tuned_critic):
            # An empty critique is resampled up to --max-resamples times, then left empty.
            _, texts = chat_parsed(
                self.user_llm,
                convs,
                lambda text: text or None,
                stats,
                max_tries=self.args.max_resamples + 1,
                temperature=self.args.temperature,
                retry_temperature=self.args.temperature,
                max_tokens=self.args.critique_max_tokens,
            )
        self.counts["critique_resamples"] += stats.retries
        self.counts["critique_empty"] += stats.failures
        self.counts["critiques"] += len(convs)
        return [texts[j * k : (j + 1) * k] for j in range(len(lists))]

    # ------------------------------------------------------------------ the reward (generative item scoring)

    def score(self, tasks: list[Task], frontiers: list[list[dict]], caches: list[dict[str, float]]) -> None:
        """Give every state its reward f_s (Eq. 2): score its items not yet in the turn's cache, then average. The
        reward is P(accept) under every --scoring, as in the released code, where the votes only rank the output
        (``item_scores``). Usage counts one call per item with its full prompt, as an API would bill."""
        for task, states, cache in zip(tasks, frontiers, caches):
            self.counts["lists_scored"] += len(states)
            new = list(dict.fromkeys(t for s in states for t in s["items"] if t not in cache))
            if new:
                with adapter_off(self.user_llm.model, not self.args.tuned_scorer):
                    cards = [self.catalog.card(t, CARD_FIELDS) for t in new]
                    cache.update(zip(new, score_items(self.user_llm, task.history, cards)))
                self.counts["items_scored"] += len(new)
            for s in states:
                s["reward"] = list_reward(s["items"], cache)

    def item_scores(self, states: list[dict], cache: dict[str, float]) -> dict[str, float]:
        """Each item's score in the final ranking, under --scoring. Generative scores are greedy and cached, so "the
        mean of repeated scorings" is the one cached value; majority counts the share of lists holding the item (the
        released code's item_all_vote, summed); weighted-majority multiplies that share by P(accept) (the order of the
        released item_all_reward summed over the lists that hold the item)."""
        if self.args.scoring == "generative":
            return {t: cache[t] for s in states for t in s["items"]}
        share: dict[str, float] = {}
        for s in states:
            for t in s["items"]:
                share[t] = share.get(t, 0.0) + 1.0 / len(states)
        if self.args.scoring == "majority":
            return share
        return {t: share[t] * cache[t] for t in share}

    # ------------------------------------------------------------------ beam search and ranking

    def results(self, tasks: list[Task]) -> Iterator[dict]:
        """Each task's search record as its batch of --examples-per-batch tasks ends, with its share of the batch's
        LLM calls and tokens (split evenly)."""
        for start in range(0, len(tasks), self.args.examples_per_batch):
            batch = tasks[start : start + self.args.examples_per_batch]
            before = self.cost()
            records = self.rollout(batch)
            calls, tokens = (now - then for now, then in zip(self.cost(), before))
            yield from ({**r, "llm_calls": calls / len(batch), "tokens": tokens / len(batch)} for r in records)

    def rollout(self, tasks: list[Task]) -> list[dict]:
        """Sec. 3.3 on a batch of tasks: the N^2 initial lists, then rounds of (reward every list of the frontier,
        keep the best B, expand each by N critiques and revisions), the last frontier rewarded too; then each
        task's record with its ranking."""
        width, expansion, rounds = search_shape(self.args)
        greedy, frontiers = self.initial_lists(tasks)
        caches: list[dict[str, float]] = [{} for _ in tasks]
        for level in range(1, rounds + 1):
            self.score(tasks, frontiers, caches)
            kept = [sorted(f, key=lambda s: -s["reward"])[:width] for f in frontiers]
            frontiers = self.expand(tasks, kept, level, expansion)
        if self.args.search != "none":
            self.score(tasks, frontiers, caches)
        return [self.record(*outcome) for outcome in zip(tasks, self.seen, caches, greedy)]

    def initial_lists(self, tasks: list[Task]) -> tuple[list[list[str]], list[list[dict]]]:
        """(the zero-shot CRS's own answer, greedy, for the baseline only; per task its N^2 initial states, their
        lists all sampled). They start ``seen``."""
        args, n = self.args, self.args.expansion
        greedy = self.generate_lists([crs_prompt(t.history, args.list_length) for t in tasks], [0.0] * len(tasks))
        self.counts["zero_shot_lists"] += len(tasks)
        prompts = [crs_prompt(t.history, args.list_length) for t in tasks for _ in range(n * n)]
        lists = self.generate_lists(prompts, [args.temperature] * len(prompts))
        self.counts["crs_lists"] += len(prompts)
        frontiers = [
            [
                {"id": j, "items": lists[i * n * n + j], "depth": 0, "parent": None, "critique": None}
                for j in range(n * n)
            ]
            for i in range(len(tasks))
        ]
        self.seen = [list(f) for f in frontiers]
        return greedy, frontiers

    def expand(self, tasks: list[Task], kept: list[list[dict]], level: int, expansion: int) -> list[list[dict]]:
        """Eq. 1 on each kept state: ``expansion`` critiques f_c of its list, and the CRS's revision after each, the
        next frontier (appended to ``seen``)."""
        flat = [(i, s) for i, states in enumerate(kept) for s in states]
        critiques = self.critique([tasks[i].history for i, _ in flat], [s["items"] for _, s in flat], expansion)
        jobs = [(i, s, c) for (i, s), cs in zip(flat, critiques) for c in cs]
        prompts = []
        for i, s, c in jobs:
            cards = [self.catalog.card(t, CARD_FIELDS) for t in s["items"]]
            prompts.append(crs_prompt(tasks[i].history, self.args.list_length, previous=cards, critique=c))
        revised = self.generate_lists(prompts, [self.args.temperature] * len(jobs))
        self.counts["crs_lists"] += len(jobs)
        frontiers = [[] for _ in tasks]
        for (i, parent, c), items in zip(jobs, revised):
            state = {"id": len(self.seen[i]), "items": items, "depth": level, "parent": parent["id"], "critique": c}
            frontiers[i].append(state)
            self.seen[i].append(state)
        return frontiers

    def record(self, task: Task, states: list[dict], cache: dict[str, float], greedy: list[str]) -> dict:
        """A task's search record: every state, every item's P(accept), and the rankings of GRSU (under --ranking
        and --scoring) and of the zero-shot CRS."""
        n = self.args.expansion
        zero_shot = zero_shot_ranking([greedy] + [s["items"] for s in states[: n * n]])
        if self.args.search == "none":
            ranked = zero_shot
        elif self.args.ranking == "best-list":
            ranked = list(max(states, key=lambda s: s["reward"])["items"])
        else:
            scores = self.item_scores(states, cache)
            ranked = pooled_ranking([(t, scores[t]) for s in states for t in s["items"]])
        return {
            "key": task.key,
            "labels": task.labels,
            "mentioned": task.mentioned,
            "ranked": ranked,
            "zero_shot": zero_shot,
            "greedy": greedy,
            "states": states,
            "item_scores": {t: round(p, 5) for t, p in cache.items()},
        }


def adapter_off(model, off: bool):
    """A context in which a peft model runs without its adapter (the untuned user, for the ablations)."""
    return model.disable_adapter() if off and hasattr(model, "disable_adapter") else contextlib.nullcontext()


# =============================================================================================== evaluation


def ranking_metrics(
    records: list[dict], field: str, *, ks: tuple[int, ...], prefix: str, remove_mentioned: bool = False
) -> dict[str, float]:
    """Recall, NDCG and MRR@k of each label (one relevant item; each @k on its own top-k slice), averaged two ways:
    within each turn and then over turns, the paper's "average scores on all the test examples" and the released
    code's (``<prefix>/...``, the headline); and over every (turn, label) pair (``<prefix>_pairs/...``). A label
    outside the catalog is never ranked, so it counts as a miss."""
    per_turn, per_pair, pairs = defaultdict(float), defaultdict(float), 0
    for record in records:
        mentioned = set(record["mentioned"]) if remove_mentioned else set()
        ranked = [t for t in record[field] if t not in mentioned]
        scores = defaultdict(float)
        for label in record["labels"]:
            for k in ks:
                scores[f"recall@{k}"] += recall_at_k(ranked, [label], k)
                scores[f"ndcg@{k}"] += ndcg_at_k(ranked, [label], k)
                scores[f"mrr@{k}"] += mrr_at_k(ranked, [label], k)
        for name, total in scores.items():
            per_turn[name] += total / len(record["labels"])
            per_pair[name] += total
        pairs += len(record["labels"])
    if not pairs:
        return {}
    return {f"{prefix}/{name}": value / len(records) for name, value in per_turn.items()} | {
        f"{prefix}_pairs/{name}": value / pairs for name, value in per_pair.items()
    }


def search_metrics(records: list[dict], *, catalog: Catalog, args: Args, dropped: dict | None) -> dict[str, float]:
    """The evaluation of the searched tasks' records: GRSU's and the zero-shot CRS's rankings, the labels outside the
    catalog (misses) and those ``dropped`` with their turns (when the whole split was searched), and the cost of the
    search, each record holding its share of its batch's."""
    calls, tokens = sum(r["llm_calls"] for r in records), sum(r["tokens"] for r in records)
    titles = set(catalog.titles)
    return {
        **ranking_metrics(records, "ranked", ks=args.ks, prefix="eval", remove_mentioned=args.remove_mentioned),
        **ranking_metrics(
            records, "zero_shot", ks=args.ks, prefix="eval_zeroshot", remove_mentioned=args.remove_mentioned
        ),
        "eval/examples": len(records),
        "eval/pairs": sum(len(r["labels"]) for r in records),
        "eval/labels_outside_catalog": sum(label not in titles for r in records for label in r["labels"]),
        **({f"eval/{k}_dropped_outside_catalog": v for k, v in dropped.items()} if dropped is not None else {}),
        "cost/llm_calls": round(calls),
        "cost/tokens": round(tokens),
        "cost/llm_calls_per_example": calls / len(records),
        "cost/tokens_per_example": tokens / len(records),
    }


def print_example(record: dict) -> None:
    print(f"\n=== {record['key']}  labels: {record['labels']}")
    for j, s in enumerate(record["states"]):
        critique = f"  <- {s['critique'][:100]!r}" if s["critique"] else ""
        print(f"  [{j}] d{s['depth']} r={s.get('reward', float('nan')):.3f} {s['items'][:4]}{critique}")
    print(f"  GRSU top-10: {record['ranked'][:10]}\n  zero-shot top-10: {record['zero_shot'][:10]}")


# =============================================================================================== stages


def load_user(args: Args, model_dir: Path | None, device):
    """(model, tokenizer) of the simulated user: the base model, with the tuned adapter (LoRA) or the tuned weights
    (full) when ``model_dir`` holds them. The adapter stays unmerged so the ablations can switch it off."""
    from peft import PeftModel

    if model_dir is not None and args.finetune == "full" and not (args.tuned_critic and args.tuned_scorer):
        raise InputError("the untuned-critic/scorer ablations switch off a LoRA adapter; use --finetune lora")
    if model_dir is not None and args.finetune == "full":
        model, tokenizer = load_model(str(model_dir))
    else:
        model, tokenizer = load_model(args.user_model)
        if model_dir is not None:
            model = PeftModel.from_pretrained(model, model_dir)
    return model.to(device).eval(), tokenizer


def synthesize_instructions(run: Run, args: Args) -> dict:
    """Sec. 3.2.2: critique and scoring instruction data from each training dataset's recommendation turns."""
    teacher, metrics, naming = run.llm(args.teacher_llm, args.batch_size), {}, 0
    for name in args.train_datasets or (args.dataset,):
        dataset = data_of(args, name)
        tasks, left_out = dataset.train[: args.num_train_turns or None], dataset.left_out
        if run.main:
            print(
                f"synth: {len(tasks)} training turns of {name} ({left_out} left out: their conversation is evaluated)"
            )
        catalog = Catalog(dataset.items)
        jobs = [job for task in tasks for part in synthesis_jobs(task, catalog, args) for job in part]
        stats = ParseStats()
        examples = run.map("instructions.jsonl", jobs, partial(synthesize, teacher=teacher, args=args, stats=stats))
        run.count({"synth/critique_resamples": stats.retries, "synth/critique_empty": stats.failures})
        metrics |= {f"synth/{name}_turns": len(tasks), f"synth/{name}_turns_left_out": left_out}
        naming += sum(r.get("names_label", False) for r in examples)
    if run.main:  # the teacher sees the wanted titles (p_k) and may name them: its student then learns to name titles
        run.count({"synth/critiques_naming_a_label": naming})
    run.count(teacher.usage.metrics("cost/synth_"))
    return metrics


def tune_user(run: Run, args: Args) -> dict:
    """Sec. 3.2.2, Eq. 4: instruction tuning of the simulated user on both behaviours' data (LoRA or full)."""
    if run.finished("user_model"):
        return {}
    data = sorted(run.records("instructions.jsonl").records(), key=lambda r: r["key"])
    if not data:
        raise InputError(f"{run.dir / 'instructions.jsonl'} holds no instruction data: run the synth stage first")
    # Every weight that trains is fp32, for AdamW's small steps (accelerate's mixed precision still computes in bf16):
    # the whole model under --finetune full, the adapter alone (peft's choice) on a default-dtype base under lora.
    model, tokenizer = load_model(args.user_model, dtype=torch.float32 if args.finetune == "full" else None)
    if args.finetune == "lora":
        torch.manual_seed(args.seed)  # the same adapter init on every rank and every rerun
        model = add_lora(model, rank=args.lora_rank, alpha=args.lora_alpha)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    examples = []
    for r in data:
        prompt = [{"role": "user", "content": r["prompt"]}]
        ids, mask = encode_prompt_completion(tokenizer, prompt, r["completion"], max_length=args.max_length)
        examples.append({"input_ids": ids, "completion_mask": mask})
    run.save_dataset("instructions", [sft_row(r["prompt"], r["completion"]) for r in data])
    if run.main:
        kinds = [r["kind"] for r in data]
        print(f"train: {kinds.count('critique')} critique and {kinds.count('score')} scoring examples")
    # Eq. 4: the NLL of the response tokens, their mean over each global batch (common/sft.py)
    lr = args.lr if args.lr is not None else (1e-4 if args.finetune == "lora" else 1e-6)
    model = supervised_finetuning(
        run, args, model.to(run.device), tokenizer, examples, "user", lr=lr, batch_size=args.train_batch_size,
        epochs=args.epochs, warmup_ratio=args.max_warmup_ratio, max_warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio, keep_checkpoints=args.keep_checkpoints,
        weight_decay=args.weight_decay,
    )  # fmt: skip
    tokenizer = tokenizer if args.finetune == "full" else None
    save_final(run.accelerator, model, run.dir / "user_model", {"examples": len(examples)}, tokenizer=tokenizer)
    return {}


def search_and_rank(run: Run, args: Args) -> dict:
    """Sec. 3.3: per test turn, the beam search steered by the simulated user's rewards and critiques, then every
    item seen ranked by its own score; Recall/NDCG/MRR beside the zero-shot CRS's own ranking."""
    tuned = run.finished("user_model")
    if run.main and not tuned:
        print("search: no tuned simulated user in this run; scoring and critiques come from the base model")
    dataset = data_of(args, args.dataset)
    if run.main and args.outside_catalog == "drop":
        dropped = dataset.outside
        print(f"search: {dropped['labels']} labels of the {args.eval_split} split are outside the catalog: dropped, "
              f"with the {dropped['turns']} turns left without one (--outside-catalog miss keeps them)")  # fmt: skip
    tasks = dataset.evaluated[: args.num_test or None]
    user_model, user_tokenizer = load_user(args, run.dir / "user_model" if tuned else None, run.device)
    user_llm = run.count_costs(HFChat(user_model, user_tokenizer, batch_size=args.batch_size))
    crs, catalog = run.llm(args.crs_llm, args.batch_size), Catalog(dataset.items)
    search = Search(crs=crs, user_llm=user_llm, catalog=catalog, args=args)
    records = run.map(f"search_{args.search}.jsonl", tasks, search.results, desc=f"{args.search} search")
    run.count({f"search/{k}": v for k, v in search.counts.items()})
    if args.print_examples and run.main:
        for record in records:
            print_example(record)
    if not records:
        return {}
    whole_split = len(tasks) == len(dataset.evaluated)  # the drop counts are the whole split's
    return search_metrics(records, catalog=catalog, args=args, dropped=dataset.outside if whole_split else None)


def check_args(args: Args, world: int) -> list[str]:
    """Flags that cannot work on ``world`` ranks, refused before anything loads: a search shape that cannot search,
    a training batch that does not split evenly into ranks x micro-batches. Returns the split, for the dry run."""
    if "search" in args.stages:
        search_shape(args)
    if "train" not in args.stages:
        return []
    return [check_division(world, args.train_batch_size, args.micro_batch_size, "--train-batch-size")]


def data_sizes(args: Args) -> dict[str, int]:
    """What the stages asked for would read, loaded (for the dry run: every file they need exists and parses)."""
    sizes = {}
    synthesized = (args.train_datasets or (args.dataset,)) if "synth" in args.stages else ()
    for name in synthesized:
        turns = data_of(args, name).train
        sizes[f"{name} training turns"] = len(turns[: args.num_train_turns or None])
    if "search" in args.stages:
        dataset = data_of(args, args.dataset)
        sizes[f"{args.dataset} {args.eval_split} turns"] = len(dataset.evaluated[: args.num_test or None])
        if args.outside_catalog == "drop":
            sizes[f"{args.eval_split} labels outside the catalog (dropped)"] = dataset.outside["labels"]
    return sizes


def print_table(metrics: dict, search: str) -> None:
    ks = sorted({int(key.split("@")[1]) for key in metrics if key.startswith("eval/recall@")})
    if not ks:
        return
    columns = [f"{m}@{k}" for m in ("recall", "ndcg", "mrr") for k in ks]
    print(f"\n{'':14}" + "".join(f"{c:>11}" for c in columns))
    for name, prefix in (("zero-shot", "eval_zeroshot"), (f"GRSU ({search})", "eval")):
        print(f"{name:14}" + "".join(f"{metrics.get(f'{prefix}/{c}', float('nan')):11.3f}" for c in columns))
    print(f"(averaged over {metrics['eval/examples']} turns; {metrics['eval/pairs']} (turn, label) pairs; "
          f"{metrics['eval/labels_outside_catalog']} labels outside the catalog, counted as misses)")  # fmt: skip


# =============================================================================================== main


# What runs/<run>/curves.png draws: the simulated user's loss, and the ranking beside the zero-shot CRS's.
CURVES = {"simulated user loss (Eq. 4)": ["train/loss"]}
BARS = {
    "Recall@10": ["eval_zeroshot/recall@10", "eval/recall@10"],
    "NDCG@10": ["eval_zeroshot/ndcg@10", "eval/ndcg@10"],
}


def main(args: Args) -> None:
    check_specs(args)  # a wrong model or LLM spec stops here, not after minutes of an earlier stage
    batches = check_args(args, args.dry_run or launched_processes())
    if args.dry_run:
        print_dry_run("grsu.py", args.dry_run, batches, data_sizes(args))
        return
    run = Run(args)  # runs/<run_name>/, ranks, seeding, metrics; each run.stage is timed and its LLM costs booked
    run.stage("synth", synthesize_instructions, args)  # critique and scoring data written by a teacher
    run.stage("train", tune_user, args)  # Eq. 4: instruction tuning of the simulated user
    run.stage("search", search_and_rank, args)  # beam search on its rewards (Eq. 2) and critiques; pooled ranking
    run.finish(partial(print_table, search=args.search), CURVES, BARS)


if __name__ == "__main__":
    try:
        main(parse_args(Args, PRESETS))
    except (InputError, ModelSpecError, LLMBackendError) as err:
        raise SystemExit(f"error: {err}") from None
