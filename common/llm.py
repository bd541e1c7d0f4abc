"""One LLM interface for every role (policy, user simulator, rewriter, judge, teacher), three backends.

    llm = make_llm("hf:smollm2-135m")          # local transformers
    llm = make_llm("openai:gpt-4o-mini")       # any OpenAI-compatible endpoint (OPENAI_BASE_URL, OPENAI_API_KEY)
    llm = make_llm("vllm:meta-llama/Llama-3.1-8B-Instruct")   # in-process vLLM, GPU only

Every backend has the same two methods:
    llm.chat(conversations, n=1, temperature=0.0, max_tokens=256, stop=None, prefix="") -> list[list[str]]
    llm.choice_probs(conversations, choices=("Yes", "No"), prefix="", shared_prefix=False) -> list[dict[str, float]]
and the local ones (hf, vllm) a third, for policies trained on their own samples:
    llm.complete(conversations, n=1, temperature=1.0, max_tokens=256, prefix="") -> list[list[Completion]]
and a ``usage`` counter (calls, prompt and completion tokens) that scripts log as ``cost/*``.
``prefix`` pre-fills the start of the assistant's answer (constrained decoding): one string for every
conversation, or a list with one per conversation. Only local backends (``can_prefill``) support it.
``shared_prefix`` tells a local backend that the conversations differ only at their end, so their common
beginning is computed once (vLLM's prefix caching and API servers do this on their own).
A "call" is one completion asked for: n samples of one conversation are n calls on every backend.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
import sys
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from common.distributed import launched_processes
from common.models import ModelSpecError, default_dtype, load_model, resolve_model_path
from common.tokens import pad, prefill, render_prompt


class LLMBackendError(RuntimeError):
    """A backend that could not answer, after its retries."""


@dataclass
class Usage:
    """What a backend was asked for, billed as an API bills it (every call its whole prompt), and, on the hf backend,
    what it computed: ``prefill_tokens`` prompt tokens run through the model (the scored continuations of
    ``choice_probs`` included), ``cached_tokens`` prompt tokens read from the prefix cache instead (its hits; the
    prefill tokens are its misses)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_tokens: int = 0
    cached_tokens: int = 0

    def add(self, calls: int, prompt_tokens: int, completion_tokens: int) -> None:
        self.calls += calls
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def metrics(self, prefix: str = "cost/") -> dict[str, int]:
        return {
            f"{prefix}llm_calls": self.calls,
            f"{prefix}prompt_tokens": self.prompt_tokens,
            f"{prefix}completion_tokens": self.completion_tokens,
            f"{prefix}tokens": self.prompt_tokens + self.completion_tokens,
        }


def truncate_at_stop(text: str, stop: list[str] | None) -> str:
    """Cut ``text`` before the earliest stop string (the stop string itself is dropped, as in the OpenAI API)."""
    cut = len(text)
    for s in stop or []:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def per_conversation(prefix: str | list[str], count: int) -> list[str]:
    """A ``prefix`` argument as one string per conversation."""
    prefixes = [prefix] * count if isinstance(prefix, str) else list(prefix)
    if len(prefixes) != count:
        raise ValueError(f"{len(prefixes)} prefixes for {count} conversations")
    return prefixes


def prefilled_prompts(tokenizer, conversations, prefix: str | list[str]) -> list[str]:
    """Each conversation's chat-template text up to the assistant header, followed by what its ``prefix`` adds to
    it (``prefill``: not a "<think>" the template already opened)."""
    return [
        prefill(render_prompt(tokenizer, conv), p)
        for conv, p in zip(conversations, per_conversation(prefix, len(conversations)))
    ]


def prompt_ids(tokenizer, conversations, prefix, max_prompt_tokens: int | None = None) -> list[list[int]]:
    """The prefilled prompts as token ids, the latest ``max_prompt_tokens`` of each where given. Both backends
    generate from ids: a rendered text would be tokenized again (by vLLM), with a second BOS where the template writes
    one (Llama-3's, DeepSeek-R1-Distill's)."""
    texts = prefilled_prompts(tokenizer, conversations, prefix)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [row[-max_prompt_tokens:] for row in ids] if max_prompt_tokens else ids


@dataclass
class Completion:
    """One sampled completion with the token ids it was sampled as: a policy trained on its own samples (GRPO)
    trains these ids, not a re-tokenization of the decoded text (which loses a truncation, a sampled leading newline,
    and any token sequence that decodes and encodes differently)."""

    text: str  # decoded, special tokens skipped
    prompt_ids: list[int]  # the prompt as the model read it: chat template, pre-filled prefix
    completion_ids: list[int]  # the sampled tokens; the end-of-sequence token only where it was sampled


def _choice_variants(choice: str) -> list[str]:
    return sorted({choice.strip(), " " + choice.strip()})


@dataclass
class WrittenChoices:
    """The choices of ``choice_probs`` as token ids written after one prompt (its pre-fill's trailing spaces
    removed), the way lm-evaluation-harness scores a continuation: each spelling (with and without a leading space)
    is the whole text tokenized at once, and what it adds lies after the tokens that every spelling and the prompt
    share. That boundary is usually the prompt's end; where a spelling merges with the prompt's last token, it lies
    before it, and the prompt's own tokens after it (``tail``) are scored too, so that each spelling's probability is
    P(prompt + spelling) / P(prompt), the same wherever the boundary falls."""

    context: list[int]  # the prompt's tokens up to the boundary
    spellings: dict[str, list[list[int]]]  # per choice, the tokens each of its spellings adds after the boundary
    tail: list[int]  # the prompt's tokens after the boundary (none unless a spelling merges with the prompt's end)

    def sequences(self) -> list[list[int]]:
        return [ids for spelled in self.spellings.values() for ids in spelled] + [self.tail]

    def probs(self, logprob) -> dict[str, float]:
        """P(each choice written in full after the prompt), summed over its spellings, from ``logprob(path, token)``:
        log P(token | context + path)."""

        def total(ids: list[int]) -> float:
            return sum(logprob(tuple(ids[:j]), token) for j, token in enumerate(ids))

        tail = total(self.tail)
        return {c: sum(math.exp(total(ids) - tail) for ids in spelled) for c, spelled in self.spellings.items()}


