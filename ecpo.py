"""ECPO: Expectation Confirmation Preference Optimization for a multi-turn conversational recommender agent
(Feng et al., 2025, Sec. 2.2 and 3, App. B-D).

    python ecpo.py                                        # every stage on the embedded SmolLM2 + bundled demo
    accelerate launch ecpo.py --lam 4                     # the same, on every rank accelerate gives it
    python ecpo.py --stages forward backward --lam 2      # rerun part of the pipeline in an existing run
    accelerate launch --config_file configs/gpu_ddp.yaml ecpo.py --dataset book \\
        --policy meta-llama/Llama-3.1-8B-Instruct --user-llm openai:gpt-4o-mini ...   # see README, Table 1

The CRA is ActCRS: one action per LLM call, Search[keywords] | Ask[question] | Recommend[answer] |
Response[content]. Search calls the dense retriever and the agent acts again; the other three are shown to the
user. The pipeline, one stage per function below, each writing its records under runs/<run_name>/:

  teacher   a teacher CRA talks with the AILO simulator on D_sft tasks      -> teacher_trajectories.jsonl
  sft       SGPT: LoRA SFT (Eq. 1) on every CRA call of the successful ones -> sft_data.jsonl, sft_adapter/
  forward   pi_sft talks with AILO on D_pre tasks; AILO rates every visible
            response (forward expectation confirmation: CONF_t, r_t)        -> forward_trajectories.jsonl
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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm

from ailo_sim import AILO, CRAReply, episode_metrics, render_history, run_episodes
from common.catalog import Catalog, item_card
from common.data import DataError, Task, load_demo_catalog, load_demo_tasks, load_ecpo_items, load_ecpo_tasks
from common.distributed import (
    configure_batches,
    global_batches,
    make_accelerator,
    rank_micro_batches,
    resume,
    save_final,
    save_resumable,
)
from common.llm import HFChat, LLMBackendError, make_llm
from common.metrics import win_rate
from common.models import ModelSpecError, add_lora, load_model
from common.parsing import ParseStats, chat_parsed, coerce_int, parse_action, parse_json
from common.tokens import collate, encode_prompt_completion, sequence_logprobs
from common.tracking import RecordFile, Tracker, default_run_name, seed_everything

STAGES = ("teacher", "sft", "forward", "backward", "po", "eval")


@dataclass
class Args:
    exp_name: str = "ecpo"
    """the name of this experiment (prefix of the default run name)"""
    seed: int = 1
    """seed of python, numpy and torch: LoRA init, data order, sampled retries"""
    run_name: str | None = None
    """outputs go to runs/<run_name>/; rerun with the same name to resume (default: <exp_name>__<seed>__<time>)"""
    stages: tuple[Literal["teacher", "sft", "forward", "backward", "po", "eval"], ...] = STAGES
    """which stages to run, in pipeline order; each reads what the earlier ones left in the run folder"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works) as well as runs/<run_name>/metrics.jsonl"""
    wandb_project: str = "cleancrs"
    """the W&B project"""
    wandb_entity: str | None = None
    """the W&B entity (team); None uses your default"""

    # ------------------------------------------------------------------------------------------- data
    dataset: Literal["demo", "book", "game", "yelp"] = "demo"
    """demo: the bundled movie tasks; book/game/yelp: the ECPO task files under --data-dir"""
    data_dir: str = "../shared/data"
    """root of the real data (see README 'Data'); unused for the demo"""
    num_sft_tasks: int = 4
    """training tasks the teacher plays to build D_sft (paper: 1000)"""
    num_pre_tasks: int = 4
    """further training tasks pi_sft plays to build D_pre, one trajectory each (paper: 500)"""
    num_test_tasks: int = 2
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
    expert_llm: str = "hf:smollm2-135m"
    """backend of the expert CRA the win rate is measured against (paper: openai:gpt-4o-mini)"""
    judge_llm: str = "hf:smollm2-135m"
    """backend of the win-rate judge (paper: openai:gpt-4o)"""

    # ------------------------------------------------------------------------------------------- ActCRS
    max_turns: int = 5
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
    """show the teacher and the expert one example dialogue (the paper's optional few-shot block); it is never
    in the prompts of D_sft or of the trained policy"""
    action_max_tokens: int = 64
    """max new tokens of one action"""
    user_max_tokens: int = 64
    """max new tokens of each AILO call (policy, content, EC)"""
    max_parse_tries: int = 1
    """tries of any call whose output must parse; each retry is +0.3 temperature, as in the ECPO code. Use 3
    with API models; the embedded model rarely writes JSON, so on it retries only cost time (local backends
    fall back to constrained decoding instead)"""
    batch_size: int = 16
    """conversations advanced together; also the generation batch size of hf backends"""

    # ------------------------------------------------------------------------------------------- backward
    lam: float = 4.0
    """lambda: responses rated r_t <= lambda are rewritten (paper: 4; sweep 1..4)"""
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
    po_epochs: int = 3
    """ECPO epochs (ECPO code: 3)"""
    micro_batch_size: int = 1
    """examples (pairs, for ECPO) per rank per forward pass; accumulation fills the global batch. One pair of
    ~1.5k-token ActCRS states already holds several GiB of activations; 4 was killed for memory on 24 GiB"""
    warmup_ratio: float = 0.1
    """linear warmup share of the cosine schedule"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    max_length: int = 2048
    """cutoff in tokens of prompt + completion; longer prompts lose their oldest tokens"""
    save_every: int = 50
    """optimizer steps between resumable checkpoints (each stage also saves when it ends)"""

    # ------------------------------------------------------------------------------------------- eval
    judge_max_tokens: int = 256
    """max new tokens of one judgement"""
    print_conversations: bool = False
    """print every finished evaluation conversation"""


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
Action {n}:"""

