import torch

from common.tokens import collate, encode_prompt_completion, render_prompt, sequence_logprobs

MESSAGES = [{"role": "user", "content": "Recommend a movie about dreams."}]


def test_completion_mask_covers_exactly_the_completion(tokenizer):
    ids, mask = encode_prompt_completion(tokenizer, MESSAGES, "Search[dream heist]")
    prompt_ids = tokenizer(render_prompt(tokenizer, MESSAGES), add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert mask == [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
    assert ids[-1] == tokenizer.eos_token_id  # the end-of-turn token is trained
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True) == "Search[dream heist]"


def test_sequence_logprobs_match_hand_computation(tiny_model, tokenizer):
    ids, mask = encode_prompt_completion(tokenizer, MESSAGES, "Ask[which era?]")
    batch = collate([(ids, mask)], tokenizer.pad_token_id)
    total, count, per_token = sequence_logprobs(tiny_model, **batch)
    with torch.no_grad():
        logits = tiny_model(torch.tensor([ids])).logits[0].double()
    expected = sum(torch.log_softmax(logits[j - 1], -1)[ids[j]].item() for j in range(len(ids)) if mask[j])
    assert count.item() == sum(mask)
    assert abs(total.item() - expected) < 1e-4
    assert torch.all(per_token[0][torch.tensor(mask[1:]) == 0] == 0)


def test_padding_does_not_change_logprobs(tiny_model, tokenizer):
    short = encode_prompt_completion(tokenizer, MESSAGES, "Ask[which era?]")
    long = encode_prompt_completion(tokenizer, MESSAGES, "Recommend[Inception (2010), a heist inside dreams]")
    alone, _, _ = sequence_logprobs(tiny_model, **collate([short], tokenizer.pad_token_id))
    batched, counts, _ = sequence_logprobs(tiny_model, **collate([short, long], tokenizer.pad_token_id))
    assert abs(alone.item() - batched[0].item()) < 1e-4
    assert counts.tolist() == [sum(short[1]), sum(long[1])]


def test_only_completion_tokens_carry_gradient(tiny_model, tokenizer):
    batch = collate([encode_prompt_completion(tokenizer, MESSAGES, "Ask[which era?]")], tokenizer.pad_token_id)
    tiny_model.zero_grad(set_to_none=True)
    no_completion = dict(batch, completion_mask=torch.zeros_like(batch["completion_mask"]))
    sequence_logprobs(tiny_model, **no_completion)[0].sum().backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in tiny_model.parameters())
    tiny_model.zero_grad(set_to_none=True)
    sequence_logprobs(tiny_model, **batch)[0].sum().backward()
    assert tiny_model.get_output_embeddings().weight.grad.abs().max() > 0
    tiny_model.zero_grad(set_to_none=True)


def test_max_length_keeps_the_last_tokens(tokenizer):
    ids, mask = encode_prompt_completion(tokenizer, MESSAGES, "Ask[which era?]")
    cut_ids, cut_mask = encode_prompt_completion(tokenizer, MESSAGES, "Ask[which era?]", max_length=10)
    assert cut_ids == ids[-10:] and cut_mask == mask[-10:] and sum(cut_mask) == sum(mask)


def test_a_long_example_loses_its_oldest_utterances_not_its_instruction(tokenizer):
    from common.conversations import render_history

    history = [{"role": "user" if k % 2 == 0 else "assistant", "content": f"utterance {k} " * 12} for k in range(9)]
    prompt = f"Rank the films for this user.\n\nConversation:\n{render_history(history)}\n\nAnswer with a list."
    messages = [{"role": "user", "content": prompt}]
    full, _ = encode_prompt_completion(tokenizer, messages, "Search[dream heist]")
    ids, mask = encode_prompt_completion(tokenizer, messages, "Search[dream heist]", max_length=len(full) - 60)
    text = tokenizer.decode(ids)
    assert len(ids) <= len(full) - 60 and text.startswith("<|im_start|>system")
    assert "Rank the films for this user." in text and "Answer with a list." in text  # the instruction stays
    assert "User: " + "utterance 8 " * 11 in text  # the latest user utterance stays
    assert "utterance 0" not in text and "earlier messages left out)\nUser: utterance" in text  # the oldest went
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True) == "Search[dream heist]"


def test_fit_prompt_leaves_out_the_fewest_parts_that_fit():
    from common.tokens import fit_prompt

    parts = ["old " * 5, "older " * 3, "recent " * 4, "latest " * 2]  # 5, 3, 4 and 2 words

    def build(k):
        return "instruction " + "".join(parts[k:])

    for budget, dropped in ((15, 0), (14, 1), (10, 1), (9, 2), (7, 2), (6, 3), (3, 3)):
        fitted = fit_prompt(lambda t: len(t.split()), build, 3, budget)
        assert fitted.dropped_parts == dropped and fitted.text == build(dropped), budget
        assert fitted.tokens == len(build(dropped).split()) and fitted.dropped_tokens == 15 - fitted.tokens
    assert fit_prompt(lambda t: len(t.split()), build, 3, 2).tokens == 3  # still over: the caller can tell