def written_choices(tokenizer, text: str, choices) -> WrittenChoices:
    """``choices`` written after the prompt ``text`` (``WrittenChoices``)."""
    spellings = {c: _choice_variants(c) for c in choices}
    flat = [s for c in choices for s in spellings[c]]
    encoded = tokenizer([text] + [text + s for s in flat], add_special_tokens=False)["input_ids"]
    prompt, written = encoded[0], dict(zip(flat, encoded[1:]))
    boundary = min(_shared_length(prompt, ids) for ids in written.values())
    return WrittenChoices(
        prompt[:boundary], {c: [written[s][boundary:] for s in spellings[c]] for c in choices}, prompt[boundary:]
    )


def _shared_length(a: list[int], b: list[int]) -> int:
    size = 0
    while size < min(len(a), len(b)) and a[size] == b[size]:
        size += 1
    return size


def following_tokens(sequences: list[list[int]]) -> dict[tuple[int, ...], set[int]]:
    """The token paths a model must be read after to score ``sequences`` (the empty path, the context's end,
    included), each with the tokens that follow it in some sequence: a tree, so spellings that begin alike share a
    row (" 1" and " 0" are " " and then a digit)."""
    following: dict[tuple[int, ...], set[int]] = {}
    for ids in sequences:
        for j, token in enumerate(ids):
            following.setdefault(tuple(ids[:j]), set()).add(token)
    return following


def cache_rows(cache, rows: torch.Tensor):
    """A key/value cache holding ``rows`` of ``cache`` (repeats allowed), which stays as it was: each layer's
    tensors are selected anew, not in place."""
    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]
    selected.reorder_cache(rows)
    return selected


# ------------------------------------------------------------------------------------------- the prefix cache
# The hf backend keeps the key/value states of the prompts it has read, by token ids, and a later prompt that begins
# with the same ids reads them instead of computing them again (vLLM's automatic prefix caching, SGLang's radix
# cache): a turn's prompts re-read the history that the previous turn's read, and only what is new is run.


def prefix_cache_capacity() -> int:
    """Bytes of key/value states that the ``hf:`` backend's prefix caches hold together, all models included:
    ``CLEANCRS_PREFIX_CACHE_GB``, default 2; 0 turns the cache off. The least recently used prefixes go first."""
    value = os.environ.get("CLEANCRS_PREFIX_CACHE_GB", "2")
    try:
        gigabytes = float(value)
    except ValueError:
        gigabytes = -1.0
    if not 0 <= gigabytes < math.inf:
        raise ModelSpecError(f"CLEANCRS_PREFIX_CACHE_GB={value!r}: use a size in GB (0 turns the prefix cache off)")
    return int(gigabytes * 2**30)


_OPTIMIZER_STEPS = [0]  # optimizer steps taken in this process, by any torch optimizer


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def weights_fingerprint(model) -> tuple:
    """What the model's outputs depend on besides its input, cheaply: each weight's identity, storage and in-place
    version (a loaded state dict, a swapped or gathered weight, an unfused optimizer step), peft's adapter switches
    (active, disabled, merged: the same weights, another function), autocast, and, where any weight can train, the
    process's count of optimizer steps (a fused optimizer, or DeepSpeed's writes through ``.data``, leave the version
    counters as they were)."""
    tuner = None
    if "peft" in sys.modules:  # no adapter without peft
        from peft.tuners.tuners_utils import BaseTunerLayer as tuner
    weights, adapters, trains = [], [], False
    for module in model.modules():  # one walk: a LoRA model has a thousand modules
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is not None:
                weights.append((id(tensor), tensor.data_ptr(), tensor._version))
                trains |= tensor.requires_grad
        if tuner is not None and isinstance(module, tuner):
            adapters.append((id(module), str(module.active_adapter), module.disable_adapters, module.merged_adapters))
    device = model.device.type
    autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    return tuple(weights), str(adapters), autocast, _OPTIMIZER_STEPS[0] if trains else None


class _Node:
    """A run of token ids in the prefix tree with their keys and values (per layer [heads, tokens, head dim]), read
    after the tokens of the nodes above it."""

    __slots__ = ("tokens", "keys", "values", "children", "parent", "used", "nbytes")

    def __init__(self, tokens: tuple[int, ...], keys: list, values: list, parent):
        self.tokens, self.keys, self.values, self.parent = tokens, keys, values, parent
        self.children: dict[int, _Node] = {}
        self.used = 0
        self.nbytes = sum(t.numel() * t.element_size() for t in (*keys, *values))


_TICKS = itertools.count(1)


