# Sourced by the recipes in benchmark/: how a script is launched on its GPUs, and the vLLM servers beside it.
#
#   launch CONFIG GPUS SCRIPT [ARG...]    accelerate launch --config_file configs/CONFIG.yaml SCRIPT ARG..., one rank
#                                         on each GPU of the comma-separated list GPUS (as CUDA_VISIBLE_DEVICES, so
#                                         --num_processes always matches it)
#   run_single GPUS SCRIPT [ARG...]       python SCRIPT ARG... in one process that sees the GPUs GPUS
#   serve GPUS PORT MODEL [ARG...]        vllm serve MODEL on the GPUs GPUS in the background, then wait until it
#                                         answers; stop_server stops it (so does the recipe's exit, even on an error)
#   gpu_list N, gpu_count GPUS            0,1,...,N-1; the number of GPUs in a list
#
# STEP_TIMEOUT=SECONDS before launch or run_single stops that command after SECONDS (exit status 124).
#
# A launch on a GPU that the running server holds is refused: vLLM takes most of each GPU's memory, so a training
# rank there would run out of it.
#
# DRY_RUN=N bash benchmark/<recipe>.sh runs every command as `python SCRIPT ARG... --dry-run N` (N processes for a
# launch, 1 for run_single): each checks its flags, the division of every training batch over the processes and
# its data files, and exits without loading a model. No server starts, and the recipe skips what it guards with
# `dry_run ||` (copies between run folders, model downloads).

SERVER_PID=""
SERVER_GPUS=""

dry_run() { [[ -n "${DRY_RUN:-}" ]]; }

gpu_list() { seq -s, 0 $(($1 - 1)); }

gpu_count() { tr , '\n' <<<"$1" | grep -c .; }

refuse_server_gpus() {  # refuse_server_gpus GPUS WHAT: stop where WHAT would run on a GPU the server holds
  local gpu
  for gpu in ${1//,/ }; do
    if [[ ",$SERVER_GPUS," == *",$gpu,"* ]]; then
      echo "benchmark: $2 would run on GPU $gpu, which the vLLM server holds (GPUs $SERVER_GPUS)" >&2
      return 1
    fi
  done
}

launch() {
  local config=$1 gpus=$2
  shift 2
  refuse_server_gpus "$gpus" "$1" || return 1
  if dry_run; then
    echo "dry run, $DRY_RUN processes (for real: $(gpu_count "$gpus") on GPUs $gpus, configs/$config.yaml): $*"
    CUDA_VISIBLE_DEVICES=$gpus python "$@" --dry-run "$DRY_RUN"
  else
    CUDA_VISIBLE_DEVICES=$gpus ${STEP_TIMEOUT:+timeout "$STEP_TIMEOUT"} accelerate launch \
      --config_file "configs/$config.yaml" --num_processes "$(gpu_count "$gpus")" "$@"
  fi
}

run_single() {
  local gpus=$1
  shift
  refuse_server_gpus "$gpus" "$1" || return 1
  if dry_run; then
    echo "dry run, 1 process (for real: on GPUs $gpus): $*"
    CUDA_VISIBLE_DEVICES=$gpus python "$@" --dry-run 1
  else
    CUDA_VISIBLE_DEVICES=$gpus ${STEP_TIMEOUT:+timeout "$STEP_TIMEOUT"} python "$@"
  fi
}

serve() {
  local gpus=$1 port=$2
  shift 2
  if [[ -n "$SERVER_GPUS" ]]; then
    echo "benchmark: one server at a time: stop_server the one on GPUs $SERVER_GPUS before serving $1" >&2
    return 1
  fi
  SERVER_GPUS=$gpus
  if dry_run; then
    echo "dry run: would serve $1 on GPUs $gpus at port $port"
    return
  fi
  CUDA_VISIBLE_DEVICES=$gpus vllm serve "$@" --port "$port" &
  SERVER_PID=$!
  until curl -sf "localhost:$port/v1/models" >/dev/null; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "benchmark: vllm serve $1 exited before it answered on port $port" >&2
      return 1
    fi
    sleep 10
  done
}

stop_server() {
  if [[ -n "$SERVER_PID" ]]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true  # its GPU memory is free only once it has exited
  fi
  SERVER_PID=""
  SERVER_GPUS=""
}

trap stop_server EXIT
