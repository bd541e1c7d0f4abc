"""SMTPO: Simulator-guided Multi-Turn Preference Optimization for a reasoning LLM recommender (METHODS.md Sec. 3).
Docs: docs/smtpo.md.

    python smtpo.py                                    # every stage on the embedded SmolLM2 + the bundled demo
    python smtpo.py --dataset inspired --num-test 20   # INSPIRED (validation split) from --data-dir
    accelerate launch smtpo.py --dataset redial        # rollouts, synthesis and training over ranks
    python smtpo.py --run-name <run> --stages eval --noisy-feedback   # Table 3's controls on a trained run
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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm

from common.catalog import Catalog, item_card
from common.conversations import render_history
from common.data import (
    DataError,
    Dialogue,
    load_cfcrs_dialogues,
    load_cfcrs_kg,
    load_demo_catalog,
    load_ievalm_turns,
    load_redial_official,
    load_unicrs_jsonl,
    restore_years,
)
from common.distributed import (
    generation_weights,
    micro_batches,
    optimizer_step,
    save_final,
    save_resumable,
    start_training,
    training_steps,
)
from common.llm import HFChat, LLMBackendError
from common.metrics import mrr_at_k, ndcg_at_k, recall_at_k
from common.models import ModelSpecError, load_merged
from common.parsing import ParseStats, chat_parsed
from common.run import Run
from common.sft import supervised_finetuning
from common.tokens import collate, encode_prompt_completion, sequence_logprobs

STAGES = ("simulator", "retriever", "sft", "grpo", "eval")


@dataclass
class Args:
    exp_name: str = "smtpo"
    """the name of this experiment (prefix of the default run name)"""
    seed: int = 1
    """seed of python, numpy and torch: negatives, LoRA init, data order, sampled outputs"""
    run_name: str | None = None
    """outputs go to runs/<run_name>/; rerun with the same name to resume (default: <exp_name>__<seed>__<time>)"""
    stages: tuple[Literal["simulator", "retriever", "sft", "grpo", "eval"], ...] = STAGES
    """which stages to run, in pipeline order; each reads what the earlier ones left in the run folder"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works) as well as runs/<run_name>/metrics.jsonl"""
    wandb_project: str = "cleancrs"
    """the W&B project"""
    wandb_entity: str | None = None
    """the W&B entity (team); None uses your default"""

    # ------------------------------------------------------------------------------------------- data
    dataset: Literal["demo", "inspired", "redial"] = "demo"
    """demo (bundled), inspired (UniCRS train, CFCRS valid/test, the CFCRS KG) or redial (official train, iEvaLM
    valid/test and KG)"""
    data_dir: str = "../shared/data"
    """root of the real data (docs/data.md); unused for the demo"""
    eval_split: Literal["valid", "test"] = "valid"
    """valid for development; test is held out: use it only for final numbers"""
    num_train: int = 4
    """training turns (a context ending at a recommendation turn) for the simulator and the recommender; 0 = all"""
    num_test: int = 2
    """test dialogues, each run through all --max-turns turns; 0 = all"""

    # ------------------------------------------------------------------------------------------- roles
    policy: str = "smollm2-135m"
    """the recommender (paper: deepseek-ai/DeepSeek-R1-Distill-Llama-8B)"""
    simulator_model: str = "smollm2-135m"
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
    simulator_predictions: int = 1
    """target-prediction (Yes/No) examples per training turn: the target and negatives from the lists"""
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
    retriever_patience: int = 5
    """epochs without a better held-out Recall@20 before stopping"""
    retriever_lr: float = 5e-5
    """fusion-head learning rate, Adam (paper: 5e-5)"""
    negatives: int = 64
    """InfoNCE negatives per example, excluding the target and the mentioned items (METHODS.md default: 64)"""
    num_candidates: int = 20
    """candidates the retriever recalls for the recommender (paper: 20)"""

    # ------------------------------------------------------------------------------------------- recommender
    list_length: int = 10
    """titles in the RANK LIST (paper: 10)"""
    max_turns: int = 2
    """T: recommender calls per dialogue, the first without feedback (paper: 5)"""
    rec_max_tokens: int = 192
    """length cap of one recommender output (reasoning and list; paper: 2048 in all)"""
    think_prefill: bool = True
    """open every recommender output with "<think>" pre-filled after the assistant header, as the chat template of
    the paper's DeepSeek-R1-Distill backbone does; the tag counts as part of the output for the format rewards"""
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
    """gradient clipping"""
    save_every: int = 1
    """optimizer steps between resumable checkpoints"""

    # ------------------------------------------------------------------------------------------- GRPO
    group_size: int = 4
    """G: outputs sampled from one shared prompt (paper: 4)"""
    grpo_steps: int = 5
    """GRPO optimizer steps; each rolls out --dialogues-per-step dialogues through all their turns"""
    dialogues_per_step: int = 1
    """training dialogues rolled out per optimizer step; each turn is one group, so a step has up to this x T groups
    (paper: gradient accumulation 8, i.e. 8 groups)"""
    grpo_lr: float = 1e-3
    """GRPO learning rate (paper: 1e-5; the demo's 5 steps of 2 groups on a 135M model need a much larger step for
    the format rewards to move)"""
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


# =============================================================================================== data


@dataclass
class Sample:
    """A conversation context ending at a recommendation turn; the item recommended there is the target i*."""

    key: str
    history: list[dict]  # chat roles: "user" the seeker, "assistant" the recommender
    mentioned: list[str]  # I_D: the items and entities the context mentions
    target: str


@dataclass
class Data:
    train: list[Sample]
    held_out: list[Sample]  # a tenth of the training turns, for the retriever's early stopping
    test: list[Sample]
    catalog: Catalog
    domain: str = "movie"


def make_samples(dialogues: list[Dialogue], titles: set[str]) -> list[Sample]:
    """One sample per recommender turn with history whose first recommended item is in the catalog and was not
    mentioned before (the retriever never recalls a mentioned item); I_D is what the dialogue annotates before the
    turn (items and entities, or iEvaLM's context annotations)."""
    samples = []
    for dialogue in dialogues:
        for i, turn in enumerate(dialogue.turns):
            history = [
                {"role": "user" if t.role == "seeker" else "assistant", "content": t.text}
                for t in dialogue.turns[:i]
                if t.text.strip()
            ]
            mentioned = dialogue.context_items
            if mentioned is None:
                mentioned = [m for t in dialogue.turns[:i] for m in t.items + t.entities]
            targets = [t for t in turn.items if t in titles and t not in mentioned]  # a new item: never a repeat
            if turn.role != "recommender" or not targets or not history:
                continue
            samples.append(Sample(f"{dialogue.dialog_id}:{i}", history, list(dict.fromkeys(mentioned)), targets[0]))
    return samples


