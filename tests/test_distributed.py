"""common/distributed.py under real ranks: generation from ZeRO-3-sharded weights with unequal work per rank."""

import os
import subprocess

import psutil
import pytest

from tests.conftest import ROOT, accelerate_launch


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
