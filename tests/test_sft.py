"""common/sft.py: the masked NLL every method's SFT stage minimises, by hand, and the loop that lowers it."""

import json

import pytest
import torch

from common.sft import completion_nll, supervised_finetuning
from common.tokens import collate, encode_prompt_completion, sequence_logprobs


def test_completion_nll_hand_value_and_gradient():
    token_logps = torch.tensor([[0.0, -1.0, -2.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    weights = torch.tensor([1.0, 0.0])  # the second row is padding
    loss = (completion_nll(token_logps) * weights).sum() / 2  # two completion tokens in the real row
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    assert token_logps.grad.tolist() == [[-0.5, -0.5, -0.5], [0.0, 0.0, 0.0]]  # raising a log-prob lowers the loss


def test_completion_nll_is_the_token_mean_over_the_batch(tokenizer, tiny_model):
    rows = [
        encode_prompt_completion(tokenizer, [{"role": "user", "content": "Find me a film."}], "Ask[Which genre?]"),
        encode_prompt_completion(tokenizer, [{"role": "user", "content": "Hello"}], "Search[space opera]"),
    ]
    _, n_tokens, token_logps = sequence_logprobs(tiny_model, **collate(rows, tokenizer.pad_token_id))
    loss = completion_nll(token_logps).sum() / n_tokens.sum()
    by_hand = []  # log softmax at each completion position, one sequence at a time
    for ids, mask in rows:
        logits = tiny_model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        by_hand += [logits[j - 1, ids[j]].item() for j in range(1, len(ids)) if mask[j]]
    assert n_tokens.sum().item() == len(by_hand) == sum(sum(m) for _, m in rows)
    assert loss.item() == pytest.approx(-sum(by_hand) / len(by_hand), rel=1e-5)


def test_supervised_finetuning_lowers_the_loss(tmp_path, monkeypatch, tokenizer, tiny_model, settings):
    import copy

    from common.run import Run

    monkeypatch.chdir(tmp_path)
    args = settings(exp_name="sft", run_name="sft", micro_batch_size=2, max_grad_norm=1.0, save_every=50)
    run = Run(args)
    prompts = [("A scary film?", "Recommend[Alien (1979)]"), ("Something funny?", "Ask[Slapstick or witty?]")]
    encoded = [encode_prompt_completion(tokenizer, [{"role": "user", "content": p}], c) for p, c in prompts]
    examples = [{"input_ids": ids, "completion_mask": mask} for ids, mask in encoded]
    model = copy.deepcopy(tiny_model)  # every weight trains: the tiny model's LoRA could not fit the words
    supervised_finetuning(run, args, model, tokenizer, examples, "sft", lr=1e-2, batch_size=2, epochs=8, warmup_ratio=0)
    losses = [json.loads(line)["train/loss"] for line in (tmp_path / "runs/sft/metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0] - 1.0  # the same two examples, fit: over a nat lower
    assert (tmp_path / "runs/sft/sft/checkpoints").exists()


def test_a_rerun_does_not_log_again_the_steps_a_killed_launch_logged(
    tmp_path, monkeypatch, capsys, tokenizer, tiny_model, settings
):
    """A launch killed after logging steps 1-2 but before its first checkpoint: the rerun redoes them from step 0 and
    logs steps 3-4 only, so the curve has each step once (it had steps 1-6, the first two twice)."""
    import copy

    from common.run import Run

    monkeypatch.chdir(tmp_path)
    args = settings(exp_name="sft", run_name="sft", micro_batch_size=2, max_grad_norm=1.0, save_every=50)
    encoded = [encode_prompt_completion(tokenizer, [{"role": "user", "content": "A film?"}], "Recommend[Alien]")] * 2
    examples = [{"input_ids": ids, "completion_mask": mask} for ids, mask in encoded]
    killed = Run(args)
    for loss in (3.0, 2.0):  # what the killed launch logged of steps 1 and 2
        killed.log_step({"train_sft/loss": loss, "train_sft/lr": 0.01}, 1.0)
    supervised_finetuning(Run(args), args, copy.deepcopy(tiny_model), tokenizer, examples, "sft", lr=1e-2,
                          batch_size=2, epochs=4, warmup_ratio=0, metric_prefix="train_sft")  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "runs/sft/metrics.jsonl").read_text().splitlines()]
    assert [r["train_sft/step"] for r in rows if "train_sft/loss" in r] == [1, 2, 3, 4]
    assert [r["train_sft/loss"] for r in rows[:2]] == [3.0, 2.0]
    assert "sft steps 1-2, logged before the run was stopped" in capsys.readouterr().out
