"""ECPO: Expectation Confirmation Preference Optimization for a multi-turn conversational recommender agent
(Feng et al., 2025, Sec. 2.2 and 3, App. B-D). Docs: docs/ecpo.md.

    python ecpo.py                                        # every stage on the embedded SmolLM2 + bundled demo
    accelerate launch ecpo.py                             # the same, on every rank accelerate gives it
    python ecpo.py --run-name <run> --stages backward --lam 2   # D_pre for another lambda, from the stored rewrites
    python ecpo.py paper --policy <8B> --dataset book ... # the paper's settings (PAPER below); state models and data
    bash benchmark/ecpo_table1.sh                         # the paper's Table 1 on GPUs

The CRA is ActCRS: one action per LLM call, Search[keywords] | Ask[question] | Recommend[answer] |
Response[content]. Search calls the dense retriever and the agent acts again; the other three are shown to the
user. The pipeline (the paper's Fig. 2), one stage function each, writing under runs/<run_name>/:

  teacher   a teacher CRA talks with the AILO simulator on D_sft tasks      -> teacher_episodes.jsonl
  sft       SGPT: LoRA SFT (Eq. 1) on every CRA call of the successful ones -> sft_data.jsonl, sft_adapter/
  forward   pi_sft talks with AILO on D_pre tasks; AILO rates every visible
            response but the last (forward expectation confirmation)         -> forward_episodes.jsonl
  backward  a rewriter revises each response with r_t <= lambda, given CONF_t
            (backward expectation derivation); valid rewrites form D_pre    -> rewrites.jsonl, pairs.jsonl
  po        ECPO: DPO (Eq. 3) / SimPO / KTO / SFT on D_pre, reference pi_sft -> ref_logps.jsonl, po_adapter/
  eval      SR, R, and the win rate against an expert CRA judged in both
            orders (Fig. 11), for pi_sft and the ECPO policy side by side   -> eval_*.jsonl, judgements.jsonl

A rerun with the same --run-name skips every finished record, checkpoint and adapter.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ailo_sim import (
    AILO,
    TASK_DOMAINS,
    CRAReply,
    audit_leaks,
    episode_metrics,
    kept,
    load_task_items,
    load_tasks,
    print_audit,
    printed,
    run_episodes,
)
from common.catalog import Catalog
from common.checkpoints import resume_and_prepare, save_final, save_resumable
from common.conversations import render_history
from common.distributed import (
    backward_and_step,
    check_division,
    launched_processes,
    micro_batches,
    print_dry_run,
    share_of_global_mean,
    training_steps,
)
from common.formats import InputError, Task
from common.judging import JudgeScoring, expected_scores, json_string, mass_metrics, scores_in_answers
from common.llm import HFChat, LLMBackendError, per_conversation, prompt_ids
from common.models import ModelSpecError, check_specs, load_merged
from common.parsing import ParseStats, chat_parsed, coerce_int, parse_json
from common.presets import Preset, parse_args
from common.run import Run, sft_row
from common.sft import supervised_finetuning
from common.tokens import collate, encode_prompt_completion, sequence_logprobs
from common.tracking import RecordFile

STAGES = ("teacher", "sft", "forward", "backward", "po", "eval")


@dataclass
class Args:
    exp_name: str = "ecpo"
    """the name of this experiment (prefix of the default run name)"""
    seed: int = 1
    """seed of python, numpy and torch: LoRA init, data order, sampled retries"""
    run_name: str | None = None
    """outputs go to runs/<run_name>/; rerun with the same name to resume (default, CleanRL's:
    <exp_name>__<dataset>__<seed>__<unix time>)"""
    stages: tuple[Literal["teacher", "sft", "forward", "backward", "po", "eval"], ...] = STAGES
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
    dataset: Literal["demo", "book", "game", "yelp"] = "demo"
    """demo: the bundled movie tasks; book/game/yelp: the ECPO task files under --data-dir"""
    data_dir: str = "../shared/data"
    """root of the real data (docs/data.md); unused for the demo"""
    num_sft_tasks: int = 2
    """training tasks the teacher plays to build D_sft (paper: 1000)"""
    num_pre_tasks: int = 2
    """further training tasks pi_sft plays to build D_pre, one episode each (paper: 500)"""
    train_tasks: Literal["random", "first"] = "random"
    """how D_sft's and D_pre's tasks are drawn from the train file: random, a --seed shuffle whose first
    --num-sft-tasks go to D_sft and the next --num-pre-tasks to D_pre (the paper: "we randomly sample 1000 ... an
    additional 500"); first, the file's first ones in order (the released main.py's loop; Book's file is grouped by
    user, so 1000 + 500 cover 27 and 15 of its 95 users)"""
    num_test_tasks: int = 1
    """held-out tasks for evaluation: the first ones of the test file (paper: 100)"""

    # ------------------------------------------------------------------------------------------- roles
    policy: str = "smollm2-135m"
    """the trainable CRA: smollm2-135m, a Hugging Face id or a local folder (paper: meta-llama/Llama-3.1-8B-Instruct)"""
    teacher_llm: str = "hf:smollm2-135m"
    """backend of the teacher CRA that builds D_sft (paper: openai:gpt-4o-mini)"""
    user_llm: str = "hf:smollm2-135m"
    """backend of the AILO simulated user, which also rates each response (paper: openai:gpt-4o-mini)"""
    rewriter_llm: str = "hf:smollm2-135m"
    """backend of the rewriter of backward expectation derivation (paper's code: gpt-4o-mini)"""
    expert_cra_llm: str = "hf:smollm2-135m"
    """backend of the Expert CRA, the paper's baseline the win rate is measured against (paper: openai:gpt-4o-mini)"""
    judge_llm: str = "hf:smollm2-135m"
    """backend of the win-rate judge (paper: openai:gpt-4o)"""

    # ------------------------------------------------------------------------------------------- ActCRS
    max_turns: int = 2
    """T: CRA responses per conversation (paper: 5; ablations 3 and 7)"""
    retriever_top_k: int = 5
    """items a Search returns (paper: 5)"""
    max_searches: int = 1
    """Search calls the CRA may chain within one turn before it must answer the user (the paper's code: about 3;
    1 keeps the CPU demo's prompts short, since every Search adds its results to every later prompt)"""
    action_decoding: Literal["constrained", "free"] = "constrained"
    """free: plain generation, parsed, retried, else "Sorry, System Error" (the paper). constrained: the action
    type is the most probable of the four names, then the argument is generated after a forced "Type[" (hf/vllm
    only; small models rarely follow the format freely). openai: backends always decode freely"""
    few_shot: bool = True
    """show the teacher and the expert one example dialogue of the task's domain (the paper's optional few-shot
    block, one per domain as in the released code); it is never in the prompts of D_sft or of the trained policy"""
    action_max_tokens: int = 64
    """max new tokens of one action"""
    user_max_tokens: int = 64
    """max new tokens of each AILO call (policy, content, EC)"""
    target_note: bool = False
    """tell AILO whether the system's last message named its target (our addition to AILO's prompts, not the
    paper's; it tells the simulated user the very fact SR measures)"""
    leak_guard: Literal["regenerate", "drop"] = "regenerate"
    """what becomes of an AILO utterance that names the target before the CRA has: regenerate it, then redact the
    title (every conversation is kept; the demo's few conversations would otherwise lose some), or drop the
    conversation, counted in the leak audit (paper: drop, as the released main.py skips such a user; SR and the win
    rate then count the conversations left)"""
    max_parse_tries: int = 1
    """tries of any call whose output must parse; each retry is +0.3 temperature, as in the ECPO code. Use 3
    with API models; the embedded model rarely writes JSON, so on it retries only cost time (local backends
    fall back to constrained decoding instead)"""
    batch_size: int = 16
    """conversations advanced together; also the generation batch size of hf backends"""
    rollout_batch_tokens: int = 32768
    """the most tokens one generation batch of the trained policy holds in the forward and evaluation rollouts,
    counted as padded: rows x (longest prompt + new tokens); a call over it is split, prompts of similar length
    together (0: no cap). Bounds the key/value cache: 32k tokens of an 8B Llama are 4 GiB in bf16, where the paper
    recipe's ~63 conversations a rank at turn 5 (~4k tokens each) would hold ~31 GiB in one batch (estimates)"""

    # ------------------------------------------------------------------------------------------- backward
    lam: float = 5.0
    """lambda: responses rated r_t <= lambda are rewritten (paper: 4; sweep 1..4). r_t is the rating AILO writes: with
    --judge-scoring expected its most probable rating 0-5 (E[r_t] is logged beside it, not tested). The demo's 5
    rewrites every rated response: the embedded 135M AILO rates every forward response of the no-flag run 5, so at
    the paper's 4 it would rewrite nothing and train nothing"""
    rewriter_max_tokens: int = 192
    """max new tokens of one rewrite"""

    # ------------------------------------------------------------------------------------------- training
    loss: Literal["dpo", "simpo", "kto", "sft"] = "dpo"
    """ECPO's preference objective (Table 4b): dpo (Eq. 3), simpo, kto, or sft on the rewritten responses"""
    beta: float | None = None
    """temperature of the loss; None takes the default of --loss: dpo 0.1, simpo 2.0, kto 0.1"""
    simpo_gamma: float = 1.0
    """SimPO's target reward margin gamma"""
    kto_lambda_w: float = 1.0
    """KTO's weight of desirable (rewritten) responses"""
    kto_lambda_l: float = 1.0
    """KTO's weight of undesirable (original) responses"""
    lora_rank: int = 8
    """LoRA rank, on all linear layers (LlamaFactory's default; the paper is silent)"""
    lora_alpha: int = 16
    """LoRA alpha"""
    sft_lr: float = 5e-5
    """SGPT learning rate (paper: 5e-5)"""
    sft_batch_size: int = 8
    """SGPT global batch size, over all ranks and accumulation steps (paper: 8)"""
    sft_epochs: int = 3
    """SGPT epochs (ECPO code: 3)"""
    po_lr: float = 1e-6
    """ECPO learning rate (paper: 1e-6 or 5e-7)"""
    po_batch_size: int = 32
    """ECPO global batch size in pairs (paper: 32)"""
    po_epochs: int = 8
    """ECPO epochs (ECPO code: 3); the demo's few pairs need more for the preference statistics to move at lr 1e-6"""
    micro_batch_size: int = 1
    """examples (pairs, for ECPO) per rank per forward pass; accumulation fills the global batch"""
    warmup_ratio: float = 0.1
    """linear warmup share of the cosine schedule"""
    max_grad_norm: float = 1.0
    """gradient clipping: the largest gradient norm a step keeps (inf: no clipping)"""
    max_length: int = 2048
    """cutoff in tokens of prompt + completion; longer prompts lose their oldest tokens"""
    gradient_checkpointing: bool = True
    """recompute each layer's activations in the backward pass instead of storing them (LLaMA-Factory's default,
    which the paper's runs used): a DPO step on one ~1.5k-token pair keeps 0.3 GB of activations instead of 5.2 GB"""
    save_every: int = 50
    """optimizer steps between resumable checkpoints (each stage also saves when it ends)"""

    # ------------------------------------------------------------------------------------------- eval
    judge_scoring: JudgeScoring = "expected"
    """how AILO's EC rating r_t and the win-rate judge's verdicts are read: "expected", from the answer distribution
    after the pre-filled reason, each score's probability of being written in full (r_t: the most probable rating
    0-5, E[r_t] beside it; each verdict: P(1) - P(-1) over {1, 0, -1}), one batched pass per score, so every judged
    pair counts (common/judging.py; an openai: judge's from its answer's logprobs, refused where they cannot give a
    verdict written in two tokens, such as -1); "sampled", the paper's: parsed from the generated JSON, a judgement
    that never parses is left out"""
    judge_max_tokens: int = 256
    """max new tokens of one judgement (with --judge-scoring expected: of each dimension's reason)"""
    print_conversations: bool = False
    """print every finished evaluation conversation (the expert's, pi_sft's and the ECPO policy's), not the
    teacher's or the forward stage's"""
    dry_run: int = 0
    """validate the flags, every batch division for this many processes, and the data files, then exit without
    loading a model (0: run)"""


# The paper's settings, each with its source: `python ecpo.py paper --policy ... --dataset ...` (common/presets.py;
# docs/ecpo.md shows this table). Released files are XueyangFeng/ECPO's (sft.sh and dpo.sh: LLaMA-Factory/ecpo/
# <domain>/{sft,ecpo}/).
PAPER = Preset(
    "the paper's Table 1 setting (App. B.3, the released code where the paper is silent); state the models, the "
    "data and the scale",
    values={
        "num_sft_tasks": (1000, 'App. B.3: "we randomly sample 1000 simulation tasks" for D_sft'),
        "num_pre_tasks": (500, 'App. B.3: "an additional 500 tasks" for D_pre'),
        "train_tasks": ("random", 'App. B.3: "randomly sample" (the released main.py plays the first)'),
        "num_test_tasks": (100, "App. B.3: 100 test tasks; released main.sh NUM_USERS=100"),
        "max_turns": (5, 'App. B.3: "a maximum of 5 interaction turns"'),
        "retriever_top_k": (5, 'App. B.3: "the top 5 most relevant items"'),
        "max_searches": (3, "released crs/act_crs.py: after three Searches in a turn the next action must answer"),
        "action_decoding": ("free", "released crs/act_crs.py: generation stopped at ']', else 'Sorry, System Error'"),
        "few_shot": (True, "released main.py: teacher and expert with shot_type few_shot (main_lora.py: the tuned "
                     "policy zero_shot)"),
        "action_max_tokens": (256, "not in the paper; the released client sets no cap: one action fits 256"),
        "user_max_tokens": (512, "not in the paper; the released client sets no cap: an EC reason fits 512"),
        "target_note": (False, "not in the paper (our addition)"),
        "leak_guard": ("drop", "released main.py: a user input that names the target before a success raises, and "
                       "the user is skipped"),
        "max_parse_tries": (3, "released crs/act_crs.py: 3 tries, each 0.3 hotter"),
        "lam": (4.0, "App. B.3: lambda = 4.0"),
        "rewriter_max_tokens": (512, "not in the paper; the released rewrite.py sets no cap"),
        "loss": ("dpo", "Sec. 2.2, Eq. 3"),
        "beta": (None, "DPO 0.1: LlamaFactory's pref_beta, which released dpo.sh leaves; SimPO 2.0, KTO 0.1: "
                 "not released (METHODS.md 1.6)"),
        "simpo_gamma": (1.0, "not released (METHODS.md 1.6; LlamaFactory's own default is 0.5)"),
        "kto_lambda_w": (1.0, "not released; LlamaFactory's kto_chosen_weight default"),
        "kto_lambda_l": (1.0, "not released; LlamaFactory's kto_rejected_weight default"),
        "lora_rank": (8, "released sft.sh, dpo.sh: lora_target all, LlamaFactory's default rank 8"),
        "lora_alpha": (16, "released sft.sh, dpo.sh: LlamaFactory's default alpha, 2 x rank"),
        "sft_lr": (5e-5, "App. B.3; released sft.sh"),
        "sft_batch_size": (8, "App. B.3; released sft.sh: 1 per device x 8 accumulation steps"),
        "sft_epochs": (3, "released sft.sh num_train_epochs 3.0"),
        "po_lr": (1e-6, "App. B.3: searched {1e-6, 5e-7}; released dpo.sh 1.0e-6"),
        "po_batch_size": (32, "App. B.3; released dpo.sh: 1 per device x 32 accumulation steps"),
        "po_epochs": (3, "released dpo.sh num_train_epochs 3.0"),
        "warmup_ratio": (0.1, "released sft.sh, dpo.sh: cosine schedule, warmup_ratio 0.1"),
        "max_grad_norm": (1.0, "released sft.sh, dpo.sh leave it: transformers' default 1.0"),
        "max_length": (2048, "released sft.sh, dpo.sh: cutoff_len 2048"),
        "gradient_checkpointing": (True, "LlamaFactory's default, which the released scripts keep"),
        "judge_scoring": ("sampled", "App. B.5, Fig. 11: the judge's JSON, parsed (released pair_eval/eval.py)"),
        "judge_max_tokens": (1024, "not in the paper; released pair_eval/eval.py sets no cap: Fig. 11's JSON fits"),
    },
    ablations={"loss": "Table 4a", "lam": "Fig. 7a", "max_turns": "Table 6b", "retriever_top_k": "Table 6a"},
    recipe=(
        "exp_name", "seed", "run_name", "stages", "track", "wandb_project", "wandb_entity", "wandb_group", "wandb_tags",
        "dataset", "data_dir", "policy", "teacher_llm", "user_llm", "rewriter_llm", "expert_cra_llm", "judge_llm",
        "batch_size", "rollout_batch_tokens", "micro_batch_size", "save_every", "print_conversations", "dry_run",
    ),
)  # fmt: skip
PRESETS = {"paper": PAPER}


# =============================================================================================== ActCRS

ACTIONS = ("Search", "Ask", "Recommend", "Response")
VISIBLE_ACTIONS = ("Ask", "Recommend", "Response")
SYSTEM_ERROR = "Sorry, System Error"
ACTION_FORMAT = re.compile(r"^(Ask|Recommend|Response|Search)\[[^\[\]]+\]$")  # the ECPO code's rewrite check

ACTCRS_PROMPT = """You are a conversational recommender system that helps a user find a {domain}. You work by interleaving Observation and Action steps. Observations are the user's messages and the results of your searches. Every Action is exactly one of:
(1) Search[keywords]: search the {domain} database; the best matches come back as the next Observation.
(2) Ask[question]: ask the user one clarifying question about what they want.
(3) Recommend[answer]: recommend items, naming them by their full titles exactly as the search results give them.
(4) Response[content]: reply to anything else, such as chit-chat or a question about an item.
The user sees only Ask, Recommend and Response. Search before you recommend.
{examples}
Dialogue:
{scratchpad}
Action {n}:"""  # noqa: E501  (prompt text, kept verbatim)

# One example dialogue per domain (TASK_DOMAINS' values), as the released code has one each for Book, Game and
# Yelp; the items are made up, and each Search observation is written as search_observation writes the domain's.
FEW_SHOT = {
    "movie": """
Here is an example:
Observation 1: User: Hi, can you suggest something for tonight?
Action 1: Ask[Sure! Are you in the mood for something light, or something tense and gripping?]
Observation 2: User: Something tense, maybe a mystery.
Action 2: Search[tense mystery thriller twist]
Observation 3: Search results: 1. The Silent Harbor (2015); genre: mystery, thriller 2. Night Ledger (2019); genre: crime, drama
Action 3: Recommend[You might enjoy The Silent Harbor (2015), a tense mystery whose twist recasts everything before it. Would you like something darker, like Night Ledger (2019)?]
(end of example)
""",  # noqa: E501  (prompt text, kept verbatim)
    "book": """
Here is an example:
Observation 1: User: I'd like a book to get lost in this weekend.
Action 1: Ask[Happy to help! Do you lean toward mysteries, fantasy, or something true?]
Observation 2: User: A mystery, ideally a cozy one with some humor.
Action 2: Search[cozy mystery humor small town amateur sleuth]
Observation 3: Search results: 1. The Teapot Affair (A Marigold Lane Mystery Book 1); categories: Books, Mystery, Thriller & Suspense, Mystery; price: 4.99 2. Murder at Quill Cottage; categories: Books, Mystery, Thriller & Suspense; price: 9.99
Action 3: Recommend[Try The Teapot Affair (A Marigold Lane Mystery Book 1), a cozy small-town mystery with a light touch. If you would rather not start a series, Murder at Quill Cottage stands alone. Which appeals more?]
Observation 4: User: Is the first one part of a series?
Action 4: Response[Yes: The Teapot Affair (A Marigold Lane Mystery Book 1) is the first book of the Marigold Lane Mysteries, so more follow if you enjoy it.]
(end of example)
""",  # noqa: E501  (prompt text, kept verbatim)
    "video game": """
Here is an example:
Observation 1: User: Hey, I'm looking for a new game to play.
Action 1: Ask[Sure! Which platform do you play on, and do you prefer story-driven games or fast action?]
Observation 2: User: PlayStation 5, and I love a good story with choices that matter.
Action 2: Search[PlayStation 5 story-driven role-playing game choices]
Observation 3: Search results: 1. Ember Crown: Rise of the Exiles - PlayStation 5; categories: Video Games, PlayStation 5, Games; price: 39.99 2. Harbor Lights - PlayStation 5 Standard Edition; categories: Video Games, PlayStation 5, Games; price: 29.99
Action 3: Recommend[Ember Crown: Rise of the Exiles - PlayStation 5 is a story-driven role-playing game for your console. For something shorter, Harbor Lights - PlayStation 5 Standard Edition is a narrative adventure. Which sounds closer to what you want?]
Observation 4: User: How much is the first one?
Action 4: Response[Ember Crown: Rise of the Exiles - PlayStation 5 is listed at 39.99.]
(end of example)
""",  # noqa: E501  (prompt text, kept verbatim)
    "restaurant or local business": """
Here is an example:
Observation 1: User: Where should I eat tonight?
Action 1: Ask[Glad to help! What kind of food are you in the mood for, and would you like a quick bite or a sit-down dinner?]
Observation 2: User: A sit-down dinner, and I'm craving Thai food.
Action 2: Search[Thai restaurant sit-down dinner]
Observation 3: Search results: 1. Lotus Lantern Thai Kitchen; categories: Thai, Restaurants, Noodles 2. Bangkok Corner Bistro; categories: Restaurants, Thai, Vegetarian
Action 3: Recommend[Lotus Lantern Thai Kitchen is a sit-down Thai restaurant known for its noodles. If you want plenty of vegetarian dishes, Bangkok Corner Bistro is another Thai place. Does either appeal?]
Observation 4: User: Does the second one have vegetarian food?
Action 4: Response[Yes, Bangkok Corner Bistro lists vegetarian among its categories.]
(end of example)
""",  # noqa: E501  (prompt text, kept verbatim)
}


def actcrs_prompt(domain: str, scratchpad: list[str], few_shot: bool) -> str:
    """The state s_t: instruction, optional example of the domain, the scratchpad, and the slot for the next
    action."""
    return ACTCRS_PROMPT.format(
        domain=domain,
        examples=FEW_SHOT[domain] if few_shot else "",
        scratchpad="\n".join(scratchpad),
        n=sum(line.startswith("Action ") for line in scratchpad) + 1,
    )


def parse_actcrs(text: str, allowed=ACTIONS) -> str | None:
    """The first ``Type[argument]`` in ``text`` with an allowed type, normalized, or None. Generation stops at "]",
    so a missing closing bracket is put back; nested brackets and an empty argument are refused."""
    match = re.search(r"\b(" + "|".join(map(re.escape, allowed)) + r")\s*\[([^\[\]]+)(?:\]|\s*$)", text)
    if match is None or not match.group(2).strip():
        return None
    return f"{match.group(1)}[{match.group(2).strip()}]"


def split_action(action: str) -> tuple[str, str]:
    kind, _, rest = action.partition("[")
    return kind, rest[:-1] if rest.endswith("]") else rest


def decode_actions(
    llm, prompts: list[str], *, allowed, args: Args, stats: ParseStats, prefix: str = ""
) -> list[str | None]:
    """One action per prompt. Free decoding: generate, parse, retry the failures (+0.3 temperature each).
    Constrained decoding (``--action-decoding constrained`` on a backend that can pre-fill): after ``prefix``, the
    type is the most probable allowed name (one forward pass), then the argument is generated after the forced
    "Type[" up to "]". Both return the same string format; an empty argument counts as a failure."""
    convs = [[{"role": "user", "content": p}] for p in prompts]
    if args.action_decoding == "free" or not getattr(llm, "can_prefill", False):
        parsed, _ = chat_parsed(
            llm,
            convs,
            lambda t: parse_actcrs(t, allowed),
            stats,
            max_tries=args.max_parse_tries,
            max_tokens=args.action_max_tokens,
            stop=["]"],
        )
        return parsed
    kinds = [max(p, key=p.get) for p in llm.choice_probs(convs, choices=allowed, prefix=prefix)]
    outputs = llm.chat(
        convs,
        max_tokens=args.action_max_tokens,
        stop=["]", "\n"] + (['"'] if prefix else []),
        prefix=[f"{prefix}{kind}[" for kind in kinds],
    )
    stats.attempts += len(prompts)
    arguments = [" ".join(text.replace("[", "(").split()) for (text,) in outputs]
    actions = [f"{kind}[{argument}]" if argument else None for kind, argument in zip(kinds, arguments)]
    stats.failures += sum(a is None for a in actions)
    return actions


CARD_FIELDS = ("year", "genre", "categories", "price")  # an item as a Search observation shows it


def search_observation(catalog: Catalog, titles: list[str]) -> str:
    cards = [catalog.card(t, CARD_FIELDS)[:200] for t in titles]
    return "Search results: " + " ".join(f"{k}. {card}" for k, card in enumerate(cards, 1))


def make_actcrs(llm, *, catalog: Catalog, domain: str, args: Args, few_shot: bool, stats: ParseStats):
    """An ActCRS agent as a ``CRA`` for ``ailo_sim.run_episodes``. It keeps one scratchpad per conversation and, per
    user turn, appends the user's message as an Observation and acts (``act``).

    Each reply's record holds every call of the turn as (state, action), the state without the few-shot
    block: these are SGPT's training examples and ECPO's (s_t, p_t)."""
    scratchpads: dict[str, list[str]] = {}

    def cra(keys: list[str], histories: list[list[dict]]) -> list[CRAReply]:
        pads = []
        for key, history in zip(keys, histories):
            pad = scratchpads.setdefault(key, [])
            pad.append(f"Observation {observations(pad) + 1}: User: {history[-1]['content']}")
            pads.append(pad)
        return act(llm, pads, catalog=catalog, domain=domain, args=args, few_shot=few_shot, stats=stats)

    return cra


def observations(pad: list[str]) -> int:
    return sum(line.startswith("Observation") for line in pad)


def act(llm, pads: list[list[str]], *, catalog: Catalog, domain: str, args: Args, few_shot: bool,
        stats: ParseStats) -> list[CRAReply]:  # fmt: skip
    """One turn of ActCRS on each scratchpad: act until a visible action. Search results are appended as
    Observations, up to ``max_searches`` chained searches; after that only Ask/Recommend/Response are accepted. An
    action that never parses is the paper's fallback: "Sorry, System Error" is shown, and the turn gets no rewrite."""
    calls: list[list[dict]] = [[] for _ in pads]
    retrieved: list[list[str]] = [[] for _ in pads]
    replies: list[str | None] = [None] * len(pads)
    pending = list(range(len(pads)))
    for searches in range(args.max_searches + 1):
        if not pending:
            break
        allowed = ACTIONS if searches < args.max_searches else VISIBLE_ACTIONS
        prompts = [actcrs_prompt(domain, pads[i], few_shot) for i in pending]
        actions = decode_actions(llm, prompts, allowed=allowed, args=args, stats=stats)
        searching = []
        for i, action in zip(pending, actions):
            state = actcrs_prompt(domain, pads[i], few_shot=False)
            n = state.rsplit("Action ", 1)[1].rstrip(":")
            kind, argument = split_action(action) if action is not None else ("Error", SYSTEM_ERROR)
            calls[i].append({"state": state, "action": action, "type": kind})
            pads[i].append(f"Action {n}: {action or f'Response[{SYSTEM_ERROR}]'}")
            if kind == "Search":
                searching.append((i, argument))
            else:
                replies[i] = argument
        if searching:
            for (i, _), titles in zip(searching, catalog.search([q for _, q in searching], args.retriever_top_k)):
                retrieved[i] += [t for t in titles if t not in retrieved[i]]
                pads[i].append(f"Observation {observations(pads[i]) + 1}: {search_observation(catalog, titles)}")
        pending = [i for i, _ in searching]
    return [
        CRAReply(
            text=reply or SYSTEM_ERROR,
            retrieved=found,
            record={"calls": turn_calls, "state": turn_calls[-1]["state"], "action": turn_calls[-1]["action"],
                    "action_type": turn_calls[-1]["type"]},
        )
        for reply, found, turn_calls in zip(replies, retrieved, calls)
    ]  # fmt: skip


# ============================================================================ reward: expectation confirmation
# ECPO's reward is the simulated user's own rating of each turn. After every visible response p_t, AILO rates it
# against the dialogue before it with ailo_sim.EC_PROMPT: start from 5, deduct flexibility 0-2, coherence 0-2 and
# user guidance 0-1, and say why. The reason is CONF_t, the rating r_t (AILO.expectation_confirmation; the harness
# stores both in each turn as ec_reason and ec_rating). r_t chooses which turns are rewritten (Eq. 2) and CONF_t
# tells the rewriter what to fix; neither enters a loss as a number.


def rated_turns(episodes: list[dict]) -> list[dict]:
    """(s_t, p_t, CONF_t, r_t) of every visible response: the state the policy acted from, its action, AILO's
    reason and rating, and E[r_t] where the rating was read from the distribution. "System Error" fallbacks (no
    action), unparsed ratings and the unrated last turn are left out (METHODS.md 1.9)."""
    return [
        {
            "key": f"{episode['key']}#{t['turn']}",
            "state": t["cra"]["state"],
            "action": t["cra"]["action"],
            "conf": t["ec_reason"],
            "rating": t["ec_rating"],
            "expected": t.get("ec_expected"),
        }
        for episode in episodes
        for t in episode["turns"]
        if t["ec_rating"] is not None and t["cra"].get("action") is not None
    ]


def short_of_expectation(rating: int, lam: float) -> bool:
    """Eq. 2's test, r_t <= lambda, on the rating the user writes: parsed, or under expected scoring the most
    probable rating (the paper's user writes one integer at temperature 0, so a response it would rate 5 is never
    rewritten at lambda = 4). E[r_t] is not tested: floor(E[r_t]) <= 4 rewrote every response with E[r_t] < 5,
    4.999 included, so D_pre grew with the judge's uncertainty rather than with shortfalls."""
    return rating <= lam


def rewritable_turns(episodes: list[dict], lam: float) -> list[dict]:
    """Eq. 2: the turns whose response fell short of the user's expectation."""
    return [t for t in rated_turns(episodes) if short_of_expectation(t["rating"], lam)]


def rating_table(turns: list[dict], lam: float) -> str:
    counts = [sum(t["rating"] == r for t in turns) for r in range(6)]
    low = sum(short_of_expectation(t["rating"], lam) for t in turns)
    table = f"r_t 0..5: {counts}; {low} of {len(turns)} rated responses have r_t <= lambda = {lam:g}"
    expected = [t["expected"] for t in turns if t.get("expected") is not None]
    if expected:
        table += f" (E[r_t] {min(expected):.2f} to {max(expected):.2f})"
    return table


# =============================================================================================== rewriter

REWRITE_PROMPT = """You are a rewrite model. Your task is to improve one response of a conversational recommender system (CRS) that helps a user find a {domain}. The CRS works by interleaving Observation and Action steps. Observations are the user's requests and replies, and the results of the CRS's searches. The CRS acts with exactly one of four actions: Search[keywords] searches the database; Ask[question] asks the user a clarifying question; Recommend[answer] recommends items by their full titles; Response[content] answers other requests or chit-chat.

Inputs:
- Scratchpad: the CRS's interaction so far.
- Original Response: the action that needs improvement.
- Feedback on Flaws: the user's feedback on its Flexibility, Coherence and User Guidance.

Rewrite strategy:
- Targeted flaw fixing: use the feedback as a blueprint, and fix exactly the flaws it names.
- Context-aware rewriting: follow the conversation, keep the logical flow, and serve what the user wants now.
- Make limited edits, not a new response: keep the action type unless the feedback shows it was the wrong choice.
- Be concrete and actionable: ask "historical or contemporary?", not "Would you like more details?".
- Keep every item title exactly as written; never invent titles.

Scratchpad:
{scratchpad}

Original Response: {response}

Feedback on Flaws: {feedback}

Answer with JSON only: {{"reason": "<why the refinement fixes the flaws>", "refinement": "<the rewritten action: Ask[...], Recommend[...], Response[...] or Search[...]>"}}"""  # noqa: E501  (prompt text, kept verbatim)


def scratchpad_of(state: str) -> str:
    """The dialogue part of an ActCRS state, without the instruction and the trailing action slot."""
    return state.split("Dialogue:\n", 1)[-1].rsplit("\nAction ", 1)[0]


def check_refinement(text: str, original: str) -> tuple[str | None, str]:
    """(refinement, status). Status is ok, unparsable (no JSON with a string refinement), bad_format (not one
    action matching the ECPO code's pattern) or unchanged (equal to the original)."""
    data = parse_json(text)
    refinement = data.get("refinement") if isinstance(data, dict) else None
    if not isinstance(refinement, str):
        return None, "unparsable"
    refinement = refinement.strip()
    if not ACTION_FORMAT.match(refinement):
        return None, "bad_format"
    if refinement == original:
        return None, "unchanged"
    return refinement, "ok"


def derive_pairs(turns: list[dict], *, rewriter, domain: str, args: Args, stats: ParseStats) -> Iterator[dict]:
    """Backward expectation derivation: one rewrite per turn, yielded as each batch of rewrites is made.
    Output that is not JSON with a well-formed action is retried; a well-formed rewrite equal to the original
    is kept as "unchanged" (it is a valid answer, just not a preference pair)."""
    well_formed = lambda text: check_refinement(text, original="")[0]  # noqa: E731
    for start in range(0, len(turns), args.batch_size):
        chunk = turns[start : start + args.batch_size]
        prompts = [
            [
                {
                    "role": "user",
                    "content": REWRITE_PROMPT.format(
                        domain=domain, scratchpad=scratchpad_of(t["state"]), response=t["action"], feedback=t["conf"]
                    ),
                }
            ]
            for t in chunk
        ]
        _, texts = chat_parsed(
            rewriter, prompts, well_formed, stats, max_tries=args.max_parse_tries, max_tokens=args.rewriter_max_tokens
        )
        # A local rewriter that never wrote the JSON gets its refinement decoded under the grammar instead:
        # the answer is pre-filled up to '{"refinement": "' and the action is decoded as in decode_actions.
        failed = [k for k, text in enumerate(texts) if well_formed(text) is None]
        if failed and args.action_decoding == "constrained" and getattr(rewriter, "can_prefill", False):
            actions = decode_actions(
                rewriter,
                [prompts[k][0]["content"] for k in failed],
                allowed=ACTIONS,
                args=args,
                stats=ParseStats(),
                prefix='{"refinement": "',
            )
            for k, action in zip(failed, actions):
                if action is not None:
                    texts[k] = json.dumps({"reason": "", "refinement": action})
        for turn, text in zip(chunk, texts):
            refinement, status = check_refinement(text, turn["action"])
            yield {**turn, "refinement": refinement, "status": status, "raw": text}


def select_pairs(rewrites: list[dict], lam: float) -> list[dict]:
    """D_pre: the valid rewrites of turns rated <= lambda; chosen = rewrite, rejected = original."""
    return [
        {
            "key": r["key"],
            "prompt": r["state"],
            "chosen": r["refinement"],
            "rejected": r["action"],
            "rating": r["rating"],
            "expected": r.get("expected"),
            "conf": r["conf"],
        }
        for r in rewrites
        if r["status"] == "ok" and short_of_expectation(r["rating"], lam)
    ]


def preference_row(prompt: str, chosen: str, rejected: str) -> dict:
    """A pair of D_pre in TRL's conversational ``prompt`` / ``chosen`` / ``rejected`` columns."""
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


# =============================================================================================== losses


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:
    """Eq. 3 (ECPO+DPO): -log sigma(beta * lr_w - beta * lr_l), lr = log pi_theta - log pi_sft (sequence sums)."""
    logits = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(logits)


def simpo_loss(
    policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, *, beta: float, gamma: float
) -> torch.Tensor:
    """ECPO+SimPO (Table 4b): -log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma); no reference."""
    return -F.logsigmoid(beta * policy_chosen / chosen_tokens - beta * policy_rejected / rejected_tokens - gamma)


def kto_loss(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, z_ref, *, beta: float, lambda_w: float, lambda_l: float
) -> torch.Tensor:
    """ECPO+KTO (Table 4b, with the sign of the undesirable term corrected to the standard KTO form):
    lambda_w (1 - sigma(beta lr_w - z_ref)) for the rewrite and lambda_l (1 - sigma(z_ref - beta lr_l)) for the
    original. Each pair is one desirable and one undesirable example, so a pair's loss is their mean."""
    chosen = lambda_w * (1 - torch.sigmoid(beta * (policy_chosen - ref_chosen) - z_ref))
    rejected = lambda_l * (1 - torch.sigmoid(z_ref - beta * (policy_rejected - ref_rejected)))
    return (chosen + rejected) / 2


def kto_reference_point(policy_mismatched, ref_mismatched, weights, beta: float) -> torch.Tensor:
    """z_ref = beta * max(0, mean KL estimate) over mismatched (s_j, y_k) pairs, without gradient. The training loop
    gives it every mismatched pair of the global batch (``global_kto_reference_point``)."""
    kl = ((policy_mismatched - ref_mismatched) * weights).sum() / weights.sum().clamp(min=1)
    return (beta * kl.clamp(min=0)).detach()


DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0, "kto": 0.1, "sft": 0.0}


