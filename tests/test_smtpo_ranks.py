"""smtpo.py's GRPO update on 1 rank and on 2 CPU ranks (accelerate, gloo), on the same recorded rollouts: the loss
and the adapter agree, so the groups' split over ranks, the padding weights and the averaging are right."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory, tiny_model, tokenizer):
    folder = tmp_path_factory.mktemp("tiny_policy")
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_two_ranks_match_one_rank_on_the_same_rollouts(tmp_path, tiny_policy):
    from safetensors.torch import load_file

    models = ["--policy", str(tiny_policy), "--simulator-model", str(tiny_policy), "--teacher-llm", f"hf:{tiny_policy}"]
    flags = models + "--num-train 4 --max-turns 2 --group-size 2 --rec-max-tokens 24 --step-max-tokens 4".split()
    flags += "--feedback-max-tokens 8 --simulator-epochs 1 --sft-epochs 1 --bpr-epochs 3 --retriever-epochs 2".split()
    flags += "--dialogues-per-step 2 --grpo-steps 1 --grpo-lr 1e-2 --micro-batch-size 1".split()
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}

    def smtpo(*extra, launcher=(sys.executable,)):
        result = subprocess.run([*launcher, str(ROOT / "smtpo.py"), *flags, *extra], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=900)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]

    smtpo("--stages", "simulator", "retriever", "sft", "--run-name", "base")
    for name in ("one", "two"):
        shutil.copytree(tmp_path / "runs" / "base", tmp_path / "runs" / name)
    smtpo("--stages", "grpo", "--run-name", "one")  # samples the rollouts and takes the step on 1 rank
    shutil.copy(tmp_path / "runs/one/grpo_rollouts.jsonl", tmp_path / "runs/two/grpo_rollouts.jsonl")
    launcher = (
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs/cpu_2proc.yaml"),
    )
    smtpo("--stages", "grpo", "--run-name", "two", launcher=launcher)  # the same rollouts, the step on 2 ranks

    def step(name):
        rows = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        (row,) = [r for r in rows if "rollout/reward_total" in r]
        return row

    one, two = step("one"), step("two")
    assert one["train/groups"] == two["train/groups"] == 4  # 2 dialogues x 2 turns
    assert two["train/loss"] == pytest.approx(one["train/loss"], abs=1e-6)
    assert two["rollout/reward_total"] == one["rollout/reward_total"]
    adapters = [load_file(tmp_path / "runs" / n / "grpo_adapter" / "adapter_model.safetensors") for n in ("one", "two")]
    assert max((adapters[0][k] - adapters[1][k]).abs().max().item() for k in adapters[0]) < 1e-5
    assert any(adapters[0][k].abs().max() > 0 for k in adapters[0] if "lora_B" in k)  # the step moved the policy