class PrefixCache:
    """The key/value states of the token prefixes one model has read, as a radix tree of token runs: prompts that
    share a beginning share its nodes, so a history read by several turns and roles is held once. ``match`` finds the
    longest prefix held, ``insert`` adds what a pass computed, and the least recently used leaves go when the
    caches together exceed ``prefix_cache_capacity`` (``make_room``). Valid for the weights it was filled under
    (``weights_fingerprint``): ``prefix_cache_of`` empties it when they change."""

    def __init__(self, registered: bool = True):
        self.root = _Node((), [], [], None)
        self.registered = registered  # a call's own tree (a shared prefix without the cache) takes no part in eviction
        self.fingerprint = None
        self.nbytes = 0
        self.supported = True

    def clear(self) -> None:
        self.root, self.nbytes = _Node((), [], [], None), 0

    def match(self, ids: list[int], limit: int) -> tuple[int, list[tuple[_Node, int]]]:
        """(length of the longest prefix of ``ids[:limit]`` held, the nodes it runs through with how many tokens of
        each); the nodes count as used now."""
        node, held, path, tick = self.root, 0, [], next(_TICKS)
        while held < limit:
            child = node.children.get(ids[held])
            if child is None:
                break
            size = _shared_length(child.tokens, ids[held:limit])
            path.append((child, size))
            child.used = tick
            held += size
            if size < len(child.tokens):
                break
            node = child
        return held, path

    def insert(self, ids: list[int], states) -> None:
        """Hold the keys and values of ``ids``; ``states(start, end)`` gives those of ``ids[start:end]`` (lists per
        layer) for the part not held yet, which is copied out of the pass that computed it."""
        node, held, tick = self.root, 0, next(_TICKS)
        while held < len(ids):
            child = node.children.get(ids[held])
            if child is None:
                break
            size = _shared_length(child.tokens, ids[held:])
            if size < len(child.tokens):
                child = self._split(child, size)
            child.used = tick
            held += size
            node = child
        if held < len(ids):
            keys, values = states(held, len(ids))
            leaf = _Node(tuple(ids[held:]), keys, values, node)
            leaf.used = tick
            node.children[ids[held]] = leaf
            self.nbytes += leaf.nbytes

    def _split(self, node: _Node, size: int) -> _Node:
        """Cut ``node`` after ``size`` tokens: a new node holds the first part and ``node`` the rest under it (each
        part copied out, so that dropping one frees its memory)."""
        head = _Node(
            node.tokens[:size],
            [k[:, :size].clone() for k in node.keys],
            [v[:, :size].clone() for v in node.values],
            node.parent,
        )
        head.used = node.used
        node.parent.children[node.tokens[0]] = head
        node.tokens, node.parent = node.tokens[size:], head
        node.keys = [k[:, size:].clone() for k in node.keys]
        node.values = [v[:, size:].clone() for v in node.values]
        node.nbytes -= head.nbytes
        head.children[node.tokens[0]] = node
        return head

    def leaves(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if not node.children and node is not self.root:
                yield node

    def drop(self, leaf: _Node) -> None:
        del leaf.parent.children[leaf.tokens[0]]
        self.nbytes -= leaf.nbytes


_PREFIX_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its PrefixCache


def prefix_cache_of(model) -> PrefixCache | None:
    """The model's prefix cache, emptied if its weights changed since it was filled (``weights_fingerprint``); None
    where the cache is off (``CLEANCRS_PREFIX_CACHE_GB=0``) or cannot serve the model: only a cache of plain
    full-attention layers continues from any prefix (a sliding window or a recurrent state does not)."""
    if prefix_cache_capacity() == 0:
        return None
    cache = _PREFIX_CACHES.get(model)
    if cache is None:
        cache = _PREFIX_CACHES[model] = PrefixCache()
        cache.supported = _full_attention(model)
    if not cache.supported:
        return None
    fingerprint = weights_fingerprint(model)
    if cache.fingerprint != fingerprint:
        cache.clear()
        cache.fingerprint = fingerprint
    return cache


def _full_attention(model) -> bool:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # a model without a decoder cache of its own
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def make_room() -> None:
    """Drop least recently used leaves of the prefix caches until they hold at most ``prefix_cache_capacity``."""
    capacity, caches = prefix_cache_capacity(), list(_PREFIX_CACHES.values())
    while sum(c.nbytes for c in caches) > capacity:
        leaves = [(c, leaf) for c in caches for leaf in c.leaves()]
        if not leaves:
            return
        cache, leaf = min(leaves, key=lambda pair: pair[1].used)
        cache.drop(leaf)


def clear_prefix_caches() -> None:
    for cache in _PREFIX_CACHES.values():
        cache.clear()


@dataclass
class PromptPass:
    """Prompts run through the model from the prefixes a prefix cache held, each row laid out as [pads, the prefix
    read from the cache, pads, the tokens run now]: the held parts end at one place, where the pass begins."""

    input_ids: torch.Tensor  # [rows, held + run]
    attention_mask: torch.Tensor  # [rows, held + run], 0 on the pads
    cache: object  # a DynamicCache of every place
    logits: torch.Tensor | None  # each row's next-token logits [rows, V]; None where nothing had to run


def _row_states(cache, row: int, held: int, first_held: int, first_run: int, start: int, end: int):
    """Keys and values (lists per layer, [heads, tokens, head dim]) of a pass's row's tokens ``start:end``: its first
    ``held`` tokens lie from place ``first_held`` on, the rest from ``first_run`` on (``PromptPass``)."""
    spans = []
    if start < held:
        spans.append((first_held + start, first_held + min(end, held)))
    if end > held:
        spans.append((first_run + max(start, held) - held, first_run + end - held))
    keys = [torch.cat([layer.keys[row, :, a:b] for a, b in spans], 1) for layer in cache.layers]
    values = [torch.cat([layer.values[row, :, a:b] for a, b in spans], 1) for layer in cache.layers]
    return keys, values


class HFChat:
    """Local transformers backend. Wraps a live model, so a trainable policy generates with its current weights.

    Its prompts' key/value states stay in the model's prefix cache (``PrefixCache``, shared by every role on the
    model, bounded by ``CLEANCRS_PREFIX_CACHE_GB``): a later prompt, of this role or another, that begins with the
    same token ids runs only what follows them. The cache is emptied whenever the weights change
    (``weights_fingerprint``), so a policy between two updates reuses it and after an update does not.
    ``prefix_cache=False`` runs every prompt whole, as before the cache."""

    can_prefill = True

    def __init__(self, model, tokenizer, batch_size: int = 16, prefix_cache: bool = True):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.prefix_cache = prefix_cache and prefix_cache_capacity() > 0
        self.usage = Usage()

    def _prefix_tree(self) -> PrefixCache | None:
        return prefix_cache_of(self.model) if self.prefix_cache else None

    def _left_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = pad(rows, self.tokenizer.pad_token_id, side="left").to(self.model.device)
        attention_mask = pad([[1] * len(r) for r in rows], 0, side="left").to(self.model.device)
        return input_ids, attention_mask

    @torch.no_grad()
    def _sample(self, prompts: list[list[int]], n: int, temperature: float, max_tokens: int, stop) -> list[list]:
        """``n`` generated token rows per prompt, in order, each cut after its first eos. The prompts' n samples each
        are one list of rows, prompts of similar length next to each other, generated ``batch_size`` rows at a time.
        Samples of one prompt in a batch share its prefill: the prompt is run once and its key/value cache copied to
        each of them (as vLLM's n does). With the prefix cache, every prompt but its last token is run that way,
        from the longest prefix the cache holds, and what it computed stays there; generate continues from it, as
        transformers continues from a prompt cache."""
        outputs: list[list[list[int]]] = [[] for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        tree = self._prefix_tree()
        owners = [i for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])) for _ in range(n)]
        for start in range(0, len(owners), self.batch_size):
            chunk = owners[start : start + self.batch_size]
            distinct = list(dict.fromkeys(chunk))
            rows = torch.tensor([distinct.index(i) for i in chunk], device=self.model.device)
            shortest = min(len(prompts[i]) for i in distinct)
            cache = None
            if shortest > 1 and (tree is not None or len(distinct) < len(chunk)):
                read = self._prompt_pass([prompts[i][:-1] for i in distinct], tree, fresh=0)
                last = torch.tensor([[prompts[i][-1]] for i in distinct], device=self.model.device)
                input_ids = torch.cat([read.input_ids, last], 1)
                attention_mask = torch.cat([read.attention_mask, torch.ones_like(last)], 1)
                cache = read.cache
                cache.reorder_cache(rows)  # each sample's copy of its prompt's cache
                self.usage.prefill_tokens += len(chunk)  # generate runs each sample's last prompt token
            else:
                input_ids, attention_mask = self._left_padded([prompts[i] for i in distinct])
                self.usage.prefill_tokens += sum(len(prompts[i]) for i in chunk)
            generated = self._generate(input_ids[rows], attention_mask[rows], cache, temperature, max_tokens, stop)
            for i, row in zip(chunk, generated):
                outputs[i].append(self._trim(row))
        self.model.train(was_training)
        for ids, rows in zip(prompts, outputs):
            for row in rows:
                self.usage.add(1, len(ids), len(row))
        return outputs

    def chat(
        self, conversations, n=1, temperature=0.0, max_tokens=256, stop=None, prefix: str | list[str] = ""
    ) -> list[list[str]]:
        """``n`` completions per conversation, decoded and cut at the first stop string."""
        sampled = self._sample(prompt_ids(self.tokenizer, conversations, prefix), n, temperature, max_tokens, stop)
        decode = self.tokenizer.decode
        return [
            [truncate_at_stop(decode(row, skip_special_tokens=True), stop).strip() for row in rows] for rows in sampled
        ]

    def complete(
        self, conversations, n=1, temperature=1.0, max_tokens=256, prefix: str | list[str] = "", max_prompt_tokens=None
    ) -> list[list[Completion]]:
        """``n`` samples per conversation with the token ids they were sampled as (for training on them). A prompt
        longer than ``max_prompt_tokens`` loses its oldest tokens before it is sampled from."""
        prompts = prompt_ids(self.tokenizer, conversations, prefix, max_prompt_tokens)
        sampled = self._sample(prompts, n, temperature, max_tokens, None)
        decode = self.tokenizer.decode
        return [
            [Completion(decode(row, skip_special_tokens=True), ids, row) for row in rows]
            for ids, rows in zip(prompts, sampled)
        ]

    def _prompt_pass(self, rows: list[list[int]], tree: PrefixCache | None, fresh: int, store: bool = True):
        """Run ``rows`` (token ids) through the model together, each from the longest prefix ``tree`` holds but its
        last ``fresh`` tokens (a pass that gives the next token's logits runs at least the last one), and hold in
        ``tree`` what it ran (unless ``store`` is off). A ``PromptPass``. Positions count real tokens only, as
        generate counts them, so every row reads as its unpadded self, whatever its pads."""
        device = self.model.device
        matches = [tree.match(r, len(r) - fresh) if tree is not None else (0, []) for r in rows]
        held = [size for size, _ in matches]
        run = [len(r) - size for r, size in zip(rows, held)]
        width_held, width_run = max(held), max(run)
        pad_id = self.tokenizer.pad_token_id
        laid_out = [
            [pad_id] * (width_held - h) + r[:h] + [pad_id] * (width_run - n) + r[h:] for r, h, n in zip(rows, held, run)
        ]
        input_ids = torch.tensor(laid_out, device=device)
        attention_mask = torch.tensor(
            [[0] * (width_held - h) + [1] * h + [0] * (width_run - n) + [1] * n for h, n in zip(held, run)],
            device=device,
        )
        cache = self._held_states([path for _, path in matches], held, width_held) if width_held else None
        logits = None
        if width_run:
            out = self.model(
                input_ids=input_ids[:, width_held:],
                attention_mask=attention_mask,
                position_ids=(attention_mask.cumsum(1) - 1).clamp_min(0)[:, width_held:],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache, logits = out.past_key_values, out.logits[:, -1]
        self.usage.prefill_tokens += sum(run)
        self.usage.cached_tokens += sum(held)
        if tree is not None and store and width_run:
            for k, (r, h, n) in enumerate(zip(rows, held, run)):
                tree.insert(r, partial(_row_states, cache, k, h, width_held - h, width_held + width_run - n))
            if tree.registered:
                make_room()
        return PromptPass(input_ids, attention_mask, cache, logits)

    def _held_states(self, paths: list[list[tuple[_Node, int]]], held: list[int], width: int):
        """A DynamicCache of ``width`` places holding each row's cached prefix (the nodes of its ``path``) at its
        end, zeros before it (pads, masked)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        first = next(node for path in paths for node, _ in path)
        for layer, (k, v) in enumerate(zip(first.keys, first.values)):
            keys = k.new_zeros(len(paths), k.shape[0], width, k.shape[2])
            values = v.new_zeros(len(paths), v.shape[0], width, v.shape[2])
            for row, (path, size) in enumerate(zip(paths, held)):
                place = width - size
                for node, part in path:
                    keys[row, :, place : place + part] = node.keys[layer][:, :part]
                    values[row, :, place : place + part] = node.values[layer][:, :part]
                    place += part
            cache.update(keys, values, layer)
        return cache

    def _generate(self, input_ids, attention_mask, cache, temperature: float, max_tokens: int, stop):
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
            if temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        return self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            max_new_tokens=max_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=stop or None,
            tokenizer=self.tokenizer,
            # Each rank holds whole weights here (a frozen model, or a trained one inside generation_weights), so
            # no rank waits for another. transformers would sync the ranks at every decode step under ZeRO-3,
            # which hangs as soon as ranks make different numbers of generate calls.
            synced_gpus=False,
            **sampling,
        )[:, input_ids.shape[1] :]

    def _trim(self, generated: torch.Tensor) -> list[int]:
        """The generated tokens up to and including the first eos; rows that stopped early are padded after it (with
        a pad that may be the eos itself), rows cut by a stop string are padded at the end."""
        tokens = generated.tolist()
        eos, pad_id = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        if eos in tokens:
            return tokens[: tokens.index(eos) + 1]
        while tokens and tokens[-1] == pad_id:
            tokens.pop()
        return tokens

    @torch.no_grad()
    def choice_probs(
        self, conversations, choices=("Yes", "No"), prefix: str | list[str] = "", shared_prefix: bool = False
    ) -> list[dict[str, float]]:
        """P(the answer goes on with each choice written in full) after the generation header and ``prefix``: every
        token of each spelling, with and without a leading space, the way lm-evaluation-harness scores a
        continuation's log-likelihood (``WrittenChoices``). The pre-fill's trailing spaces belong to the spellings,
        so '"Score": ' and '"Score":' give the same numbers, and " -1" is read as the model writes it (" -", "1").
        No sampling. The prompt runs once: its next-token distribution gives the first token of every spelling, and
        its key/value cache serves one short row per token path that a longer spelling needs (" ", " -", "-" for
        1, 0, -1). Choices written in one token either way (Yes/No) need no second pass. With ``shared_prefix``
        (conversations that differ only at their end, such as one dialogue and many items), the tokens they share
        are run once and their cache reused, so each conversation costs its own tokens."""
        prefixes = [p.rstrip(" ") for p in per_conversation(prefix, len(conversations))]
        texts = prefilled_prompts(self.tokenizer, conversations, prefixes)
        written = [written_choices(self.tokenizer, t, choices) for t in texts]
        following = [following_tokens(w.sequences()) for w in written]
        longer = any(len(paths) > 1 for paths in following)  # a spelling of two or more tokens somewhere
        was_training = self.model.training
        self.model.eval()
        contexts = [w.context for w in written]
        read: dict[tuple[int, tuple[int, ...], int], float] = {}  # (conversation, path, token) -> log-prob
        for chunk, logits, cache, mask in self._context_passes(contexts, shared_prefix, keep_cache=longer):
            first = logits.float().log_softmax(-1)
            for row, i in enumerate(chunk):
                read.update({(i, (), t): float(first[row, t]) for t in following[i][()]})
                self.usage.add(1, len(contexts[i]) + len(written[i].tail), 0)  # billed as an API bills: the prompt
            paths = [(row, i, path) for row, i in enumerate(chunk) for path in following[i] if path]
            for start in range(0, len(paths), self.batch_size):
                part = paths[start : start + self.batch_size]
                after = self._after_paths(cache, mask, [row for row, _, _ in part], [list(p) for _, _, p in part])
                for (_, i, path), logprobs in zip(part, after):
                    read.update({(i, path, t): float(logprobs[t]) for t in following[i][path]})
        self.model.train(was_training)
        return [w.probs(lambda path, token, i=i: read[i, path, token]) for i, w in enumerate(written)]

    def _context_passes(self, contexts: list[list[int]], shared_prefix: bool, keep_cache: bool):
        """Run the prompts ``contexts`` (token ids) in batches of the batch size, prompts of similar length together:
        yields (indices, next-token logits [B, V], the key/value cache or None, its attention mask [B, L])
        (``_prompt_pass``: each from the longest prefix the prefix cache holds). The LM head runs at the last
        position only (on a 49k vocabulary it is a large share of the pass). With ``shared_prefix`` the token ids
        every prompt begins with are run once first, and every row reads them from there (without the prefix cache,
        from a tree of this call alone)."""
        tree, store = self._prefix_tree(), True
        shared = 0
        if shared_prefix and len(contexts) > 1:  # at least one token of each prompt stays its own
            shared = min(len(os.path.commonprefix(contexts)), min(map(len, contexts)) - 1)
        if shared:
            if tree is None:
                tree, store = PrefixCache(registered=False), False
            self._prompt_pass([contexts[0][:shared]], tree, fresh=0)
        order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            read = self._prompt_pass([contexts[i] for i in chunk], tree, fresh=1, store=store)
            yield chunk, read.logits, read.cache if keep_cache else None, read.attention_mask

    def _after_paths(self, cache, mask, rows: list[int], paths: list[list[int]]) -> torch.Tensor:
        """Log-probs of the next token [len(paths), V] after each token path, appended to row ``rows[k]`` of a
        context pass (``cache``, ``mask``): the prompt is not run again."""
        device = self.model.device
        index = torch.tensor(rows, device=device)
        input_ids = pad(paths, self.tokenizer.pad_token_id, side="right").to(device)
        path_mask = pad([[1] * len(p) for p in paths], 0, side="right").to(device)
        positions = mask[index].sum(1, keepdim=True) + torch.arange(input_ids.shape[1], device=device)
        logits = self.model(
            input_ids=input_ids,
            attention_mask=torch.cat([mask[index], path_mask], dim=1),
            position_ids=positions,
            past_key_values=cache_rows(cache, index),
            use_cache=True,
        ).logits
        self.usage.prefill_tokens += sum(map(len, paths))
        ends = torch.tensor([len(p) - 1 for p in paths], device=device)
        return logits[torch.arange(len(paths), device=device), ends].float().log_softmax(-1)


class OpenAIChat:
    """Any OpenAI-compatible endpoint: OpenAI itself, a vLLM server, or ``transformers serve``.

    The base URL and key come from OPENAI_BASE_URL / OPENAI_API_KEY unless given. Up to ``max_workers`` requests
    run concurrently (``make_llm`` reads CLEANCRS_OPENAI_CONCURRENCY); transient failures are retried with
    exponential backoff.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        max_workers: int = 8,
        max_retries: int = 4,
        timeout: float = 300.0,
    ):
        from openai import OpenAI

        self.model, self.max_workers, self.max_retries = model, max_workers, max_retries
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
        key = api_key or os.environ.get("OPENAI_API_KEY") or "not-needed-for-local-servers"
        self.client = OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=timeout)
        self.usage = Usage()

    def _request(self, **kwargs):
        import openai

        fatal = (openai.BadRequestError, openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)
        for attempt in range(self.max_retries + 1):
            try:
                response = self.client.chat.completions.create(model=self.model, **kwargs)
                usage = response.usage
                self.usage.add(1, usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)
                return response
            except fatal as err:
                raise LLMBackendError(
                    f"endpoint {self.base_url} (model {self.model}) refused the request: {err}"
                ) from None
            except openai.OpenAIError as err:
                if attempt == self.max_retries:
                    raise LLMBackendError(
                        f"endpoint {self.base_url} (model {self.model}) failed after {attempt + 1} tries: {err}"
                    ) from None
                time.sleep(min(2.0**attempt, 30.0))

    def _map(self, fn, jobs):
        with ThreadPoolExecutor(self.max_workers) as pool:
            return list(pool.map(fn, jobs))

    def chat(
        self, conversations, n=1, temperature=0.0, max_tokens=256, stop=None, prefix: str | list[str] = ""
    ) -> list[list[str]]:
        if any(per_conversation(prefix, len(conversations))):
            raise ValueError("the openai backend cannot prefill an assistant prefix; use free decoding")

        def one(conv):
            response = self._request(messages=conv, temperature=temperature, max_tokens=max_tokens, stop=stop or None)
            return truncate_at_stop(response.choices[0].message.content or "", stop).strip()

        flat = self._map(one, [conv for conv in conversations for _ in range(n)])
        return [flat[k * n : (k + 1) * n] for k in range(len(conversations))]

    def choice_probs(
        self, conversations, choices=("Yes", "No"), prefix: str | list[str] = "", shared_prefix: bool = False
    ) -> list[dict[str, float]]:
        """P(the answer begins with each choice written in full), read along the greedy answer
        (``read_along_answer``); a choice whose probability the server's top log-probs cannot give is refused."""
        if any(per_conversation(prefix, len(conversations))):
            raise ValueError("the openai backend cannot prefill an assistant prefix; put it in the instruction")
        longest = max(len(s) for c in choices for s in _choice_variants(c))  # a token holds at least one character
        return [self.read_choices(tokens, 0, choices) for tokens in self.answer_distributions(conversations, longest)]

    def answer_distributions(self, conversations, max_tokens: int) -> list[list[tuple[str, dict[str, float]]]]:
        """One greedy answer per conversation, token by token, each with the probabilities of the server's top 20
        tokens at its place (the written token among them): how a judge that cannot be pre-filled gives its score
        distribution (read where the score stands in its own answer)."""

        def one(conv):
            response = self._request(
                messages=conv, temperature=0.0, max_tokens=max_tokens, logprobs=True, top_logprobs=20
            )
            logprobs = response.choices[0].logprobs
            if logprobs is None or not logprobs.content:
                raise LLMBackendError(
                    f"endpoint {self.base_url} (model {self.model}) returned no logprobs; reading a score from the "
                    "answer distribution needs a server that supports them (OpenAI, vLLM), or --judge-scoring sampled"
                )
            tokens = []
            for t in logprobs.content:
                top = {alt.token: math.exp(alt.logprob) for alt in t.top_logprobs}
                if getattr(t, "logprob", None) is not None:
                    top.setdefault(t.token, math.exp(t.logprob))
                tokens.append((t.token, top))
            return tokens

        return self._map(one, conversations)

    def read_choices(self, tokens: list[tuple[str, dict[str, float]]], start: int, choices) -> dict[str, float]:
        """P(each choice written in full from character ``start`` of a greedy answer on), ``read_along_answer``'s
        reading. A choice that the answer did not write in more than one token may be unreadable: the server gives
        only the top log-probs of each place of its own answer, so after a first token it did not write (" -" of
        " -1" where it wrote " 1") the rest is unknown. Where such unread mass exceeds ``UNREAD_SHARE`` of the mass
        read, this is an error that names the choices; below it, it is left out (it counts as outside mass)."""
        probs, unread, unread_mass = read_along_answer(tokens, start, choices)
        if unread_mass > UNREAD_SHARE * sum(probs.values()):
            missing = ", ".join(f"{c!r} (begun with p = {p:.3g})" for c, p in unread.items() if p > 0)
            raise LLMBackendError(
                f"endpoint {self.base_url} (model {self.model}) gives log-probs only along its own answer, and cannot "
                f"give the probability of {missing}: written in more than one token, beginning with a token its "
                "answer did not write. Use --judge-scoring sampled (the paper's parse), or a local judge (hf:, vllm:)"
            )
        return probs