# =============================================================================================== training


def encode(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], list[int]]:
    return encode_prompt_completion(tokenizer, [{"role": "user", "content": prompt}], completion, max_length=max_length)


def sequence_logps(model, rows: list[tuple[list[int], list[int]]], pad_id: int, device):
    """(sum of completion log-probs [B], completion tokens [B]) of right-padded (ids, completion mask) rows."""
    batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
    logps, n_tokens, _ = sequence_logprobs(model, **batch)
    return logps, n_tokens


def load_policy(args: Args, adapters: list[Path], device, trainable: bool = False):
    """(model, tokenizer): the base policy with ``adapters`` merged in order (SGPT's gives pi_sft, ECPO's sits on
    top), plus a fresh LoRA if ``trainable``. Merging makes "adapter disabled" mean pi_sft, so the reference
    needs no second copy of the model. The ECPO code keeps training the SFT adapter instead; a fresh,
    zero-initialised adapter on the merged weights starts from the same policy pi_sft."""
    lora = (args.lora_rank, args.lora_alpha) if trainable else None
    return load_merged(args.policy, adapters, device, lora, args.seed, args.gradient_checkpointing)


def pair_examples(tokenizer, pairs: list[dict], max_length: int) -> list[dict]:
    """Token ids and completion masks of each pair's chosen and rejected response. KTO's KL estimate also needs
    a mismatched (prompt, response): this prompt with the next pair's rewrite, fixed here so that its reference
    log-prob is stored with the others."""
    examples = []
    for k, pair in enumerate(pairs):
        example = {"key": pair["key"]}
        mismatched = pairs[(k + 1) % len(pairs)]["chosen"]
        for part, completion in (
            ("chosen", pair["chosen"]),
            ("rejected", pair["rejected"]),
            ("mismatched", mismatched),
        ):
            example[f"{part}_ids"], example[f"{part}_mask"] = encode(tokenizer, pair["prompt"], completion, max_length)
        example["ref_chosen"] = example["ref_rejected"] = example["ref_mismatched"] = 0.0  # SimPO and SFT need none
        examples.append(example)
    return examples


