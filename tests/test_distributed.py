"""common/distributed.py under real ranks: generation from ZeRO-3-sharded weights with unequal work per rank, the
process group's timeout, ZeRO-3 checkpoints of a LoRA (the adapter alone, the last two kept, Adam's moments resumed:
common/checkpoints.py under ranks) and the clipping flags under DeepSpeed; on one process, the global batches, each
rank's micro-batches and the accumulation each stage starts afresh. Run.finish leaves the process group."""

import json
import os
import re
import shutil
import subprocess
from datetime import timedelta

import psutil
import pytest
import torch

from common.distributed import collective_timeout, global_batches, rank_micro_batches
from common.formats import InputError
from tests.conftest import ROOT, accelerate_launch

PRINT_TIMEOUT = f"""
import sys
from dataclasses import dataclass
import torch
sys.path.insert(0, {str(ROOT)!r})
from common.run import Run
@dataclass
class Args:
    run_name: str = "ranks"
    exp_name: str = "ranks"
    seed: int = 1
    track: bool = False
    wandb_project: str = "cleancrs"
    wandb_entity: str | None = None
run = Run(Args())
group = torch.distributed.distributed_c10d._get_default_group()
timeout = group._get_backend(torch.device("cpu")).options._timeout
print(f"rank {{run.rank}} of {{run.world}} waits {{timeout}}")
run.finish()
print(f"rank {{run.rank}} left the group: {{not torch.distributed.is_initialized()}}")
"""


