"""Each script run end-to-end as a subprocess on the embedded model, the way CleanRL tests its scripts."""

import json
import re
import subprocess
import sys

from tests.conftest import ROOT


def run(*args, cwd, timeout=900):
    result = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_ailo_sim_end_to_end(tmp_path):
    args = ("ailo_sim.py", "--num-tasks", "2", "--max-turns", "2", "--run-name", "e2e")
    run(*args, cwd=tmp_path)
    run_dir = tmp_path / "runs" / "e2e"
    trajectories = [json.loads(line) for line in (run_dir / "trajectories.jsonl").read_text().splitlines()]
    assert len(trajectories) == 2
    for trajectory in trajectories:
        assert 1 <= len(trajectory["turns"]) <= 2 and trajectory["turns"][0]["system"]
        assert all(t["ec_rating"] is None or 0 <= t["ec_rating"] <= 5 for t in trajectory["turns"])
        user_text = [trajectory["opening"]["user"]] + [t["user"] for t in trajectory["turns"]]
        core = re.split(r"\s*[(:]", trajectory["target"])[0]
        assert not any(core.lower() in u.lower() for u in user_text)
    metrics = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("eval/sr", "eval/recall", "cost/llm_calls", "cost/tokens", "rollout/user_parse_failures",
                "personas/tasks/max_rouge_l_mean"):
        assert key in metrics
    assert metrics["cost/llm_calls"] > 0 and 0 <= metrics["eval/sr"] <= 1

    # a rerun with the same run name resumes: nothing is simulated again
    again = run(*args, cwd=tmp_path)
    assert len((run_dir / "trajectories.jsonl").read_text().splitlines()) == 2
    resumed = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert resumed["cost/user_llm_calls"] == 0 and resumed["eval/sr"] == metrics["eval/sr"]
    assert "=== " not in again.stdout


def test_bad_input_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "ailo_sim.py"), "--dataset", "book", "--data-dir",
                             str(tmp_path / "missing")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "error: " in result.stderr and "Book_train.jsonl: file not found" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, str(ROOT / "ailo_sim.py"), "--user-llm", "hf:not a model"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "unknown model spec 'not a model'" in result.stderr
    assert "Traceback" not in result.stderr