def response_rows(pairs: list[dict], parts: tuple[str, ...]) -> list[tuple[list[int], list[int]]]:
    """The (ids, completion mask) rows of ``pairs``' responses, part by part: every chosen one, then every rejected
    one (the layout ``preference_loss`` reads), or the mismatched ones."""
    return [(e[f"{part}_ids"], e[f"{part}_mask"]) for part in parts for e in pairs]


REFERENCE_KEYS = ("ref_chosen", "ref_rejected", "ref_mismatched")


def reference_logps(run: Run, model, *, tokenizer, examples: list[dict], args: Args, epoch: list[list[int]],
                    accum: int) -> None:  # fmt: skip
    """log pi_sft of every chosen, rejected and mismatched response, computed once with the adapter disabled (the
    adapter sits on the merged pi_sft weights) and stored in ref_logps.jsonl. ``model`` is the prepared policy and
    ``epoch`` the first epoch's global batches: each micro-batch's rows go through the forward passes the policy's do
    in training, in its precision (accelerate's bf16 autocast, DeepSpeed's bf16 weights) and with the same batch
    shapes (low-precision kernels round differently at other shapes), so every log-ratio is exactly 0 before the
    first update. Ranks split the work as they split training's: ``run.map``'s share of the epoch's examples in
    order is each rank's share of every global batch (``rank_micro_batches``), and every rank runs the forward
    passes of each batch that any rank still needs, in lockstep as ZeRO-3 needs."""

    def logps_of(pairs: list[dict], parts: tuple[str, ...]) -> torch.Tensor:
        return sequence_logps(model, response_rows(pairs, parts), tokenizer.pad_token_id, run.device)[0]

    def compute(todo: list[dict]) -> Iterator[dict]:
        mine, needed = {e["key"] for e in todo}, set(run.gather([e["key"] for e in todo]))
        with torch.no_grad(), run.accelerator.unwrap_model(model).disable_adapter():
            for batch in (b for b in epoch if needed.intersection(examples[i]["key"] for i in b)):
                for pairs, weights in micro_batches(examples, batch, run.accelerator, args.micro_batch_size, accum):
                    # as in training: chosen and rejected in one pass, the mismatched responses in another (z_ref)
                    chosen_rejected = logps_of(pairs, ("chosen", "rejected"))
                    mismatched = logps_of(pairs, ("mismatched",))
                    for j, (example, weight) in enumerate(zip(pairs, weights.tolist())):
                        if weight and example["key"] in mine:  # weight 0: a rank's padding
                            mine.discard(example["key"])
                            values = (chosen_rejected[j], chosen_rejected[len(pairs) + j], mismatched[j])
                            yield {"key": example["key"], **dict(zip(REFERENCE_KEYS, map(float, values)))}

    model.eval()
    in_order = [examples[i] for batch in epoch for i in batch]
    stored = run.map("ref_logps.jsonl", in_order, compute, every_rank=True, desc="reference log-probs")
    by_key = {r["key"]: r for r in stored}
    for example in examples:
        example.update({key: by_key[example["key"]][key] for key in REFERENCE_KEYS})
    model.train()


