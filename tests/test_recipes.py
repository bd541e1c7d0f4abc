"""The paper-scale recipes in benchmark/ as written: every command passes its script's dry run (the flags, the division
of every training batch over the processes, the data files) for 1, 4 and 8 processes, and no training rank shares a
GPU with a vLLM server the recipe started.

Each recipe runs in bash, from a copy of benchmark/ in a temporary folder (so that its copies between run folders
never touch this checkout), with stand-ins for ``python``, ``accelerate``, ``vllm``, ``curl`` and ``cp`` first on
PATH, which write down how they were called. Under DRY_RUN=N (benchmark/lib.sh) the recipe may call only ``python``
(one ``--dry-run`` command each), and each recorded command then runs in this process: no model loads, and the whole
check takes about a second per command. Without DRY_RUN the stand-ins show what the recipe would start on which GPUs.
"""

import importlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import tyro

from common.data import DataError
from common.distributed import check_division
from tests.conftest import DATA, ROOT, fails_cleanly

RECIPES = sorted(path for path in (ROOT / "benchmark").glob("*.sh") if path.name != "lib.sh")
PROCESSES = (1, 4, 8)
# Files the recipes read that ../shared/data does not mirror (its README: "Not available here"); a user downloads them.
NOT_MIRRORED = ("ecpo/Game/Game_train.jsonl", "ecpo/Yelp/Yelp_train.jsonl")

# Every stand-in appends one line: its name, its CUDA_VISIBLE_DEVICES, its pid, then its arguments, tab-separated.
RECORD = 'printf "%s\\t%s\\t%s" "$(basename "$0")" "${CUDA_VISIBLE_DEVICES-unset}" "$$" >> "$RECIPE_LOG"\n'
RECORD += 'printf "\\t%s" "$@" >> "$RECIPE_LOG"; printf "\\n" >> "$RECIPE_LOG"\n'
STAND_INS = {
    "dry": {
        "python": RECORD,
        **{
            name: f'echo "{name} must not run in a dry run: $*" >&2; exit 1\n'
            for name in ("accelerate", "vllm", "curl", "cp")
        },
    },
    "real": {"python": RECORD, "accelerate": RECORD, "vllm": RECORD + "exec sleep 300\n", "curl": "", "cp": ""},
}


