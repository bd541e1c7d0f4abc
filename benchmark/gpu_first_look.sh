#!/usr/bin/env bash
# The first look at a GPU: what one borrowed GPU (an H100 or H200) can tell in ten minutes, offline, on a stock PyTorch
# image (torch, transformers, accelerate, peft; no DeepSpeed, vLLM, tyro, datasets or wandb), from a copy of this
# repository alone: every model is built from a config with random weights (no hub, no model files). Each step is one
# process of benchmark/gpu_first_look.py under `timeout`, most telling first, and adds its rows, with its time and
# peak memory, to $FIRST_LOOK_OUT/table.md (default runs/gpu_first_look/); a step that fails or times out says so in
# its row and the others still run.
#
#   env         versions, the GPU, bf16 support, which optional packages and which of the scripts import    45 s
#   precision   a ~1B Llama in fp32 and in bf16 on one batch: completion log-probs, loss, gradient norm       75 s
#   dpo         one DPO step (ECPO's Eq. 3) of a LoRA policy in bf16: the loss starts at log 2, the margin rises   75 s
#   grpo        one GRPO update (SMTPO's Eq. 14) on HF-generate samples: the best output's log-prob rises       100 s
#   generation  Llama-3-8B's width (8 of its 32 layers) in bf16, sampled through the training loops' gathered
#               weights (common.distributed.generation_weights): tokens/s, peak memory                         120 s
#   resume      a full fine-tune through common/sft.py killed after its checkpoint at step 4 of 6, relaunched; it
#               must resume at step 4 and end with the uninterrupted run's weights                               150 s
#
# The limits add up to 565 s. The losses are the scripts' own where the scripts import, which needs tyro: put its
# wheels in a folder (on a machine with a network: `pip download tyro==1.0.17 -d wheels/`, which brings
# docstring-parser and typeguard along) and run with VENDOR=wheels/; they are installed from there alone, into
# $FIRST_LOOK_OUT/vendor. Without them each row says it used the equation as written in gpu_first_look.py.
#
#   bash benchmark/gpu_first_look.sh                        # on the GPU
#   DEVICE=cpu bash benchmark/gpu_first_look.sh             # tiny shapes on the CPU (tests/test_gpu_first_look.py)
#   STEPS="env resume" bash benchmark/gpu_first_look.sh     # some of the steps
#   LIMIT_SECONDS=300 bash benchmark/gpu_first_look.sh      # one time limit for every step (a slow machine)
#
# benchmark/gpu_smoke.sh is the longer session after it: 2 GPUs, DeepSpeed, vLLM and the embedded model files.
# Not run by the developers on a GPU (none was lent to them): its GPU figures are still to be measured.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${FIRST_LOOK_OUT:-runs/gpu_first_look}
STEPS=${STEPS:-env precision dpo grpo generation resume}
PYTHON=${PYTHON:-python}
declare -A LIMIT=([env]=45 [precision]=75 [dpo]=75 [grpo]=100 [generation]=120 [resume]=150)
mkdir -p "$OUT"
if [[ -n "${VENDOR:-}" ]]; then
  "$PYTHON" -m pip install --quiet --no-index --find-links "$VENDOR" --target "$OUT/vendor" "$VENDOR"/*.whl ||
    echo "gpu_first_look: the wheels in $VENDOR did not install; the steps run without them" >&2
  export PYTHONPATH="$OUT/vendor${PYTHONPATH:+:$PYTHONPATH}"
fi
TABLE=$OUT/table.md
printf '| step | check | seconds | peak GB | detail |\n|---|---|---|---|---|\n' >"$TABLE"
failed=0
for step in $STEPS; do
  limit=${LIMIT_SECONDS:-${LIMIT[$step]:-60}}
  started=$SECONDS
  timeout -k 10 "$limit" "$PYTHON" benchmark/gpu_first_look.py "$step" --device "$DEVICE" >"$OUT/$step.log" 2>&1
  status=$?
  grep '^| ' "$OUT/$step.log" >>"$TABLE"
  if [[ $status == 124 || $status == 137 ]]; then
    echo "| $step | timed out after $limit s | $((SECONDS - started)) | | see $OUT/$step.log |" >>"$TABLE"
  elif [[ $status != 0 ]]; then
    last=$(grep -v '^| ' "$OUT/$step.log" | tail -n 1 | tr '|' '/')
    echo "| $step | exit $status | $((SECONDS - started)) | | $last (see $OUT/$step.log) |" >>"$TABLE"
  fi
  [[ $status == 0 ]] || failed=1
done
cat "$TABLE"
exit $failed