@torch.no_grad()
def global_kto_reference_point(run: Run, model, *, tokenizer, examples: list[dict], batch: list[int], accum: int,
                               micro: int, beta: float) -> torch.Tensor:  # fmt: skip
    """KTO's z_ref for one optimizer step, estimated on every mismatched (prompt, response) pair of the global batch,
    over all its micro-batches and ranks, so that 1 rank and 2 ranks agree; one pair per micro-batch would be too
    noisy an estimate (TRL refuses a KTO batch of 1 for this reason). The policy is the one the step starts from."""
    policy, reference, weights = [], [], []
    for pairs, pair_weights in micro_batches(examples, batch, run.accelerator, micro, accum):
        policy.append(
            sequence_logps(model, response_rows(pairs, ("mismatched",)), tokenizer.pad_token_id, run.device)[0]
        )
        reference.append(torch.tensor([e["ref_mismatched"] for e in pairs], device=run.device))
        weights.append(pair_weights)
    policy, reference, weights = (run.accelerator.gather(torch.cat(t)) for t in (policy, reference, weights))
    return kto_reference_point(policy, reference, weights, beta)


def preference_loss(logps, n_tokens, ref_chosen_logps, ref_rejected_logps, *, args: Args, beta: float, z_ref=None):
    """--loss on one micro-batch of pairs -> (per-pair losses, chosen rewards, rejected rewards). ``logps`` and
    ``n_tokens`` hold the policy's log-probs and lengths of the chosen rows, then of the rejected rows. The losses are
    Eq. 3's DPO, SimPO, KTO against ``z_ref``, or ECPO+SFT's NLL of the rewrite alone (its token mean comes from the
    caller's normalizer); the implicit rewards are the ones TRL logs: beta times the log-ratio to pi_sft, SimPO's
    beta times the length-normalized log-prob, and for SFT the log-prob itself."""
    b = len(ref_chosen_logps)
    policy_chosen_logps, policy_rejected_logps = logps[:b], logps[b : 2 * b]
    chosen_tokens, rejected_tokens = n_tokens[:b], n_tokens[b : 2 * b]
    if args.loss == "dpo":
        losses = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    elif args.loss == "simpo":
        losses = simpo_loss(
            policy_chosen_logps, policy_rejected_logps, chosen_tokens, rejected_tokens, beta=beta,
            gamma=args.simpo_gamma,
        )  # fmt: skip
    elif args.loss == "kto":
        losses = kto_loss(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, z_ref, beta=beta,
            lambda_w=args.kto_lambda_w, lambda_l=args.kto_lambda_l,
        )  # fmt: skip
    else:
        losses = -policy_chosen_logps
    if args.loss == "simpo":
        return losses, beta * policy_chosen_logps / chosen_tokens, beta * policy_rejected_logps / rejected_tokens
    return (
        losses,
        (beta or 1.0) * (policy_chosen_logps - ref_chosen_logps),
        (beta or 1.0) * (policy_rejected_logps - ref_rejected_logps),
    )