UNREAD_SHARE = 0.01  # an API judge's unreadable mass left out (as outside mass) up to 1% of the mass it read


def read_along_answer(tokens: list[tuple[str, dict[str, float]]], start: int, choices):
    """(P(each choice written in full from character ``start`` of the greedy answer ``tokens`` on), per choice the
    probability of the tokens that begin a spelling of it whose rest cannot be read, and the probability of those
    tokens counted once: " " begins " 1" and " 0"). ``tokens``: each written token with the server's top
    tokens at its place and their probabilities. Each spelling (with and without a leading space) is followed token
    by token: at each place its next piece is the longest top token that it begins with (the tokenizer's own
    split, as far as the top list shows it). The spelling is read where that piece completes it, or where the
    answer wrote that piece and the rest is read at the next place; a piece the answer did not write leaves the rest
    unknown (unread); no piece in the top list leaves it below the top list's reach (not counted, as before). If no
    token edge falls at ``start``, the edge after it is taken and the text between belongs to every spelling."""
    edges = [0]
    for token, _ in tokens:
        edges.append(edges[-1] + len(token))
    first = next((k for k, edge in enumerate(edges) if edge >= start), len(tokens))
    answer = "".join(token for token, _ in tokens)
    written = answer[start : edges[first]] if first < len(edges) else ""
    probs, unread, unread_pieces = {c: 0.0 for c in choices}, {c: 0.0 for c in choices}, {}
    for choice in choices:
        for spelling in _choice_variants(choice):
            if not spelling.startswith(written) or spelling == written:
                continue
            rest, p, place = spelling[len(written) :], 1.0, first
            while place < len(tokens):
                token, top = tokens[place]
                pieces = [t for t in top if t and rest.startswith(t)]
                if not pieces:
                    break
                piece = max(pieces, key=len)
                if piece == rest:
                    probs[choice] += p * top[piece]
                    break
                if piece != token:
                    unread[choice] += p * top[piece]
                    unread_pieces[place, spelling[: len(spelling) - len(rest)] + piece] = p * top[piece]
                    break
                rest, p, place = rest[len(piece) :], p * top[piece], place + 1
    return probs, unread, sum(unread_pieces.values())


