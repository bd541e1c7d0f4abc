"""rso.py run end-to-end as a subprocess on the embedded models with tiny counts: killed in the middle of RL, between
two checkpoints, and resumed, and bad input refused with one clear line."""

import json
import signal
import subprocess
import sys
import time

import pytest

import rso
from tests.conftest import ROOT, fails_cleanly, run_script


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


RSO_TINY = (
    "--rl-episodes", "3", "--num-envs", "1", "--max-turns", "2", "--num-test", "1", "--reward-samples", "2",
    "--reasoner-max-tokens", "6", "--actor-max-tokens", "8", "--user-max-tokens", "16", "--judge-max-tokens", "2",
    "--sft-epochs", "1", "--planner-max-length", "128", "--planners", "random", "rl", "--run-name", "e2e",
    "--rl-save-every", "2",
)  # fmt: skip


def logged_updates(run_dir):
    path = run_dir / "metrics.jsonl"
    return [r for r in _jsonl(path) if "train/entropy" in r] if path.exists() else []


def test_rso_killed_in_rl_then_resumed(tmp_path):
    """Killed (SIGKILL) once the first RL update is logged, before the first checkpoint (--rl-save-every 2): the rerun
    redoes that update from its recorded episode, logs it once, plays no episode twice, and checkpoints every second
    update and after the last."""
    run_dir = tmp_path / "runs" / "e2e"
    process = subprocess.Popen([sys.executable, str(ROOT / "rso.py"), *RSO_TINY], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 1800
    try:
        while not logged_updates(run_dir):  # the first update stepped; the second update's episode is playing
            assert process.poll() is None, "rso.py ended before its first RL update"
            assert time.time() < deadline, "no RL update within 30 minutes"
            time.sleep(0.5)
    finally:  # never leave the run behind, whatever failed
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (run_dir / "rl_planner").exists() and not (run_dir / "rl" / "checkpoints").exists()
    sft_weights = (run_dir / "sft_planner" / "model.safetensors").stat().st_mtime
    played = _jsonl(run_dir / "rl_episodes.jsonl")

    result = run_script("rso.py", *RSO_TINY, cwd=tmp_path, timeout=1800)  # no checkpoint: redoes update 1, plays on
    assert (run_dir / "sft_planner" / "model.safetensors").stat().st_mtime == sft_weights  # SFT was not redone
    episodes = _jsonl(run_dir / "rl_episodes.jsonl")
    keys = [e["key"] for e in episodes]
    assert len(keys) == len(set(keys)) == 3 and episodes[: len(played)] == played  # each episode played once
    for episode in episodes:
        assert 1 <= len(episode["turns"]) == episode["num_turns"] <= 2
        assert episode["end"] in ("accepted", "left with its target", "user left", "turn limit")
        assert all(0 <= t["reward"] <= 1 and len(t["scores"]) <= 2 for t in episode["turns"])
        assert all(0 <= t["strategy"] < 13 and t["state"] and t["user"] for t in episode["turns"])
        assert all(len(t["retrieved"]) == 5 and t["facts"] for t in episode["turns"])
    assert (run_dir / "rl_planner" / "model.safetensors").exists()
    checkpoints = sorted(p.name for p in (run_dir / "rl" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000002", "step_00000003"]  # every second update and the last
    metrics = _jsonl(run_dir / "metrics.jsonl")
    updates = logged_updates(run_dir)
    assert len(updates) == 3 and all(0 < r["train/entropy"] <= 2.5650 for r in updates)  # log 13 = 2.565: once each
    assert all("rollout/return" in r and "train/baseline" in r and r["train/grad_norm"] > 0 for r in updates)
    # the rerun redid update 1 on its recorded episode, whose return the running baseline compares update 2 with
    assert updates[1]["train/baseline"] == pytest.approx(rso.episode_returns(episodes[0], rso.Args(max_turns=2))[0])
    summary = metrics[-1]
    for key in ("sft/accuracy", "sft/majority_accuracy", "sft/macro_f1", "eval/sr", "eval/wi", "eval/prs",
                "eval/prs_left_out", "eval/cred", "eval/dist2", "eval/dist2_corpus", "eval/rec_sr", "eval/recall@1",
                "eval/recall@5", "eval/recall@1_last", "eval_random/sr", "cost/llm_calls", "cost/tokens",
                "perf/rl_seconds", "train/weight_distance", "train/policy_tv_from_sft"):  # fmt: skip
        assert key in summary, key
    for name in ("eval_random.jsonl", "eval_rl.jsonl", "judged_rl.jsonl"):
        assert len(_jsonl(run_dir / name)) == 1
    assert (run_dir / "strategy_by_progress.png").stat().st_size > 1000
    assert summary["train/weight_distance"] > 0  # the three updates moved the planner
    # update 1 was redone (the scheduler stepped twice before update 2 logged its lr) and said so once, not logged
    assert updates[1]["train/lr"] == pytest.approx(1e-4 * (3 - 2) / 3)
    assert "rl updates 1, logged before the run was stopped" in result.stdout
    assert result.stdout.count("redone, not logged again") == 1
    assert (
        "rl update 1/3" not in result.stdout
        and "rl update 2/3: " in result.stdout
        and "rl update 3/3: " in result.stdout
    )
    assert "the planner moved" in result.stdout and "R@1 last" in result.stdout
    assert "Conv-SR" in result.stdout and "random" in result.stdout and "RL" in result.stdout


def test_rso_bad_input_is_a_clear_error(tmp_path):
    stderr = fails_cleanly("rso.py", "--dataset", "inspired", "--data-dir", str(tmp_path / "missing"), cwd=tmp_path)
    assert "dev.tsv: file not found" in stderr
    stderr = fails_cleanly("rso.py", "--stages", "rl", "--run-name", "empty", cwd=tmp_path)
    assert "run the sft stage first" in stderr
    stderr = fails_cleanly("rso.py", "--tau", "1.5", cwd=tmp_path)
    assert "--tau 1.5 must lie in [0, 1)" in stderr
    stderr = fails_cleanly("rso.py", "--num-envs", "0", cwd=tmp_path)
    assert "--num-envs must be at least 1" in stderr
    stderr = fails_cleanly("rso.py", "--baseline", "batch", "--num-envs", "1", cwd=tmp_path)
    assert "--baseline batch needs at least 2 episodes in every update" in stderr and "--baseline ema" in stderr
    stderr = fails_cleanly("rso.py", "--baseline", "batch", "--num-envs", "4", "--rl-episodes", "9", cwd=tmp_path)
    assert "gives an update of 1" in stderr  # the last update would hold one episode
    broken = tmp_path / "data" / "inspired" / "sweetpeach"
    broken.mkdir(parents=True)
    (broken / "dev.tsv").write_text("dialog_id\tspeaker\ttext\texpert_label\nd1\tRECOMMENDER\tHi\tno_strategy\nd1\n")
    stderr = fails_cleanly("rso.py", "--dataset", "inspired", "--data-dir", str(tmp_path / "data"), cwd=tmp_path)
    assert "dev.tsv:3: row has 1 columns where the header has 4" in stderr
    (broken / "dev.tsv").write_text("dialog_id\tspeaker\ttext\texpert_label\nd1\tRECOMMENDER\tHi\trecommend\n")
    stderr = fails_cleanly("rso.py", "--dataset", "inspired", "--data-dir", str(tmp_path / "data"), cwd=tmp_path)
    assert "unknown strategy label 'recommend'" in stderr
