"""benchmark/gpu_first_look.sh and its steps, in their CPU mode (tiny shapes), so that the first GPU session's script
cannot rot: every step passes on the CPU with the stock image's packages alone, the resume check fails where it
should, and the wrapper reports a step that fails or runs out of time."""

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def first_look():
    spec = importlib.util.spec_from_file_location("gpu_first_look", ROOT / "benchmark" / "gpu_first_look.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_first_look"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_first_look"]


@pytest.mark.parametrize("step", ["precision", "dpo", "grpo", "generation"])
def test_each_step_passes_its_check_on_the_cpu(first_look, step, capsys):
    assert first_look.STEPS[step]("cpu"), capsys.readouterr().out
    (line,) = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ")]
    assert line.startswith(f"| {step} | ok |") and line.count("|") == 6  # one row of the five-column table


def test_the_resume_check_kills_relaunches_and_compares(first_look, capsys):
    """Three processes: killed after the checkpoint of step 4, relaunched, and a run never killed."""
    assert first_look.resume("cpu"), capsys.readouterr().out
    assert "resumed at step 4: True" in capsys.readouterr().out


def test_the_resume_check_can_fail(first_look):
    weights = {"w": 1.0, "b": 2.0}
    log = "resuming sft at step 4"
    assert first_look.resume_verdict(3, 0, log, 0, weights, dict(weights)) == (True, 0.0)
    assert not first_look.resume_verdict(3, 0, "", 0, weights, weights)[0]  # it started again from step 0
    assert not first_look.resume_verdict(0, 0, log, 0, weights, weights)[0]  # never killed
    assert not first_look.resume_verdict(3, 0, log, 0, {"w": 1.0, "b": 2.1}, weights)[0]  # other weights
    assert not first_look.resume_verdict(3, 1, log, 0, None, weights)[0]  # the relaunch failed


def _wrapper(tmp_path, steps: str, python: str, **env) -> tuple[subprocess.CompletedProcess, str]:
    environment = {**os.environ, "DEVICE": "cpu", "FIRST_LOOK_OUT": str(tmp_path), "STEPS": steps, "PYTHON": python}
    result = subprocess.run(
        ["bash", str(ROOT / "benchmark" / "gpu_first_look.sh")], env=environment | env, capture_output=True, text=True
    )
    return result, (tmp_path / "table.md").read_text()


def test_the_wrapper_runs_a_step_without_the_packages_a_stock_image_lacks(tmp_path):
    blocked = "tyro,deepspeed,vllm,datasets,wandb"
    result, table = _wrapper(tmp_path, "env", sys.executable, FIRST_LOOK_BLOCK=blocked)
    assert result.returncode == 0, result.stderr
    assert "| env | ok |" in table and "optional packages present: none; scripts that import: none" in table


def test_the_wrapper_reports_a_failed_and_a_timed_out_step(tmp_path):
    stub = tmp_path / "python"
    stub.write_text(
        '#!/usr/bin/env bash\n[[ $2 == slow ]] && exec sleep 30\necho "| $2 | FAILED | 0 | 0 | x |"\nexit 1\n'
    )
    stub.chmod(0o755)
    result, table = _wrapper(tmp_path, "broken slow", str(stub), LIMIT_SECONDS="1")
    assert result.returncode == 1
    assert "| broken | FAILED |" in table and "| broken | exit 1 |" in table
    assert "| slow | timed out after 1 s |" in table