def vllm_memory_fraction() -> float:
    """The share of its GPU's memory each in-process vLLM engine takes (vLLM's gpu_memory_utilization):
    ``CLEANCRS_VLLM_MEMORY``, default 0.9, vLLM's own, for one engine alone on its GPU. Engines of different models,
    and a model that trains beside them, share the GPU: lower it so that the shares fit together."""
    value = os.environ.get("CLEANCRS_VLLM_MEMORY", "0.9")
    try:
        fraction = float(value)
    except ValueError:
        fraction = 0.0
    if not 0 < fraction <= 1:
        raise ModelSpecError(f"CLEANCRS_VLLM_MEMORY={value!r}: use a share of GPU memory in (0, 1]")
    return fraction


def vllm_max_model_len(model_path: str) -> int:
    """The longest prompt plus completion an in-process vLLM engine holds: ``CLEANCRS_VLLM_MAX_MODEL_LEN``, default
    8192, at most the model's own context. Unbounded, vLLM reserves key/value memory for the model's whole context
    (128k tokens for Llama-3.1) and refuses to start where one such sequence does not fit in its share."""
    value = os.environ.get("CLEANCRS_VLLM_MAX_MODEL_LEN", "8192")
    if not value.isdigit() or int(value) < 1:
        raise ModelSpecError(f"CLEANCRS_VLLM_MAX_MODEL_LEN={value!r}: use a positive number of tokens")
    from transformers import AutoConfig

    context = getattr(AutoConfig.from_pretrained(model_path).get_text_config(), "max_position_embeddings", None)
    return min(int(value), context or int(value))