def preference_statistics(chosen_rewards, rejected_rewards, logps, weights) -> dict[str, float]:
    """TRL's preference statistics of a micro-batch as sums over its pairs (weighted: padding rows count 0), with
    those pairs' count, "pairs": the step logs each sum over the global batch's pairs (``per_pair``). ``logps`` holds
    the policy's log-probs of the chosen rows, then of the rejected rows."""
    b = len(chosen_rewards)
    values = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": logps[:b],
        "logps/rejected": logps[b : 2 * b],
    }
    sums = {f"train/{name}": (value.detach() * weights).sum().item() for name, value in values.items()}
    return sums | {"pairs": weights.sum().item()}


def per_pair(sums: dict[str, float]) -> dict:
    """A step's sums, this rank's, for ``run.log_step``: the loss (its term of the global batch's mean already) and
    each preference statistic as (sum, pairs), their ratio over every rank the statistic's mean over the batch."""
    return {name: value if name == "train/loss" else (value, sums["pairs"]) for name, value in sums.items()
            if name != "pairs"}  # fmt: skip


def train_preferences(run: Run, args: Args, model, tokenizer, examples: list[dict]):
    """ECPO's optimization on D_pre: --loss dpo (Eq. 3), simpo, kto or sft, with pi_sft's log-probs stored.
    Logs TRL's preference statistics per step: rewards/chosen = beta (log pi(y_w|s) - log pi_sft(y_w|s)) (SimPO:
    beta log pi(y_w|s) / |y_w|; SFT: log pi(y_w|s)), the same for y_l, rewards/accuracies (the share with chosen >
    rejected) and rewards/margins (their mean difference)."""
    from transformers import get_cosine_schedule_with_warmup

    accelerator, micro, device = run.accelerator, args.micro_batch_size, run.device
    beta = args.beta if args.beta is not None else DEFAULT_BETA[args.loss]
    steps, accum = training_steps(accelerator, len(examples), args.po_batch_size, micro, args.po_epochs, args.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.po_lr, weight_decay=0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * len(steps)), len(steps))
    model, optimizer, start = resume_and_prepare(accelerator, model, optimizer, scheduler, run.dir / "po")
    if args.loss in ("dpo", "kto"):  # after prepare: pi_sft in the precision the policy is compared in
        epoch = steps[: len(steps) // args.po_epochs]
        reference_logps(run, model, tokenizer=tokenizer, examples=examples, args=args, epoch=epoch, accum=accum)
    logged = run.steps_logged("train", start, "po steps")
    for step in tqdm(range(start, len(steps)), desc="po", initial=start, total=len(steps), disable=not run.main):
        started, batch, sums = time.time(), steps[step], Counter()
        # ALGO LOGIC: one step of --loss on the global batch, a mean over its pairs (--loss sft: over the rewrites'
        # tokens); KTO's z_ref from every mismatched pair of it; chosen and rejected in one forward pass
        z_ref = None
        if args.loss == "kto":
            z_ref = global_kto_reference_point(run, model, tokenizer=tokenizer, examples=examples, batch=batch,
                                               accum=accum, micro=micro, beta=beta)  # fmt: skip
        normalizer = sum(sum(examples[i]["chosen_mask"]) for i in batch) if args.loss == "sft" else len(batch)
        for pairs, weights in micro_batches(examples, batch, accelerator, micro, accum):
            ref_chosen, ref_rejected = (torch.tensor([e[f"ref_{part}"] for e in pairs], device=device)
                                        for part in ("chosen", "rejected"))  # fmt: skip
            with accelerator.accumulate(model):
                logps, n_tokens = sequence_logps(model, response_rows(pairs, ("chosen", "rejected")),
                                                 tokenizer.pad_token_id, device)  # fmt: skip
                losses, chosen_rewards, rejected_rewards = preference_loss(
                    logps, n_tokens, ref_chosen, ref_rejected, args=args, beta=beta, z_ref=z_ref
                )
                loss = share_of_global_mean(losses, weights, normalizer, run.world, accum)
                grad_norm = backward_and_step(accelerator, model, optimizer, loss, args.max_grad_norm)
            statistics = preference_statistics(chosen_rewards, rejected_rewards, logps, weights)
            sums.update(statistics | {"train/loss": loss.item() / (run.world * accum)})
        scheduler.step()

        progress = {"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm,
                    "train/epoch": (step + 1) * args.po_epochs / len(steps)}  # fmt: skip
        if step >= logged:  # a step a killed launch logged is redone, not logged again
            run.log_step(progress, time.time() - started, sums=per_pair(sums), show=f"po step {step + 1}/{len(steps)}")
        if (step + 1) % args.save_every == 0 or step + 1 == len(steps):
            save_resumable(accelerator, model, run.dir / "po", step + 1, optimizer, scheduler)
    return model


# =============================================================================================== evaluation

JUDGE_PROMPT = """You are an expert judge of conversational recommender systems that help users find a {domain}. Compare the system's side of two dialogue trajectories with the same user and decide which system interacts better.

1. Flexibility: how well does the system adapt to changes in the user's requests or shifts in the conversation? 1: A is more flexible. -1: B is more flexible. 0: equally flexible.
2. Coherence: how consistent and fluid is the dialogue; does the system remember the context and answer the user's input? 1: A is more coherent. -1: B is more coherent. 0: equally coherent.
3. User Guidance: how well does the system guide the user, clarify requests, or steer the conversation somewhere productive? 1: A guides better. -1: B guides better. 0: similar guidance.
4. Overall Evaluation: based on the three dimensions, which trajectory is better?

Trajectory A:
{a}

Trajectory B:
{b}

Score each with 1, -1 or 0, then answer with JSON only:
{{"Flexibility": {{"Reason": "{{reason}}", "Score": -1 or 1 or 0}}, "Coherence": {{"Reason": "{{reason}}", "Score": -1 or 1 or 0}}, "User Guidance": {{"Reason": "{{reason}}", "Score": -1 or 1 or 0}}, "Final Score": -1 or 1 or 0}}"""  # noqa: E501  (prompt text, kept verbatim)

JUDGE_DIMENSIONS = {
    "Flexibility": "flexibility",
    "Coherence": "coherence",
    "User Guidance": "user_guidance",
    "Final Score": "final",
}


def render_episode(episode: dict) -> str:
    history = [{"role": "user", "content": episode["opening"]["user"]}]
    for t in episode["turns"]:
        history.append({"role": "assistant", "content": t["system"]})
        if t["user"]:
            history.append({"role": "user", "content": t["user"]})
    return render_history(history)


def parse_judgement(text: str) -> dict[str, int] | None:
    """Fig. 11's JSON -> {flexibility, coherence, user_guidance, final} in {-1, 0, 1}; needs at least the final
    score. A dimension may be a number or {"Reason", "Score"}."""
    data = parse_json(text)
    if not isinstance(data, dict):
        return None
    lowered = {str(k).strip().lower(): v for k, v in data.items()}
    scores = {}
    for name, short in JUDGE_DIMENSIONS.items():
        value = lowered.get(name.lower())
        if isinstance(value, dict):
            value = {str(k).lower(): v for k, v in value.items()}.get("score")
        score = coerce_int(value, -1, 1) if value is not None else None
        if score is not None:
            scores[short] = score
    return scores if "final" in scores else None


def judge_jobs(candidates: list[dict], expert: list[dict], label: str, domain: str) -> list[dict]:
    """Fig. 11's comparisons of each candidate episode with the expert's on the same task, in both position orders:
    the candidate as A ("ab"), then as B ("ba")."""
    expert_by_task = {e["key"]: e for e in expert}
    jobs = []
    for episode in candidates:
        other = expert_by_task.get(episode["key"])
        if other is None:
            continue
        for order, (a, b) in (("ab", (episode, other)), ("ba", (other, episode))):
            prompt = JUDGE_PROMPT.format(domain=domain, a=render_episode(a), b=render_episode(b))
            jobs.append({"key": f"{label}|{episode['key']}|{order}", "label": label, "order": order, "prompt": prompt})
    return jobs


def judge_pairs(jobs: list[dict], *, judge, args: Args, stats: ParseStats) -> Iterator[dict]:
    """Fig. 11 judgements of ``judge_jobs``, a batch at a time, each yielded as it is read."""
    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start : start + args.batch_size]
        conversations = [[{"role": "user", "content": job["prompt"]}] for job in chunk]
        if args.judge_scoring == "expected":
            read = expected_judgements(judge, conversations, args.judge_max_tokens)
        else:
            parsed, _ = chat_parsed(
                judge, conversations, parse_judgement, stats, max_tries=args.max_parse_tries,
                max_tokens=args.judge_max_tokens,
            )  # fmt: skip
            read = [(scores, None) for scores in parsed]
        for job, (scores, outside) in zip(chunk, read):
            yield {"key": job["key"], "label": job["label"], "order": job["order"], "scores": scores,
                   "mass_outside": outside}  # fmt: skip


