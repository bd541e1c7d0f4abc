"""common/checkpoints.py on one process: a checkpoint saved and resumed gives back the trained weights, AdamW's
moments and the schedule; pruning keeps the newest. Under real ranks (ZeRO-3 partitions): tests/test_distributed.py."""

import copy
import json

import torch

from common.checkpoints import latest_checkpoint, prune_checkpoints, resume, save_checkpoint
from common.models import add_lora


def lora_training(tiny_model, seed: int):
    """A LoRA on ``tiny_model`` with its AdamW and a linear schedule, every adapter weight drawn at random from
    ``seed`` (an untrained LoRA's B is all zeros: a round trip that lost it would still compare equal)."""
    model = add_lora(copy.deepcopy(tiny_model), rank=2, alpha=4)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=20)
    return model, optimizer, scheduler


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_saved_checkpoint_resumes_the_trained_adapter_adams_moments_and_the_schedule(tmp_path, tiny_model):
    model, optimizer, scheduler = lora_training(tiny_model, seed=1)
    ids = torch.tensor([[1, 2, 3, 4]])
    for _ in range(3):  # three steps: AdamW's moments and the schedule are no longer their starting values
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 5, model, optimizer, scheduler, state={"epoch": 0})
    path = save_checkpoint(tmp_path, 10, model, optimizer, scheduler, state={"epoch": 1})
    assert latest_checkpoint(tmp_path) == path and path.name == "step_00000010"
    assert json.loads((path / "state.json").read_text()) == {"step": 10, "epoch": 1}

    fresh, fresh_optimizer, fresh_scheduler = lora_training(tiny_model, seed=2)
    saved, before = trainable(model), trainable(fresh)
    assert resume(fresh, fresh_optimizer, fresh_scheduler, tmp_path) == 10
    restored = trainable(fresh)
    assert restored.keys() == saved.keys() and any("lora_B" in n for n in saved)
    for name, weight in saved.items():
        assert not torch.equal(before[name], weight)  # the fresh adapter differs: equality below is the resume's
        assert torch.equal(restored[name], weight), name
    moments, resumed = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert moments.keys() == resumed.keys() and len(moments) == len(saved)
    for index, state in moments.items():
        assert torch.equal(resumed[index]["exp_avg"], state["exp_avg"])
        assert torch.equal(resumed[index]["exp_avg_sq"], state["exp_avg_sq"])
        assert int(resumed[index]["step"]) == 3
    assert fresh_scheduler.last_epoch == scheduler.last_epoch == 3
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_pruning_keeps_the_newest_checkpoints_and_drops_unfinished_ones(tmp_path):
    for step in (3, 10, 2, 7):
        (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000012.tmp").mkdir()  # a save killed mid-way
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000007", "step_00000010"]
    prune_checkpoints(tmp_path, keep=2)  # no more than keep: none goes
    assert latest_checkpoint(tmp_path).name == "step_00000010"


def test_a_resume_without_deepspeed_says_it_cannot_load_zero3_partitions(tmp_path, tiny_model, capsys):
    import copy

    from transformers import get_linear_schedule_with_warmup

    from common.checkpoints import resume_and_prepare, save_checkpoint
    from common.distributed import make_accelerator
    from common.models import add_lora

    model = add_lora(copy.deepcopy(tiny_model), rank=2, alpha=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, 10)
    folder = save_checkpoint(tmp_path, 4, model, state={"ranks": 2})  # what 2 ZeRO-3 ranks save, but the partitions
    for rank in (0, 1):
        torch.save({}, folder / f"training_state_rank{rank}.pt")
    _, _, start = resume_and_prepare(make_accelerator(), model, optimizer, scheduler, tmp_path)
    assert start == 4 and scheduler.last_epoch == 4
    assert (
        f"resuming {tmp_path.name} at step 4 without the optimizer state: the checkpoint holds its ZeRO-3 partitions "
        "for 2 ranks, and this launch runs 1 rank without ZeRO-3; AdamW's moments start again from zero"
    ) in capsys.readouterr().out
