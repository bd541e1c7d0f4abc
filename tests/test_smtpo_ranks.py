"""smtpo.py on 1 rank and on 2 CPU ranks (accelerate, gloo): the retriever stage, its text encoding and its heads
shared over the ranks, trains what 1 rank trains; GRPO's update (DDP and ZeRO-3), on the same recorded rollouts,
gives the same loss and adapter, so the groups' split over ranks, the padding weights and the averaging are right."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, accelerate_launch


def test_two_ranks_match_one_rank_on_the_same_rollouts(tmp_path, tiny_policy):
    from safetensors.torch import load_file

    models = ["--policy", str(tiny_policy), "--user-model", str(tiny_policy), "--teacher-llm", f"hf:{tiny_policy}"]
    flags = models + "--num-train 4 --max-turns 2 --group-size 2 --rec-max-tokens 24 --step-max-tokens 4".split()
    flags += "--feedback-max-tokens 8 --simulator-epochs 1 --sft-epochs 1 --bpr-epochs 3 --retriever-epochs 2".split()
    flags += "--groups-per-step 4 --grpo-steps 1 --grpo-lr 1e-2 --micro-batch-size 1".split()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # no ACCELERATE_USE_CPU: under cpu_zero3 it would turn DeepSpeed off

    def smtpo(*extra, launcher=(sys.executable,)):
        result = subprocess.run([*launcher, str(ROOT / "smtpo.py"), *flags, *extra], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=900)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]

    smtpo("--stages", "simulator", "retriever", "sft", "--run-name", "base")
    # The retriever stage on 2 ranks: the ranks share the text encoding and the three heads (the fused one and the
    # text view on rank 0 and 1, the graph view on rank 0 again) and must train what 1 rank trains.
    shutil.copytree(tmp_path / "runs" / "base", tmp_path / "runs" / "retriever_two")
    shutil.rmtree(tmp_path / "runs" / "retriever_two" / "retriever")
    smtpo("--stages", "retriever", "--run-name", "retriever_two", launcher=accelerate_launch("cpu_2proc"))
    alone, shared = (
        json.loads((tmp_path / "runs" / n / "retriever/metrics.json").read_text()) for n in ("base", "retriever_two")
    )
    recalls = [k for k in alone if "recall@" in k or k.endswith("_weight")]
    assert len(recalls) > 20 and all(shared[k] == pytest.approx(alone[k], abs=1e-6) for k in recalls), (alone, shared)
    import torch

    heads = [torch.load(tmp_path / "runs" / n / "retriever/retriever.pt")["heads"] for n in ("base", "retriever_two")]
    for views in ("both", "text", "graph"):
        assert all(torch.allclose(heads[0][views][k], heads[1][views][k], atol=1e-5) for k in heads[0][views])
    shutil.copytree(tmp_path / "runs" / "base", tmp_path / "runs" / "sampler")
    smtpo("--stages", "grpo", "--run-name", "sampler")  # records the rollouts of step 1
    # A random model earns the same reward with every output, so every advantage would be 0 and no step would
    # move: give the recorded outputs distinct rewards, then take the step from those episodes on 1 and 2 ranks.
    episodes = [json.loads(line) for line in (tmp_path / "runs/sampler/grpo_episodes.jsonl").read_text().splitlines()]
    for episode in episodes:
        for turn in episode["turns"]:
            for k, rewards in enumerate(turn["rewards"]):
                rewards["total"] = float(k)
    for name in ("one", "two", "zero3"):
        shutil.copytree(tmp_path / "runs" / "base", tmp_path / "runs" / name)
        (tmp_path / "runs" / name / "grpo_episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in episodes))
    smtpo("--stages", "grpo", "--run-name", "one")
    for name, config in (("two", "cpu_2proc"), ("zero3", "cpu_zero3")):
        smtpo("--stages", "grpo", "--run-name", name, launcher=accelerate_launch(config))

    def step(name):
        rows = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        (row,) = [r for r in rows if "rollout/reward_total" in r]
        return row

    one, two, zero3 = step("one"), step("two"), step("zero3")
    assert one["train/groups"] == two["train/groups"] == zero3["train/groups"] == 4
    assert two["train/loss"] == pytest.approx(one["train/loss"], abs=1e-6)
    assert zero3["train/loss"] == pytest.approx(one["train/loss"], abs=1e-5)
    assert two["rollout/reward_total"] == zero3["rollout/reward_total"] == one["rollout/reward_total"]
    names = ("one", "two", "zero3")
    adapters = [load_file(tmp_path / "runs" / n / "grpo_adapter" / "adapter_model.safetensors") for n in names]
    assert max((adapters[0][k] - adapters[1][k]).abs().max().item() for k in adapters[0]) < 1e-5
    assert max((adapters[0][k] - adapters[2][k]).abs().max().item() for k in adapters[0]) < 1e-4
    assert any(adapters[0][k].abs().max() > 0 for k in adapters[0] if "lora_B" in k)  # the step moved the policy
