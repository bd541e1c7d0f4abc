#!/usr/bin/env bash
# The smallest run of every script on a CUDA machine: the vllm: backend for the frozen roles, the GPU accelerate
# configs for training, bf16. Meant for a user's first GPU session, to see that everything starts before a paper
# run. It cannot run on this repository's CPU CI and has not been run by the developers (no GPU was available);
# report what fails.
#
# Needs: a CUDA build of torch, `make install`, `pip install -r requirements-gpu.txt` (vLLM), and the embedded
# model cached once on CPU or GPU (`python -c "from common.models import resolve_model_path as r; r('smollm2-135m')"`).
#
# GPUs: the in-process vLLM runs use GPU 0 alone; the training runs one rank on each of GPUs 0 to GPUS-1 (default:
# every GPU). Their batches (8) split over 1, 2, 4 or 8 GPUs; on another count pass ones that do.
# DRY_RUN=8 bash benchmark/gpu_smoke.sh checks every command's flags, batches and data files for 8 processes without
# loading a model (benchmark/lib.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
if dry_run; then
  MODEL=smollm2-135m GPUS=${GPUS:-$DRY_RUN}
else
  MODEL=$(python -c "from common.models import resolve_model_path; print(resolve_model_path('smollm2-135m'))")
  GPUS=${GPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
fi
export WANDB_MODE=${WANDB_MODE:-offline}
# vLLM in one process: each vLLM engine takes most of its GPU's memory, so it does not share a GPU with training.
run_single 0 ailo_sim.py --run-name smoke_ailo --user-llm "vllm:$MODEL" --cra-llm "vllm:$MODEL" --num-tasks 2 \
  --max-turns 2
run_single 0 grsu.py --run-name smoke_grsu_vllm --num-train-turns 2 --num-test 2 --beam-width 2 --expansion 2 \
  --depth 1 --crs-llm "vllm:$MODEL" --teacher-llm "vllm:$MODEL"
# SMTPO's GRPO rollouts from a vLLM engine that loads the current LoRA after every update.
run_single 0 smtpo.py --run-name smoke_smtpo_vllm --num-train 2 --num-test 1 --max-turns 2 --grpo-steps 2 \
  --rollout-backend vllm
# Training under the GPU configs (DDP, then ZeRO-3), every role on the hf: backend.
for config in gpu_ddp gpu_zero3; do
  launch "$config" "$(gpu_list "$GPUS")" ecpo.py --run-name "smoke_ecpo_$config" \
    --num-sft-tasks 2 --num-pre-tasks 2 --num-test-tasks 1 --max-turns 2 --po-epochs 2
  launch "$config" "$(gpu_list "$GPUS")" grsu.py --run-name "smoke_grsu_$config" \
    --num-train-turns 2 --num-test 2 --beam-width 2 --expansion 2 --depth 1 --train-batch-size 8 --micro-batch-size 1
  launch "$config" "$(gpu_list "$GPUS")" smtpo.py --run-name "smoke_smtpo_$config" \
    --num-train 2 --num-test 2 --max-turns 2 --grpo-steps 2 --sft-batch-size 8
done
dry_run || echo "all GPU smoke runs finished; see runs/smoke_*/metrics.jsonl"