@pytest.mark.parametrize("config", ["cpu_2proc", "cpu_zero3"])
def test_both_configs_start_two_ranks_that_wait_the_collective_timeout(tmp_path, config):
    # Two gloo ranks (cpu_2proc.yaml once started a single process: every "2 ranks match 1" test then compared one
    # rank with one) and two DeepSpeed ranks, whose process group DeepSpeed builds itself: both must be 2 ranks,
    # and the timeout must reach both.
    script = tmp_path / "print_timeout.py"
    script.write_text(PRINT_TIMEOUT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLEANCRS_COLLECTIVE_TIMEOUT_MINUTES": "7"}
    env.pop("ACCELERATE_USE_CPU", None)  # it would turn DeepSpeed off
    command = list(accelerate_launch(config))
    result = subprocess.run([*command, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    waits = sorted(re.findall(r"rank \d of 2 waits [\d:]+", result.stdout))  # the ranks' lines may interleave
    assert waits == [f"rank {k} of 2 waits 0:07:00" for k in (0, 1)], result.stdout
    # Run.finish ends the group: a rank that exits inside it can abort when gloo's threads outlive the interpreter
    assert sorted(re.findall(r"rank \d left the group: (?:True|False)", result.stdout)) == [
        f"rank {k} left the group: True" for k in (0, 1)
    ], result.stdout


def test_the_collective_timeout_is_two_hours_unless_set(monkeypatch):
    monkeypatch.delenv("CLEANCRS_COLLECTIVE_TIMEOUT_MINUTES", raising=False)
    assert collective_timeout() == timedelta(hours=2)
    monkeypatch.setenv("CLEANCRS_COLLECTIVE_TIMEOUT_MINUTES", "0.5")
    assert collective_timeout() == timedelta(seconds=30)
    for bad in ("0", "-3", "ten", "inf"):  # inf would overflow timedelta
        monkeypatch.setenv("CLEANCRS_COLLECTIVE_TIMEOUT_MINUTES", bad)
        with pytest.raises(InputError, match=f"TIMEOUT_MINUTES='{bad}': use a positive, finite number"):
            collective_timeout()


@pytest.mark.parametrize("idle", [False, True], ids=["unequal-work", "one-rank-idle"])
def test_zero3_generation_with_unequal_work_per_rank_does_not_hang(idle):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)  # it would turn DeepSpeed off and run plain data parallelism
    command = [*accelerate_launch("cpu_zero3"), str(ROOT / "tests" / "zero3_generation.py")]
    process = subprocess.Popen(
        command + (["--idle-rank"] if idle else []),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(process.pid).children(recursive=True) + [psutil.Process(process.pid)]:
            child.kill()  # the ranks start sessions of their own: kill the whole tree
        process.communicate()
        pytest.fail("the ranks hung in ZeRO-3 generation (killed after 300 s)")
    assert process.returncode == 0, stderr[-3000:]
    assert stdout.count("zero3 generation ok") == 2, stdout[-2000:]


def launch_zero3_checkpoint(stage_dir, steps: int, weights) -> str:
    """tests/zero3_checkpoint.py on 2 ZeRO-3 ranks: train a LoRA up to step ``steps`` from the newest checkpoint of
    ``stage_dir``, checking each save; returns its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)  # it would turn DeepSpeed off
    script = [str(ROOT / "tests" / "zero3_checkpoint.py"), "--stage-dir", str(stage_dir), "--weights", str(weights)]
    command = [*accelerate_launch("cpu_zero3"), *script, "--steps", str(steps)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count("zero3 checkpoint ok") == 2, result.stdout[-2000:]
    return result.stdout


def test_zero3_lora_checkpoints_hold_the_adapter_alone_keep_the_last_two_and_resume_adams_moments(tmp_path):
    # The launched script checks every save: the checkpoint holds exactly the adapter, equal to the gathered
    # weights, and the save gathered no frozen weight (nor asked accelerate for the whole state dict).
    stage = tmp_path / "stage"
    launch_zero3_checkpoint(stage, 3, tmp_path / "uninterrupted.pt")
    checkpoints = stage / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000003"]
    assert sorted(p.name for p in (checkpoints / "step_00000002").glob("training_state*")) == [
        "training_state.pt",
        "training_state_rank0.pt",
        "training_state_rank1.pt",
    ]
    uninterrupted = torch.load(tmp_path / "uninterrupted.pt")

    shutil.rmtree(checkpoints / "step_00000003")  # as if killed after step 2's save
    kept = tmp_path / "step_00000002"
    shutil.copytree(checkpoints / "step_00000002", kept)
    resumed = launch_zero3_checkpoint(stage, 3, tmp_path / "resumed.pt")
    assert "resuming stage at step 2" in resumed and "without the optimizer state" not in resumed
    weights = torch.load(tmp_path / "resumed.pt")
    assert all(torch.equal(weights[name], uninterrupted[name]) for name in uninterrupted)  # Adam's moments too

    # The same checkpoint as if saved by 4 ranks: ZeRO's partitions do not fit 2, and the run says so.
    shutil.rmtree(checkpoints)
    shutil.copytree(kept, checkpoints / "step_00000002")
    state = json.loads((checkpoints / "step_00000002" / "state.json").read_text())
    (checkpoints / "step_00000002" / "state.json").write_text(json.dumps(state | {"ranks": 4}))
    restarted = launch_zero3_checkpoint(stage, 3, tmp_path / "restarted.pt")
    message = (
        "resuming stage at step 2 without the optimizer state: the checkpoint holds its ZeRO-3 partitions for 4 "
        "ranks, and this launch runs 2 ranks under ZeRO-3; AdamW's moments start again from zero"
    )
    assert message in restarted
    weights = torch.load(tmp_path / "restarted.pt")
    assert not all(torch.equal(weights[name], uninterrupted[name]) for name in uninterrupted)  # the moments matter


def test_every_clipping_flag_reaches_deepspeed_on_two_zero3_ranks(tmp_path):
    # accelerate fills DeepSpeed's gradient_clipping with 1.0 at prepare whatever the flag: every step here was
    # clipped at 1.0 before backward_and_step set the engine's clip. SGD at learning rate 1 moves the weights by exactly
    # the gradient DeepSpeed applied, of norm 5 before clipping.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)  # it would turn DeepSpeed off
    script = [str(ROOT / "tests" / "zero3_clipping.py"), "--stage-dir", str(tmp_path / "stage")]
    command = [*accelerate_launch("cpu_zero3"), *script, "--flags", "0.5", "inf", "2.0"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    steps = re.findall(r"rank (\d) clip (\S+): grad norm ([\d.]+), step norm ([\d.]+)", result.stdout)
    assert len(steps) == 6, result.stdout
    for _, flag, grad_norm, moved in steps:
        assert float(grad_norm) == pytest.approx(5.0, abs=1e-4)  # the norm before clipping, as logged
        assert float(moved) == pytest.approx(min(5.0, float(flag)), abs=1e-4)  # the applied clip is the flag's


@pytest.mark.parametrize("path", ["ecpo.py", "smtpo.py", "rso.py", "common/sft.py"])
def test_every_training_step_passes_its_scripts_clipping_flag(path):
    # backward_and_step is the one place a script's clipping flag reaches DDP and DeepSpeed alike (test above)
    calls = re.findall(r"backward_and_step\(accelerator, model, optimizer, loss, ([\w.]+)\)", (ROOT / path).read_text())
    assert calls and all(re.fullmatch(r"args\.\w*max_grad_norm", flag) for flag in calls), calls


def test_rank_micro_batches_cover_the_batch_once_with_equal_shapes():
    batch = [7, 3, 9, 1, 4]
    world, micro, accum = 2, 2, 2
    shares = [rank_micro_batches(batch, r, world, micro, accum) for r in range(world)]
    real = sorted(i for share in shares for chunk in share for i, w in chunk if w == 1.0)
    assert real == sorted(batch)
    assert all(len(share) == accum and all(len(chunk) == micro for chunk in share) for share in shares)
    batches = global_batches(10, 4, epochs=2, seed=3)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(batches[:3], [])) == list(range(10)) and batches == global_batches(10, 4, 2, 3)


def test_each_training_stage_starts_its_gradient_accumulation_afresh(tmp_path):
    # accelerate counts micro-batches on the Accelerator: SGPT's count must not shift where ECPO's steps fall
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    from common.checkpoints import resume_and_prepare
    from common.distributed import configure_batches

    accelerator = Accelerator(cpu=True)
    pattern = {}
    for stage, accum, micro_batches in (("sft", 6, 17), ("po", 4, 8)):
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.AdamW(model.parameters())
        configure_batches(accelerator, accum, accum, 1)  # a global batch of accum micro-batches of 1
        model, optimizer, _ = resume_and_prepare(
            accelerator, model, optimizer, get_cosine_schedule_with_warmup(optimizer, 0, 10), tmp_path / stage
        )
        pattern[stage] = []
        for _ in range(micro_batches):
            with accelerator.accumulate(model):
                pattern[stage].append(accelerator.sync_gradients)
    assert pattern["po"] == [False, False, False, True] * 2  # every 4th micro-batch steps, from the first batch on
