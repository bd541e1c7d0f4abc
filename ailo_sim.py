"""AILO: the LLM user simulator of ECPO (Feng et al., 2025, Sec. 2.3). Docs: docs/ailo_sim.md.

    python ailo_sim.py                                   # demo: 4 users x 3 turns on the embedded SmolLM2
    python ailo_sim.py --dataset book --split train --num-tasks 16 --max-turns 5
    python ailo_sim.py --dataset book --num-personas 20  # also build personas from real reviews
    accelerate launch ailo_sim.py --user-llm hf:meta-llama/Llama-3.1-8B-Instruct   # tasks sharded over ranks

AILO has two parts:
  * Persona modeling: Activities / Interests / Language / Orientations, inferred by an LLM from a user's
    real reviews (or read from the released task files). Diversity is reported as in the paper's Fig. 4:
    for each persona, the ROUGE-L against the most similar other persona (lower = more diverse).
  * Policy-based simulation: each user turn is three LLM calls, batched across all live conversations:
      1. response policy   -> {reason, policy}      (policy in POLICIES; turn 0 is fixed to ask_recommendation)
      2. response content  -> {reason, response}    (never names the target; enforced by a guard)
      3. expectation confirmation (EC) of the CRA's last response -> {reason: CONF_t, rating: r_t in 0..5}

The harness below (``run_episodes``: a CRA talks with AILO, batched across conversations, yielding each episode
as it finishes; ``episode_metrics``: SR, R and EC ratings per turn) makes this script the environment ECPO plays in:
``ecpo.py`` imports it from here with the tasks (``load_tasks``), as ``rso.py`` imports ``AILO`` (the repository's
only imports between scripts). This script's CLI runs it against a zero-shot prompted CRA, one stage function each,
writing under runs/<run_name>/:

  personas  (with --num-personas) user persona modeling from real reviews
            (Sec. 2.3) and their diversity, ROUGE-L to the nearest other (Fig. 4) -> personas.jsonl
  simulate  policy-based user simulation (Sec. 2.3) against the zero-shot CRA:
            SR, R and the EC rating r_t of every CRA response but the last     -> episodes.jsonl

A rerun with the same --run-name skips every finished conversation and persona.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import tyro
from tqdm import tqdm

from common.catalog import Catalog, item_card
from common.conversations import render_history
from common.distributed import print_dry_run
from common.formats import (
    InputError,
    Item,
    Persona,
    Task,
    load_demo_catalog,
    load_demo_tasks,
    load_ecpo_items,
    load_ecpo_reviews,
    load_ecpo_tasks,
)
from common.judging import Expectation, JudgeScoring, expected_scores, json_string, mass_metrics, scores_in_answers
from common.llm import LLMBackendError
from common.metrics import mentions_title, redact_title, success_rate
from common.models import ModelSpecError, check_specs
from common.parsing import ParseStats, chat_parsed, coerce_int, is_placeholder, parse_json
from common.run import Run


@dataclass
class Args:
    exp_name: str = "ailo_sim"
    """the name of this experiment (prefix of the default run name)"""
    seed: int = 1
    """seed of python, numpy and torch (sampled retries and CRA sampling depend on it)"""
    run_name: str | None = None
    """outputs go to runs/<run_name>/; rerun with the same name to resume (default, CleanRL's:
    <exp_name>__<dataset>__<seed>__<unix time>)"""
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

    dataset: Literal["demo", "book", "game", "yelp"] = "demo"
    """demo: the bundled movie tasks; book/game/yelp: the ECPO task files under --data-dir"""
    data_dir: str = "../shared/data"
    """root of the real data (docs/data.md); unused for the demo"""
    split: Literal["train", "test"] = "train"
    """which ECPO task file: <Dataset>_train.jsonl or <Dataset>_test.jsonl (test is held-out: evaluation only)"""
    num_tasks: int = 4
    """how many tasks (simulated users) to run"""
    task_offset: int = 0
    """index of the first task in the task file"""
    max_turns: int = 3
    """T: the number of CRA responses per conversation (the paper uses 5)"""

    user_llm: str = "hf:smollm2-135m"
    """backend of the simulated user: hf:<model>, openai:<model> or vllm:<model> (paper: openai:gpt-4o-mini)"""
    cra_llm: str = "hf:smollm2-135m"
    """backend of the zero-shot prompted CRA that this script's CLI pits against AILO"""
    cra: Literal["llm", "names-target", "never-names"] = "llm"
    """the CRA AILO talks to: the zero-shot prompted --cra-llm, or a scripted one (no LLM) that recommends the
    task's target by its title every turn ("names-target") or another item of the catalog every turn, never the
    target ("never-names"): the good and the bad CRA whose EC ratings the simulator should tell apart
    (benchmark/ailo_ec_separation.py)"""
    persona_llm: str | None = None
    """backend that builds personas from reviews (paper: GPT-4o); None reuses --user-llm"""
    retriever_top_k: int = 5
    """candidates the zero-shot CRA retrieves per turn (R counts the target in any retrieval)"""
    batch_size: int = 16
    """conversations advanced together; also the hf backend's generation batch size"""
    user_max_tokens: int = 128
    """max new tokens for each simulator call (policy, content, EC)"""
    cra_max_tokens: int = 96
    """max new tokens for a CRA response"""
    max_parse_tries: int = 3
    """tries per simulator call before falling back (each retry is +0.3 temperature, as in the ECPO code)"""
    max_leak_tries: int = 2
    """with --leak-guard regenerate: regenerations of an utterance that named the target before the title is
    redacted"""
    leak_guard: Literal["regenerate", "drop"] = "regenerate"
    """what becomes of a user utterance that names the target before the system has: regenerate it (temperature
    0.7, then 1.0), then redact the title, so every conversation is kept; or drop the conversation, counted in the
    leak audit (the paper's released main.py raises and skips the user: its SR counts the conversations left).
    After the system named the target, the user may name it too, as in the released loop"""
    target_note: bool = False
    """tell the simulated user whether the system's last message named its target (our addition, not the paper's:
    it helps weak simulators notice a success, but it tells the user the very fact SR measures)"""
    audit: str | None = None
    """a run folder (of any script that plays AILO) whose recorded simulated user turns are audited for ones that
    name their target (``audit_leaks``); prints them and exits without simulating"""
    strict: bool = False
    """with --audit: exit non-zero when a recorded user turn names its target"""
    judge_scoring: JudgeScoring = "expected"
    """how the EC rating r_t is read: "expected", from the answer distribution after the pre-filled reason, one
    batched pass, every response rated: r_t is the rating the user would write (the most probable of 0-5) and E[r_t]
    is logged beside it (common/judging.py; an openai: simulator's from its answer's logprobs); "sampled", the
    paper's: the rating parsed from the generated JSON, retried, then the most probable rating after the reason"""

    num_personas: int = 0
    """if > 0, build this many personas from real reviews (book/game) with --persona-llm and report diversity"""
    reviews_per_user: int = 8
    """reviews shown to the persona builder per user"""
    print_conversations: bool = True
    """print every finished conversation"""
    dry_run: int = 0
    """validate the flags and the data files, then exit without loading a model (0: run; nothing here trains, so
    the number of processes only shares out the tasks)"""


