"""ecpo.py's preference-optimization stage on 1 rank and on 2 CPU ranks (accelerate, gloo) with the same global
batch: the loss curves agree, so the data split, the padding weights and the gradient averaging are right."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, accelerate_launch

PAIRS = [
    ("I want a film about dreams.", "Recommend[Inception (2010) bends dreams into a heist.]", "Ask[What genre?]"),
    ("Something funny tonight?", "Ask[Slapstick, or dry and witty?]", "Response[OK.]"),
    ("A scary movie please.", "Search[supernatural horror haunted house]", "Recommend[Heat (1995)]"),
    ("Any space adventures?", "Recommend[Interstellar (2014), a voyage through a wormhole.]", "Ask[Why?]"),
    ("A romance, maybe.", "Ask[A classic love story, or something modern?]", "Response[Sure.]"),
    ("I liked Heat.", "Search[crime thriller heist]", "Response[Nice.]"),
    ("Animated films?", "Recommend[Spirited Away (2001), a hand-drawn fantasy.]", "Search[cartoon]"),
    ("Surprise me.", "Ask[Do you want something light or something intense?]", "Recommend[Alien (1979)]"),
]


def _prepare_run(root, name, tiny_policy):
    from transformers import AutoModelForCausalLM

    from common.models import add_lora

    run_dir = root / "runs" / name
    run_dir.mkdir(parents=True)
    torch.manual_seed(0)
    add_lora(AutoModelForCausalLM.from_pretrained(tiny_policy)).save_pretrained(run_dir / "sft_adapter")
    (run_dir / "sft_adapter" / "steps.json").write_text(json.dumps({"steps": 0, "examples": 0}))
    with (run_dir / "pairs.jsonl").open("w") as f:
        for k, (prompt, chosen, rejected) in enumerate(PAIRS):
            f.write(
                json.dumps(
                    {
                        "key": f"t{k}#1",
                        "prompt": prompt,
                        "chosen": chosen,
                        "rejected": rejected,
                        "rating": 2,
                        "conf": "flaw",
                    }
                )
                + "\n"
            )
    return run_dir


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_two_ranks_match_one_rank(tmp_path, tiny_policy, loss):
    # KTO's z_ref is estimated on the whole global batch, every micro-batch of every rank, so it agrees too
    flags = ["--loss", loss, "--stages", "po", "--policy", str(tiny_policy)]
    flags += "--po-batch-size 4 --micro-batch-size 2 --po-epochs 2 --po-lr 5e-3 --warmup-ratio 0".split()
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    one = _prepare_run(tmp_path, "one", tiny_policy)
    two = _prepare_run(tmp_path, "two", tiny_policy)
    result = subprocess.run(
        [sys.executable, str(ROOT / "ecpo.py"), *flags, "--run-name", "one"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run(
        [
            *accelerate_launch("cpu_2proc"),
            str(ROOT / "ecpo.py"),
            *flags,
            "--run-name",
            "two",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    curve_one, curve_two = _losses(one), _losses(two)
    assert len(curve_one) == len(curve_two) == 4  # 8 pairs / 4 per step x 2 epochs
    assert abs(curve_one[-1] - curve_one[0]) > 1e-3  # it trains
    if loss == "dpo":
        assert curve_one[0] == pytest.approx(0.6931, abs=1e-3)  # the policy starts as the reference
    assert curve_two == pytest.approx(curve_one, abs=2e-5)
    assert (two / "po_adapter" / "adapter_config.json").exists() and (two / "ref_logps.jsonl").exists()
    refs = [json.loads(line) for line in (two / "ref_logps.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in refs) == sorted(f"t{k}#1" for k in range(8))  # each pair once, over both ranks