FEW_SHOT = """
Here is an example:
Observation 1: User: Hi, can you suggest something for tonight?
Action 1: Ask[Sure! Are you in the mood for something light, or something tense and gripping?]
Observation 2: User: Something tense, maybe a mystery.
Action 2: Search[tense mystery thriller twist]
Observation 3: Search results: 1. The Silent Harbor (2015); genre: mystery, thriller 2. Night Ledger (2019); genre: crime, drama
Action 3: Recommend[You might enjoy The Silent Harbor (2015), a tense mystery whose twist recasts everything before it. Would you like something darker, like Night Ledger (2019)?]
(end of example)
"""


def actcrs_prompt(domain: str, scratchpad: list[str], few_shot: bool) -> str:
    """The state s_t: instruction, optional example, the scratchpad, and the slot for the next action."""
    return ACTCRS_PROMPT.format(
        domain=domain,
        examples=FEW_SHOT if few_shot else "",
        scratchpad="\n".join(scratchpad),
        n=sum(line.startswith("Action ") for line in scratchpad) + 1,
    )


def parse_actcrs(text: str, allowed=ACTIONS) -> str | None:
    """The normalized action string ``Type[argument]``, or None. Generation stops at "]", which is put back."""
    parsed = parse_action(text, allowed)
    return None if parsed is None else f"{parsed[0]}[{parsed[1]}]"


def split_action(action: str) -> tuple[str, str]:
    kind, _, rest = action.partition("[")
    return kind, rest[:-1] if rest.endswith("]") else rest