_LOADED_VLLM: dict[tuple, object] = {}


@contextlib.contextmanager
def global_rngs_kept():
    """Python's, numpy's and torch's (CPU and every GPU's) global generators as they were before the block: vLLM
    seeds them all with its engine's seed when it builds an engine in this process, which would make the run's own
    draws (data order, negatives, dropout, HF sampling) depend on whether and when an engine was built."""
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def vllm_engine(model_path: str, seed: int = 0, **engine_kwargs):
    """The process's vLLM engine on ``model_path``, built on first use and shared by every role that asks for the
    same model and ``engine_kwargs``: each engine reserves its share of the GPU, so a second engine on one model
    would only take memory away from the first.

    ``engine_kwargs`` override the defaults (``vllm_memory_fraction``, ``vllm_max_model_len``). Under ``accelerate
    launch`` (WORLD_SIZE > 1) every rank runs its own engine inside its process, as TRL's colocate mode does: vLLM's
    external launcher takes the rank's GPU from LOCAL_RANK and the process group accelerate started, where without it
    every rank's engine would land on GPU 0. The ranks build such an engine together (vLLM creates its groups on the
    whole process group), so every rank must ask for it at the same point of the run. The sampling seed is
    ``seed`` plus the rank, so ranks draw different samples, as their torch seeds differ; it is fixed when the engine
    is built, and a later role asking with another seed shares the first engine and its seed."""
    key = (model_path, tuple(sorted(engine_kwargs.items())))
    if key in _LOADED_VLLM:
        return _LOADED_VLLM[key]
    try:
        import vllm
    except ImportError:
        raise ImportError(
            "the vllm backend needs vLLM, which has no CPU build: on a CUDA machine run "
            "`pip install -r requirements-gpu.txt`, or use an hf: or openai: spec"
        ) from None
    settings = {"gpu_memory_utilization": vllm_memory_fraction(), "max_model_len": vllm_max_model_len(model_path)}
    settings["seed"] = seed + int(os.environ.get("RANK", "0"))
    if launched_processes() > 1:
        settings["distributed_executor_backend"] = "external_launcher"
    try:
        with global_rngs_kept():
            engine = vllm.LLM(model=model_path, enable_prefix_caching=True, **(settings | engine_kwargs))
    except Exception as err:
        err.add_note(
            "cleancrs: each in-process vLLM engine takes CLEANCRS_VLLM_MEMORY of its GPU (now "
            f"{settings['gpu_memory_utilization']}) and holds CLEANCRS_VLLM_MAX_MODEL_LEN tokens per sequence (now "
            f"{settings['max_model_len']}); one engine is built per model"
        )
        raise
    _LOADED_VLLM[key] = engine
    return engine