# =============================================================================================== tasks

TASK_DOMAINS = {"demo": "movie", "book": "book", "game": "video game", "yelp": "restaurant or local business"}
DEMO_TRAIN_TASKS = 24  # the first 24 demo users train, the last 8 are the demo's test split


def load_tasks(dataset: str, data_dir: str | Path, split: str) -> list[Task]:
    """The simulated users of ``split`` (train or test): the demo users, or an ECPO task file
    ``ecpo/<Dataset>/<Dataset>_<split>.jsonl`` (test is held out)."""
    if dataset == "demo":
        tasks = load_demo_tasks()
        return tasks[:DEMO_TRAIN_TASKS] if split == "train" else tasks[DEMO_TRAIN_TASKS:]
    name = dataset.capitalize()
    return load_ecpo_tasks(Path(data_dir) / "ecpo" / name / f"{name}_{split}.jsonl")


def load_task_items(dataset: str, data_dir: str | Path, tasks: list[Task]) -> list[Item]:
    """The item database the agents search: the demo films; else ECPO's released pool where there is one
    (``items.jsonl``), plus every item the tasks name."""
    if dataset == "demo":
        return load_demo_catalog()
    pool = Path(data_dir) / "ecpo" / dataset.capitalize() / "items.jsonl"
    return (load_ecpo_items(pool) if pool.exists() else []) + [t.target for t in tasks]


# =============================================================================================== personas

ACTIVITY_TYPES = ("Efficiency-seeking", "Detail-oriented", "Exploration-oriented")

PERSONA_PROMPT = """You are an expert in consumer psychology. Read one customer's product reviews and infer their persona along four dimensions (the AIO model extended with Language):
- Activities: how they behave in a recommendation conversation. Start with exactly one of "Efficiency-seeking user", "Detail-oriented user" or "Exploration-oriented user", then one sentence.
- Interests: the kinds of items, topics and features they like, from their well-rated items.
- Language: their Information Density, Expression Style and Tone.
- Orientations: their values and priorities (for example price vs quality, speed vs in-depth discussion).

Reviews:
{reviews}

Answer with JSON only:
{{"Activities": "...", "Interests": "...", "Language": {{"Information Density": "...", "Expression Style": "...", "Tone": "..."}}, "Orientations": "..."}}"""  # noqa: E501  (prompt text, kept verbatim)


def render_reviews(reviews: list[dict], limit: int) -> str:
    lines = []
    for r in reviews[:limit]:
        content = " ".join(str(r.get("Content", "")).split())[:300]
        lines.append(f'- {r.get("ItemName", "?")} (rated {r.get("Rating", "?")}/5): "{r.get("Title", "")}" {content}')
    return "\n".join(lines)


def parse_persona(text: str, user_id: str) -> Persona | None:
    data = parse_json(text)
    if not data or not isinstance(data.get("Activities"), str):
        return None
    activity_type = next((t for t in ACTIVITY_TYPES if t.lower() in data["Activities"].lower()), None)
    if activity_type is None:
        return None
    language = data.get("Language") if isinstance(data.get("Language"), dict) else {}
    interests = data.get("Interests", "")
    return Persona(
        user_id=user_id,
        activities=data["Activities"],
        interests=", ".join(map(str, interests)) if isinstance(interests, list) else str(interests),
        language={k: str(v) for k, v in language.items()},
        orientations=str(data.get("Orientations", "")),
    )


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 between two token lists (longest common subsequence)."""
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def max_rouge_l(personas: list[Persona]) -> list[float]:
    """Fig. 4: for each persona, ROUGE-L to its most similar other persona."""
    tokens = [re.findall(r"\w+", p.as_text().lower()) for p in personas]
    best = [0.0] * len(tokens)
    for i in range(len(tokens)):
        for j in range(i + 1, len(tokens)):
            score = rouge_l(tokens[i], tokens[j])
            best[i], best[j] = max(best[i], score), max(best[j], score)
    return best


def diversity_metrics(personas: list[Persona], prefix: str) -> dict[str, float]:
    unique = list({p.as_text(): p for p in personas}.values())
    if len(unique) < 2:
        return {}
    scores = sorted(max_rouge_l(unique))
    return {
        f"{prefix}/count": len(unique),
        f"{prefix}/max_rouge_l_mean": sum(scores) / len(scores),
        f"{prefix}/max_rouge_l_median": scores[len(scores) // 2],
    }


# =============================================================================================== simulator

POLICIES = ("respond_to_clarification", "provide_feedback_on_recommendation", "end_conversation")
OPENING_POLICY = "ask_recommendation"

POLICY_PROMPT = """You are role-playing a user who is chatting with a conversational recommender system to find a {domain}.
Your behaviour type: {activities}
Your priorities: {orientations}
The {domain} you are secretly looking for: {target}

