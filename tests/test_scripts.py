"""Each script run end-to-end as a subprocess on the embedded model, the way CleanRL tests its scripts."""

import json
import re
import subprocess
import sys
import time

import pytest

import ecpo
from ailo_sim import leaks_title
from common.metrics import mentions_title
from tests.conftest import ROOT, fails_cleanly, run_script


def test_ailo_sim_end_to_end(tmp_path):
    # short generations keep CI fast; two parse tries still exercise the retry-then-fallback path
    args = (
        "ailo_sim.py",
        "--num-tasks",
        "2",
        "--max-turns",
        "2",
        "--max-parse-tries",
        "2",
        "--user-max-tokens",
        "64",
        "--cra-max-tokens",
        "48",
        "--run-name",
        "e2e",
    )
    run_script(*args, cwd=tmp_path)
    run_dir = tmp_path / "runs" / "e2e"
    episodes = [json.loads(line) for line in (run_dir / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 2
    for episode in episodes:
        assert 1 <= len(episode["turns"]) <= 2 and episode["turns"][0]["system"]
        assert all(t["ec_rating"] is None or 0 <= t["ec_rating"] <= 5 for t in episode["turns"])
        user_text = [episode["opening"]["user"]] + [t["user"] for t in episode["turns"]]
        assert not any(leaks_title(u, episode["target"]) for u in user_text)  # the guard held
    metrics = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in (
        "eval/sr",
        "eval/recall",
        "cost/llm_calls",
        "cost/tokens",
        "rollout/user_parse_failures",
        "personas/tasks/max_rouge_l_mean",
    ):
        assert key in metrics
    successes = [any(mentions_title(t["system"], e["target"]) for t in e["turns"]) for e in episodes]
    assert metrics["cost/llm_calls"] > 0 and metrics["eval/sr"] == sum(successes) / 2  # SR: the target named

    # a rerun with the same run name resumes: nothing is simulated again
    again = run_script(*args, cwd=tmp_path)
    assert len((run_dir / "episodes.jsonl").read_text().splitlines()) == 2
    resumed = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert resumed["cost/user_llm_calls"] == 0 and resumed["eval/sr"] == metrics["eval/sr"]
    assert "=== " not in again.stdout


def test_bad_input_is_a_clear_error(tmp_path):
    stderr = fails_cleanly("ailo_sim.py", "--dataset", "book", "--data-dir", str(tmp_path / "missing"), cwd=tmp_path)
    assert "Book_train.jsonl: file not found" in stderr
    stderr = fails_cleanly("ailo_sim.py", "--user-llm", "hf:not a model", cwd=tmp_path)
    assert "unknown model spec 'not a model'" in stderr


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ecpo_all_stages_resume_and_lambda(tmp_path):
    tiny = (
        "ecpo.py",
        "--num-sft-tasks",
        "2",
        "--num-pre-tasks",
        "2",
        "--num-test-tasks",
        "1",
        "--max-turns",
        "2",
        "--max-parse-tries",
        "1",
        "--max-searches",
        "1",
        "--sft-epochs",
        "1",
        "--po-epochs",
        "1",
        "--action-max-tokens",
        "32",
        "--user-max-tokens",
        "48",
        "--rewriter-max-tokens",
        "96",
        "--judge-max-tokens",
        "64",
        "--run-name",
        "e2e",
    )
    run_dir = tmp_path / "runs" / "e2e"

    # stop after the forward stage ...
    run_script(*tiny, "--lam", "5", "--stages", "teacher", "sft", "forward", cwd=tmp_path)
    assert (run_dir / "sft_adapter" / "adapter_config.json").exists() and not (run_dir / "rewrites.jsonl").exists()
    teacher, forward = _jsonl(run_dir / "teacher_episodes.jsonl"), _jsonl(run_dir / "forward_episodes.jsonl")
    assert len(teacher) == 2 and len(forward) == 2
    sft_mtime = (run_dir / "sft_adapter" / "adapter_model.safetensors").stat().st_mtime

    # ... then rerun every stage: the finished ones are not redone, the rest complete
    result = run_script(*tiny, "--lam", "5", cwd=tmp_path)
    assert (
        _jsonl(run_dir / "teacher_episodes.jsonl") == teacher and _jsonl(run_dir / "forward_episodes.jsonl") == forward
    )
    assert (run_dir / "sft_adapter" / "adapter_model.safetensors").stat().st_mtime == sft_mtime
    costs = {r["stage"]: r for r in _jsonl(run_dir / "costs.jsonl")}  # each stage's latest row
    assert costs["teacher"]["llm_calls"] == 0 and costs["forward"]["llm_calls"] == 0
    assert costs["backward"]["llm_calls"] > 0 and costs["eval"]["llm_calls"] > 0
    pairs = _jsonl(run_dir / "pairs.jsonl")
    assert pairs and (run_dir / "po_adapter" / "adapter_config.json").exists()
    assert all(ecpo_format(p["chosen"]) and p["chosen"] != p["rejected"] for p in pairs)
    for name in ("eval_expert", "eval_sft", "eval_ecpo"):
        assert len(_jsonl(run_dir / f"{name}.jsonl")) == 1
    metrics = _jsonl(run_dir / "metrics.jsonl")[-1]
    for key in (
        "eval/sr",
        "eval/recall",
        "eval_sft/sr",
        "eval_expert/sr",
        "cost/pairs",
        "cost/trajectories_per_pair",
        "cost/llm_calls_per_pair",
        "cost/llm_calls",
        "cost/tokens",
        "rollout/pairs",
    ):
        assert key in metrics, key
    assert metrics["cost/trajectories_per_pair"] == 2 / len(pairs)
    assert any("train/loss" in m for m in _jsonl(run_dir / "metrics.jsonl"))
    assert "SR" in result.stdout and "ECPO" in result.stdout

    # a lower lambda selects a subset of the pairs from the stored rewrites, with no new rewriter calls
    run_script(*tiny, "--lam", "3", "--stages", "backward", cwd=tmp_path)
    lower = _jsonl(run_dir / "pairs.jsonl")
    stored = _jsonl(run_dir / "rewrites.jsonl")  # ratings read as expectations count by their integer part (Eq. 2)
    expected = {r["key"] for r in stored if r["status"] == "ok" and ecpo.short_of_expectation(r["rating"], 3)}
    assert {p["key"] for p in lower} == expected <= {p["key"] for p in pairs}  # exactly the stored ok rewrites
    assert _jsonl(run_dir / "costs.jsonl")[-1] == {"stage": "backward", "llm_calls": 0, "tokens": 0}
    assert _jsonl(run_dir / "metrics.jsonl")[-1]["cost/pairs"] == len(lower)


def ecpo_format(action):
    return re.fullmatch(r"(Ask|Recommend|Response|Search)\[[^\[\]]+\]", action) is not None


def test_ecpo_bad_input_is_a_clear_error(tmp_path):
    stderr = fails_cleanly("ecpo.py", "--dataset", "game", "--data-dir", str(tmp_path), cwd=tmp_path)
    assert "Game_train.jsonl: file not found" in stderr
    stderr = fails_cleanly("ecpo.py", "--stages", "po", "--run-name", "empty", cwd=tmp_path)
    assert "run the backward stage first" in stderr


def test_grsu_end_to_end_and_resume(tmp_path):
    tiny = (
        "grsu.py",
        "--num-train-turns",
        "2",
        "--num-test",
        "2",
        "--beam-width",
        "1",
        "--expansion",
        "1",
        "--depth",
        "2",
        "--critique-max-tokens",
        "16",
        "--crs-max-tokens",
        "48",
        "--examples-per-batch",
        "1",
        "--run-name",
        "e2e",
    )
    run_dir = tmp_path / "runs" / "e2e"
    result = run_script(*tiny, cwd=tmp_path)
    assert "zero-shot" in result.stdout and "GRSU (beam)" in result.stdout
    instructions = _jsonl(run_dir / "instructions.jsonl")
    kinds = [r["kind"] for r in instructions]
    assert kinds.count("score") >= 4 and kinds.count("critique") >= 2
    assert all(r["completion"] for r in instructions)
    assert (run_dir / "user_model" / "adapter_model.safetensors").exists()
    searched = _jsonl(run_dir / "search_beam.jsonl")
    assert len(searched) == 2 and all(len(r["states"]) == 1 + 1 for r in searched)
    metrics = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in (
        "eval/recall@10",
        "eval/ndcg@50",
        "eval/mrr@10",
        "eval_zeroshot/recall@50",
        "cost/llm_calls",
        "cost/tokens",
        "cost/llm_calls_per_example",
        "cost/tokens_per_example",
        "search/crs_lists",
    ):
        assert key in metrics
    losses = [r["train/loss"] for r in _jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert losses and all(0 < loss < 20 for loss in losses)
    adapter_mtime = (run_dir / "user_model" / "adapter_model.safetensors").stat().st_mtime

    # a rerun finds every stage done: no new instruction data, no training, no search
    run_script(*tiny, cwd=tmp_path)
    assert _jsonl(run_dir / "instructions.jsonl") == instructions and _jsonl(run_dir / "search_beam.jsonl") == searched
    assert (run_dir / "user_model" / "adapter_model.safetensors").stat().st_mtime == adapter_mtime
    resumed = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert resumed["search/crs_calls"] == 0 and resumed["cost/synth_llm_calls"] == 0
    assert resumed["eval/recall@50"] == metrics["eval/recall@50"]
    assert resumed["cost/llm_calls"] == metrics["cost/llm_calls"] > 0  # the search's cost is kept in its records


def test_grsu_bad_input_is_a_clear_error(tmp_path):
    stderr = fails_cleanly("grsu.py", "--dataset", "inspired", "--data-dir", str(tmp_path / "missing"), cwd=tmp_path)
    assert "inspired/cfcrs/kg.json: file not found" in stderr  # the KG, read first (common/data.load_crs_dataset)


SMTPO_TINY = (
    "smtpo.py", "--num-train", "2", "--num-test", "1", "--max-turns", "2", "--group-size", "2", "--grpo-steps", "2",
    "--rec-max-tokens", "40", "--step-max-tokens", "6", "--feedback-max-tokens", "12", "--simulator-epochs", "1",
    "--simulator-lists", "1", "--simulator-predictions", "1", "--sft-epochs", "1", "--bpr-epochs", "5",
    "--retriever-epochs", "2", "--policies", "sft", "smtpo", "--run-name", "e2e",
)  # fmt: skip


def test_smtpo_killed_in_grpo_then_resumed(tmp_path):
    import signal
    import time

    run_dir = tmp_path / "runs" / "e2e"
    process = subprocess.Popen([sys.executable, str(ROOT / "smtpo.py"), *SMTPO_TINY[1:]], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    checkpoint = run_dir / "grpo" / "checkpoints" / "step_00000001"
    deadline = time.time() + 900
    while not checkpoint.exists():  # kill it (SIGKILL: no clean-up) once the first GRPO step is saved
        assert process.poll() is None and time.time() < deadline, "smtpo.py ended before its first GRPO step"
        time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    kept = {name: (run_dir / name).read_text() for name in ("simulator_data.jsonl", "recommender_data.jsonl")}
    adapters = {
        n: (run_dir / n / "adapter_model.safetensors").stat().st_mtime for n in ("simulator_adapter", "sft_adapter")
    }
    assert not (run_dir / "grpo_adapter").exists()

    result = run_script(*SMTPO_TINY, cwd=tmp_path)  # resumes inside the GRPO stage, from its step-1 checkpoint
    assert {name: (run_dir / name).read_text() for name in kept} == kept  # nothing before GRPO was redone
    assert all((run_dir / n / "adapter_model.safetensors").stat().st_mtime == t for n, t in adapters.items())
    episodes = [r["key"] for r in _jsonl(run_dir / "grpo_episodes.jsonl")]
    assert len(episodes) == len(set(episodes)) >= 2  # each dialogue rolled out once
    assert {key.split("|")[0] for key in episodes} == {"0", "1"}  # both steps, the one after the kill too
    assert (run_dir / "grpo_adapter" / "adapter_model.safetensors").exists()
    steps = [r for r in _jsonl(run_dir / "metrics.jsonl") if "rollout/reward_total" in r]
    assert len(steps) == 2 and all(0 <= r["rollout/reward_think"] <= 1 for r in steps)  # the step after the kill too
    metrics = _jsonl(run_dir / "metrics.jsonl")[-1]
    for key in ("eval/turn1/recall@10", "eval/turn2/recall@10", "eval/recall@1", "eval_sft/ndcg@10", "eval/mrr@10",
                "retriever/both/recall@20", "retriever/text/recall@20", "retriever/graph/recall@20"):  # fmt: skip
        assert key in metrics, key
    for name in ("eval_sft.jsonl", "eval_smtpo.jsonl"):
        (record,) = _jsonl(run_dir / name)
        assert len(record["turns"]) == 2  # all T turns, no early stop at evaluation
    assert "turn2" in result.stdout and "eval_sft" in result.stdout


def test_smtpo_bad_input_is_a_clear_error(tmp_path):
    stderr = fails_cleanly("smtpo.py", "--dataset", "redial", "--data-dir", str(tmp_path / "missing"), cwd=tmp_path)
    assert "file not found" in stderr
    stderr = fails_cleanly("smtpo.py", "--stages", "grpo", "--run-name", "empty", cwd=tmp_path)
    assert "run the retriever stage first" in stderr


@pytest.mark.parametrize(
    "command, message",
    [
        (("smtpo.py", "--policy", "hf:/nope"), "unknown model spec 'hf:/nope'"),
        (("rso.py", "--rewarder-llm", "gpt-4o"), "--rewarder-llm 'gpt-4o': use hf:<model>"),
        (("grsu.py", "--user-model", "./no/such/folder"), "unknown model spec"),
        (("ecpo.py", "--lam", "9"), "--lam 9 lies outside AILO's rating scale 0-5"),
    ],
)
def test_a_wrong_spec_or_flag_stops_before_the_first_stage(tmp_path, command, message):
    started = time.time()
    assert message in fails_cleanly(*command, cwd=tmp_path)
    assert time.time() - started < 60  # imports only: nothing trained or loaded first
    assert not (tmp_path / "runs").exists()