VERDICTS = {"1": 1.0, "0": 0.0, "-1": -1.0}  # A better, a tie, B better


def expected_judgements(judge, conversations: list[list[dict]], max_tokens: int) -> list[tuple[dict, dict]]:
    """Fig. 11's judgement read from the judge's answer distribution: the JSON is pre-filled dimension by dimension;
    each reason is generated up to the quote that closes its JSON string (``json_string``; generation stops at the
    next key or at '"}'), then the verdict read in one batched pass as its expectation over {1, 0, -1}, each written
    in full after '"Score":' (" -1" is two tokens, " -" and "1"): P(1) - P(-1) (P(A better) - P(B better)). The
    JSON goes on with the most probable verdict, so each later dimension, and the overall score last, reads after a
    definite answer. An API judge answers greedily and each verdict is read where its own JSON writes it
    (``scores_in_answers``). Returns, per conversation, ({dimension: expected verdict}, {dimension: the probability
    outside 1, 0, -1})."""
    if not getattr(judge, "can_prefill", False):  # an API judge: read where its own greedy answer writes each score
        leads = [rf'"{name}"\s*:\s*{{[^{{}}]*"Score"\s*:\s*"?' for name in JUDGE_DIMENSIONS if name != "Final Score"]
        leads.append(r'"Final Score"\s*:\s*"?')
        answers = scores_in_answers(judge, conversations, leads, VERDICTS, max_tokens)
        return [
            (
                {short: e.value for short, e in zip(JUDGE_DIMENSIONS.values(), read) if e and e.value is not None},
                {short: e.mass_outside for short, e in zip(JUDGE_DIMENSIONS.values(), read) if e},
            )
            for _, read in answers
        ]
    prefixes, scores, outside = ["{"] * len(conversations), [{} for _ in conversations], [{} for _ in conversations]
    for name, short in JUDGE_DIMENSIONS.items():
        if short == "final":
            prefixes = [p + f'"{name}": ' for p in prefixes]
        else:
            prefixes = [p + f'"{name}": {{"Reason": "' for p in prefixes]
            reasons = judge.chat(conversations, max_tokens=max_tokens, stop=['"Score"', '"}'], prefix=prefixes)
            prefixes = [p + json_string(r[0])[0] + '", "Score": ' for p, r in zip(prefixes, reasons)]
        read = expected_scores(judge, conversations, VERDICTS, prefixes)
        for k, e in enumerate(read):
            scores[k][short], outside[k][short] = e.value, e.mass_outside
        prefixes = [p + max(e.probs, key=e.probs.get) + "}, " for p, e in zip(prefixes, read)]
    return [({k: v for k, v in s.items() if v is not None}, o) for s, o in zip(scores, outside)]


def win_rate(scores_ab: list[float], scores_ba: list[float]) -> float:
    """(wins + 0.5 ties) / total over both position orders. ``scores_ab[i]`` is the judge's verdict with the
    candidate shown as A (1 = A better, -1 = B better, 0 = tie); ``scores_ba[i]`` is the verdict on the same pair
    with the positions swapped, so it is negated to speak for the candidate again. An expected verdict v in
    [-1, 1] (P(win) - P(loss)) counts (1 + v) / 2, its expected share of (wins + 0.5 ties): on the integers
    -1, 0, 1 that is exactly 0, 0.5, 1."""
    verdicts = list(scores_ab) + [-s for s in scores_ba]
    if not verdicts:
        return 0.0
    return sum((1 + v) / 2 for v in verdicts) / len(verdicts)


def win_rates(judgements: list[dict], label: str, prefix: str) -> dict[str, float]:
    """eval/wr (on the final score) and eval/wr_<dimension>: (wins + 0.5 ties) / judgements, both orders."""
    mine = [j for j in judgements if j["label"] == label and j["scores"]]
    metrics = {
        f"{prefix}/judgements": len(mine),
        f"{prefix}/judge_failures": sum(1 for j in judgements if j["label"] == label and not j["scores"]),
    }
    outside = [o for j in mine for o in (j.get("mass_outside") or {}).values()]
    metrics |= mass_metrics(outside, f"{prefix}/judge")
    for short in JUDGE_DIMENSIONS.values():
        ab = [j["scores"][short] for j in mine if j["order"] == "ab" and short in j["scores"]]
        ba = [j["scores"][short] for j in mine if j["order"] == "ba" and short in j["scores"]]
        if ab or ba:
            metrics[f"{prefix}/wr" if short == "final" else f"{prefix}/wr_{short}"] = win_rate(ab, ba)
    return metrics


# =============================================================================================== stages (Fig. 2)


@dataclass
class Data:
    sft: list[Task]  # D_sft's tasks, played by the teacher
    pre: list[Task]  # D_pre's tasks, played by pi_sft once each
    evaluated: list[Task]  # held out, for evaluation
    catalog: Catalog  # the item database Search retrieves from
    domain: str