Conversation so far:
{history}

The system just said: "{last}"
{target_note}
Choose how to respond next. Policies:
- respond_to_clarification: the system asked something or needs more detail; answer it.
- provide_feedback_on_recommendation: the system recommended something; say whether and why it fits.
- end_conversation: stop the conversation.
Rules by behaviour type: an Efficiency-seeking user ends the conversation as soon as the target has been recommended; a Detail-oriented user may ask follow-up questions about a recommendation before ending; an Exploration-oriented user rarely ends the conversation and keeps exploring.

Answer with JSON only: {{"reason": "<one sentence>", "policy": "<one of respond_to_clarification, provide_feedback_on_recommendation, end_conversation>"}}"""  # noqa: E501  (prompt text, kept verbatim)

CONTENT_INSTRUCTIONS = {
    OPENING_POLICY: "Open the conversation by asking for a recommendation. "
    "Give minimal information: at most one broad preference.",
    "respond_to_clarification": "Answer the system's question, revealing one or two new features of what you want, "
    "taken from the target's features.",
    "provide_feedback_on_recommendation": "React to the system's recommendation. If it recommended your target, "
    "say you are satisfied. Otherwise say briefly what does not fit, and reveal one more feature you want.",
    # A user who leaves after its target was recommended has found it: its goodbye says that it takes it, so that
    # a judge reading the conversation sees the acceptance (before, the goodbye said nothing of it).
    "end_conversation": "End the conversation politely in one short sentence. If the system recommended what you are "
    "secretly looking for, say that you will take it; otherwise say that you will look elsewhere.",
}

CONTENT_PROMPT = """You are role-playing a user who is chatting with a conversational recommender system to find a {domain}.
Your interests: {interests}
Your language: information density: {density}; expression style: {style}; tone: {tone}.
The {domain} you are secretly looking for: {target}
Never say its name: reveal what you want gradually, through its features.

Conversation so far:
{history}
{target_note}
Task: {instruction}
Write one or two sentences in your own voice, as the user.

Answer with JSON only: {{"reason": "<one sentence>", "response": "<your message to the system>"}}"""  # noqa: E501  (prompt text, kept verbatim)

EC_PROMPT = """You are a user simulator. Evaluate the expressiveness and interaction quality of the conversational recommender system's last response: how well it supports the dialogue flow, user engagement and natural communication.

Dimensions (start from 5 points and deduct):
- Flexibility (deduct 0 to 2): -2 if the system ignores the user's change of intent or request and answers rigidly; -1 if it notices the change but adapts late, rigidly or awkwardly; 0 if it adapts naturally.
- Coherence (deduct 0 to 2): -2 if the response is disjointed or irrelevant to the conversation; -1 if it partly loses context or contradicts earlier turns; 0 if it follows logically from the conversation.
- User Guidance (deduct 0 to 1): -1 if it offers no clarification, follow-up or direction; 0 if it guides the user effectively toward what they want.
Final rating = 5 - all deductions, from 0 to 5.

In the reason, refer to flexibility, coherence and user guidance, mention any user reaction (confusion, frustration, engagement), and name the issues that caused deductions.

System's last response: "{last}"
Dialogue history:
{history}
Target: {target}

