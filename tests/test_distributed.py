"""common/distributed.py under real ranks: generation from ZeRO-3-sharded weights with unequal work per rank, and the
process group's timeout."""

import os
import subprocess
from datetime import timedelta

import psutil
import pytest

from common.data import DataError
from common.distributed import collective_timeout
from tests.conftest import ROOT, accelerate_launch

PRINT_TIMEOUT = f"""
import sys
import torch
sys.path.insert(0, {str(ROOT)!r})
from common.distributed import make_accelerator
accelerator = make_accelerator()
group = torch.distributed.distributed_c10d._get_default_group()
timeout = group._get_backend(torch.device("cpu")).options._timeout
print(f"rank {{accelerator.process_index}} of {{accelerator.num_processes}} waits {{timeout}}")
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
    waits = sorted(line for line in result.stdout.splitlines() if " waits " in line)
    assert waits == [f"rank {k} of 2 waits 0:07:00" for k in (0, 1)], result.stdout


def test_the_collective_timeout_is_two_hours_unless_set(monkeypatch):
    monkeypatch.delenv("CLEANCRS_COLLECTIVE_TIMEOUT_MINUTES", raising=False)
    assert collective_timeout() == timedelta(hours=2)
    monkeypatch.setenv("CLEANCRS_COLLECTIVE_TIMEOUT_MINUTES", "0.5")
    assert collective_timeout() == timedelta(seconds=30)
    for bad in ("0", "-3", "ten"):
        monkeypatch.setenv("CLEANCRS_COLLECTIVE_TIMEOUT_MINUTES", bad)
        with pytest.raises(DataError, match=f"CLEANCRS_COLLECTIVE_TIMEOUT_MINUTES='{bad}': use a positive number"):
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
