#!/usr/bin/env bash
# The second GPU session's 15-minute plan (the first is benchmark/gpu_first_look.sh: one GPU, a stock image, ten
# minutes): what no CPU can measure, each step under `timeout`, most useful first, so that a session cut short still
# leaves the top of the table. It needs no hub download (random weights from a
# config, the embedded SmolLM2). Its output is runs/gpu_smoke.md, a table to paste into docs/benchmarks.md. It has
# not been run by the developers (no GPU was lent to them); every failure it reports is a finding.
#
#   1. versions, the device and bf16 support                                     (bench/gpu_probe.py env)
#   2. an 8B-shaped random Llama: decoding tokens/s and peak memory, fp32 vs bf16 (bench/gpu_probe.py throughput)
#   3. one vLLM engine with LoRA: samples, logprobs, a saved adapter loaded       (bench/gpu_probe.py vllm-lora)
#   4. SMTPO under ZeRO-3 on 2 GPUs: the stages up to one GRPO step, its rollouts generated for real
#   5. ECPO's preference optimization under ZeRO-3 on 2 GPUs, a checkpoint every step, killed after 60 s and resumed:
#      the row "ecpo_po_resumed | resumed" fails where the relaunch did not resume (the kill came before the first
#      checkpoint, or after the stage ended: then change the 60 s)
#   6. with EXTRA=1, the smallest run of every other GPU path: vLLM roles in one process, DDP training
#
# Steps 1-5 take about 15 minutes when each takes the time expected of it (2 x 80 GB; startup included); the
# timeouts bound each step, not the sum.
# Needs: a CUDA build of torch, `make install`, `pip install -r requirements-gpu.txt` (vLLM), at least 2 GPUs.
# GPUs: steps 1-3 use GPU 0; the launches use GPUs 0-1 (TRAIN_GPUS). The launches' batches (8) split over 1, 2, 4
# or 8 GPUs. DRY_RUN=8 bash benchmark/gpu_smoke.sh checks every launch's flags, batches and data files without
# loading a model (benchmark/lib.sh); the probes are skipped then.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
TRAIN_GPUS=${TRAIN_GPUS:-0,1}
export WANDB_MODE=${WANDB_MODE:-offline}
mkdir -p runs
TABLE=runs/gpu_smoke.md
dry_run || printf '| step | what | result | detail |\n|---|---|---|---|\n' >"$TABLE"

step() {  # step NAME SECONDS COMMAND...: one row of the table, whatever the command's fate
  local name=$1 seconds=$2 started=$SECONDS status=0
  shift 2
  if dry_run; then
    "$@"
    return
  fi
  STEP_TIMEOUT=$seconds "$@" >"runs/gpu_smoke_$name.log" 2>&1 || status=$?
  grep '^| ' "runs/gpu_smoke_$name.log" | sed "s/^| /| $name: /" >>"$TABLE" || true
  local verdict="ok"
  [[ $status == 124 ]] && verdict="timed out after ${seconds} s"
  [[ $status != 0 && $status != 124 ]] && verdict="failed (exit $status): see runs/gpu_smoke_$name.log"
  echo "| $name | exit | $verdict | $((SECONDS - started)) s |" | tee -a "$TABLE"
}

probe() { run_single 0 bench/gpu_probe.py "$@"; }

dry_run || step env 60 probe env
dry_run || step throughput 240 probe throughput --shape 8b
dry_run || step vllm_lora 240 probe vllm-lora
step smtpo_zero3 300 launch gpu_zero3 "$TRAIN_GPUS" smtpo.py --run-name smoke_smtpo_zero3 --num-train 2 \
  --num-test 1 --max-turns 2 --grpo-steps 1 --sft-batch-size 8 --stages simulator retriever sft grpo
# ECPO: the stages before preference optimization, then po stopped mid-way and resumed ("resuming po at step k")
ECPO=(ecpo.py --run-name smoke_ecpo_zero3 --num-sft-tasks 2 --num-pre-tasks 4 --num-test-tasks 1 --max-turns 2
  --po-epochs 8 --save-every 1)
step ecpo_stages 240 launch gpu_zero3 "$TRAIN_GPUS" "${ECPO[@]}" --stages teacher sft forward backward
step ecpo_po_killed 60 launch gpu_zero3 "$TRAIN_GPUS" "${ECPO[@]}" --stages po
step ecpo_po_resumed 180 launch gpu_zero3 "$TRAIN_GPUS" "${ECPO[@]}" --stages po
if ! dry_run; then
  resumed=$(grep -h -m 1 "resuming po at step" runs/gpu_smoke_ecpo_po_resumed.log || true)
  if [[ -n "$resumed" ]]; then
    echo "| ecpo_po_resumed | resumed | ok | $resumed |" | tee -a "$TABLE"
  else
    echo "| ecpo_po_resumed | resumed | FAILED | no 'resuming po at step' in the relaunch's log |" | tee -a "$TABLE"
  fi
fi
# the other paths, smallest runs: vLLM roles in one process (GPU 0), DDP training
if [[ -n "${EXTRA:-}" ]] || dry_run; then
  step ailo_vllm 300 run_single 0 ailo_sim.py --run-name smoke_ailo --user-llm vllm:smollm2-135m \
    --cra-llm vllm:smollm2-135m --num-tasks 2 --max-turns 2
  step smtpo_vllm 420 run_single 0 smtpo.py --run-name smoke_smtpo_vllm --num-train 2 --num-test 1 --max-turns 2 \
    --grpo-steps 2 --rollout-backend vllm
  step grsu_ddp 420 launch gpu_ddp "$TRAIN_GPUS" grsu.py --run-name smoke_grsu_ddp --num-train-turns 2 --num-test 2 \
    --beam-width 2 --expansion 2 --depth 1 --train-batch-size 8 --micro-batch-size 1
fi
dry_run || echo "the table: $TABLE"