class VLLMChat:
    """In-process vLLM (CUDA only), on the process's engine for ``model_path`` (``vllm_engine``): roles on one model
    share the engine but count usage and load adapters apart. Optional: ``pip install -r requirements-gpu.txt``."""

    can_prefill = True

    def __init__(self, model_path: str, seed: int = 0, **engine_kwargs):
        self.engine = vllm_engine(model_path, seed, **engine_kwargs)
        import vllm

        self._vllm = vllm
        self.tokenizer = self.engine.get_tokenizer()
        self.usage = Usage()
        self.lora_request = None

    def use_adapter(self, path: str | None, version: int = 1) -> None:
        """Sample with the LoRA adapter saved in ``path`` from now on (the engine needs ``enable_lora=True``); a new
        ``version`` makes vLLM load the adapter again, as after every training update."""
        from vllm.lora.request import LoRARequest

        self.lora_request = None if path is None else LoRARequest(f"adapter-{version}", version, str(path))

    def _generate(self, prompts: list[list[int]], params):
        requests = [{"prompt_token_ids": ids} for ids in prompts]
        outputs = self.engine.generate(requests, params, lora_request=self.lora_request, use_tqdm=False)
        for out in outputs:
            self.usage.add(
                len(out.outputs),
                len(out.prompt_token_ids) * len(out.outputs),
                sum(len(o.token_ids) for o in out.outputs),
            )
        return outputs

    def chat(
        self, conversations, n=1, temperature=0.0, max_tokens=256, stop=None, prefix: str | list[str] = ""
    ) -> list[list[str]]:
        params = self._vllm.SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, stop=stop or None)
        outputs = self._generate(prompt_ids(self.tokenizer, conversations, prefix), params)
        return [[o.text.strip() for o in out.outputs] for out in outputs]

    def complete(
        self, conversations, n=1, temperature=1.0, max_tokens=256, prefix: str | list[str] = "", max_prompt_tokens=None
    ) -> list[list[Completion]]:
        """As ``HFChat.complete``: the engine reads exactly the prompt ids the update trains on; vLLM's output ids
        hold the end-of-sequence token where it was sampled."""
        prompts = prompt_ids(self.tokenizer, conversations, prefix, max_prompt_tokens)
        params = self._vllm.SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens)
        outputs = self._generate(prompts, params)
        return [[Completion(o.text, ids, list(o.token_ids)) for o in out.outputs] for ids, out in zip(prompts, outputs)]

    def choice_probs(
        self, conversations, choices=("Yes", "No"), prefix: str | list[str] = "", shared_prefix: bool = False
    ) -> list[dict[str, float]]:
        """As ``HFChat.choice_probs``: P(each choice written in full), from vLLM's prompt log-probs of the prompt
        followed by each spelling (one request per spelling; the engine's prefix cache shares the prompt where it
        can). Billed as one call per conversation, as the hf backend bills it."""
        prefixes = [p.rstrip(" ") for p in per_conversation(prefix, len(conversations))]
        texts = prefilled_prompts(self.tokenizer, conversations, prefixes)
        written = [written_choices(self.tokenizer, t, choices) for t in texts]
        requests = [(i, ids) for i, w in enumerate(written) for ids in w.sequences() if ids]
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        prompts = [{"prompt_token_ids": written[i].context + ids} for i, ids in requests]
        outputs = self.engine.generate(prompts, params, lora_request=self.lora_request, use_tqdm=False)
        read: dict[tuple[int, tuple[int, ...], int], float] = {}
        for (i, ids), out in zip(requests, outputs):
            start = len(written[i].context)
            for j, token in enumerate(ids):
                read[i, tuple(ids[:j]), token] = out.prompt_logprobs[start + j][token].logprob
        for w in written:
            self.usage.add(1, len(w.context) + len(w.tail), 0)
        return [w.probs(lambda path, token, i=i: read[i, path, token]) for i, w in enumerate(written)]