def load_data(args: Args) -> Data:
    """Training turns (in order; a tenth held out for the retriever), the evaluated split's turns, and the catalog
    with the attributes of the dataset's KG. The evaluated split's conversations never train anything."""
    root = Path(args.data_dir)
    if args.dataset == "demo":
        items = load_demo_catalog()
        train = load_unicrs_jsonl(Path(__file__).parent / "data" / "demo" / "dialogues_train.jsonl")
        evaluated = load_unicrs_jsonl(Path(__file__).parent / "data" / "demo" / "dialogues_test.jsonl")
    elif args.dataset == "inspired":
        items = load_cfcrs_kg(root / "inspired" / "cfcrs")
        train = load_unicrs_jsonl(root / "inspired" / "unicrs" / "train_data_dbpedia.jsonl")
        restore_years(train, items)
        evaluated = load_cfcrs_dialogues(root / "inspired" / "cfcrs" / f"{args.eval_split}_data.jsonl")
    else:
        items = load_cfcrs_kg(root / "redial" / "ievalm")  # the same KG format: star, director, genre, writer
        official = root / "redial" / "official"
        train = load_redial_official(official / "train_subset_500.jsonl")
        train += load_redial_official(official / "valid_subset_100.jsonl")
        evaluated = load_ievalm_turns(root / "redial" / "ievalm" / f"{args.eval_split}_data_processed.jsonl")
        held = {d.conversation_id for d in evaluated}
        train = [d for d in train if d.dialog_id not in held]  # 50 of them are in iEvaLM's validation file
    catalog = Catalog(items, encoder=args.text_encoder)
    titles = set(catalog.titles)
    samples = make_samples(train, titles)
    random.Random(args.seed).shuffle(samples)
    if args.num_train:  # a tenth more than --num-train, held out: every held-out turn costs teacher calls
        samples = samples[: args.num_train + max(1, args.num_train // 10)]
    held_out = samples[: max(1, len(samples) // 10)]
    train_samples = samples[len(held_out) :]
    test = make_samples(evaluated, titles)[: args.num_test or None]
    if not train_samples or not test:
        raise DataError(f"{args.dataset}: {len(train_samples)} training and {len(test)} test turns with a target")
    return Data(train_samples, held_out, test, catalog)


def attributes_of(catalog: Catalog, title: str) -> set[str]:
    item = catalog.by_title.get(title)
    if item is None:
        return set()
    return {f"{k}: {v}" for k in ("genre", "director", "star", "writer") for v in item.attributes.get(k) or []}


def card(catalog: Catalog, title: str) -> str:
    item = catalog.by_title.get(title)
    return item_card(item, ("genre", "director", "star")) if item else title


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

IRRELEVANT_CHAT = (
    "By the way, the weather has been lovely this week.",
    "I had pasta for dinner yesterday.",
    "My cat keeps sitting on my keyboard.",
    "I need to buy new running shoes soon.",
)


def mentioned_text(sample: Sample) -> str:
    return ", ".join(sample.mentioned) or "(nothing)"


def feedback_prompt(sample: Sample, recommendations: list[str], catalog: Catalog, target_note: bool = False) -> str:
    """Task 1, feedback generation (D, I_D, R) -> F; the teacher's version also shows the target (Eq. 3)."""
    listing = "\n".join(f"{k}. {card(catalog, t)}" for k, t in enumerate(recommendations, 1)) or "(none yet)"
    prompt = FEEDBACK_PROMPT.format(
        history=render_history(sample.history), mentioned=mentioned_text(sample), recommendations=listing
    )
    if target_note:
        attributes = "; ".join(sorted(attributes_of(catalog, sample.target))) or "no attributes"
        prompt += FEEDBACK_TARGET_NOTE.format(target=sample.target, attributes=attributes)
    return prompt


def recommender_prompt(sample: Sample, candidates: list[str], feedback: str, context: str, n: int) -> str:
    """Q = {Inst, D, I_D, I_cand, F}, with the earlier turns compressed to their feedback and lists (METHODS 3.9.8)."""
    return RECOMMENDER_PROMPT.format(
        history=render_history(sample.history),
        mentioned=mentioned_text(sample),
        context=context,
        feedback=feedback or "(none yet)",
        candidates="\n".join(f"- {t}" for t in candidates),
        n=n,
    )


def turn_context(turns: list[dict]) -> str:
    """The compressed C_{t-1}: each earlier turn's feedback and list, titles only."""
    return "".join(f"Turn {t['turn']}: feedback: {t['feedback'] or '-'}; list: {t['ranked']}\n" for t in turns)


# =============================================================================================== parsing

THINK_PREFIX = "<think>\n"
STEP_HEADER = re.compile(r"Step\s*\d+\s*[:.]", re.IGNORECASE)  # METHODS.md 3.9.6
RANK_LIST = re.compile(r"RANK LIST:\s*\[(.+)\]", re.DOTALL)


def split_output(text: str) -> tuple[str, str]:
    """(the reasoning inside <think>...</think>, the text after it); a missing </think> leaves no answer."""
    start = text.find("<think>")
    end = text.find("</think>")
    if end == -1:
        return text[start + 7 if start != -1 else 0 :], ""
    return text[start + 7 if -1 < start < end else 0 : end], text[end + len("</think>") :]


def preference_text(text: str) -> str:
    """P_t: the Step 1 text of the reasoning (empty if there is none)."""
    thought, _ = split_output(text)
    match = re.search(
        r"Step\s*1\s*[:.]\s*(?:Preference Inference\s*[:.-]?)?(.*?)(?=Step\s*2\s*[:.]|$)", thought, re.S | re.I
    )
    return " ".join(match.group(1).split()) if match else ""


def parse_rank_list(text: str, candidates: list[str]) -> list[str] | None:
    """The ranked candidates of the answer's RANK LIST, in order, or None without one. Titles can hold commas and
    brackets, so the known candidate titles are found in order of appearance inside the brackets; what is left
    between them is fuzzy-matched (rapidfuzz, cutoff 85) to the unused candidates; duplicates and titles outside
    the candidates are dropped (METHODS.md 3.9.7)."""
    _, answer = split_output(text)
    match = RANK_LIST.search(answer)
    if match is None:
        return None
    from rapidfuzz import fuzz, process, utils

    inside = match.group(1)
    found: list[tuple[int, int, str]] = []  # (start, end, title) of the exact mentions
    for title in sorted(candidates, key=len, reverse=True):  # longest first: "Alien" inside "Aliens (1986)"
        for m in re.finditer(re.escape(title), inside, re.IGNORECASE):
            if not any(s <= m.start() < e or s < m.end() <= e for s, e, _ in found):
                found.append((m.start(), m.end(), title))
    blanked = inside
    for start, end, _ in found:  # keep every position: the leftovers are ranked where they stand
        blanked = blanked[:start] + "," * (end - start) + blanked[end:]
    placed = [(start, title) for start, _, title in found]
    for piece in re.finditer(r"[^,]+", blanked):
        text = piece.group().strip(" '\"")
        unused = [c for c in candidates if c not in {t for _, t in placed}]
        best = process.extractOne(text, unused, scorer=fuzz.QRatio, processor=utils.default_process, score_cutoff=85)
        if text and best:
            placed.append((piece.start(), best[0]))
    return list(dict.fromkeys(title for _, title in sorted(placed)))


# =============================================================================================== rewards (Sec. 3.4.2)


def process_format_reward(text: str) -> float:
    """Eq. 15: r_think = 1 - |N_match - 5| / 5 if 1 <= N_match <= 7, else 0; N_match counts the step headers inside
    <think> (repeated ones too)."""
    thought, _ = split_output(text)
    matches = len(STEP_HEADER.findall(thought)) if "<think>" in text else 0
    return 1 - abs(matches - 5) / 5 if 1 <= matches <= 7 else 0.0


def answer_format_reward(text: str) -> float:
    """Eq. 16: r_answer = 1 if the text after </think> holds RANK LIST: [...], else 0."""
    _, answer = split_output(text)
    return float(RANK_LIST.search(answer) is not None)


def hit_reward(ranked: list[str], target: str) -> float:
    """Eq. 17: r_hit = 1 if i* is in R_t."""
    return float(target in ranked)


def rank_reward(ranked: list[str], target: str) -> float:
    """Eq. 18: r_rank = 1 - (pos(i*) - 1) / len(R_t) for i* in R_t (1-based position), else 0."""
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
    + b2; the collaborative view attends from e_s' over the entity embeddings of I_D and the list R, the semantic
    view from their mean over the adapted embeddings of the dialogue, the feedback and the preference; the
    conversation is e = [e_c^ ; e_s^] and an item [i_c ; i_s]. ``views`` keeps one side only (the ablations)."""

    def __init__(self, text_dim: int, graph_dim: int, views: str = "both"):
        super().__init__()
        self.adapter = torch.nn.Sequential(
            torch.nn.Linear(text_dim, text_dim // 2), torch.nn.Linear(text_dim // 2, graph_dim)
        )
        self.graph_q, self.graph_k, self.graph_v = (torch.nn.Linear(graph_dim, graph_dim, bias=False) for _ in range(3))
        self.text_q, self.text_k, self.text_v = (torch.nn.Linear(graph_dim, graph_dim, bias=False) for _ in range(3))
        self.views = views

    @staticmethod
    def attend(query, keys, values, mask):
        scores = (query[:, None, :] * keys).sum(-1) / math.sqrt(query.shape[-1])
        weights = scores.masked_fill(~mask, -1e9).softmax(-1)
        return (weights[:, :, None] * values).sum(1)

    def forward(self, texts, text_mask, entities, entity_mask):
        """texts [B, 3, Ds] (dialogue, feedback, preference), entities [B, M, Dc] -> e [B, 2 Dc]."""
        adapted = self.adapter(texts)
        pooled_text = (adapted * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True).clamp(min=1)
        pooled_graph = (entities * entity_mask[..., None]).sum(1) / entity_mask.sum(1, keepdim=True).clamp(min=1)
        graph = self.attend(self.graph_q(pooled_text), self.graph_k(entities), self.graph_v(entities), entity_mask)
        text = self.attend(self.text_q(pooled_graph), self.text_k(adapted), self.text_v(adapted), text_mask)
        if self.views == "text":
            graph = torch.zeros_like(graph)
        if self.views == "graph":
            text = torch.zeros_like(text)
        return torch.cat([graph, text], dim=-1)

    def items(self, item_graph_embeddings, item_text_embeddings):
        """[i_c ; i_s] for every item [I, 2 Dc]; i_s goes through the same adapter (METHODS.md 3.3)."""
        return torch.cat([item_graph_embeddings, self.adapter(item_text_embeddings)], dim=-1)


class Retriever:
    """The trained retriever at inference: the frozen encoders, the fusion head, and top-k recall over the catalog
    with the target never forced in and the mentioned items excluded."""

    def __init__(self, head: FusionHead, nodes: list[str], node_embeddings: torch.Tensor, catalog: Catalog):
        self.head, self.catalog = head.eval(), catalog
        self.node_index = {name: k for k, name in enumerate(nodes)}
        self.node_embeddings = node_embeddings
        item_graph_embeddings = node_embeddings[: len(catalog)]
        with torch.no_grad():
            self.item_matrix = head.items(item_graph_embeddings, torch.from_numpy(catalog.embeddings()))

    def conversation_inputs(self, samples: list[Sample], feedback: list[str], preference: list[str], lists):
        """(texts, text_mask, entities, entity_mask) for a batch: the three texts embedded (an empty one masked),
        and the graph embeddings of I_D and the list R."""
        texts = [[render_history(s.history), f, p] for s, f, p in zip(samples, feedback, preference)]
        flat = self.catalog.encode([t or " " for row in texts for t in row])
        text_embeddings = torch.from_numpy(flat).view(len(samples), 3, -1)
        text_mask = torch.tensor([[bool(t) for t in row] for row in texts])
        names = [[n for n in s.mentioned + list(r) if n in self.node_index] for s, r in zip(samples, lists)]
        width = max(1, max(len(n) for n in names))
        entities = torch.zeros(len(samples), width, self.node_embeddings.shape[1])
        entity_mask = torch.zeros(len(samples), width, dtype=torch.bool)
        for row, row_names in enumerate(names):
            for column, name in enumerate(row_names):
                entities[row, column] = self.node_embeddings[self.node_index[name]]
                entity_mask[row, column] = True
        entity_mask[:, 0] |= ~entity_mask.any(1)  # nothing known: attend to a zero vector
        return text_embeddings, text_mask, entities, entity_mask

    @torch.no_grad()
    def retrieve(self, samples, feedback, preference, lists, k: int) -> list[list[str]]:
        scores = self.head(*self.conversation_inputs(samples, feedback, preference, lists)) @ self.item_matrix.T
        results = []
        for row, sample in zip(scores, samples):
            mentioned = set(sample.mentioned)
            ranked = [self.catalog.titles[j] for j in row.argsort(descending=True).tolist()]
            results.append([t for t in ranked if t not in mentioned][:k])
        return results


def recall_at(ranked_lists: list[list[str]], targets: list[str], k: int) -> float:
    return sum(t in r[:k] for r, t in zip(ranked_lists, targets)) / max(len(targets), 1)


# =============================================================================================== the simulator


def simulator_lists(sample: Sample, catalog: Catalog, n: int, rng: random.Random) -> dict[str, list[str]]:
    """The four recommendation lists R_human_D (Sec. 3.2.1): hard negatives share the most attributes with the
    target, easy ones the fewest (ties broken at random); H+ and S+ hold the target, H- and S- do not."""
    wanted = attributes_of(catalog, sample.target)
    pool = [t for t in catalog.titles if t != sample.target and t not in set(sample.mentioned)]
    overlap = {t: len(wanted & attributes_of(catalog, t)) for t in pool}
    hard = sorted(pool, key=lambda t: (-overlap[t], rng.random()))[:n]
    easy = sorted(pool, key=lambda t: (overlap[t], rng.random()))[:n]
    lists = {"H+": hard[: n - 1] + [sample.target], "H-": hard, "S+": easy[: n - 1] + [sample.target], "S-": easy}
    for items in lists.values():
        rng.shuffle(items)
    return lists


def simulator_jobs(sample: Sample, catalog: Catalog, args: Args) -> tuple[list[dict], list[dict]]:
    """(feedback jobs for the teacher, finished examples) of one training turn, seeded by the turn so that every
    rank and rerun draws the same lists: task 1 (feedback on each list), task 2 (the target and its attributes),
    task 3 (Yes/No on the target and on negatives from the lists)."""
    rng = random.Random(f"{args.seed}:{sample.key}")
    lists = simulator_lists(sample, catalog, args.list_length, rng)
    jobs = [
        {
            "key": f"{sample.key}|feedback|{kind}",
            "task": "feedback",
            "list": kind,
            "teacher_prompt": feedback_prompt(sample, items, catalog, target_note=True),
            "prompt": feedback_prompt(sample, items, catalog),
        }
        for kind, items in rng.sample(sorted(lists.items()), args.simulator_lists)
    ]
    history, mentioned = render_history(sample.history), mentioned_text(sample)
    attributes = "; ".join(sorted(attributes_of(catalog, sample.target))) or "no attributes"
    examples = [
        {
            "key": f"{sample.key}|alignment",
            "task": "alignment",
            "prompt": ALIGNMENT_PROMPT.format(history=history, mentioned=mentioned),
            "completion": f"{sample.target}; {attributes}",
        }
    ]
    negatives = list(dict.fromkeys(t for items in lists.values() for t in items if t != sample.target))
    for title in ([sample.target] + negatives)[: args.simulator_predictions]:
        prompt = PREDICTION_PROMPT.format(history=history, mentioned=mentioned, item=card(catalog, title))
        answer = "Yes" if title == sample.target else "No"
        examples.append(
            {"key": f"{sample.key}|prediction|{title}", "task": "prediction", "prompt": prompt, "completion": answer}
        )
    return jobs, examples


def simulate_feedback(
    simulator,
    samples: list[Sample],
    lists: list[list[str]],
    catalog: Catalog,
    args: Args,
    rng: random.Random,
    controls: bool = True,
) -> list[str]:
    """The simulator's task 1 at inference: F_t from (D, I_D, R_{t-1}), greedy. With ``controls``, Table 3's: a
    blind simulator never sees the list (--blind-simulator); noisy feedback is irrelevant chat (--noisy-feedback)."""
    if controls and args.noisy_feedback:
        return [rng.choice(IRRELEVANT_CHAT) for _ in samples]
    blind = controls and args.blind_simulator
    prompts = [feedback_prompt(s, [] if blind else items, catalog) for s, items in zip(samples, lists)]
    outputs = simulator.chat([[{"role": "user", "content": p}] for p in prompts], max_tokens=args.feedback_max_tokens)
    return [" ".join(text.split()) or "Hmm, not quite what I want." for (text,) in outputs]


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


def gold_answer(target: str, candidates: list[str], n: int) -> str:
    """The gold RANK LIST: the target first (the teacher sees it), then the others in the retriever's order."""
    ranked = [target] + [c for c in candidates if c != target]
    return f"RANK LIST: [{', '.join(ranked[:n])}]"


# =============================================================================================== the rollout


@dataclass
class Roles:
    """What a multi-turn rollout needs: the recommender, the simulator, the retriever and the reference preferences."""

    policy: object
    simulator: object
    retriever: Retriever
    references: dict[str, np.ndarray]  # sample key -> E_T(P_gold); empty at evaluation (no rewards)


def roll_out(
    samples: list[Sample],
    roles: Roles,
    data: Data,
    args: Args,
    n: int,
    temperature: float,
    training: bool,
    rng: random.Random,
) -> list[list[dict]]:
    """T turns of each sample's interaction (METHODS.md 3.5), batched across samples: retrieve the candidates from
    (D, F_t, P_{t-1}, I_D, R_{t-1}), sample ``n`` outputs of one shared prompt (one prefill), score each output
    with the five rewards, continue with one format-valid output (random, or the best with --continuation best),
    and ask the simulator for F_{t+1}. Training rollouts stop once the target is ranked first (METHODS.md 3.9.3);
    evaluation runs all T turns, under Table 3's controls if asked. Returns each sample's turns."""
    feedback, preference, lists = [""] * len(samples), [""] * len(samples), [[] for _ in samples]
    turns: list[list[dict]] = [[] for _ in samples]
    live = list(range(len(samples)))
    for t in range(1, args.max_turns + 1):
        if not live:
            break
        batch = [samples[i] for i in live]
        candidates = roles.retriever.retrieve(
            batch,
            [feedback[i] for i in live],
            [preference[i] for i in live],
            [lists[i] for i in live],
            args.num_candidates,
        )
        prompts = [
            recommender_prompt(s, c, feedback[i], turn_context(turns[i]), args.list_length)
            for i, s, c in zip(live, batch, candidates)
        ]
        prefix = output_prefix(args)
        outputs = roles.policy.chat(
            [[{"role": "user", "content": p}] for p in prompts],
            n=n,
            temperature=temperature,
            max_tokens=args.rec_max_tokens,
            prefix=prefix,
        )
        outputs = [[prefix + text for text in texts] for texts in outputs]
        for i, sample, prompt, cands, texts in zip(live, batch, prompts, candidates, outputs):
            rewards = []
            if sample.key in roles.references:
                steps = [preference_text(text) for text in texts]
                vectors = data.catalog.encode([p or " " for p in steps])
                rewards = [
                    output_rewards(
                        text,
                        cands,
                        sample.target,
                        vector if step else None,
                        roles.references[sample.key],
                        args.list_length,
                    )
                    for text, step, vector in zip(texts, steps, vectors)
                ]
            valid = [k for k, text in enumerate(texts) if answer_format_reward(text) and parse_rank_list(text, cands)]
            if args.continuation == "best" and rewards:
                chosen = max(range(len(texts)), key=lambda k: rewards[k]["total"])
            else:
                chosen = rng.choice(valid) if valid else 0
            ranked = (parse_rank_list(texts[chosen], cands) or [])[: args.list_length]
            lists[i], preference[i] = ranked, preference_text(texts[chosen])
            turns[i].append(
                {
                    "turn": t,
                    "feedback": feedback[i],
                    "candidates": cands,
                    "prompt": prompt,
                    "outputs": texts,
                    "rewards": rewards,
                    "chosen": chosen,
                    "ranked": ranked,
                }
            )
        if training:
            live = [i for i in live if not (lists[i][:1] == [samples[i].target])]
        if t < args.max_turns and live:
            batch_lists = [lists[i] for i in live]
            new = simulate_feedback(
                roles.simulator, [samples[i] for i in live], batch_lists, data.catalog, args, rng, controls=not training
            )
            for i, text in zip(live, new):
                feedback[i] = text
    return turns


# =============================================================================================== stages (Fig. 2)


def encode_example(tokenizer, prompt: str, completion: str, max_length: int, prefix: str = "") -> dict:
    """Token ids and completion mask of one example; a pre-filled ``prefix`` of the completion goes to the prompt."""
    if prefix and completion.startswith(prefix):
        completion = completion[len(prefix) :]
    else:
        prefix = ""
    messages = [{"role": "user", "content": prompt}]
    ids, mask = encode_prompt_completion(tokenizer, messages, completion, max_length, prefix)
    return {"input_ids": ids, "completion_mask": mask}


def output_prefix(args: Args) -> str:
    return THINK_PREFIX if args.think_prefill else ""


def teacher_texts(run: Run, args: Args, name: str, jobs: list[dict], max_tokens: int, fallback=None) -> None:
    """The teacher's answer to each job's ``teacher_prompt`` (not empty; retried once, else ``fallback(job)`` or
    dropped), appended to ``name`` as the job's completion. Jobs already there are skipped."""
    records = run.records(name)
    done = records.done_keys()
    jobs = [j for j in jobs if j["key"] not in done]
    if not jobs:
        return
    teacher, stats = run.llm(args.teacher_llm, args.batch_size), ParseStats()
    for start in tqdm(range(0, len(jobs), args.batch_size), desc=name, disable=not jobs):
        batch = jobs[start : start + args.batch_size]
        conversations = [[{"role": "user", "content": j["teacher_prompt"]}] for j in batch]
        texts, _ = chat_parsed(
            teacher, conversations, lambda t: " ".join(t.split()) or None, stats, max_tries=2, max_tokens=max_tokens
        )
        for job, text in zip(batch, texts):
            text = text or (fallback(job) if fallback else None)
            if text:
                records.append({k: v for k, v in job.items() if k != "teacher_prompt"} | {"completion": text})
    run.count(stats.metrics("rollout/teacher_"))


def load_simulator(run: Run, args: Args):
    """The tuned simulator (its adapter merged), as an LLM for feedback."""
    adapters = [run.dir / "simulator_adapter"] if run.finished("simulator_adapter") else []
    if not adapters and run.main:
        print("no tuned simulator in this run: the base model gives the feedback")
    model, tokenizer = load_merged(args.simulator_model, adapters, run.device)
    return run.track(HFChat(model, tokenizer, args.batch_size))


def train_simulator(run: Run, args: Args, data: Data) -> dict:
    """Sec. 3.2: the simulator's three tasks mixed into one instruction set, then LoRA SFT with the masked NLL of the
    outputs (Eq. 6, common/sft.py). Inference uses the feedback task alone."""
    if run.finished("simulator_adapter"):
        return {}
    records = run.records("simulator_data.jsonl")
    done, jobs = records.done_keys(), []
    for sample in run.shard(data.train):
        feedback_jobs, examples = simulator_jobs(sample, data.catalog, args)
        for example in (e for e in examples if e["key"] not in done):
            records.append(example)
        jobs += feedback_jobs
    teacher_texts(run, args, "simulator_data.jsonl", jobs, args.feedback_max_tokens)
    run.barrier()
    rows = sorted(records.records(), key=lambda r: r["key"])
    model, tokenizer = load_merged(
        args.simulator_model, [], run.device, (args.lora_rank, args.lora_alpha), args.seed, args.gradient_checkpointing
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
    tasks = [r["task"] for r in rows]
    return {f"simulator/{task}_examples": tasks.count(task) for task in ("feedback", "alignment", "prediction")}


def reference_preferences(run: Run, args: Args, data: Data, samples: list[Sample]) -> dict[str, str]:
    """P_gold per training turn: the teacher's one-sentence summary of the user's taste, shown the target and its
    attributes (METHODS.md 3.9.4); "The user likes <attributes>" where the teacher writes nothing."""

    def job(sample: Sample) -> dict:
        attributes = ", ".join(sorted(attributes_of(data.catalog, sample.target))) or "movies like it"
        prompt = PREFERENCE_PROMPT.format(
            history=render_history(sample.history), target=sample.target, attributes=attributes
        )
        return {"key": sample.key, "teacher_prompt": prompt, "fallback": f"The user likes {attributes}."}

    teacher_texts(
        run,
        args,
        "preferences.jsonl",
        [job(s) for s in run.shard(samples)],
        args.feedback_max_tokens,
        fallback=lambda j: j["fallback"],
    )
    run.barrier()
    return {r["key"]: r["completion"] for r in run.records("preferences.jsonl").records()}


def human_list_feedback(run: Run, args: Args, data: Data, samples: list[Sample]) -> dict[str, dict]:
    """The tuned simulator's feedback F on one of each turn's four lists R_human (seeded by the turn), the retriever's
    and the SFT prompts' feedback input (METHODS.md 3.3)."""
    records = run.records("human_list_feedback.jsonl")
    done = records.done_keys()
    todo = [s for s in run.shard(samples) if s.key not in done]
    if todo:
        simulator, lists = load_simulator(run, args), []
        for sample in todo:
            rng = random.Random(f"{args.seed}:{sample.key}")
            kind, items = rng.choice(sorted(simulator_lists(sample, data.catalog, args.list_length, rng).items()))
            lists.append((kind, items))
        for start in range(0, len(todo), args.batch_size):
            chunk, chunk_lists = todo[start : start + args.batch_size], lists[start : start + args.batch_size]
            items = [items for _, items in chunk_lists]
            texts = simulate_feedback(simulator, chunk, items, data.catalog, args, random.Random(args.seed), False)
            for sample, (kind, items), text in zip(chunk, chunk_lists, texts):
                records.append({"key": sample.key, "list": kind, "items": items, "feedback": text})
    run.barrier()
    return {r["key"]: r for r in records.records()}


def train_retriever(run: Run, args: Args, data: Data) -> dict:
    """Sec. 3.3: LightGCN on the item-entity graph pretrained with BPR (Eq. 8) and frozen; then the fusion head
    (Eq. 9-11) trained with InfoNCE (Eq. 12) on the training turns, with the simulator's feedback and the reference
    preference as texts and I_D plus R_human as entities, early-stopped on the held-out turns' Recall@20. The
    text-only and graph-only heads are trained the same way, for the "w/o Rec" and "w/o Pref" comparison. The
    head is small: rank 0 trains it and the others read it."""
    if run.finished("retriever"):
        return json.loads((run.dir / "retriever" / "metrics.json").read_text())
    samples = data.train + data.held_out
    preferences = reference_preferences(run, args, data, samples)
    feedback = human_list_feedback(run, args, data, samples)
    metrics = {}
    if run.main:
        torch.manual_seed(args.seed)
        nodes, edges = item_graph(data.catalog)
        node_embeddings = pretrain_lightgcn(nodes, edges, len(data.catalog), args)
        retriever_inputs = {
            s.key: (feedback[s.key]["feedback"], preferences[s.key], feedback[s.key]["items"]) for s in samples
        }
        heads = {}
        for views in ("both", "text", "graph"):
            heads[views], found = fit_fusion_head(data, nodes, node_embeddings, retriever_inputs, views, args)
            metrics |= {f"retriever/{views}/{k}": v for k, v in found.items()}
        folder = run.dir / "retriever"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"nodes": nodes, "node_embeddings": node_embeddings, "heads": heads}, folder / "retriever.pt")
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "steps.json").write_text(json.dumps({"held_out": len(data.held_out)}))
    run.barrier()
    return metrics


def pretrain_lightgcn(nodes: list[str], edges: torch.Tensor, num_items: int, args: Args) -> torch.Tensor:
    """Eq. 8: BPR over (movie, an attribute it has, one it does not), the embeddings propagated by LightGCN."""
    adjacency = normalized_adjacency(len(nodes), edges)
    embeddings = torch.nn.Parameter(torch.randn(len(nodes), args.gcn_dim) * 0.1)
    optimizer = torch.optim.Adam([embeddings], lr=1e-2)
    for _ in tqdm(range(args.bpr_epochs), desc="lightgcn (BPR)"):
        propagated = lightgcn(embeddings, adjacency, args.gcn_layers)
        negatives = torch.randint(num_items, len(nodes), (edges.shape[1],))  # entity nodes follow the items
        loss = bpr_loss(propagated[edges[0]], propagated[edges[1]], propagated[negatives])
        loss = loss + 1e-4 * embeddings.pow(2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return lightgcn(embeddings, adjacency, args.gcn_layers).detach()


def fit_fusion_head(data: Data, nodes, node_embeddings, inputs: dict, views: str, args: Args):
    """(the best state, its held-out Recall@{1,10,20}) of one fusion head trained with InfoNCE (Eq. 12): each
    training turn's target against --negatives random items, none of them the target or a mentioned item."""
    text_dim = data.catalog.encode(["x"]).shape[1]
    head = FusionHead(text_dim, args.gcn_dim, views)
    retriever = Retriever(head, nodes, node_embeddings, data.catalog)
    optimizer = torch.optim.Adam(head.parameters(), lr=args.retriever_lr)
    rng = random.Random(args.seed)

    def columns(batch):
        return [list(x) for x in zip(*(inputs[s.key] for s in batch))]

    train_inputs = retriever.conversation_inputs(data.train, *columns(data.train))
    titles = {t: k for k, t in enumerate(data.catalog.titles)}
    item_graph_embeddings, item_text = node_embeddings[: len(data.catalog)], torch.from_numpy(data.catalog.embeddings())
    best, best_recall, waited = None, -1.0, 0
    for _ in tqdm(range(args.retriever_epochs), desc=f"retriever ({views})"):
        head.train()
        conversations = head(*train_inputs)
        items = head.items(item_graph_embeddings, item_text)
        negatives = []
        for sample in data.train:
            excluded = {titles[t] for t in [sample.target, *sample.mentioned] if t in titles}
            pool = [k for k in range(len(titles)) if k not in excluded]
            negatives.append(rng.sample(pool, min(args.negatives, len(pool))))
        width = min(len(n) for n in negatives)
        candidates = torch.tensor([[titles[s.target]] + n[:width] for s, n in zip(data.train, negatives)])
        scores = (conversations[:, None, :] * items[candidates]).sum(-1)
        loss = info_nce_loss(scores)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        found = held_out_recall(Retriever(head, nodes, node_embeddings, data.catalog), data, inputs, columns)
        if found["recall@20"] > best_recall:
            best, best_recall, waited = {k: v.clone() for k, v in head.state_dict().items()}, found["recall@20"], 0
            best_found = found
        else:
            waited += 1
            if waited >= args.retriever_patience:
                break
    return best, best_found


def held_out_recall(retriever: Retriever, data: Data, inputs: dict, columns) -> dict[str, float]:
    ranked = retriever.retrieve(data.held_out, *columns(data.held_out), k=20)
    targets = [s.target for s in data.held_out]
    return {f"recall@{k}": recall_at(ranked, targets, k) for k in (1, 10, 20)}


def load_retriever(run: Run, data: Data, views: str = "both") -> Retriever:
    if not run.finished("retriever"):
        raise DataError(f"no {run.dir / 'retriever'}: run the retriever stage first")
    saved = torch.load(run.dir / "retriever" / "retriever.pt", weights_only=False)
    head = FusionHead(data.catalog.encode(["x"]).shape[1], saved["node_embeddings"].shape[1], views)
    head.load_state_dict(saved["heads"][views])
    return Retriever(head, saved["nodes"], saved["node_embeddings"], data.catalog)


def recommender_sft(run: Run, args: Args, data: Data) -> dict:
    """Sec. 3.4.1 (Eq. 13): the teacher, shown the target, writes the five-step reasoning for each training turn
    (its candidates: the retriever's top-20 given the simulator's feedback on R_human, the target put in where the
    retriever missed it); the gold RANK LIST ranks the target first. LoRA SFT of the recommender (common/sft.py)."""
    if run.finished("sft_adapter"):
        return {}
    retriever = load_retriever(run, data)
    feedback = human_list_feedback(run, args, data, data.train)
    records = run.records("recommender_data.jsonl")
    done = records.done_keys()
    todo = [s for s in run.shard(data.train) if s.key not in done]
    teacher, stats = run.llm(args.teacher_llm, args.batch_size) if todo else None, ParseStats()
    for start in tqdm(range(0, len(todo), args.batch_size), desc="reasoning", disable=not todo):
        batch = todo[start : start + args.batch_size]
        f = [feedback[s.key]["feedback"] for s in batch]
        retrieved = retriever.retrieve(
            batch, f, [""] * len(batch), [feedback[s.key]["items"] for s in batch], args.num_candidates
        )
        candidates = [c if s.target in c else c[:-1] + [s.target] for s, c in zip(batch, retrieved)]
        prompts = [recommender_prompt(s, c, text, "", args.list_length) for s, c, text in zip(batch, candidates, f)]
        attributes = ["; ".join(sorted(attributes_of(data.catalog, s.target))) or "no attributes" for s in batch]
        notes = [TEACHER_NOTE.format(target=s.target, attributes=a) for s, a in zip(batch, attributes)]
        thoughts = teacher_reasoning(teacher, [p + n for p, n in zip(prompts, notes)], args, stats)
        for sample, prompt, cands, thought in zip(batch, prompts, candidates, thoughts):
            if thought:
                completion = thought + gold_answer(sample.target, cands, args.list_length)
                records.append({"key": sample.key, "prompt": prompt, "completion": completion})
    run.count(stats.metrics("rollout/teacher_"))
    run.barrier()
    rows = sorted(records.records(), key=lambda r: r["key"])
    if not rows:
        raise DataError(f"{records.path}: the teacher wrote no reasoning in the five-step format")
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
    return {"rollout/sft_examples": len(examples)}


def load_policy(run: Run, args: Args, adapters: list[Path], trainable: bool = False):
    """(model, tokenizer): the recommender with ``adapters`` merged (SFT's gives pi_sft), plus a fresh LoRA if
    ``trainable``, so that "adapter disabled" is the reference pi_sft."""
    for adapter in adapters:
        if not (adapter / "steps.json").exists():
            raise DataError(f"no {adapter}: run the stage that writes it first")
    lora = (args.lora_rank, args.lora_alpha) if trainable else None
    return load_merged(args.policy, adapters, run.device, lora, args.seed, args.gradient_checkpointing)


def group_examples(tokenizer, rollouts: list[dict], args: Args) -> list[dict]:
    """Every sampled output of a step's groups as a training example with its group-normalized advantage."""
    examples = []
    for rollout in rollouts:
        for turn in rollout["turns"]:
            advantages = group_advantages(torch.tensor([r["total"] for r in turn["rewards"]]))
            for output, advantage in zip(turn["outputs"], advantages.tolist()):
                example = encode_example(tokenizer, turn["prompt"], output, args.max_length, output_prefix(args))
                examples.append(example | {"advantage": advantage})
    return examples


def multi_turn_grpo(run: Run, args: Args, data: Data) -> dict:
    """Sec. 3.4.1 (Eq. 14): per optimizer step, --dialogues-per-step training dialogues are rolled out through T
    turns with the current policy (``roll_out``: G outputs per turn, five rewards each); every output of the step
    then takes one clipped-ratio step against the SFT reference (the adapter switched off). One update per rollout
    (mu = 1), so pi_old is the policy that sampled. Rollouts are recorded per step and resumed from."""
    from transformers import get_constant_schedule

    if run.finished("grpo_adapter"):
        return reward_curve(run.records("grpo_rollouts.jsonl").records(), args.grpo_steps) if run.main else {}
    accelerator = run.accelerator
    retriever, simulator = load_retriever(run, data), load_simulator(run, args)
    preferences = reference_preferences(run, args, data, data.train)
    references = dict(zip(preferences, data.catalog.encode(list(preferences.values()))))
    model, tokenizer = load_policy(run, args, [run.dir / "sft_adapter"], trainable=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.grpo_lr, weight_decay=0)
    scheduler = get_constant_schedule(optimizer)
    model, optimizer, start = start_training(accelerator, model, optimizer, scheduler, run.dir / "grpo")
    rng, records = random.Random(args.seed), run.records("grpo_rollouts.jsonl")
    engine = rollout_engine(run, args) if args.rollout_backend == "vllm" else None
    epochs = math.ceil(args.grpo_steps * args.dialogues_per_step / len(data.train))
    order = [s for e in range(epochs) for s in random.Random(args.seed + e).sample(data.train, len(data.train))]
    for step in tqdm(
        range(start, args.grpo_steps), desc="grpo", initial=start, total=args.grpo_steps, disable=not run.main
    ):
        started, dialogues = time.time(), order[step * args.dialogues_per_step : (step + 1) * args.dialogues_per_step]
        done = records.done_keys()
        mine = [s for s in run.shard(dialogues) if f"{step}|{s.key}" not in done]
        if engine is not None:  # vLLM samples with the adapter as it is now
            save_final(accelerator, model, run.dir / "grpo" / "sampler_adapter", {"step": step})
            engine.use_adapter(run.dir / "grpo" / "sampler_adapter", version=step + 1)
            roles = Roles(engine, simulator, retriever, references)
            turns = roll_out(mine, roles, data, args, args.group_size, args.temperature, True, rng) if mine else []
        else:
            with generation_weights(accelerator, model) as current:  # the policy samples with its current weights
                roles = Roles(run.track(HFChat(current, tokenizer, args.batch_size)), simulator, retriever, references)
                turns = roll_out(mine, roles, data, args, args.group_size, args.temperature, True, rng) if mine else []
        for sample, sample_turns in zip(mine, turns):
            records.append({"key": f"{step}|{sample.key}", "turns": sample_turns})
        run.barrier()
        rollouts = sorted((r for r in records.records() if r["key"].startswith(f"{step}|")), key=lambda r: r["key"])
        examples = group_examples(tokenizer, rollouts, args)
        sums = grpo_update(run, args, model, optimizer, tokenizer, examples)
        scheduler.step()
        rewards = [r for rollout in rollouts for turn in rollout["turns"] for r in turn["rewards"]]
        means = {f"rollout/reward_{k}": float(np.mean([r[k] for r in rewards])) for k in rewards[0]}
        run.log_step(
            {
                "train/loss": sums["loss"],
                "train/kl": sums["kl"],
                "train/groups": len(examples) / args.group_size,
                **means,
            },
            time.time() - started,
        )
        if run.main:
            tqdm.write(
                f"grpo step {step + 1}/{args.grpo_steps}: "
                + "  ".join(f"{k.split('_')[-1]} {v:.3f}" for k, v in means.items())
                + f"  loss {sums['loss']:.4f}"
            )
        if (step + 1) % args.save_every == 0 or step + 1 == args.grpo_steps:
            save_resumable(accelerator, model, run.dir / "grpo", step + 1, optimizer, scheduler)
    save_final(accelerator, model, run.dir / "grpo_adapter", {"steps": args.grpo_steps})
    return reward_curve(records.records(), args.grpo_steps) if run.main else {}


def reward_curve(rollouts: list[dict], steps: int) -> dict[str, float]:
    """The mean rewards of the first and the second half of the GRPO steps: what the update should raise."""
    halves = {}
    for name, part in (("first_half", range(steps // 2)), ("second_half", range(steps // 2, steps))):
        keys = {str(step) for step in part}
        rewards = [r for o in rollouts if o["key"].split("|")[0] in keys for t in o["turns"] for r in t["rewards"]]
        for k in ("total", "think", "answer", "pref") if rewards else ():
            halves[f"rollout/reward_{k}_{name}"] = float(np.mean([r[k] for r in rewards]))
    return halves


def rollout_engine(run: Run, args: Args):
    """A vLLM engine on pi_sft (the SFT adapter merged and saved once), for sampling with LoRA adapters."""
    from common.llm import VLLMChat

    base = run.dir / "sft_merged"
    if run.main and not (base / "config.json").exists():
        model, tokenizer = load_merged(args.policy, [run.dir / "sft_adapter"])
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
    run.barrier()
    return run.track(
        VLLMChat(str(base), enable_lora=True, max_lora_rank=args.lora_rank, gpu_memory_utilization=args.vllm_memory)
    )


def grpo_update(run: Run, args: Args, model, optimizer, tokenizer, examples: list[dict]) -> dict[str, float]:
    """One optimizer step on every output of the step (the global batch, split over ranks and micro-batches): Eq. 14
    averaged over the outputs. Returns the loss and the mean per-token KL. With one update per rollout the ratio is 1
    here, so no token is clipped and no clip ratio is logged."""
    accelerator, micro = run.accelerator, args.micro_batch_size
    steps, accum = training_steps(
        accelerator, len(examples), len(examples) + (-len(examples)) % (run.world * micro), micro, 1, args.seed
    )
    sums = {"loss": 0.0, "kl": 0.0, "tokens": 0.0}
    for chunk, weights in micro_batches(examples, steps[0], accelerator, micro, accum):
        rows = [(e["input_ids"], e["completion_mask"]) for e in chunk]
        advantages = torch.tensor([e["advantage"] for e in chunk], device=run.device)
        inputs = {k: v.to(run.device) for k, v in collate(rows, tokenizer.pad_token_id).items()}
        mask = inputs["completion_mask"][:, 1:].float()
        with torch.no_grad(), accelerator.unwrap_model(model).disable_adapter():  # the reference: pi_sft
            _, _, ref_logps = sequence_logprobs(accelerator.unwrap_model(model), **inputs)
        with accelerator.accumulate(model):
            _, _, policy_logps = sequence_logprobs(model, **inputs)
            losses = grpo_loss(
                policy_logps, policy_logps.detach(), ref_logps, advantages, mask, args.epsilon, args.kl_beta
            )
            # Eq. 14's mean over the global batch's outputs; * world * accum undoes accelerate's 1 / accum per
            # micro-batch and DDP's mean over ranks
            loss = (losses * weights).sum() / len(examples) * run.world * accum
            optimizer_step(accelerator, model, optimizer, loss, args.max_grad_norm)
        with torch.no_grad():
            kl = torch.exp(ref_logps - policy_logps) - (ref_logps - policy_logps) - 1
            sums["loss"] += loss.item() / (run.world * accum)
            sums["kl"] += ((kl * mask).sum(-1) * weights).sum().item()
            sums["tokens"] += (mask.sum(-1) * weights).sum().item()
    totals = run.sum_over_ranks(sums)
    return {"loss": totals["loss"], "kl": totals["kl"] / max(totals["tokens"], 1)}


def evaluate(run: Run, args: Args, data: Data) -> dict:
    """Sec. 3.7: every test dialogue through all T turns (greedy, no early stop), for the zero-shot backbone, the SFT
    recommender and SMTPO side by side; Recall@{1,10}, NDCG@10 and MRR@10 at every turn over the whole test set."""
    retriever, simulator = load_retriever(run, data), load_simulator(run, args)
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
        roles = Roles(run.track(HFChat(model, tokenizer, args.batch_size)), simulator, retriever, {})
        records = run.records(f"eval_{name.replace('-', '')}{control}.jsonl")
        done = records.done_keys()
        todo = [s for s in run.shard(data.test) if s.key not in done]
        for start in tqdm(range(0, len(todo), args.batch_size), desc=f"eval {name}", disable=not todo):
            batch = todo[start : start + args.batch_size]
            for sample, turns in zip(
                batch, roll_out(batch, roles, data, args, 1, 0.0, False, random.Random(args.seed))
            ):
                records.append(
                    {
                        "key": sample.key,
                        "target": sample.target,
                        "turns": [
                            {k: t[k] for k in ("turn", "feedback", "candidates", "ranked", "outputs")} for t in turns
                        ],
                    }
                )
        run.barrier()
        wanted = {s.key for s in data.test}
        results = [r for r in records.records() if r["key"] in wanted]
        prefix = "eval" if name == "smtpo" else f"eval_{name.replace('-', '')}"
        for t in range(1, args.max_turns + 1):
            lists = [(r["turns"][:t][-1]["ranked"] if r["turns"] else [], r["target"]) for r in results]
            turn = {
                "recall@1": np.mean([recall_at_k(ranked, [target], 1) for ranked, target in lists]),
                "recall@10": np.mean([recall_at_k(ranked, [target], 10) for ranked, target in lists]),
                "ndcg@10": np.mean([ndcg_at_k(ranked, [target], 10) for ranked, target in lists]),
                "mrr@10": np.mean([mrr_at_k(ranked, [target], 10) for ranked, target in lists]),
            }
            metrics |= {f"{prefix}{control}/turn{t}/{k}": float(v) for k, v in turn.items()}
            rows.append([name, t, *[round(float(v), 4) for v in turn.values()]])
            if t == args.max_turns:
                metrics |= {f"{prefix}{control}/{k}": float(v) for k, v in turn.items()}
        del model
    run.table(f"eval{control}_by_turn", ["policy", "turn", "recall@1", "recall@10", "ndcg@10", "mrr@10"], rows)
    return metrics | {"eval/examples": len(data.test)}


def print_tables(metrics: dict) -> None:
    steps = sorted({k.split("/")[1] for k in metrics if "/turn" in k}, key=lambda t: int(t[4:]))
    names = {"eval_zeroshot": "zero-shot", "eval_sft": "SFT", "eval": "SMTPO"}  # the paper's order
    prefixes = {k.split("/")[0] for k in metrics if "/turn" in k}
    for prefix in sorted(prefixes, key=lambda p: [*names, p].index(p.removesuffix("_blind").removesuffix("_noisy"))):
        label = f"{names.get(prefix.split('_blind')[0].split('_noisy')[0], prefix)} ({prefix}/)"
        print(f"\n{label:30}" + "".join(f"{c:>11}" for c in ("recall@1", "recall@10", "ndcg@10", "mrr@10")))
        for turn in steps:
            values = [
                metrics.get(f"{prefix}/{turn}/{c}", float("nan"))
                for c in ("recall@1", "recall@10", "ndcg@10", "mrr@10")
            ]
            print(f"  {turn:28}" + "".join(f"{v:11.3f}" for v in values))
    halves = [k[: -len("_first_half")] for k in metrics if k.endswith("_first_half")]
    if halves:
        print("\nGRPO rewards, the mean over the first half of the steps -> the second half (metrics.jsonl: per step)")
        print(
            "  "
            + "  ".join(
                f"{k[15:]} {metrics[k + '_first_half']:.3f} -> {metrics[k + '_second_half']:.3f}" for k in halves
            )
        )
    retrieved = {k: v for k, v in metrics.items() if k.startswith("retriever/")}
    if retrieved:
        print("\nretriever on held-out training turns: " + "  ".join(f"{k[10:]} {v:.3f}" for k, v in retrieved.items()))


# =============================================================================================== main


def main(args: Args) -> None:
    run = Run(args)  # runs/<run_name>/, ranks, seeding, metrics; each run.stage is timed and its LLM costs booked
    data = load_data(args)
    run.stage("simulator", train_simulator, args, data)  # Eq. 6: the multi-task simulator
    run.stage("retriever", train_retriever, args, data)  # Eq. 8-12: LightGCN + the dual-view fusion head
    run.stage("sft", recommender_sft, args, data)  # Eq. 13: the five-step reasoning, taught
    run.stage("grpo", multi_turn_grpo, args, data)  # Eq. 14 with the rewards of Eq. 15-19, over T turns
    run.stage("eval", evaluate, args, data)  # Recall / NDCG / MRR per turn, three recommenders side by side
    run.log(run.costs())
    run.finish(print_tables)


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (DataError, ModelSpecError, LLMBackendError) as err:
        raise SystemExit(f"error: {err}") from None
