#!/usr/bin/env bash
# RSO, Tables IV and V: WI / PRS / Cred / Conv-SR / Dist-2 and Rec-SR / R@1 / R@5 on INSPIRED and ReDial, the SFT
# planner and a uniform-random planner beside RSO, and the strategy distribution by progress (Fig. 3).
#
# The paper's setting: Qwen2.5-7B-Instruct for every LLM expert (Preference Reasoner, Actor), the rewarder and the
# evaluator; RoBERTa as the Planner (METHODS.md: roberta-large) trained by SFT on INSPIRED's strategy labels (10
# epochs, AdamW, lr 6e-6, batch 16, linear decay), then entropy-regularized policy gradient (10 epochs x 100
# dialogues, at most 10 turns, lr 1e-4, gamma 0.99, 10 rewarder samples per turn, tau 0.75, beta_ent 0.01, one
# update at the end of each dialogue, no gradient clipping; rso.py adds its ema baseline and, by default, credits an
# accepted episode's turns left at r = 1, since Eq. 8 as printed pays stalling: docs/rso.md); bge-base-en-v1.5 as the
# entity embedder, K = 5; 99 test dialogues per dataset (INSPIRED's test split has 84 that name a KG film after
# their opening, and the run says so; ReDial's first 99 of 1,318). The user simulator is AILO on the same model
# (METHODS.md 4.8.3; the paper does not say).
# Targets: INSPIRED 3.8788 / 1.0000 / 3.8333 / .9798 / .9979 and .535 / .758 / .889;
#          ReDial   3.8393 / .9783 / 3.6271 / .9798 / .9974 and .566 / .742 / .884.
#
# Needs: 8 GPUs, a CUDA build of torch, `make install`, `pip install -r requirements-gpu.txt`, roberta-large and
# BAAI/bge-base-en-v1.5 in the local Hugging Face cache. Qwen2.5-7B-Instruct is served by vLLM on an
# OpenAI-compatible endpoint (the frozen roles are many short calls; a server batches them across ranks): the recipe
# starts it unless OPENAI_BASE_URL names one already running elsewhere.
# Episodes per update: NUM_ENVS (default 1, the paper's one update per dialogue: 1,000 updates, each played by the
# Planner it updates). NUM_ENVS=16 plays 16 dialogues together per update (63 on-policy updates, METHODS.md
# 4.8.5's batch of 16), much faster where the LLM server batches; more ranks than NUM_ENVS leave ranks idle in RL.
# It cannot run on this repository's CPU machine, and it has not been run by the developers (no GPU was available).
#
# GPUs: 0-3 serve Qwen2.5-7B-Instruct (a replica on each); 4-7 train and evaluate the Planner (4 ranks). SERVE_GPUS
# and TRAIN_GPUS move them; the two must not share a GPU (benchmark/lib.sh refuses a launch on a GPU the server
# holds).
# SFT batch: the paper's 16, in micro-batches of 2 (2 accumulation steps on 4 ranks); the micro-batch of 8 before
# split 16 over 1 or 2 ranks only.
# DRY_RUN=4 bash benchmark/rso_table.sh checks every command's flags, batches and data files for 4 processes
# without loading a model or starting a server.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
SERVE_GPUS=${SERVE_GPUS:-0,1,2,3}
TRAIN_GPUS=${TRAIN_GPUS:-4,5,6,7}
NUM_ENVS=${NUM_ENVS:-1}
LLM=openai:Qwen/Qwen2.5-7B-Instruct
if [[ -z "${OPENAI_BASE_URL:-}" ]]; then
  serve "$SERVE_GPUS" 8000 Qwen/Qwen2.5-7B-Instruct --data-parallel-size "$(gpu_count "$SERVE_GPUS")"
  export OPENAI_BASE_URL=http://localhost:8000/v1
fi
export OPENAI_API_KEY=${OPENAI_API_KEY:-none}
for dataset in inspired redial; do
  launch gpu_ddp "$TRAIN_GPUS" rso.py \
    --run-name "table_${dataset}" --dataset "$dataset" --data-dir "${DATA_DIR:-../shared/data}" --eval-split test \
    --num-test 99 --planner roberta-large --text-encoder BAAI/bge-base-en-v1.5 \
    --expert-llm "$LLM" --user-llm "$LLM" --judge-llm "$LLM" --evaluator-llm "$LLM" \
    --reasoner-max-tokens 128 --actor-max-tokens 128 --user-max-tokens 256 --user-parse-tries 3 \
    --sft-lr 6e-6 --sft-epochs 10 --sft-batch-size 16 --micro-batch-size 2 \
    --rl-episodes 1000 --max-turns 10 --num-envs "$NUM_ENVS" --baseline ema --rl-max-grad-norm inf \
    --judge-scoring sampled --reward-samples 10 --judge-max-tokens 4 --eval-num-envs 33 --track
done
stop_server
