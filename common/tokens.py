"""Chat messages -> token ids with a completion mask, prompts fitted to a token budget, and masked sequence
log-probs."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import torch

# A dialogue as common.conversations.render_history writes it: each utterance opens a line with "User: " or "System: ".
UTTERANCE = re.compile(r"^(?:User|System): ", re.MULTILINE)


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat-template text of ``messages`` followed by the assistant generation header."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prefill(prompt: str, prefix: str) -> str:
    """``prompt`` followed by the part of the pre-filled answer ``prefix`` that it does not already end with. Some
    templates open the answer themselves (DeepSeek-R1-Distill's generation header ends with "<think>\n"), and a
    prefix that opens the same way must not write it twice. Only an overlap with visible text counts: a prefix's
    leading newlines are its own, even after a header that ends with a newline."""
    for size in range(len(prefix), 0, -1):
        if prefix[:size].strip() and prompt.endswith(prefix[:size]):
            return prompt + prefix[size:]
    return prompt + prefix


def prompt_length(tokenizer, messages: list[dict], prefix: str = "") -> int:
    """Tokens of ``messages`` in the chat template, with the generation header and the pre-filled ``prefix``: what a
    model reads before it writes."""
    return len(tokenizer(prefill(render_prompt(tokenizer, messages), prefix), add_special_tokens=False)["input_ids"])


def droppable_utterances(text: str) -> int:
    """How many utterances of the dialogue in ``text`` come before its latest user utterance: the ones a prompt that
    is too long may lose (the latest user utterance and what follows it stay)."""
    speakers = [m.group() for m in UTTERANCE.finditer(text)]
    users = [k for k, speaker in enumerate(speakers) if speaker.startswith("User")]
    return users[-1] if users else max(len(speakers) - 1, 0)


def drop_utterances(text: str, count: int) -> str:
    """``text`` with the ``count`` oldest utterances of its dialogue left out, a note saying so in their place."""
    starts = [m.start() for m in UTTERANCE.finditer(text)]
    if count <= 0 or not starts:
        return text
    note = f"({count} earlier message{'s' if count > 1 else ''} left out)\n"
    return text[: starts[0]] + note + text[starts[count] if count < len(starts) else len(text) :]


class Fitted(NamedTuple):
    """A prompt fitted to a budget: its text, how many droppable parts it left out, its tokens, the tokens saved."""

    text: str
    dropped_parts: int
    tokens: int
    dropped_tokens: int


def fit_prompt(length: Callable[[str], int], build: Callable[[int], str], droppable: int, budget: int) -> Fitted:
    """``build(k)`` for the fewest ``k`` in 0..``droppable`` whose ``length`` is at most ``budget`` tokens, or
    ``build(droppable)`` where none is (its ``tokens`` then say it is still over). ``build(k)`` is the prompt with its
    ``k`` oldest droppable parts (dialogue lines, earlier turns) left out, so the parts it never drops (the
    instruction, the latest turns, the generation header) always stay. Found by bisection: a prompt gets shorter
    with every part it leaves out."""
    full = build(0)
    whole = length(full)
    if whole <= budget or droppable <= 0:
        return Fitted(full, 0, whole, 0)
    shortest = build(droppable)
    fits = (droppable, shortest, length(shortest))
    if fits[2] > budget:
        return Fitted(shortest, droppable, fits[2], whole - fits[2])
    low, high = 1, droppable - 1  # the fewest that fits lies in low..fits[0]
    while low <= high:
        k = (low + high) // 2
        text = build(k)
        tokens = length(text)
        if tokens <= budget:
            fits, high = (k, text, tokens), k - 1
        else:
            low = k + 1
    return Fitted(fits[1], fits[0], fits[2], whole - fits[2])


def encode_prompt_completion(
    tokenizer, messages: list[dict], completion: str, max_length: int | None = None, prefix: str = ""
) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion, and a mask that is 1 on completion tokens only.

    The prompt and the completion are tokenized separately and concatenated, so the mask
    boundary is exact even where a joint tokenization would merge tokens across it. The
    completion is closed with the end-of-turn token, which the model must learn to emit. With ``max_length``, a
    longer example loses the oldest utterances of the dialogue in its last message first (``fit_prompt``: the
    instruction, the rest of the prompt, the latest user utterance and the generation header stay); only where that
    is not enough are the oldest tokens cut. A ``prefix`` pre-filled after the assistant header belongs to the
    prompt, as it did when the completion was generated.
    """
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if max_length and prompt_length(tokenizer, messages, prefix) + len(completion_ids) > max_length:
        content = messages[-1]["content"]
        text = fit_prompt(
            lambda t: prompt_length(tokenizer, [*messages[:-1], {**messages[-1], "content": t}], prefix),
            lambda k: drop_utterances(content, k),
            droppable_utterances(content),
            max_length - len(completion_ids),
        ).text
        messages = [*messages[:-1], {**messages[-1], "content": text}]
    prompt_ids = tokenizer(prefill(render_prompt(tokenizer, messages), prefix), add_special_tokens=False)["input_ids"]
    ids, mask = prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)
    return (ids[-max_length:], mask[-max_length:]) if max_length else (ids, mask)


def pad(sequences: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in sequences)
    rows = [([value] * (width - len(s)) + s) if side == "left" else (s + [value] * (width - len(s))) for s in sequences]
    return torch.tensor(rows, dtype=torch.long)


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of (input_ids, completion_mask) pairs."""
    ids = [e[0] for e in examples]
    return {
        "input_ids": pad(ids, pad_id),
        "attention_mask": pad([[1] * len(s) for s in ids], 0),
        "completion_mask": pad([e[1] for e in examples], 0),
    }


def sequence_logprobs(model, input_ids, attention_mask, completion_mask):
    """Log-probability of the completion tokens under ``model``.

    Returns ``(sum_logp [B], n_tokens [B], per_token_logp [B, L-1])``; ``per_token_logp[:, j]``
    is log p(input_ids[:, j+1] | input_ids[:, :j+1]) and is zero where the mask is off.
    The LM head runs only at positions that predict a completion token in some row (``logits_to_keep``):
    prompts are long and completions short, and full-vocabulary logits over the prompt would dominate
    time and memory. Computed in fp32 whatever the model dtype, so bf16 runs compare equal log-ratios.
    """
    predicts = completion_mask[:, 1:].bool()  # position j predicts token j+1
    keep = predicts.any(0).nonzero().squeeze(1)
    if keep.numel() == 0:  # no completion anywhere: keep one position so the graph still exists
        keep = torch.zeros(1, dtype=torch.long, device=input_ids.device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False).logits
    logits = logits.float()
    targets = input_ids[:, keep + 1]
    mask = predicts[:, keep].to(logits.dtype)
    kept_logp = (logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)) * mask
    token_logp = kept_logp.new_zeros(input_ids.shape[0], input_ids.shape[1] - 1).index_copy(1, keep, kept_logp)
    return token_logp.sum(-1), mask.sum(-1), token_logp
