#!/usr/bin/env bash
# Run a slayer_jax command on one node with several GPUs (one process drives all local GPUs).
#
#   launch/gpu.sh [--dry-run] [--gpus 0,1,2,3] [--log FILE] -- slayer train --config configs/slayer_llama2_7b.py ...
#
# Installs nothing by default; --install runs `pip install -e . 'jax[cuda12]'` first. The mesh
# comes from the config (--config.mesh=data=1,fsdp=-1,tensor=1 uses every visible GPU).
set -euo pipefail

DRY_RUN=0
INSTALL=0
GPUS=""
LOG="gpu_run.log"
CMD=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --install) INSTALL=1 ;;
    --gpus) GPUS="$2"; shift ;;
    --log) LOG="$2"; shift ;;
    --) shift; CMD=("$@"); break ;;
    *) echo "gpu.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
[[ ${#CMD[@]} -gt 0 ]] || { echo "gpu.sh: give the command after --" >&2; exit 2; }

run() {
  if [[ $DRY_RUN -eq 1 ]]; then printf '%q ' "$@"; printf '\n'; else "$@"; fi
}

[[ $INSTALL -eq 1 ]] && run python3 -m pip install -e . 'jax[cuda12]'
if [[ -n "$GPUS" ]]; then export CUDA_VISIBLE_DEVICES="$GPUS"; fi
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
if [[ $DRY_RUN -eq 1 ]]; then
  echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-all} XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
  printf '%q ' "${CMD[@]}"; printf '\n'
else
  "${CMD[@]}" 2>&1 | tee "$LOG"
fi