Answer with JSON only: {{"reason": "<reason for the rating>", "rating": "<final rating from 0 to 5>"}}"""  # noqa: E501  (prompt text, kept verbatim)


def leaks_title(text: str, title: str) -> bool:
    """The leak guard: an utterance names the target (``common.metrics.title_spans``), a capitalised ordinary word
    at the start of a sentence included ("Jaws!"), since a leak must not reach the CRA."""
    return mentions_title(text, title, sentence_start=True)


def target_named(user: SimUser) -> bool:
    """The system has named the user's target (SR's test): from then on the user naming it is the dialogue's
    success, not a leak (the released loop checks the user's input only while ``not is_correct``)."""
    return any(mentions_title(m["content"], user.task.target.title) for m in user.history if m["role"] == "assistant")


def parse_policy(text: str) -> str | None:
    data = parse_json(text)
    if data and str(data.get("policy", "")).strip() in POLICIES:
        return str(data["policy"]).strip()
    named = [p for p in POLICIES if p in text]  # a bare policy name without JSON
    return named[0] if len(named) == 1 else None


def parse_content(text: str) -> str | None:
    data = parse_json(text)
    response = data.get("response") if data else None
    if not isinstance(response, str) or not response.strip() or is_placeholder(response):
        return None
    return " ".join(response.split())


def parse_ec(text: str) -> tuple[str, int] | None:
    data = parse_json(text)
    if not data or "rating" not in data:
        return None
    rating = coerce_int(data["rating"], 0, 5)
    reason = str(data.get("reason", ""))
    return None if rating is None or is_placeholder(reason) else (reason, rating)


def fallback_utterance(raw: str, policy: str) -> str:
    """When every try failed to give JSON: the first "User:" line of a transcript-style answer, else the
    raw text if it reads like one utterance, else a stock line for the policy."""
    user_lines = re.findall(r"^\s*User\s*:\s*(.+)$", raw, flags=re.MULTILINE)
    text = user_lines[0] if user_lines else raw.strip().strip("`")
    if text and "{" not in text and "\n" not in text.strip() and len(text) < 400 and not is_placeholder(text):
        return " ".join(text.split())
    return {
        OPENING_POLICY: "Hi! Can you recommend something for me?",
        "end_conversation": "Thanks, that's all for now.",
    }.get(policy, "Hmm, can you tell me a bit more?")


@dataclass
class SimUser:
    """One simulated user's state: the task (persona + hidden target) and the conversation so far."""

    task: Task
    history: list[dict] = field(default_factory=list)  # {"role": "user" | "assistant", "content": str}
    ended: bool = False


@dataclass
class Confirmation:
    """Step 3's judgement of one CRA response: CONF_t and r_t, and E[r_t] where it was read from the distribution."""

    reason: str | None = None  # CONF_t
    rating: int | None = None  # r_t, the rating 0-5 the user writes: parsed, or the most probable one
    expected: float | None = None  # E[r_t] in [0, 5] under the rating's answer distribution
    mass_outside: float | None = None  # the probability that answer put outside the ratings 0-5


@dataclass
class UserTurn:
    policy: str
    response: str
    ec_reason: str | None
    ec_rating: int | None  # r_t, the rating 0-5 the user writes (None: unrated)
    end: bool
    ec_mass_outside: float | None = None  # read from the distribution: the probability put outside 0-5
    guard: str = "clean"  # the leak guard on the utterance: "clean", "regenerated" or "redacted"
    ec_expected: float | None = None  # read from the distribution: E[r_t], logged beside r_t


class AILO:
    """Batched AILO simulator: ``start`` opens every conversation, ``step`` answers a batch of CRA responses
    with one batched LLM call per sub-step (policy, content, EC) across all of them."""

    def __init__(
        self, llm, domain: str = "movie", max_tokens: int = 160, max_parse_tries: int = 3, max_leak_tries: int = 2,
        target_note: bool = False, ec_scoring: JudgeScoring = "sampled", leak_guard: str = "regenerate",
    ):  # fmt: skip
        self.llm, self.domain, self.max_tokens, self.ec_scoring = llm, domain, max_tokens, ec_scoring
        self.max_parse_tries, self.max_leak_tries, self.target_note = max_parse_tries, max_leak_tries, target_note
        self.leak_guard = leak_guard  # "drop" needs a caller that drops the conversation (run_episodes does)
        self.stats = ParseStats()
        self.title_leaks = 0  # generated utterances that named the target, before the guard
        self.title_redactions = 0  # utterances still leaking after regeneration, redacted
        self.constrained_ratings = 0  # EC ratings decoded under the JSON grammar after every free try failed

    def _ask(self, prompts: list[str], parse: Callable, max_tries: int | None = None, temperature: float = 0.0):
        return chat_parsed(
            self.llm,
            [[{"role": "user", "content": p}] for p in prompts],
            parse,
            self.stats,
            max_tries=max_tries or self.max_parse_tries,
            temperature=temperature,
            max_tokens=self.max_tokens,
        )

    def _target_note(self, user: SimUser) -> str:
        # Our addition, off by default (--target-note): telling the user whether the system named its target keeps
        # weak simulators from missing a success, but it hands the user the very fact that SR measures.
        last = next((m["content"] for m in reversed(user.history) if m["role"] == "assistant"), None)
        if last is None or not self.target_note:
            return ""
        named = mentions_title(last, user.task.target.title)
        return f"(Note: the system's last message {'DID' if named else 'did NOT'} recommend your target.)\n"

    def _content(self, users: list[SimUser], policies: list[str]) -> tuple[list[str], list[str]]:
        """Step 2: one utterance per user, generated in one batch. An utterance that names the target before the
        system has (``target_named``) is regenerated, then redacted, or with ``leak_guard`` "drop" marked for its
        conversation to be dropped. Returns the utterances and what the guard did to each ("clean", "regenerated",
        "redacted", "dropped")."""
        prompts = []
        for user, policy in zip(users, policies):
            persona, language = user.task.persona, user.task.persona.language
            prompts.append(
                CONTENT_PROMPT.format(
                    domain=self.domain,
                    interests=persona.interests or "(infer from the target)",
                    density=language.get("Information Density", "moderate"),
                    style=language.get("Expression Style", "casual"),
                    tone=language.get("Tone", "friendly"),
                    target=item_card(user.task.target),
                    history=render_history(user.history),
                    target_note=self._target_note(user),
                    instruction=CONTENT_INSTRUCTIONS[policy],
                )
            )
        parsed, raw = self._ask(prompts, parse_content)
        texts = [p if p is not None else fallback_utterance(r, policy) for p, r, policy in zip(parsed, raw, policies)]
        guard = ["clean"] * len(texts)
        guarded = [i for i, user in enumerate(users) if not target_named(user)]
        for attempt in range(self.max_leak_tries + 1):
            leaking = [i for i in guarded if leaks_title(texts[i], users[i].task.target.title)]
            if attempt == 0:
                self.title_leaks += len(leaking)
            if not leaking:
                break
            if self.leak_guard == "drop":  # the released loop's: the conversation ends here and is not counted
                for i in leaking:
                    guard[i] = "dropped"
                break
            if attempt == self.max_leak_tries:  # hard guard: the title never reaches the CRA
                self.title_redactions += len(leaking)
                for i in leaking:
                    texts[i], guard[i] = redact_title(texts[i], users[i].task.target.title), "redacted"
                break
            for i in leaking:
                guard[i] = "regenerated"
            regenerated, raw = self._ask(
                [prompts[i] for i in leaking], parse_content, max_tries=1, temperature=0.7 + 0.3 * attempt
            )
            for i, text, r in zip(leaking, regenerated, raw):
                texts[i] = text if text is not None else fallback_utterance(r, policies[i])
        return texts, guard

    def start(self, tasks: list[Task]) -> tuple[list[SimUser], list[UserTurn]]:
        """Turn 0: every user opens with the fixed ask_recommendation policy (no EC: nothing to rate yet)."""
        users = [SimUser(task) for task in tasks]
        texts, guard = self._content(users, [OPENING_POLICY] * len(users))
        for user, text, g in zip(users, texts, guard):
            user.ended = g == "dropped"  # a dropped utterance never reaches the CRA
            if not user.ended:
                user.history.append({"role": "user", "content": text})
        return users, [UserTurn(OPENING_POLICY, t, None, None, g == "dropped", guard=g) for t, g in zip(texts, guard)]

    def step(self, users: list[SimUser], cra_responses: list[str], final: bool = False) -> list[UserTurn]:
        """Answer one CRA response per user. With ``final`` (the turn limit) nothing runs: nobody replies, and, as in
        the paper's released simulator loop, the last response is not rated (so it is never rewritten)."""
        for user, response in zip(users, cra_responses):
            user.history.append({"role": "assistant", "content": response})
        if final:
            for user in users:
                user.ended = True
            return [UserTurn("", "", None, None, True) for _ in users]

        # Step 3 (EC) rates p_t against the history up to and including it, so it is independent of the
        # user's reply and runs first; the order of the three calls does not change any input.
        ec = self.expectation_confirmation(users)

        # Step 1: the response policy.
        policy_prompts = [
            POLICY_PROMPT.format(
                domain=self.domain,
                activities=u.task.persona.activities,
                orientations=u.task.persona.orientations or "-",
                target=item_card(u.task.target),
                history=render_history(u.history[:-1]),
                last=u.history[-1]["content"],
                target_note=self._target_note(u),
            )
            for u in users
        ]
        policies, _ = self._ask(policy_prompts, parse_policy)
        policies = [
            p
            or (
                "provide_feedback_on_recommendation"
                if mentions_title(u.history[-1]["content"], u.task.target.title)
                else "respond_to_clarification"
            )
            for p, u in zip(policies, users)
        ]

        # Step 2: the response content, conditioned on the policy.
        texts, guard = self._content(users, policies)
        turns = []
        for user, policy, text, c, g in zip(users, policies, texts, ec, guard):
            if g != "dropped":  # a dropped utterance never reaches the CRA
                user.history.append({"role": "user", "content": text})
            user.ended = policy == "end_conversation" or g == "dropped"
            turns.append(UserTurn(policy, text, c.reason, c.rating, user.ended, c.mass_outside, g, c.expected))
        return turns

    def expectation_confirmation(self, users: list[SimUser]) -> list[Confirmation]:
        """Step 3, expectation confirmation of each user's last CRA response p_t, rated against the dialogue before
        it (EC_PROMPT: start from 5, deduct flexibility 0-2, coherence 0-2, user guidance 0-1). Sampled (the paper):
        the rating parsed from the answer; malformed output is retried, then a local backend reads it after the
        pre-filled reason (``_read_ec``); else unrated. Expected: ``_read_ec`` for every response. Where the rating
        is read from the distribution, r_t is the rating the user would write (the most probable of 0-5, as a model
        writes one integer at temperature 0) and E[r_t] is kept beside it."""
        prompts = [
            EC_PROMPT.format(
                last=u.history[-1]["content"], history=render_history(u.history[:-1]), target=u.task.target.title
            )
            for u in users
        ]
        if self.ec_scoring == "expected":
            return [self._confirmation(reason, e) for reason, e in self._read_ec(prompts)]
        ec, _ = self._ask(prompts, parse_ec)
        confirmations = [Confirmation(*e) if e else Confirmation() for e in ec]
        failed = [i for i, e in enumerate(ec) if e is None]
        if failed and getattr(self.llm, "can_prefill", False):
            for i, (reason, e) in zip(failed, self._read_ec([prompts[i] for i in failed])):
                confirmations[i] = self._confirmation(reason, e)
            self.constrained_ratings += len(failed)
        return confirmations

    @staticmethod
    def _confirmation(reason: str, e: Expectation) -> Confirmation:
        if e.value is None:
            return Confirmation(mass_outside=e.mass_outside)
        return Confirmation(reason, int(e.greedy), e.value, e.mass_outside)

    def _read_ec(self, prompts: list[str]) -> list[tuple[str, Expectation]]:
        """The answer is pre-filled as '{"reason": "', the reason generated up to the quote that closes its JSON
        string (``json_string``: escaped quotes and quoted titles stay in it; generation stops at the next key or at
        '"}'), then the rating read after '", "rating": "' from the probability of each rating 0-5 written in full (one
        batched pass, ``expected_scores``): its most probable value and its probability-weighted mean (G-Eval's
        scoring). An API simulator, which cannot be pre-filled, answers greedily and the distribution is read where
        its own answer writes the rating (``scores_in_answers``)."""
        convs = [[{"role": "user", "content": p}] for p in prompts]
        digits = {str(d): float(d) for d in range(6)}
        if not getattr(self.llm, "can_prefill", False):
            answers = scores_in_answers(self.llm, convs, [r'"rating":\s*"?'], digits, self.max_tokens)
            no_score = Expectation(None, 1.0, {})
            return [((parse_json(text) or {}).get("reason") or "", read[0] or no_score) for text, read in answers]
        generated = self.llm.chat(convs, max_tokens=self.max_tokens, stop=['"rating"', '"}'], prefix='{"reason": "')
        reasons = [json_string(out[0]) for out in generated]
        prefixes = ['{"reason": "' + written + '", "rating": "' for written, _ in reasons]
        read = expected_scores(self.llm, convs, digits, prefixes)
        return [(reason, e) for (_, reason), e in zip(reasons, read)]

    def metrics(self) -> dict[str, int]:
        return {
            **self.stats.metrics("rollout/user_"),
            "rollout/title_caught": self.title_leaks,  # rollout/title_leaks is what got through: audit_leaks
            "rollout/title_redactions": self.title_redactions,
            "rollout/ec_constrained": self.constrained_ratings,
        }


# =============================================================================================== harness


@dataclass
class CRAReply:
    """What a CRA returns for one conversation turn."""

    text: str  # the user-visible response p_t
    retrieved: list[str] = field(default_factory=list)  # titles the CRA's retrieval returned this turn (for R)
    record: dict = field(default_factory=dict)  # anything the CRA wants kept with the turn (prompt, action, ...)


# A CRA maps (episode keys, histories) to one reply per conversation. Histories use chat roles from the
# CRA's side: "user" is the simulated user, "assistant" the CRA. Keys let a stateful CRA keep a scratchpad.
CRA = Callable[[list[str], list[list[dict]]], list[CRAReply]]


def run_episodes(tasks: list[Task], *, cra: CRA, simulator: AILO, max_turns: int, batch_size: int = 16):
    """Play each task's conversation between ``cra`` and ``simulator`` for up to ``max_turns`` CRA responses,
    ``batch_size`` at a time (``simulator.start`` opens them, ``simulator.step`` answers and rates each response).

    Yields each episode as it finishes: per turn the system response, retrieval, user policy and reply, EC reason and
    rating, plus ``success`` (SR: a CRA response contains the target title) and ``recall`` (R: the target appeared in
    a retrieval result). A conversation the simulator's leak guard drops (``leak_guard`` "drop") is yielded with
    ``dropped``: the turn and the utterance that named the target, which is not among its turns; SR, R, training and
    judging leave it out (``kept``).
    """
    for start in range(0, len(tasks), batch_size):
        yield from play_batch(tasks[start : start + batch_size], cra=cra, simulator=simulator, max_turns=max_turns)


def play_batch(tasks: list[Task], *, cra: CRA, simulator: AILO, max_turns: int) -> Iterator[dict]:
    """``run_episodes`` on one batch of conversations, advanced together turn by turn."""
    users, openings = simulator.start(tasks)
    episodes = [new_episode(task, opening) for task, opening in zip(tasks, openings)]
    for episode, opening in zip(episodes, openings):
        if opening.guard == "dropped":
            episode["dropped"] = {"turn": 0, "user": opening.response}
            yield finished(episode, turns=0, ended_by_user=False)
    for turn in range(1, max_turns + 1):
        live = [i for i, user in enumerate(users) if not user.ended]
        if not live:
            break
        replies = cra([tasks[i].key for i in live], [list(users[i].history) for i in live])
        final = turn == max_turns
        answers = simulator.step([users[i] for i in live], [r.text for r in replies], final=final)
        for i, reply, answer in zip(live, replies, answers):
            add_turn(episodes[i], turn, reply, answer)
            if users[i].ended:
                yield finished(episodes[i], turns=turn, ended_by_user=not final)


def new_episode(task: Task, opening: UserTurn) -> dict:
    return {
        "key": task.key,
        "user_id": task.persona.user_id,
        "target": task.target.title,
        "persona": asdict(task.persona),
        "opening": {"policy": opening.policy, "user": "" if opening.end else opening.response,
                    "user_guard": opening.guard},
        "turns": [],
        "success": False,
        "recall": False,
    }  # fmt: skip


def add_turn(episode: dict, turn: int, reply: CRAReply, answer: UserTurn) -> None:
    """The CRA's response p_t and the user's answer to it (its EC rating r_t of p_t included); SR and R so far."""
    target = episode["target"]
    if answer.guard == "dropped":
        episode["dropped"] = {"turn": turn, "user": answer.response}
    episode["turns"].append(
        {
            "turn": turn,
            "system": reply.text,
            "retrieved": reply.retrieved,
            "cra": reply.record,
            "mentions_target": mentions_title(reply.text, target),
            "user_policy": answer.policy,
            "user": "" if answer.guard == "dropped" else answer.response,
            "user_guard": answer.guard,
            "ec_reason": answer.ec_reason,
            "ec_rating": answer.ec_rating,
            "ec_expected": answer.ec_expected,
            "ec_mass_outside": answer.ec_mass_outside,
            "end": answer.end,
        }
    )
    episode["success"] |= mentions_title(reply.text, target)
    episode["recall"] |= target in reply.retrieved


def finished(episode: dict, *, turns: int, ended_by_user: bool) -> dict:
    episode["num_turns"], episode["ended_by_user"] = turns, ended_by_user
    if episode.get("dropped"):
        tqdm.write(f"dropped {episode['key']}: the user named its target ({episode['dropped']['user']!r})")
    return episode


def printed(episodes: Iterator[dict], show: bool) -> Iterator[dict]:
    """``episodes`` as they come, each printed first where ``show`` asks for it."""
    for episode in episodes:
        if show:
            print_episode(episode)
        yield episode


def kept(episodes: list[dict]) -> list[dict]:
    """The conversations the leak guard did not drop: those SR, R, training and judging count."""
    return [e for e in episodes if not e.get("dropped")]


def audit_leaks(run_dir: str | Path) -> tuple[dict[str, int], list[dict]]:
    """Every simulated user turn recorded in a run's JSON Lines files (the openings and the turns of each record
    with a ``target`` title and ``turns``: AILO's episodes in ailo_sim.py and ecpo.py, RSO's, and the
    feedback of SMTPO's simulator in its evaluation records), checked with the guard's own test (``leaks_title``)
    against its target, up to the turn whose system message named it (after that the user may name it, as the guard
    allows). Returns the counts, ``rollout/title_leaks`` being the turns that name their target as recorded (what
    reached the CRA), and ``rollout/episodes_dropped`` the conversations the guard dropped, and the offending turns.
    A dropped conversation's utterance that named the target is kept apart (``dropped``) and never reached the CRA."""
    scanned, redacted, dropped, leaks = 0, 0, 0, []
    for path in sorted(Path(run_dir).glob("*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line: the run redoes that record
            if not isinstance(record, dict) or not isinstance(record.get("target"), str):
                continue
            dropped += bool(record.get("dropped"))
            opening = record.get("opening") if isinstance(record.get("opening"), dict) else None
            turns = [opening] if opening else []
            turns += [t for t in record.get("turns") or [] if isinstance(t, dict)]
            named = False  # the system has named the target (AILO's and RSO's turns record what it said)
            for turn in turns:
                system = turn.get("system")
                named = named or (isinstance(system, str) and mentions_title(system, record["target"]))
                text = turn.get("user", turn.get("feedback"))  # AILO's and RSO's user, SMTPO's simulator
                if not isinstance(text, str) or not text:
                    continue
                scanned += 1
                redacted += turn.get("user_guard") == "redacted"
                if not named and leaks_title(text, record["target"]):
                    leaks.append({"file": path.name, "line": number, "target": record["target"], "user": text})
    metrics = {"rollout/user_turns_audited": scanned, "rollout/title_leaks": len(leaks),
               "rollout/title_redacted_turns": redacted, "rollout/episodes_dropped": dropped}  # fmt: skip
    return metrics, leaks


def print_audit(metrics: dict[str, int], leaks: list[dict]) -> None:
    print(
        f"leak audit: {metrics['rollout/user_turns_audited']} simulated user turns, {len(leaks)} name their target, "
        f"{metrics['rollout/title_redacted_turns']} redacted by the guard; "
        f"{metrics['rollout/episodes_dropped']} conversations dropped by it"
    )
    for leak in leaks:
        print(f"  {leak['file']}:{leak['line']} (target {leak['target']}): {leak['user'][:200]}")


def episode_metrics(episodes: list[dict], max_turns: int) -> dict[str, float]:
    """eval/sr, eval/recall and the EC ratings (overall and per turn) over finished episodes."""
    ratings = [(t["turn"], t["ec_rating"]) for e in episodes for t in e["turns"] if t["ec_rating"] is not None]
    metrics = {
        "eval/sr": success_rate([e["success"] for e in episodes]),
        "eval/recall": success_rate([e["recall"] for e in episodes]),
        "rollout/episodes": len(episodes),
        "rollout/turns_mean": sum(e["num_turns"] for e in episodes) / max(len(episodes), 1),
        "rollout/ended_by_user": success_rate([e["ended_by_user"] for e in episodes]),
        "rollout/ec_rating_missing": sum(t["ec_rating"] is None for e in episodes for t in e["turns"]),
    }
    if ratings:
        metrics["rollout/ec_rating_mean"] = sum(r for _, r in ratings) / len(ratings)
    expected = [t["ec_expected"] for e in episodes for t in e["turns"] if t.get("ec_expected") is not None]
    if expected:
        metrics["rollout/ec_expected_mean"] = sum(expected) / len(expected)
    outside = [t.get("ec_mass_outside") for e in episodes for t in e["turns"]]
    metrics |= mass_metrics([o for o in outside if o is not None], "rollout/ec")
    for turn in range(1, max_turns + 1):
        at_turn = [r for t, r in ratings if t == turn]
        if at_turn:
            metrics[f"rollout/ec_rating_turn{turn}"] = sum(at_turn) / len(at_turn)
    return metrics


def print_episode(episode: dict) -> None:
    print(
        f"\n=== {episode['key']} | target: {episode['target']} | "
        f"SR={int(episode['success'])} R={int(episode['recall'])}"
    )
    print(f"  USER   [{episode['opening']['policy']}] {episode['opening']['user']}")
    for t in episode["turns"]:
        print(f"  SYSTEM {t['cra'].get('action') or t['system']}")  # an agent's action where it keeps one
        expected = f" (E {t['ec_expected']:.2f})" if t.get("ec_expected") is not None else ""
        print(f"         EC rating {t['ec_rating']}{expected}: {(t['ec_reason'] or '')[:160]}")
        if t["user"]:
            print(f"  USER   [{t['user_policy']}] {t['user']}")
    if episode.get("dropped"):
        print(f"  DROPPED: the user named its target: {episode['dropped']['user']}")


# =============================================================================================== the demo CRA

CRA_SYSTEM = """You are a conversational recommender system that helps the user find a {domain}.
Ask a short clarifying question when you need to know more. When you recommend, name one or two items using their exact titles from the candidates below, and say briefly why they fit.
Candidates retrieved for this conversation:
{candidates}"""  # noqa: E501  (prompt text, kept verbatim)


def make_zero_shot_cra(llm, *, catalog: Catalog, domain: str, top_k: int, max_tokens: int) -> CRA:
    """A prompted CRA with no training: retrieve top-k items for everything the user said, then answer."""

    def cra(keys: list[str], histories: list[list[dict]]) -> list[CRAReply]:
        queries = [" ".join(m["content"] for m in h if m["role"] == "user") for h in histories]
        candidates = catalog.search(queries, top_k)
        conversations = [
            [
                {
                    "role": "system",
                    "content": CRA_SYSTEM.format(
                        domain=domain,
                        candidates="\n".join(
                            f"- {item_card(catalog.by_title[c], ('year', 'genre', 'categories'))}" for c in cands
                        ),
                    ),
                }
            ]
            + h
            for h, cands in zip(histories, candidates)
        ]
        outputs = llm.chat(conversations, max_tokens=max_tokens)
        return [
            CRAReply(text=" ".join(out[0].split()) or "Could you tell me more about what you like?", retrieved=cands)
            for out, cands in zip(outputs, candidates)
        ]

    return cra


def make_scripted_cra(tasks: list[Task], *, catalog: Catalog, names_target: bool, seed: int) -> CRA:
    """A CRA with no LLM, to check the simulator: every turn it recommends the conversation's target with the
    target's card (``names_target``), or an item of the catalog other than the target, drawn per conversation and
    turn (the same draw in every run of a seed), with that item's card."""
    targets = {task.key: task.target for task in tasks}
    titles = sorted(catalog.by_title)

    def recommended(key: str, turn: int) -> Item:
        if names_target:
            return targets[key]
        draw = random.Random(f"{seed}:{key}:{turn}")
        while (title := draw.choice(titles)) == targets[key].title:
            pass
        return catalog.by_title[title]

    def cra(keys: list[str], histories: list[list[dict]]) -> list[CRAReply]:
        items = [recommended(key, sum(m["role"] == "assistant" for m in h)) for key, h in zip(keys, histories)]
        return [
            CRAReply(text=f"I recommend {item_card(item, SCRIPTED_CARD)}.", retrieved=[item.title]) for item in items
        ]

    return cra


SCRIPTED_CARD = ("categories", "description")  # what the scripted CRAs say of the item they recommend


def build_personas(users: list[str], *, reviews: dict[str, list[dict]], llm, args: Args) -> Iterator[dict]:
    """Persona modeling from real reviews, one batched LLM call per chunk of users: yields each user's persona as
    it is made. A user whose persona never parsed is skipped (a rerun tries it again)."""
    stats = ParseStats()
    for start in range(0, len(users), args.batch_size):
        chunk = users[start : start + args.batch_size]
        prompts = [PERSONA_PROMPT.format(reviews=render_reviews(reviews[u], args.reviews_per_user)) for u in chunk]
        parsed, _ = chat_parsed(
            llm,
            [[{"role": "user", "content": p}] for p in prompts],
            lambda text: parse_persona(text, "?"),
            stats,
            max_tries=args.max_parse_tries,
            max_tokens=256,
        )
        for user_id, persona in zip(chunk, parsed):
            if persona is not None:
                persona.user_id = user_id
                yield {"key": user_id, **asdict(persona)}
    if stats.failures:
        print(f"persona builder: {stats.failures} of {len(users)} users gave no valid persona JSON; they are skipped")


# =============================================================================================== stages


def model_personas(run: Run, args: Args) -> dict[str, float]:
    """User persona modeling (Sec. 2.3) for --num-personas real users, and their diversity (Fig. 4)."""
    if args.dataset not in ("book", "game"):
        raise InputError(f"--num-personas needs review data: use --dataset book or game, not {args.dataset}")
    name = args.dataset.capitalize()
    reviews = load_ecpo_reviews(Path(args.data_dir) / "ecpo" / name / "processed_data_with_summaries.jsonl")
    llm = run.llm(args.persona_llm or args.user_llm, args.batch_size)
    users = list(reviews)[: args.num_personas]
    personas = run.map("personas.jsonl", users, lambda todo: build_personas(todo, reviews=reviews, llm=llm, args=args),
                       key=str)  # fmt: skip
    return diversity_metrics(
        [Persona(**{k: v for k, v in r.items() if k != "key"}) for r in personas], "personas/built"
    )


def simulate(run: Run, args: Args, tasks: list[Task], catalog: Catalog) -> dict[str, float]:
    """AILO against the zero-shot CRA (or a scripted one: --cra), each rank on its share of the tasks; SR, R and the
    EC ratings."""
    user_llm = run.llm(args.user_llm, args.batch_size)
    cra_llm = run.llm(args.cra_llm, args.batch_size) if args.cra == "llm" else None
    domain = TASK_DOMAINS[args.dataset]
    simulator = AILO(
        user_llm, domain=domain, max_tokens=args.user_max_tokens, max_parse_tries=args.max_parse_tries,
        max_leak_tries=args.max_leak_tries, target_note=args.target_note, ec_scoring=args.judge_scoring,
        leak_guard=args.leak_guard,
    )  # fmt: skip
    if cra_llm is not None:
        cra = make_zero_shot_cra(cra_llm, catalog=catalog, domain=domain, top_k=args.retriever_top_k,
                                 max_tokens=args.cra_max_tokens)  # fmt: skip
    else:
        cra = make_scripted_cra(tasks, catalog=catalog, names_target=args.cra == "names-target", seed=args.seed)

    def play(todo: list[Task]) -> Iterator[dict]:
        episodes = run_episodes(
            todo, cra=cra, simulator=simulator, max_turns=args.max_turns, batch_size=args.batch_size
        )
        return printed(episodes, args.print_conversations)

    episodes = run.map("episodes.jsonl", tasks, play, desc="conversations")  # an interrupted launch's count too
    for llm, role in ((user_llm, "user_"), (cra_llm, "cra_")):
        if llm is not None:  # a scripted CRA (--cra) calls none
            run.count(llm.usage.metrics(f"cost/{role}") | llm.usage.metrics("cost/"))  # per role, and their sum
    run.count(simulator.metrics())
    return episode_metrics(kept(episodes), args.max_turns)


# =============================================================================================== main


def main(args: Args) -> None:
    if args.audit:
        if not list(Path(args.audit).glob("*.jsonl")):
            raise InputError(f"--audit {args.audit}: no run folder (no JSON Lines files there)")
        metrics, leaks = audit_leaks(args.audit)
        print_audit(metrics, leaks)
        raise SystemExit(1 if leaks and args.strict else 0)
    check_specs(args)  # a wrong model or LLM spec stops here, not after minutes of an earlier stage
    split = load_tasks(args.dataset, args.data_dir, args.split)
    tasks = split[args.task_offset : args.task_offset + args.num_tasks]
    if not tasks:
        raise InputError(
            f"no tasks selected: offset {args.task_offset}, count {args.num_tasks}, split has {len(split)}"
        )
    catalog = Catalog(load_task_items(args.dataset, args.data_dir, split))
    if args.dry_run:
        print_dry_run("ailo_sim.py", args.dry_run, [], {"tasks": len(tasks), "items": len(catalog)})
        return
    run = Run(args)
    run.log(diversity_metrics([t.persona for t in tasks], "personas/tasks"))
    if args.num_personas > 0:
        run.stage("personas", model_personas, args)
    run.stage("simulate", simulate, args, tasks, catalog)
    if run.main:
        audit = audit_leaks(run.dir)
        print_audit(*audit)
        run.log(audit[0])
    run.finish(bars={"EC rating r_t per turn": [f"rollout/ec_rating_turn{t}" for t in range(1, args.max_turns + 1)],
                     "success": ["eval/sr", "eval/recall"]})  # fmt: skip


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (InputError, ModelSpecError, LLMBackendError) as err:
        raise SystemExit(f"error: {err}") from None
