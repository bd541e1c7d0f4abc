"""rso.py's policy-gradient update on 1 rank and on 2 CPU ranks (accelerate, gloo; DDP and ZeRO-3), from the same
recorded episodes: the loss, the gradient norm, the baseline and the planner agree, so the episodes' split over
ranks, the padding weights and the averaging over the update's episodes are right."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, accelerate_launch


@pytest.fixture(scope="module")
def tiny_planner(tmp_path_factory):
    """A 2-layer BERT with MiniLM's tokenizer, saved as an encoder folder for --planner."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from common.catalog import encoder_path

    tokenizer = AutoTokenizer.from_pretrained(encoder_path("minilm"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny_planner")
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_two_ranks_match_one_rank_on_the_same_episodes(tmp_path, tiny_policy, tiny_planner):
    from safetensors.torch import load_file

    flags = ["--planner", str(tiny_planner), "--planner-max-length", "128"]
    for role in ("experts", "user", "rewarder"):
        flags += [f"--{role}-llm", f"hf:{tiny_policy}"]
    flags += "--sft-epochs 1 --rl-episodes 4 --num-envs 4 --max-turns 2".split()
    flags += "--reward-samples 2 --reasoner-max-tokens 4 --actor-max-tokens 6 --user-max-tokens 8".split()
    flags += "--judge-max-tokens 2 --rl-lr 1e-2".split()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # no ACCELERATE_USE_CPU: under cpu_zero3 it would turn DeepSpeed off
    env.pop("ACCELERATE_USE_CPU", None)

    def rso(*extra, launcher=(sys.executable,)):
        result = subprocess.run([*launcher, str(ROOT / "rso.py"), *flags, *extra], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=900)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]

    rso("--stages", "sft", "--run-name", "base")
    shutil.copytree(tmp_path / "runs" / "base", tmp_path / "runs" / "sampler")
    rso("--stages", "rl", "--run-name", "sampler")  # records the 4 episodes of the one update
    # A random judge rarely writes a digit, so most rewards would be 0: give the turns distinct rewards (hence
    # distinct returns), then take the update from those episodes on 1 and 2 ranks.
    episodes = [json.loads(line) for line in (tmp_path / "runs/sampler/rl_episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 4
    for k, episode in enumerate(episodes):
        for t, turn in enumerate(episode["turns"]):
            turn["reward"] = 0.25 * ((k + t) % 4)
    for name in ("one", "two", "zero3"):
        shutil.copytree(tmp_path / "runs" / "base", tmp_path / "runs" / name)
        (tmp_path / "runs" / name / "rl_episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes))
    rso("--stages", "rl", "--run-name", "one")
    for name, config in (("two", "cpu_2proc"), ("zero3", "cpu_zero3")):
        rso("--stages", "rl", "--run-name", name, launcher=accelerate_launch(config))

    def update(name):
        rows = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        (row,) = [r for r in rows if "train/entropy" in r]
        return row

    one, two, zero3 = update("one"), update("two"), update("zero3")
    assert one["rollout/return"] == two["rollout/return"] == zero3["rollout/return"] > 0
    assert two["train/loss"] == pytest.approx(one["train/loss"], abs=1e-6)
    assert zero3["train/loss"] == pytest.approx(one["train/loss"], abs=1e-5)
    assert two["train/entropy"] == pytest.approx(one["train/entropy"], abs=1e-6)
    assert two["train/grad_norm"] == pytest.approx(one["train/grad_norm"], rel=1e-5) and one["train/grad_norm"] > 0
    assert zero3["train/grad_norm"] == pytest.approx(one["train/grad_norm"], rel=1e-4)  # DeepSpeed's own norm
    assert one["train/baseline"] == two["train/baseline"] == zero3["train/baseline"]
    names = ("base", "one", "two", "zero3")
    weights = [load_file(tmp_path / "runs" / n / ("sft_planner" if n == "base" else "rl_planner") / "model.safetensors")
               for n in names]  # fmt: skip
    sft, one_rank, ddp, zero3_rank = weights
    assert max((one_rank[k] - ddp[k]).abs().max().item() for k in one_rank) < 1e-5
    assert max((one_rank[k] - zero3_rank[k]).abs().max().item() for k in one_rank) < 1e-4
    assert max((one_rank[k] - sft[k]).abs().max().item() for k in one_rank) > 1e-4  # the update moved the planner