def decode_actions(
    llm, prompts: list[str], allowed, args: Args, stats: ParseStats, prefix: str = ""
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


def search_observation(catalog: Catalog, titles: list[str]) -> str:
    cards = [item_card(catalog.by_title[t], ("year", "genre", "categories", "price"))[:200] for t in titles]
    return "Search results: " + " ".join(f"{k}. {card}" for k, card in enumerate(cards, 1))


def make_actcrs(llm, catalog: Catalog, domain: str, args: Args, few_shot: bool, stats: ParseStats):
    """An ActCRS agent as a ``CRA`` for ``ailo_sim.run_episodes``. It keeps one scratchpad per conversation and,
    per user turn, acts until it takes a visible action: Search results are appended as Observations, up to
    ``max_searches`` chained searches; after that only Ask/Recommend/Response are accepted.

    Each reply's record holds every call of the turn as (state, action), the state without the few-shot
    block: these are SGPT's training examples and ECPO's (s_t, p_t)."""
    scratchpads: dict[str, list[str]] = {}

    def cra(keys: list[str], histories: list[list[dict]]) -> list[CRAReply]:
        pads = []
        for key, history in zip(keys, histories):
            pad = scratchpads.setdefault(key, [])
            pad.append(
                f"Observation {sum(l.startswith('Observation') for l in pad) + 1}: User: {history[-1]['content']}"
            )
            pads.append(pad)
        calls: list[list[dict]] = [[] for _ in keys]
        retrieved: list[list[str]] = [[] for _ in keys]
        replies: list[str | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        for searches in range(args.max_searches + 1):
            if not pending:
                break
            allowed = ACTIONS if searches < args.max_searches else VISIBLE_ACTIONS
            actions = decode_actions(
                llm, [actcrs_prompt(domain, pads[i], few_shot) for i in pending], allowed, args, stats
            )
            searching = []
            for i, action in zip(pending, actions):
                state = actcrs_prompt(domain, pads[i], few_shot=False)
                n = state.rsplit("Action ", 1)[1].rstrip(":")
                if action is None:  # the paper's fallback; the turn is shown to the user and gets no rewrite
                    calls[i].append({"state": state, "action": None, "type": "Error"})
                    replies[i] = SYSTEM_ERROR
                    pads[i].append(f"Action {n}: Response[{SYSTEM_ERROR}]")
                    continue
                kind, argument = split_action(action)
                calls[i].append({"state": state, "action": action, "type": kind})
                pads[i].append(f"Action {n}: {action}")
                if kind == "Search":
                    searching.append((i, argument))
                else:
                    replies[i] = argument
            if searching:
                for (i, _), titles in zip(searching, catalog.search([q for _, q in searching], args.retriever_top_k)):
                    retrieved[i] += [t for t in titles if t not in retrieved[i]]
                    pads[i].append(
                        f"Observation {sum(l.startswith('Observation') for l in pads[i]) + 1}: "
                        f"{search_observation(catalog, titles)}"
                    )
            pending = [i for i, _ in searching]
        return [
            CRAReply(
                text=reply or SYSTEM_ERROR,
                retrieved=found,
                record={
                    "calls": turn_calls,
                    "state": turn_calls[-1]["state"],
                    "action": turn_calls[-1]["action"],
                    "action_type": turn_calls[-1]["type"],
                },
            )
            for reply, found, turn_calls in zip(replies, retrieved, calls)
        ]

    return cra


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

Answer with JSON only: {{"reason": "<why the refinement fixes the flaws>", "refinement": "<the rewritten action: Ask[...], Recommend[...], Response[...] or Search[...]>"}}"""


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


def rewritable_turns(trajectories: list[dict], lam: float) -> list[dict]:
    """Eq. 2: every user-visible response rated r_t <= lambda. Responses that are the "System Error" fallback
    and turns without a parsed rating are left out (Sec. 1.9 of the spec)."""
    turns = []
    for trajectory in trajectories:
        for t in trajectory["turns"]:
            if t["ec_rating"] is None or t["ec_rating"] > lam or t["cra"].get("action") is None:
                continue
            turns.append(
                {
                    "key": f"{trajectory['key']}#{t['turn']}",
                    "state": t["cra"]["state"],
                    "action": t["cra"]["action"],
                    "conf": t["ec_reason"],
                    "rating": t["ec_rating"],
                }
            )
    return turns


def derive_pairs(turns: list[dict], rewriter, domain: str, args: Args, records: RecordFile, stats: ParseStats) -> None:
    """Backward expectation derivation: one rewrite per turn, appended to ``records`` (skipping done keys).
    Output that is not JSON with a well-formed action is retried; a well-formed rewrite equal to the original
    is kept as "unchanged" (it is a valid answer, just not a preference pair)."""
    done = records.done_keys()
    todo = [t for t in turns if t["key"] not in done]
    well_formed = lambda text: check_refinement(text, original="")[0]  # noqa: E731
    for start in tqdm(range(0, len(todo), args.batch_size), desc="rewrites", disable=not todo):
        chunk = todo[start : start + args.batch_size]
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
                ACTIONS,
                args,
                ParseStats(),
                prefix='{"refinement": "',
            )
            for k, action in zip(failed, actions):
                if action is not None:
                    texts[k] = json.dumps({"reason": "", "refinement": action})
        for turn, text in zip(chunk, texts):
            refinement, status = check_refinement(text, turn["action"])
            records.append({**turn, "refinement": refinement, "status": status, "raw": text})


def select_pairs(rewrites: list[dict], lam: float) -> list[dict]:
    """D_pre: the valid rewrites of turns rated <= lambda; chosen = rewrite, rejected = original."""
    return [
        {
            "key": r["key"],
            "prompt": r["state"],
            "chosen": r["refinement"],
            "rejected": r["action"],
            "rating": r["rating"],
            "conf": r["conf"],
        }
        for r in rewrites
        if r["status"] == "ok" and r["rating"] <= lam
    ]


# =============================================================================================== losses


def sft_loss(token_logps: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Eq. 1 (SGPT): the token-mean NLL of the completions. Returned as a per-example sum of token NLLs, so the
    training loop can divide by the number of completion tokens of the whole global batch."""
    return -token_logps


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:
    """Eq. 3 (ECPO+DPO): -log sigma(beta * lr_w - beta * lr_l), lr = log pi_theta - log pi_sft (sequence sums)."""
    logits = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(logits)


def simpo_loss(
    policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, beta: float, gamma: float
) -> torch.Tensor:
    """ECPO+SimPO (Table 4b): -log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma); no reference."""
    return -F.logsigmoid(beta * policy_chosen / chosen_tokens - beta * policy_rejected / rejected_tokens - gamma)


def kto_loss(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, z_ref, beta: float, lambda_w: float, lambda_l: float
) -> torch.Tensor:
    """ECPO+KTO (Table 4b, with the sign of the undesirable term corrected to the standard KTO form):
    lambda_w (1 - sigma(beta lr_w - z_ref)) for the rewrite and lambda_l (1 - sigma(z_ref - beta lr_l)) for the
    original. Each pair is one desirable and one undesirable example, so a pair's loss is their mean."""
    chosen = lambda_w * (1 - torch.sigmoid(beta * (policy_chosen - ref_chosen) - z_ref))
    rejected = lambda_l * (1 - torch.sigmoid(z_ref - beta * (policy_rejected - ref_rejected)))
    return (chosen + rejected) / 2


def kto_reference_point(policy_mismatched, ref_mismatched, weights, beta: float) -> torch.Tensor:
    """z_ref = beta * max(0, mean KL estimate) over mismatched (s_j, y_k) pairs of the batch, without gradient."""
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


def train_adapter(
    accelerator,
    model,
    tokenizer,
    examples: list[dict],
    loss_name: str,
    args: Args,
    stage_dir: Path,
    lr: float,
    batch_size: int,
    epochs: int,
    tracker: Tracker,
    metric_prefix: str,
    step_offset: int,
):
    """The optimization loop of both SGPT (loss "sft" on prompt/completion examples) and ECPO (on pairs with
    stored reference log-probs). Resumes from the newest checkpoint in ``stage_dir``. Returns the number of
    optimizer steps and the prepared model.

    Every loss is an average over the global batch, whatever the number of ranks: each rank's micro-batch sum
    is scaled by world * accum / (global normalizer), accelerate divides by accum, and DDP averages over ranks.
    """
    from transformers import get_cosine_schedule_with_warmup

    world, rank = accelerator.num_processes, accelerator.process_index
    micro = args.micro_batch_size
    batch_size, accum = configure_batches(accelerator, len(examples), batch_size, micro)
    steps = global_batches(len(examples), batch_size, epochs, args.seed)
    beta = args.beta if args.beta is not None else DEFAULT_BETA[loss_name]

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * len(steps)), len(steps))
    start = resume(model, optimizer, scheduler, stage_dir)
    if start and accelerator.is_main_process:
        print(f"resuming {stage_dir.name} at step {start}/{len(steps)}")
    # The scheduler stays unprepared: accelerate would step it once per rank, for sharded dataloaders.
    model, optimizer = accelerator.prepare(model, optimizer)
    while scheduler.last_epoch < start:  # a checkpoint saved without optimizer state (ZeRO-3)
        scheduler.step()
    model.train()
    device = accelerator.device
    pad_id = tokenizer.pad_token_id
    grad_norm = None
    pairs = "chosen_ids" in examples[0]  # ECPO pairs, else SGPT (prompt, completion) examples
    mask_key = "chosen_mask" if pairs else "completion_mask"

    for step in tqdm(
        range(start, len(steps)),
        desc=f"{stage_dir.name} steps",
        initial=start,
        total=len(steps),
        disable=not accelerator.is_main_process,
    ):
        batch = steps[step]
        # The normalizer of the global batch: pairs, or completion tokens for a token-mean loss.
        normalizer = sum(sum(examples[i][mask_key]) for i in batch) if loss_name == "sft" else len(batch)
        sums = torch.zeros(5, device=device)  # loss, chosen reward, rejected reward, accuracy, margin (weighted sums)
        for chunk in rank_micro_batches(batch, rank, world, micro, accum):
            index = [i for i, _ in chunk]
            weights = torch.tensor([w for _, w in chunk], device=device)
            with accelerator.accumulate(model):
                if not pairs:
                    rows = [(examples[i]["input_ids"], examples[i]["completion_mask"]) for i in index]
                    logps, n_tokens = sequence_logps(model, rows, pad_id, device)
                    per_example, rewards = sft_loss(logps, n_tokens), None
                else:
                    rows = [(examples[i]["chosen_ids"], examples[i]["chosen_mask"]) for i in index]
                    rows += [(examples[i]["rejected_ids"], examples[i]["rejected_mask"]) for i in index]
                    if loss_name == "kto":
                        rows += [(examples[i]["mismatched_ids"], examples[i]["mismatched_mask"]) for i in index]
                    # One concatenated forward pass for chosen, rejected (and KTO's mismatched) rows.
                    logps, n_tokens = sequence_logps(model, rows, pad_id, device)
                    b = len(index)
                    pc, pr, nc, nr = logps[:b], logps[b : 2 * b], n_tokens[:b], n_tokens[b : 2 * b]
                    rc = torch.tensor([examples[i]["ref_chosen"] for i in index], device=device)
                    rr = torch.tensor([examples[i]["ref_rejected"] for i in index], device=device)
                    if loss_name == "dpo":
                        per_example = dpo_loss(pc, pr, rc, rr, beta)
                    elif loss_name == "simpo":
                        per_example = simpo_loss(pc, pr, nc, nr, beta, args.simpo_gamma)
                    elif loss_name == "kto":
                        rm = torch.tensor([examples[i]["ref_mismatched"] for i in index], device=device)
                        z_ref = kto_reference_point(logps[2 * b :], rm, weights, beta)
                        per_example = kto_loss(pc, pr, rc, rr, z_ref, beta, args.kto_lambda_w, args.kto_lambda_l)
                    else:  # ECPO+SFT: NLL of the rewritten responses only
                        per_example = sft_loss(pc, nc)
                    rewards = (pc - rc).detach() * (beta or 1.0), (pr - rr).detach() * (beta or 1.0)
                loss = (per_example * weights).sum() * world * accum / normalizer
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()  # a no-op until the last micro-batch of the global batch
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                scheduler.step()
            sums[0] += loss.detach() / (world * accum)
            if rewards is not None:
                chosen, rejected = rewards
                sums[1:] += torch.stack(
                    [
                        (chosen * weights).sum(),
                        (rejected * weights).sum(),
                        ((chosen > rejected).float() * weights).sum(),
                        ((chosen - rejected) * weights).sum(),
                    ]
                )
        sums = accelerator.reduce(sums, reduction="sum")
        metrics = {
            f"{metric_prefix}/loss": sums[0].item(),
            f"{metric_prefix}/lr": scheduler.get_last_lr()[0],
            f"{metric_prefix}/grad_norm": float(grad_norm if grad_norm is not None else "nan"),
            f"{metric_prefix}/epoch": (step + 1) * epochs / len(steps),
        }
        if loss_name != "sft":
            metrics |= {
                f"{metric_prefix}/rewards_chosen": sums[1].item() / len(batch),
                f"{metric_prefix}/rewards_rejected": sums[2].item() / len(batch),
                f"{metric_prefix}/reward_accuracy": sums[3].item() / len(batch),
                f"{metric_prefix}/reward_margin": sums[4].item() / len(batch),
            }
        tracker.log(metrics, step=step_offset + step + 1)
        if (step + 1) % args.save_every == 0 or step + 1 == len(steps):
            save_resumable(accelerator, model, stage_dir, step + 1, optimizer, scheduler)
    return len(steps), model