def run_recipe(recipe: Path, mode: str, extra_env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run ``recipe`` in bash with the ``mode`` stand-ins; returns bash's result and the recorded calls."""
    with tempfile.TemporaryDirectory() as folder:
        bin_dir, log = Path(folder) / "bin", Path(folder) / "calls.tsv"
        bin_dir.mkdir()
        shutil.copytree(ROOT / "benchmark", Path(folder) / "checkout" / "benchmark")
        for name, body in STAND_INS[mode].items():
            (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
            (bin_dir / name).chmod(0o755)
        log.touch()
        layout = ("GPUS", "SERVE_GPUS", "TRAIN_GPUS", "DRY_RUN", "OPENAI_BASE_URL", "CUDA_VISIBLE_DEVICES")
        env = {k: v for k, v in os.environ.items() if k not in layout}  # the recipe's defaults, not this shell's
        env |= {"PATH": f"{bin_dir}:{env['PATH']}", "RECIPE_LOG": str(log), "DATA_DIR": str(DATA)}
        env |= {"OPENAI_API_KEY": "dry-run", **extra_env}
        script = Path(folder) / "checkout" / "benchmark" / recipe.name
        try:
            result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:  # a recipe that waits for a server that never comes, say
            result = subprocess.CompletedProcess(script, -1, "", "still running after 60 s: stopped")
        calls = []
        for line in log.read_text().splitlines():
            name, gpus, pid, *argv = line.split("\t")
            calls.append({"name": name, "gpus": None if gpus == "unset" else gpus, "pid": int(pid), "argv": argv})
    return result, calls


def dry_runs() -> tuple[dict, list]:
    """{(recipe, processes): bash's result} and a (recipe, processes, argv) for every command recorded."""
    results, commands = {}, []
    for recipe in RECIPES:
        for processes in PROCESSES:
            result, calls = run_recipe(recipe, "dry", {"DRY_RUN": str(processes)})
            results[recipe.name, processes] = (result, calls)
            commands += [(recipe.name, processes, call["argv"]) for call in calls]
    return results, commands


DRY_RUNS, COMMANDS = dry_runs()


@pytest.mark.parametrize("recipe", [r.name for r in RECIPES])
@pytest.mark.parametrize("processes", PROCESSES)
def test_recipe_runs_dry(recipe, processes):
    """Under DRY_RUN the recipe finishes, starting no server and no accelerate launch, and every command it would
    run is a ``--dry-run`` of a script (for N processes, or 1 for a single-process command)."""
    result, calls = DRY_RUNS[recipe, processes]
    assert result.returncode == 0, f"DRY_RUN={processes} bash benchmark/{recipe} failed:\n{result.stderr[-3000:]}"
    assert calls, f"benchmark/{recipe} ran no command under DRY_RUN"
    for call in calls:
        assert call["argv"][-2] == "--dry-run" and call["argv"][-1] in ("1", str(processes)), call["argv"]


def command_id(command) -> str:
    recipe, processes, argv = command
    run_name = argv[argv.index("--run-name") + 1] if "--run-name" in argv else ""
    return f"{Path(recipe).stem}-{processes}-{argv[0]}-{run_name}"


@pytest.mark.parametrize("recipe, processes, argv", COMMANDS, ids=[command_id(c) for c in COMMANDS])
def test_recipe_command_passes_dry_run(recipe, processes, argv, monkeypatch, capsys):
    """The command's flags parse, its training batches split over the processes, and its data files load. Commands
    whose data the shared folder does not hold (the ECPO Game and Yelp train tasks) are skipped, saying which file."""
    script, *flags = argv
    module = importlib.import_module(script.removesuffix(".py"))
    monkeypatch.chdir(ROOT)
    command = f"benchmark/{recipe}, {processes} processes: python {' '.join(argv)}"
    try:
        module.main(tyro.cli(module.Args, args=flags))
    except SystemExit as err:  # tyro refused a flag; it printed why
        pytest.fail(f"{command}\nthe flags do not parse: {capsys.readouterr().err[-2000:]} ({err})")
    except DataError as err:
        missing = str(err).partition(": file not found")[0]
        if missing != str(err) and Path(missing).is_relative_to(DATA):
            unmirrored = not DATA.exists() or Path(missing).relative_to(DATA).as_posix() in NOT_MIRRORED
            if unmirrored:
                pytest.skip(f"{script} reads {missing}, which {DATA} does not hold (download it: see the recipe)")
        pytest.fail(f"{command}\n{err}")
    assert f"dry run of {script} for {flags[-1]} processes" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", [r.name for r in RECIPES])
def test_servers_and_training_ranks_use_disjoint_gpus(recipe):
    """Run for real with stand-ins: every accelerate launch has one rank per visible GPU, no launch or single-process
    command sees a GPU of a vLLM server the recipe started, and every server is stopped when the recipe ends."""
    result, calls = run_recipe(ROOT / "benchmark" / recipe, "real", {"GPUS": "8"})
    servers = [c for c in calls if c["name"] == "vllm"]
    try:
        assert result.returncode == 0, f"bash benchmark/{recipe} failed:\n{result.stderr[-3000:]}"
        served = {gpu for server in servers for gpu in server["gpus"].split(",")}
        for call in calls:
            if call["name"] == "accelerate":
                ranks = int(call["argv"][call["argv"].index("--num_processes") + 1])
                assert call["gpus"] and ranks == len(call["gpus"].split(",")), call
            if call["name"] in ("accelerate", "python") and servers:
                assert call["gpus"] and not served & set(call["gpus"].split(",")), (call, servers)
        for server in servers:
            assert not Path(f"/proc/{server['pid']}").exists(), f"the recipe left {server['argv']} running"
    finally:
        for server in servers:  # the stand-ins this test started, should the recipe have left one
            if Path(f"/proc/{server['pid']}").exists():
                os.kill(server["pid"], 15)


def test_check_division_names_the_flag_and_what_would_fit():
    assert check_division(4, 16, 2, "--x") == "--x 16 = 4 ranks x micro-batch 2 x 2 accumulation steps"
    with pytest.raises(DataError, match=r"--x 16 must .* = 8 x 4 \(micro-batches that fit: 1, 2\)"):
        check_division(8, 16, 4, "--x")
    with pytest.raises(DataError, match=r"--sft-batch-size 4 must .* = 8 x 1 \(make it a multiple of 8\)"):
        check_division(8, 4, 1, "--sft-batch-size")


def test_dry_run_refuses_a_batch_that_does_not_split_in_one_line(tmp_path):
    """SMTPO's default SFT batch of 4 on 8 ranks (the recipe's failure of issue 22): a one-line error naming the
    flag, and no run folder."""
    error = fails_cleanly("smtpo.py", "--dry-run", "8", cwd=tmp_path)
    assert "--sft-batch-size 4 must be a multiple of ranks x micro-batch = 8 x 1" in error
    assert not (tmp_path / "runs").exists()


def test_launch_on_a_gpu_the_server_holds_is_refused():
    script = f"source {ROOT / 'benchmark' / 'lib.sh'}; serve 0,1 8000 some/model; launch gpu_ddp 1,2 grsu.py"
    result = subprocess.run(["bash", "-c", script], env={**os.environ, "DRY_RUN": "2"}, capture_output=True, text=True)
    assert result.returncode != 0
    assert "grsu.py would run on GPU 1, which the vLLM server holds (GPUs 0,1)" in result.stderr