def load_data(args: Args) -> Data:
    """D_sft's and D_pre's tasks, disjoint, drawn from the train file as --train-tasks says (by default the paper's
    random sample: the file's order under a --seed shuffle, so that more --num-pre-tasks extend D_pre); test tasks,
    the first of the held-out file, read only when the eval stage runs."""
    train = load_tasks(args.dataset, args.data_dir, "train")
    test = load_tasks(args.dataset, args.data_dir, "test") if "eval" in args.stages else []
    if len(train) < args.num_sft_tasks + args.num_pre_tasks:
        raise InputError(
            f"{args.num_sft_tasks} + {args.num_pre_tasks} training tasks asked for, the train split has {len(train)}"
        )
    catalog = Catalog(load_task_items(args.dataset, args.data_dir, train + test))
    order = list(range(len(train)))
    if args.train_tasks == "random":  # Book's file is grouped by user: its first 1500 lines hold 27 + 15 of 95 users
        random.Random(args.seed).shuffle(order)
    sft = [train[i] for i in order[: args.num_sft_tasks]]
    pre = [train[i] for i in order[args.num_sft_tasks : args.num_sft_tasks + args.num_pre_tasks]]
    return Data(sft, pre, test[: args.num_test_tasks], catalog, TASK_DOMAINS[args.dataset])


def check_args(args: Args, world: int) -> list[str]:
    """Flags that cannot work on ``world`` ranks, refused before anything loads: the global batch of each training
    stage asked for must split evenly into ranks x micro-batches. Returns those splits, for the dry run's plan."""
    if not 0 <= args.lam <= 5:
        raise InputError(f"--lam {args.lam:g} lies outside AILO's rating scale 0-5 (paper: 4; the sweep is 1..4)")
    micro, batches = args.micro_batch_size, []
    if "sft" in args.stages:
        batches.append(check_division(world, args.sft_batch_size, micro, "--sft-batch-size"))
    if "po" in args.stages:
        batches.append(check_division(world, args.po_batch_size, micro, "--po-batch-size"))
    return batches


def recorded_episodes(run: Run, name: str, tasks: list[Task], stage: str) -> list[dict]:
    """The episodes of ``tasks`` that an earlier stage, maybe of an earlier launch, recorded in ``name``, but the
    conversations AILO's leak guard dropped."""
    wanted = {t.key for t in tasks}
    records = [r for r in run.records(name).records() if r["key"] in wanted]
    if not records:
        raise InputError(f"no episodes in {run.dir / name}: run the {stage} stage first")
    return kept(records)


def sft_adapter(run: Run) -> Path:
    if not run.finished("sft_adapter"):
        raise InputError(f"no {run.dir / 'sft_adapter'}: run the sft stage first")
    return run.dir / "sft_adapter"


def rollout(run: Run, args: Args, data: Data, *, cra_llm, tasks: list[Task], few_shot: bool, name: str,
            show: bool = False) -> list[dict]:  # fmt: skip
    """ActCRS on ``cra_llm`` against AILO, each conversation recorded in ``name`` as it finishes; each rank plays its
    share of ``tasks``, every rank returns all of them but the conversations AILO's leak guard dropped. ``show``
    prints each as it finishes."""
    simulator = AILO(
        run.llm(args.user_llm, args.batch_size), domain=data.domain, max_tokens=args.user_max_tokens,
        max_parse_tries=args.max_parse_tries, target_note=args.target_note, ec_scoring=args.judge_scoring,
        leak_guard=args.leak_guard,
    )  # fmt: skip
    stats = ParseStats()
    cra = make_actcrs(cra_llm, catalog=data.catalog, domain=data.domain, args=args, few_shot=few_shot, stats=stats)

    def play(todo: list[Task]) -> Iterator[dict]:
        episodes = run_episodes(
            todo, cra=cra, simulator=simulator, max_turns=args.max_turns, batch_size=args.batch_size
        )
        return printed(episodes, show)

    episodes = run.map(name, tasks, play, desc="conversations")
    run.count(simulator.metrics() | stats.metrics("rollout/cra_"))
    return kept(episodes)


class TokenBudget:
    """The trained policy's hf backend with each call split into batches of at most ``budget`` tokens counted as
    padded (``token_batches``), prompts of similar length together; a call within the budget goes through whole, as
    before. A rollout advances --batch-size conversations together: on the paper's recipe about 63 a rank, whose
    prompts reach ~4k tokens at turn 5, so one batch padded to the longest held their whole key/value cache."""

    can_prefill = True

    def __init__(self, llm: HFChat, budget: int):
        self.llm, self.budget, self.usage = llm, budget, llm.usage
        self.split_calls = 0  # calls the budget split

    def _batches(self, conversations, prefix, rows_per_prompt: int, new_tokens: int) -> list[list[int]]:
        lengths = [len(ids) for ids in prompt_ids(self.llm.tokenizer, conversations, prefix)]
        batches = token_batches(lengths, new_tokens, self.budget, rows_per_prompt)
        self.split_calls += len(batches) > 1
        return batches

    def _split(self, method, conversations, prefix, batches: list[list[int]], **kwargs) -> list:
        if len(batches) == 1:
            return method(conversations, prefix=prefix, **kwargs)
        prefixes, outputs = per_conversation(prefix, len(conversations)), [None] * len(conversations)
        for batch in batches:
            ordered = sorted(batch)
            done = method([conversations[i] for i in ordered], prefix=[prefixes[i] for i in ordered], **kwargs)
            for i, output in zip(ordered, done):
                outputs[i] = output
        return outputs

    def chat(self, conversations, n=1, temperature=0.0, max_tokens=256, stop=None, prefix: str | list[str] = ""):
        batches = self._batches(conversations, prefix, n, max_tokens)
        return self._split(self.llm.chat, conversations, prefix, batches, n=n, temperature=temperature,
                           max_tokens=max_tokens, stop=stop)  # fmt: skip

    def choice_probs(self, conversations, choices, prefix: str | list[str] = ""):
        batches = self._batches(conversations, prefix, 1, 0)  # one pass over each prompt, then a few tokens
        return self._split(self.llm.choice_probs, conversations, prefix, batches, choices=choices)