# =============================================================================================== model loading


def load_policy(args: Args, adapters: list[Path], device, trainable: bool = False):
    """(model, tokenizer): the base policy with ``adapters`` merged in order (SGPT's gives pi_sft, ECPO's sits on
    top), plus a fresh LoRA if ``trainable``. Merging makes "adapter disabled" mean pi_sft, so the reference
    needs no second copy of the model. The ECPO code keeps training the SFT adapter instead; a fresh,
    zero-initialised adapter on the merged weights starts from the same policy pi_sft."""
    from peft import PeftModel

    model, tokenizer = load_model(args.policy)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if trainable:
        torch.manual_seed(args.seed)  # the same LoRA init on every rank and every rerun
        model = add_lora(model, rank=args.lora_rank, alpha=args.lora_alpha)
    return model.to(device), tokenizer


def final_adapter(run_dir: Path, stage: str) -> Path | None:
    folder = run_dir / f"{stage}_adapter"
    return folder if (folder / "steps.json").exists() else None


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
{{"Flexibility": {{"Reason": "...", "Score": 0}}, "Coherence": {{"Reason": "...", "Score": 0}}, "User Guidance": {{"Reason": "...", "Score": 0}}, "Final Score": 0}}"""

JUDGE_DIMENSIONS = {
    "Flexibility": "flexibility",
    "Coherence": "coherence",
    "User Guidance": "user_guidance",
    "Final Score": "final",
}


def render_trajectory(trajectory: dict) -> str:
    history = [{"role": "user", "content": trajectory["opening"]["user"]}]
    for t in trajectory["turns"]:
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


def judge_pairs(
    judge,
    candidate: list[dict],
    expert: list[dict],
    label: str,
    domain: str,
    args: Args,
    records: RecordFile,
    stats: ParseStats,
) -> None:
    """Fig. 11 judgements of candidate vs expert on the same tasks, in both position orders."""
    done = records.done_keys()
    expert_by_task = {t["key"]: t for t in expert}
    jobs = []
    for trajectory in candidate:
        other = expert_by_task.get(trajectory["key"])
        if other is None:
            continue
        for order, (a, b) in (("ab", (trajectory, other)), ("ba", (other, trajectory))):
            key = f"{label}|{trajectory['key']}|{order}"
            if key not in done:
                jobs.append((key, JUDGE_PROMPT.format(domain=domain, a=render_trajectory(a), b=render_trajectory(b))))
    for start in tqdm(range(0, len(jobs), args.batch_size), desc=f"judge {label}", disable=not jobs):
        chunk = jobs[start : start + args.batch_size]
        parsed, _ = chat_parsed(
            judge,
            [[{"role": "user", "content": p}] for _, p in chunk],
            parse_judgement,
            stats,
            max_tries=args.max_parse_tries,
            max_tokens=args.judge_max_tokens,
        )
        for (key, _), scores in zip(chunk, parsed):
            records.append({"key": key, "label": label, "order": key.rsplit("|", 1)[1], "scores": scores})


def win_rates(judgements: list[dict], label: str, prefix: str) -> dict[str, float]:
    """eval/wr (on the final score) and eval/wr_<dimension>: (wins + 0.5 ties) / judgements, both orders."""
    mine = [j for j in judgements if j["label"] == label and j["scores"]]
    metrics = {
        f"{prefix}/judgements": len(mine),
        f"{prefix}/judge_failures": sum(1 for j in judgements if j["label"] == label and not j["scores"]),
    }
    for short in JUDGE_DIMENSIONS.values():
        ab = [j["scores"][short] for j in mine if j["order"] == "ab" and short in j["scores"]]
        ba = [j["scores"][short] for j in mine if j["order"] == "ba" and short in j["scores"]]
        if ab or ba:
            metrics[f"{prefix}/wr" if short == "final" else f"{prefix}/wr_{short}"] = win_rate(ab, ba)
    return metrics


# =============================================================================================== data

DOMAINS = {"demo": "movie", "book": "book", "game": "video game", "yelp": "restaurant or local business"}


def load_splits(args: Args) -> tuple[list[Task], list[Task], list[Task], Catalog]:
    """(D_sft tasks, D_pre tasks, test tasks, catalog). Train tasks come from the train file in order; test tasks
    are the first ones of the held-out file (demo: the last 8 demo users, disjoint from the first 24)."""
    if args.dataset == "demo":
        tasks = load_demo_tasks()
        train, test, items = tasks[:24], tasks[24:], load_demo_catalog()
    else:
        name = args.dataset.capitalize()
        folder = Path(args.data_dir) / "ecpo" / name
        train = load_ecpo_tasks(folder / f"{name}_train.jsonl")
        test = load_ecpo_tasks(folder / f"{name}_test.jsonl") if "eval" in args.stages else []
        items = load_ecpo_items(folder / "items.jsonl") if (folder / "items.jsonl").exists() else []
        items += [t.target for t in train + test]  # the item DB: every item a task names, plus any released pool
    sft_tasks = train[: args.num_sft_tasks]
    pre_tasks = train[args.num_sft_tasks : args.num_sft_tasks + args.num_pre_tasks]
    if len(sft_tasks) + len(pre_tasks) < args.num_sft_tasks + args.num_pre_tasks:
        raise DataError(
            f"{args.num_sft_tasks} + {args.num_pre_tasks} training tasks asked for, the train split has {len(train)}"
        )
    return sft_tasks, pre_tasks, test[: args.num_test_tasks], Catalog(items)


# =============================================================================================== main


def main(args: Args) -> None:
    from accelerate.utils import gather_object

    accelerator = make_accelerator()
    rank, world, main_process = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    args.run_name = args.run_name or default_run_name(args.exp_name, args.seed)
    run_dir = Path("runs") / args.run_name
    seed_everything(args.seed + rank)
    tracker = Tracker(
        run_dir, args, track=args.track, project=args.wandb_project, entity=args.wandb_entity, is_main=main_process
    )
    sft_tasks, pre_tasks, test_tasks, catalog = load_splits(args)
    catalog.embeddings()  # build (or load) the retrieval index once, before any rollout
    domain, device = DOMAINS[args.dataset], accelerator.device

    # The frozen roles are built on first use, so a stage loads only what it needs. Every LLM's usage counter
    # (frozen roles and the policy's rollouts) is kept, for the cost accounting in costs.jsonl.
    roles: dict[str, object] = {}
    usages = []

    def role(name: str):
        if name not in roles:
            roles[name] = make_llm(getattr(args, f"{name}_llm"), batch_size=args.batch_size, device=device)
            usages.append(roles[name].usage)
        return roles[name]

    def usage_now() -> dict[str, int]:
        return {
            "llm_calls": sum(u.calls for u in usages),
            "tokens": sum(u.prompt_tokens + u.completion_tokens for u in usages),
        }

    costs = RecordFile(run_dir / "costs.jsonl", key="stage")

    def account(stage: str, before: dict, **extra) -> None:
        """Append the LLM calls and tokens this stage spent, summed over ranks (one row per stage run)."""
        delta = {k: v - before[k] for k, v in usage_now().items()}
        totals = gather_object([delta])
        if main_process:
            costs.append({"stage": stage, **{k: sum(t[k] for t in totals) for k in delta}, **extra})

    stats = {name: ParseStats() for name in ("cra", "rewriter", "judge")}
    simulator = None

    def rollout(tasks: list[Task], llm, few_shot: bool, records: RecordFile) -> list[dict]:
        """ActCRS on ``llm`` against AILO. Each rank plays its share of the tasks; all read the full record file."""
        nonlocal simulator
        if simulator is None:
            simulator = AILO(
                role("user"), domain=domain, max_tokens=args.user_max_tokens, max_parse_tries=args.max_parse_tries
            )
        cra = make_actcrs(llm, catalog, domain, args, few_shot, stats["cra"])
        run_episodes(
            tasks[rank::world],
            cra,
            simulator,
            args.max_turns,
            batch_size=args.batch_size,
            records=records,
            on_episode=print_trajectory if args.print_conversations else None,
        )
        accelerator.wait_for_everyone()
        wanted = {t.task_id for t in tasks}
        return [r for r in records.records() if r["key"] in wanted]

    def policy_rollout(tasks: list[Task], adapters: list[Path], records: RecordFile) -> list[dict]:
        model, tokenizer = load_policy(args, adapters, device)
        llm = HFChat(model, tokenizer, batch_size=args.batch_size)
        usages.append(llm.usage)
        trajectories = rollout(tasks, llm, few_shot=False, records=records)
        del model, llm
        return trajectories

    metrics: dict[str, float] = {}
    sft_dir, po_dir = run_dir / "sft_adapter", run_dir / "po_adapter"

    # ------------------------------------------------------------------------ 1. teacher rollouts (SGPT's data)
    teacher_records = RecordFile(run_dir / "teacher_trajectories.jsonl")
    if "teacher" in args.stages:
        before = usage_now()
        teacher = rollout(sft_tasks, role("teacher"), args.few_shot, teacher_records)
        account("teacher", before, trajectories=len(teacher))
        episode = episode_metrics(teacher, args.max_turns)
        metrics |= {"rollout/teacher_sr": episode["eval/sr"], "rollout/teacher_recall": episode["eval/recall"]}

    # ------------------------------------------------------------------------ 2. SGPT: LoRA SFT, Eq. 1
    if "sft" in args.stages and final_adapter(run_dir, "sft") is None:
        wanted = {t.task_id for t in sft_tasks}
        teacher = [r for r in teacher_records.records() if r["key"] in wanted]
        if not teacher:
            raise DataError(f"no teacher trajectories in {teacher_records.path}: run the teacher stage first")
        # D_sft: every CRA call (Search included) of every successful trajectory, its prompt without few-shot.
        d_sft = [
            {"key": f"{tr['key']}#{t['turn']}#{k}", "prompt": call["state"], "completion": call["action"]}
            for tr in teacher
            if tr["success"]
            for t in tr["turns"]
            for k, call in enumerate(t["cra"]["calls"])
            if call["action"] is not None
        ]
        if main_process:
            sft_file = RecordFile(run_dir / "sft_data.jsonl")
            done = sft_file.done_keys()
            for example in d_sft:
                if example["key"] not in done:
                    sft_file.append(example)
        metrics["rollout/sft_examples"] = len(d_sft)
        model, tokenizer = load_policy(args, [], device, trainable=True)
        steps = 0
        if d_sft:
            examples = [
                dict(
                    zip(
                        ("input_ids", "completion_mask"),
                        encode(tokenizer, e["prompt"], e["completion"], args.max_length),
                    )
                )
                for e in d_sft
            ]
            steps, model = train_adapter(
                accelerator,
                model,
                tokenizer,
                examples,
                "sft",
                args,
                run_dir / "sft",
                args.sft_lr,
                args.sft_batch_size,
                args.sft_epochs,
                tracker,
                "train_sft",
                step_offset=0,
            )
        elif main_process:
            print(
                "no successful teacher trajectory, so D_sft is empty and pi_sft is the base policy "
                "(use more --num-sft-tasks or a stronger --teacher-llm)"
            )
        save_final(accelerator, model, sft_dir, {"steps": steps, "examples": len(d_sft)})
        del model
    sft_steps = json.loads((sft_dir / "steps.json").read_text())["steps"] if final_adapter(run_dir, "sft") else 0
    step = sft_steps

    def need_sft() -> list[Path]:
        if final_adapter(run_dir, "sft") is None:
            raise DataError(f"no {sft_dir}: run the sft stage first")
        return [sft_dir]

    # ------------------------------------------------------------------------ 3. forward expectation confirmation
    forward_records = RecordFile(run_dir / "forward_trajectories.jsonl")
    if "forward" in args.stages:
        before = usage_now()
        forward = policy_rollout(pre_tasks, need_sft(), forward_records)
        account("forward", before, trajectories=len(forward))
        ratings = [t["ec_rating"] for tr in forward for t in tr["turns"] if t["ec_rating"] is not None]
        metrics |= {
            "rollout/forward_sr": episode_metrics(forward, args.max_turns)["eval/sr"],
            "rollout/forward_turns": sum(len(tr["turns"]) for tr in forward),
            "rollout/ec_ratings": len(ratings),
            "rollout/ec_rating_mean": sum(ratings) / max(len(ratings), 1),
            "rollout/system_errors": sum(t["system"] == SYSTEM_ERROR for tr in forward for t in tr["turns"]),
        }

    # ------------------------------------------------------------------------ 4. backward expectation derivation
    if "backward" in args.stages:
        wanted = {t.task_id for t in pre_tasks}
        forward = [r for r in forward_records.records() if r["key"] in wanted]
        if not forward:
            raise DataError(f"no forward trajectories in {forward_records.path}: run the forward stage first")
        turns = rewritable_turns(forward, args.lam)
        rewrite_records = RecordFile(run_dir / "rewrites.jsonl")
        before = usage_now()
        derive_pairs(turns[rank::world], role("rewriter"), domain, args, rewrite_records, stats["rewriter"])
        accelerator.wait_for_everyone()
        selected = {t["key"] for t in turns}
        rewrites = [r for r in rewrite_records.records() if r["key"] in selected]
        pairs = select_pairs(rewrites, args.lam)
        account("backward", before, pairs=len(pairs))
        if main_process:  # D_pre for this lambda, replaced whole so that it always matches the flag
            tmp = run_dir / "pairs.jsonl.tmp"
            tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
            tmp.rename(run_dir / "pairs.jsonl")
        statuses = [r["status"] for r in rewrites]
        metrics |= {
            "rollout/rewrite_turns": len(turns),
            "rollout/pairs": len(pairs),
            **{f"rollout/rewrite_{s}": statuses.count(s) for s in ("ok", "unparsable", "bad_format", "unchanged")},
        }

    # ------------------------------------------------------------------------ 5. ECPO preference optimization
    if "po" in args.stages and final_adapter(run_dir, "po") is None:
        pairs_file = run_dir / "pairs.jsonl"
        pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()] if pairs_file.exists() else []
        if not pairs:
            raise DataError(f"no preference pairs in {pairs_file}: run the backward stage first (or raise --lam)")
        model, tokenizer = load_policy(args, need_sft(), device, trainable=True)
        examples = pair_examples(tokenizer, pairs, args.max_length)
        if args.loss in ("dpo", "kto"):
            reference_logps(accelerator, model, tokenizer, examples, args, RecordFile(run_dir / "ref_logps.jsonl"))
        steps, model = train_adapter(
            accelerator,
            model,
            tokenizer,
            examples,
            args.loss,
            args,
            run_dir / "po",
            args.po_lr,
            args.po_batch_size,
            args.po_epochs,
            tracker,
            "train",
            step_offset=sft_steps,
        )
        save_final(accelerator, model, po_dir, {"steps": steps, "pairs": len(pairs), "loss": args.loss})
        del model
    if final_adapter(run_dir, "po"):
        step += json.loads((po_dir / "steps.json").read_text())["steps"]

    # ------------------------------------------------------------------------ 6. evaluation: SR, R and WR
    if "eval" in args.stages:
        before = usage_now()
        expert = rollout(test_tasks, role("expert"), args.few_shot, RecordFile(run_dir / "eval_expert.jsonl"))
        candidates = {"eval_sft": policy_rollout(test_tasks, need_sft(), RecordFile(run_dir / "eval_sft.jsonl"))}
        if final_adapter(run_dir, "po"):
            candidates["eval"] = policy_rollout(test_tasks, [sft_dir, po_dir], RecordFile(run_dir / "eval_ecpo.jsonl"))
        judgements = RecordFile(run_dir / "judgements.jsonl")
        for label, trajectories in candidates.items():
            judge_pairs(
                role("judge"), trajectories[rank::world], expert, label, domain, args, judgements, stats["judge"]
            )
        accelerator.wait_for_everyone()
        account("eval", before)
        for label, trajectories in {"eval_expert": expert, **candidates}.items():
            episode = episode_metrics(trajectories, args.max_turns)
            metrics |= {f"{label}/sr": episode["eval/sr"], f"{label}/recall": episode["eval/recall"]}
            if label != "eval_expert":
                metrics |= win_rates(judgements.records(), label, label)

    # ------------------------------------------------------------------------ parse counters, costs, summary
    counters = {
        **(simulator.metrics() if simulator else {}),
        **{k: v for name, s in stats.items() for k, v in s.metrics(f"rollout/{name}_").items()},
    }
    gathered = gather_object([counters])
    if main_process:
        metrics |= {k: sum(c.get(k, 0) for c in gathered) for k in counters}
        metrics |= cost_metrics(costs.records())
        tracker.log(metrics, step=step)
        print("\n" + json.dumps(metrics, indent=2))
        print_summary(metrics)
        print(f"outputs in {run_dir}/")
    tracker.close()


def pair_examples(tokenizer, pairs: list[dict], max_length: int) -> list[dict]:
    """Token ids and completion masks of each pair's chosen and rejected response. KTO's KL estimate also needs
    a mismatched (prompt, response): this prompt with the next pair's rewrite, fixed here so that its reference
    log-prob is stored with the others."""
    examples = []
    for k, pair in enumerate(pairs):
        example = {"key": pair["key"]}
        for part, completion in (
            ("chosen", pair["chosen"]),
            ("rejected", pair["rejected"]),
            ("mismatched", pairs[(k + 1) % len(pairs)]["chosen"]),
        ):
            example[f"{part}_ids"], example[f"{part}_mask"] = encode(tokenizer, pair["prompt"], completion, max_length)
        example["ref_chosen"] = example["ref_rejected"] = example["ref_mismatched"] = 0.0  # SimPO and SFT need none
        examples.append(example)
    return examples


def reference_logps(accelerator, model, tokenizer, examples: list[dict], args: Args, records: RecordFile) -> None:
    """log pi_sft of every chosen, rejected and mismatched response, computed once with the adapter disabled
    (the adapter sits on the merged pi_sft weights) and stored; ranks split the work."""
    done = {r["key"]: r for r in records.records()}
    todo = [k for k, e in enumerate(examples) if e["key"] not in done]
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = todo[rank::world]
    per_rank = math.ceil(len(todo) / world) if todo else 0
    mine += mine[:1] * (per_rank - len(mine)) if mine else []  # equal pass counts on every rank
    model.eval()
    micro = args.micro_batch_size
    with torch.no_grad(), model.disable_adapter():
        for start in tqdm(
            range(0, len(mine), micro), desc="reference log-probs", disable=not accelerator.is_main_process or not mine
        ):
            index = mine[start : start + micro]
            rows = [
                (examples[i][f"{part}_ids"], examples[i][f"{part}_mask"])
                for part in ("chosen", "rejected", "mismatched")
                for i in index
            ]
            logps, _ = sequence_logps(model, rows, tokenizer.pad_token_id, accelerator.device)
            b = len(index)
            for j, i in enumerate(index):
                if examples[i]["key"] not in done:
                    record = {
                        "key": examples[i]["key"],
                        "ref_chosen": logps[j].item(),
                        "ref_rejected": logps[b + j].item(),
                        "ref_mismatched": logps[2 * b + j].item(),
                    }
                    records.append(record)
                    done[record["key"]] = record
    accelerator.wait_for_everyone()
    done = {r["key"]: r for r in records.records()}
    for example in examples:
        example.update({k: done[example["key"]][k] for k in ("ref_chosen", "ref_rejected", "ref_mismatched")})
    model.train()


def cost_metrics(rows: list[dict]) -> dict[str, float]:
    """The whole run's LLM calls and tokens, and what building D_pre cost per preference pair: the calls and
    tokens of the forward rollouts and the rewrites, and the forward trajectories (the paper's Fig. 5 counts
    trajectories: ECPO 500 on 500 tasks, trajectory-level MTPO 1000, tree-based SDPO/SKTO 2500). The SGPT
    teacher rollouts are reported apart, as every method starts from pi_sft."""

    def latest(stage: str, key: str) -> int:  # counts of records: a rerun's row already includes resumed ones
        return next((r[key] for r in reversed(rows) if r["stage"] == stage), 0)

    pairs, forward_trajectories = latest("backward", "pairs"), latest("forward", "trajectories")
    metrics = {
        "cost/llm_calls": sum(r["llm_calls"] for r in rows),
        "cost/tokens": sum(r["tokens"] for r in rows),
        "cost/pairs": pairs,
        "cost/forward_trajectories": forward_trajectories,
        "cost/teacher_trajectories": latest("teacher", "trajectories"),
        "cost/teacher_llm_calls": sum(r["llm_calls"] for r in rows if r["stage"] == "teacher"),
    }
    if pairs:
        pair_rows = [r for r in rows if r["stage"] in ("forward", "backward")]
        metrics |= {
            "cost/llm_calls_per_pair": sum(r["llm_calls"] for r in pair_rows) / pairs,
            "cost/tokens_per_pair": sum(r["tokens"] for r in pair_rows) / pairs,
            "cost/trajectories_per_pair": forward_trajectories / pairs,
        }
    return metrics


def print_trajectory(trajectory: dict) -> None:
    print(
        f"\n=== {trajectory['task_id']} | target: {trajectory['target']} | SR={int(trajectory['success'])} "
        f"R={int(trajectory['recall'])}"
    )
    print(f"  USER   {trajectory['opening']['user']}")
    for t in trajectory["turns"]:
        print(f"  CRA    {t['cra'].get('action') or SYSTEM_ERROR}   (EC {t['ec_rating']})")
        if t["user"]:
            print(f"  USER   {t['user']}")


def print_summary(metrics: dict) -> None:
    rows = [("expert CRA", "eval_expert"), ("pi_sft (SGPT)", "eval_sft"), ("ECPO", "eval")]
    print(f"\n{'policy':<16}{'SR':>7}{'R':>7}{'WR':>7}")
    for name, prefix in rows:
        if f"{prefix}/sr" in metrics:
            wr = metrics.get(f"{prefix}/wr")
            print(
                f"{name:<16}{metrics[f'{prefix}/sr']:>7.2f}{metrics[f'{prefix}/recall']:>7.2f}"
                f"{'   -' if wr is None else f'{wr:>7.2f}'}"
            )


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (DataError, ModelSpecError, LLMBackendError) as err:
        raise SystemExit(f"error: {err}")
