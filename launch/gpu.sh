#!/usr/bin/env bash
# Run a slayer_jax command on one GPU node (one process drives all local GPUs), or as one node's
# process of a multi-node job started by a scheduler that sets torchrun-style variables.
#
#   launch/gpu.sh [--dry-run] [--install] [--gpus 0,1,2,3] [--log FILE] -- slayer train --config configs/slayer_llama2_7b.py ...
#
# --install runs `pip install -e . 'jax[cuda12]'` first. The mesh comes from the config
# (--config.mesh=data=1,fsdp=-1,tensor=1 uses every visible GPU).
# Several nodes: under SLURM use launch/slurm.sh. Elsewhere, when MASTER_ADDR, WORLD_SIZE > 1 and
# RANK are set (one process per node; MASTER_PORT default 29500) and JAX's own variables are not,
# they become JAX_COORDINATOR_ADDRESS=MASTER_ADDR:MASTER_PORT, JAX_NUM_PROCESSES=WORLD_SIZE and
# JAX_PROCESS_ID=RANK, which slayer_jax reads; the workdir must then be shared (gs:// or a shared disk).
set -euo pipefail

DRY_RUN=0
INSTALL=0
GPUS=""
LOG="gpu_run.log"
CMD=()
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --install) INSTALL=1 ;;
    --gpus) GPUS="$2"; shift ;;
    --log) LOG="$2"; shift ;;
    --) shift; CMD=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "gpu.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
[[ ${#CMD[@]} -gt 0 ]] || { echo "gpu.sh: give the command after --" >&2; exit 2; }

run() {
  if [[ $DRY_RUN -eq 1 ]]; then printf '%q ' "$@"; printf '\n'; else "$@"; fi
}

if [[ $INSTALL -eq 1 ]]; then run python3 -m pip install -e . 'jax[cuda12]'; fi
if [[ -n "$GPUS" ]]; then export CUDA_VISIBLE_DEVICES="$GPUS"; fi
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
if [[ -n "${MASTER_ADDR:-}" && "${WORLD_SIZE:-1}" -gt 1 && -n "${RANK:-}" && -z "${JAX_COORDINATOR_ADDRESS:-}" ]]; then
  export JAX_COORDINATOR_ADDRESS="$MASTER_ADDR:${MASTER_PORT:-29500}" JAX_NUM_PROCESSES="$WORLD_SIZE" JAX_PROCESS_ID="$RANK"
fi
if [[ $DRY_RUN -eq 1 ]]; then
  echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-all} XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
  if [[ -n "${JAX_COORDINATOR_ADDRESS:-}" ]]; then
    echo "JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES=${JAX_NUM_PROCESSES:-} JAX_PROCESS_ID=${JAX_PROCESS_ID:-}"
  fi
  printf '%q ' "${CMD[@]}"; printf '\n'
else
  set -o pipefail
  "${CMD[@]}" 2>&1 | tee "$LOG"
fi