def token_batches(lengths: list[int], new_tokens: int, budget: int, rows_per_prompt: int = 1) -> list[list[int]]:
    """Prompt indices in batches, shortest first, each within ``budget`` tokens as the batch is padded: rows x (its
    longest prompt + ``new_tokens``), ``rows_per_prompt`` rows per prompt. A prompt over the budget on its own is a
    batch of its own; budget 0 puts every prompt in one batch."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        rows = (len(batches[-1]) + 1) * rows_per_prompt if batches else 0
        if batches and (not budget or rows * (lengths[i] + new_tokens) <= budget):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def policy_rollout(run: Run, args: Args, data: Data, *, tasks: list[Task], adapters: list[Path], name: str,
                   show: bool = False) -> list[dict]:  # fmt: skip
    """The trained policy (pi_sft, or ECPO's on top) against AILO, greedy, its generation batches within
    --rollout-batch-tokens."""
    model, tokenizer = load_policy(args, adapters, run.device)
    policy = TokenBudget(run.count_costs(HFChat(model, tokenizer, args.batch_size)), args.rollout_batch_tokens)
    episodes = rollout(run, args, data, cra_llm=policy, tasks=tasks, few_shot=False, name=name, show=show)
    run.count({"rollout/policy_calls_split": policy.split_calls})
    return episodes


def teacher_rollouts(run: Run, args: Args, data: Data) -> dict:
    """Sec. 3.1: the teacher CRA, shown one example dialogue, talks with AILO on the D_sft tasks."""
    teacher = run.llm(args.teacher_llm, args.batch_size)
    episodes = rollout(run, args, data, cra_llm=teacher, tasks=data.sft, few_shot=args.few_shot,
                       name="teacher_episodes.jsonl")  # fmt: skip
    metrics = episode_metrics(episodes, args.max_turns)
    return {"rollout/teacher_sr": metrics["eval/sr"], "rollout/teacher_recall": metrics["eval/recall"]}


def sgpt(run: Run, args: Args, data: Data) -> dict:
    """Simulator-guided planning tuning (Sec. 3.1, Eq. 1): LoRA SFT on every CRA call (Search included) of the
    teacher's successful episodes, each prompt without the few-shot block. pi_sft = the policy with it merged."""
    if run.finished("sft_adapter"):
        return {"rollout/sft_examples": len(run.records("sft_data.jsonl").records())}
    teacher = recorded_episodes(run, "teacher_episodes.jsonl", data.sft, "teacher")
    d_sft = [
        {"key": f"{episode['key']}#{t['turn']}#{k}", "prompt": call["state"], "completion": call["action"]}
        for episode in teacher
        if episode["success"]
        for t in episode["turns"]
        for k, call in enumerate(t["cra"]["calls"])
        if call["action"] is not None
    ]
    if run.main:
        records = run.records("sft_data.jsonl")
        done = records.done_keys()
        for example in (e for e in d_sft if e["key"] not in done):
            records.append(example)
    run.save_dataset("d_sft", [sft_row(e["prompt"], e["completion"]) for e in d_sft])
    model, tokenizer = load_policy(args, [], run.device, trainable=True)
    if d_sft:
        encoded = [encode(tokenizer, e["prompt"], e["completion"], args.max_length) for e in d_sft]
        examples = [{"input_ids": ids, "completion_mask": mask} for ids, mask in encoded]
        # Eq. 1: the token-mean NLL of the teacher's actions (common/sft.py)
        model = supervised_finetuning(
            run, args, model, tokenizer, examples, "sft", lr=args.sft_lr, batch_size=args.sft_batch_size,
            epochs=args.sft_epochs, warmup_ratio=args.warmup_ratio, metric_prefix="train_sft",
        )  # fmt: skip
    elif run.main:
        print(
            "no successful teacher episode, so D_sft is empty and pi_sft is the base policy "
            "(use more --num-sft-tasks or a stronger --teacher-llm)"
        )
    save_final(run.accelerator, model, run.dir / "sft_adapter", {"examples": len(d_sft)})
    return {"rollout/sft_examples": len(d_sft)}


def forward_expectation_confirmation(run: Run, args: Args, data: Data) -> dict:
    """Sec. 3.2, forward: pi_sft (greedy) talks with AILO on the D_pre tasks, one episode each, and AILO rates
    every visible response as the conversation goes: (s_t, p_t, CONF_t, r_t)."""
    forward = policy_rollout(run, args, data, tasks=data.pre, adapters=[sft_adapter(run)],
                             name="forward_episodes.jsonl")  # fmt: skip
    if run.main:
        print(rating_table(rated_turns(forward), args.lam))
    ratings = [t["ec_rating"] for e in forward for t in e["turns"] if t["ec_rating"] is not None]
    expected = [t["ec_expected"] for e in forward for t in e["turns"] if t.get("ec_expected") is not None]
    return {
        "rollout/forward_sr": episode_metrics(forward, args.max_turns)["eval/sr"],
        "rollout/forward_turns": sum(len(e["turns"]) for e in forward),
        "rollout/ec_ratings": len(ratings),
        "rollout/ec_rating_mean": sum(ratings) / max(len(ratings), 1),
        **({"rollout/ec_expected_mean": sum(expected) / len(expected)} if expected else {}),
        "rollout/system_errors": sum(t["system"] == SYSTEM_ERROR for e in forward for t in e["turns"]),
    }


def backward_expectation_derivation(run: Run, args: Args, data: Data) -> dict:
    """Sec. 3.2, backward: each response with r_t <= lambda is rewritten by an LLM given the dialogue and CONF_t;
    a well-formed rewrite that differs from p_t makes the pair (s_t, rewrite > p_t) of D_pre."""
    turns = rewritable_turns(recorded_episodes(run, "forward_episodes.jsonl", data.pre, "forward"), args.lam)
    rewriter, stats = run.llm(args.rewriter_llm, args.batch_size), ParseStats()
    derive = partial(derive_pairs, rewriter=rewriter, domain=data.domain, args=args, stats=stats)
    rewrites = run.map("rewrites.jsonl", turns, derive, desc="rewrites")  # the file keeps every lambda's rewrites
    run.count(stats.metrics("rollout/rewriter_"))
    pairs = select_pairs(rewrites, args.lam)
    if run.main:  # D_pre for this lambda, replaced whole so that it always matches the flag
        (run.dir / "pairs.jsonl.tmp").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        (run.dir / "pairs.jsonl.tmp").rename(run.dir / "pairs.jsonl")
    run.save_dataset("d_pre", [preference_row(p["prompt"], p["chosen"], p["rejected"]) for p in pairs])
    statuses = [r["status"] for r in rewrites]
    counts = {f"rollout/rewrite_{s}": statuses.count(s) for s in ("ok", "unparsable", "bad_format", "unchanged")}
    return {"rollout/rewrite_turns": len(turns), "rollout/pairs": len(pairs), **counts}


def preference_optimization(run: Run, args: Args) -> dict:
    """Sec. 3.3: a fresh LoRA on pi_sft trained on D_pre with --loss (DPO, Eq. 3, by default); the reference is
    pi_sft itself, the adapter switched off, its log-probs computed once."""
    if run.finished("po_adapter"):
        return {}
    path = run.dir / "pairs.jsonl"
    if not path.exists():
        raise InputError(f"no preference pairs in {path}: run the backward stage first")
    pairs = [json.loads(line) for line in path.read_text().splitlines()]
    if not pairs:  # a result, not an error: every rated response met the user's expectation at this lambda
        if run.main:
            print(f"D_pre is empty at lambda = {args.lam:g}: no ECPO policy to train (a higher --lam rewrites more)")
        return {}
    model, tokenizer = load_policy(args, [sft_adapter(run)], run.device, trainable=True)
    examples = pair_examples(tokenizer, pairs, args.max_length)
    model = train_preferences(run, args, model, tokenizer, examples)
    save_final(run.accelerator, model, run.dir / "po_adapter", {"pairs": len(pairs), "loss": args.loss})
    return {}


def evaluate(run: Run, args: Args, data: Data) -> dict:
    """Sec. 4: the Expert CRA, pi_sft and the ECPO policy on the held-out tasks, greedy: SR, R, and the win rate
    against the Expert CRA, judged in both position orders (Fig. 11)."""
    show, expert_cra = args.print_conversations, run.llm(args.expert_cra_llm, args.batch_size)
    expert = rollout(run, args, data, cra_llm=expert_cra, tasks=data.evaluated, few_shot=args.few_shot,
                     name="eval_expert.jsonl", show=show)  # fmt: skip
    policies = {"eval_sft": ([sft_adapter(run)], "eval_sft.jsonl")}
    if run.finished("po_adapter"):
        policies["eval"] = ([sft_adapter(run), run.dir / "po_adapter"], "eval_ecpo.jsonl")
    candidates = {label: policy_rollout(run, args, data, tasks=data.evaluated, adapters=adapters, name=name, show=show)
                  for label, (adapters, name) in policies.items()}  # fmt: skip
    stats, metrics = ParseStats(), {}
    judge = partial(judge_pairs, judge=run.llm(args.judge_llm, args.batch_size), args=args, stats=stats)
    for label, episodes in {"eval_expert": expert, **candidates}.items():
        episode = episode_metrics(episodes, args.max_turns)
        metrics |= {f"{label}/sr": episode["eval/sr"], f"{label}/recall": episode["eval/recall"]}
        if label != "eval_expert":
            jobs = judge_jobs(episodes, expert, label, data.domain)
            metrics |= win_rates(run.map("judgements.jsonl", jobs, judge, desc=f"judge {label}"), label, label)
    run.count(stats.metrics("rollout/judge_"))
    return metrics


def cost_metrics(run_dir: Path, data: Data) -> dict[str, float]:
    """The run's LLM calls and tokens (every row of costs.jsonl, resumed invocations included), and what building
    D_pre cost per preference pair: the calls and tokens of the forward rollouts and the rewrites, and the forward
    episodes, which the metrics call trajectories as the paper's Fig. 5 does (ECPO 500 on 500 tasks,
    trajectory-level MTPO 1000, tree-based SDPO/SKTO 2500). The SGPT teacher rollouts are reported apart, as every
    method starts from pi_sft."""
    rows = RecordFile(run_dir / "costs.jsonl").records()
    pairs = len(RecordFile(run_dir / "pairs.jsonl").records())
    played = {name: RecordFile(run_dir / f"{name}_episodes.jsonl").done_keys() for name in ("teacher", "forward")}
    forward_episodes = sum(t.key in played["forward"] for t in data.pre)
    metrics = {
        "cost/llm_calls": sum(r["llm_calls"] for r in rows),
        "cost/tokens": sum(r["tokens"] for r in rows),
        "cost/pairs": pairs,
        "cost/forward_trajectories": forward_episodes,
        "cost/teacher_trajectories": sum(t.key in played["teacher"] for t in data.sft),
        "cost/teacher_llm_calls": sum(r["llm_calls"] for r in rows if r["stage"] == "teacher"),
    }
    if pairs:
        pair_rows = [r for r in rows if r["stage"] in ("forward", "backward")]
        metrics |= {
            "cost/llm_calls_per_pair": sum(r["llm_calls"] for r in pair_rows) / pairs,
            "cost/tokens_per_pair": sum(r["tokens"] for r in pair_rows) / pairs,
            "cost/trajectories_per_pair": forward_episodes / pairs,
        }
    return metrics


def print_summary(metrics: dict) -> None:
    print(f"\n{'policy':<16}{'SR':>7}{'R':>7}{'WR':>7}")
    for name, prefix in (("expert CRA", "eval_expert"), ("pi_sft (SGPT)", "eval_sft"), ("ECPO", "eval")):
        if f"{prefix}/sr" in metrics:
            wr = metrics.get(f"{prefix}/wr")
            print(
                f"{name:<16}{metrics[f'{prefix}/sr']:>7.2f}{metrics[f'{prefix}/recall']:>7.2f}"
                f"{'   -' if wr is None else f'{wr:>7.2f}'}"
            )


# =============================================================================================== main


# What runs/<run>/curves.png draws: the signal each update moves, and the evaluation beside its baselines.
CURVES = {
    "SGPT loss (Eq. 1)": ["train_sft/loss"],
    "ECPO loss (--loss)": ["train/loss"],
    "implicit rewards": ["train/rewards/accuracies", "train/rewards/margins"],
}
BARS = {"SR": ["eval_expert/sr", "eval_sft/sr", "eval/sr"], "win rate vs the expert": ["eval_sft/wr", "eval/wr"]}


def main(args: Args) -> None:
    check_specs(args)  # a wrong model or LLM spec stops here, not after minutes of an earlier stage
    batches = check_args(args, args.dry_run or launched_processes())
    data = load_data(args)
    if args.dry_run:
        sizes = {"D_sft tasks": len(data.sft), "D_pre tasks": len(data.pre), "test tasks": len(data.evaluated)}
        print_dry_run("ecpo.py", args.dry_run, batches, sizes | {"items": len(data.catalog)})
        return
    run = Run(args)  # runs/<run_name>/, ranks, seeding, metrics; each run.stage is timed and its LLM costs booked
    data.catalog.embeddings()  # build (or load) the retrieval index once, before any rollout
    run.stage("teacher", teacher_rollouts, args, data)  # the teacher CRA's conversations with AILO
    run.stage("sft", sgpt, args, data)  # Eq. 1: SFT on the successful ones -> pi_sft
    run.stage("forward", forward_expectation_confirmation, args, data)  # pi_sft's turns, each rated r_t by AILO
    run.stage("backward", backward_expectation_derivation, args, data)  # rewrites of r_t <= lambda -> D_pre
    run.stage("po", preference_optimization, args)  # Eq. 3: DPO on D_pre against pi_sft
    run.stage("eval", evaluate, args, data)  # SR, R and win rate against the expert
    run.log(cost_metrics(run.dir, data))
    if run.main:  # every simulated user turn the run recorded, checked for its target's title
        audit = audit_leaks(run.dir)
        print_audit(*audit)
        run.log(audit[0])
    run.finish(print_summary, CURVES, BARS)


if __name__ == "__main__":
    try:
        main(parse_args(Args, PRESETS))
    except (InputError, ModelSpecError, LLMBackendError) as err:
        raise SystemExit(f"error: {err}") from None