_LOADED_HF: dict[tuple[str, torch.dtype, str], tuple] = {}


def release_models() -> None:
    """Stop sharing the ``hf:`` weights and vLLM engines loaded so far: they are freed once no backend holds them,
    and a later ``make_llm`` loads them again. ``Run.stage`` calls it when a stage ends, so that a stage's roles do
    not hold memory through the stages after it."""
    _LOADED_HF.clear()
    _LOADED_VLLM.clear()
    clear_prefix_caches()


def openai_concurrency() -> int:
    """How many requests each process keeps in flight to an ``openai:`` endpoint: ``CLEANCRS_OPENAI_CONCURRENCY``,
    default 8 (gentle on a hosted API's rate limits; raise it for a vLLM server, which batches them). Under
    ``accelerate launch`` every rank keeps that many."""
    value = os.environ.get("CLEANCRS_OPENAI_CONCURRENCY", "8")
    if not value.isdigit() or int(value) < 1:
        raise ModelSpecError(f"CLEANCRS_OPENAI_CONCURRENCY={value!r}: use a positive number of requests")
    return int(value)


def make_llm(
    spec: str, batch_size: int = 16, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", seed: int = 0
):
    """Build a backend from ``hf:<model>``, ``openai:<model>`` or ``vllm:<model>``; an ``hf:`` model loads in
    ``dtype`` (default: ``default_dtype()``, bf16 on CUDA), a ``vllm:`` engine samples from ``seed`` (plus the rank).

    Roles that name the same ``hf:`` model share one copy of the weights, roles on the same ``vllm:`` model one
    engine (``vllm_engine``); each counts its usage apart.
    """
    backend, sep, model = spec.partition(":")
    if not sep or not model:
        raise ModelSpecError(f"LLM spec {spec!r} must look like hf:<model>, openai:<model> or vllm:<model>")
    if backend == "hf":
        key = (model, dtype or default_dtype(), str(device))
        if key not in _LOADED_HF:
            loaded, tokenizer = load_model(model, dtype=key[1])
            loaded.requires_grad_(False)  # a role's weights, shared by every role on the model, never train
            _LOADED_HF[key] = (loaded.to(device), tokenizer)
        return HFChat(*_LOADED_HF[key], batch_size=batch_size)
    if backend == "openai":
        return OpenAIChat(model, max_workers=openai_concurrency())
    if backend == "vllm":
        return VLLMChat(resolve_model_path(model), seed)
    raise ModelSpecError(f"unknown LLM backend {backend!r} in {spec!r}: use hf, openai or vllm")
