#!/usr/bin/env bash
# Submit a multi-node GPU run of slayer_jax to SLURM (the job script is launch/slurm.sbatch).
#
#   launch/slurm.sh --nodes 2 --gpus-per-node 8 [--per node|gpu] --workdir gs://B/RUN|/shared/RUN \
#       [--venv DIR] [--partition P] [--time 24:00:00] [--grace 120] [--job-name slayer] [--dry-run] \
#       -- slayer train --config configs/slayer_llama2_7b.py ...
#
# --per node (default): one process per node, driving all its GPUs; --per gpu: one process per GPU.
# --workdir (gs:// or an absolute path on a filesystem every node shares) is appended to the
#   command as --config.workdir=WORKDIR and --config.export_dir=WORKDIR/export unless the command
#   sets them.
# Preemption: the job is --requeue'd with --signal=TERM@GRACE (default 120 s before the time
#   limit); slayer train saves and exits 0, the job requeues itself and resumes (launch/slurm.sbatch).
# --venv: a virtualenv on the nodes with the package and jax[cuda12], activated in the job.
# --dry-run prints the sbatch command, then what the job script runs on the first node.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DRY_RUN=0
NODES=""
GPUS=""
PER="node"
WORKDIR=""
VENV=""
PARTITION=""
TIME=""
GRACE=120
JOB="slayer"
CMD=()

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2; }
die() { echo "slurm.sh: $*" >&2; exit 2; }
q() {  # the words, quoted only where the shell needs it (readable, and safe to paste)
  local w out=()
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$w"); else out+=("'${w//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --nodes) NODES="$2"; shift ;;
    --gpus-per-node) GPUS="$2"; shift ;;
    --per) PER="$2"; shift ;;
    --workdir) WORKDIR="${2%/}"; shift ;;
    --venv) VENV="$2"; shift ;;
    --partition) PARTITION="$2"; shift ;;
    --time) TIME="$2"; shift ;;
    --grace) GRACE="$2"; shift ;;
    --job-name) JOB="$2"; shift ;;
    --) shift; CMD=("$@"); break ;;
    -h|--help) usage ;;
    *) die "unknown argument '$1' (--help lists them)" ;;
  esac
  shift
done
[[ -n "$NODES" && -n "$GPUS" ]] || die "--nodes and --gpus-per-node are required"
[[ ${#CMD[@]} -gt 0 ]] || die "give the command after --"
[[ "$WORKDIR" == gs://* || "$WORKDIR" == /* ]] || \
  die "--workdir must be gs://... or an absolute path on a filesystem every node shares: '$WORKDIR'"
case "$PER" in
  node) TASKS=1 ;;
  gpu) TASKS="$GPUS" ;;
  *) die "--per is node or gpu, not '$PER'" ;;
esac

has_export=0
for a in "${CMD[@]}"; do
  case "$a" in
    --config.workdir=*) [[ "${a#*=}" == "$WORKDIR" ]] || die "the command's $a is not --workdir $WORKDIR" ;;
    --config.export_dir=*) has_export=1 ;;
  esac
done
if [[ ${#CMD[@]} -ge 2 && "${CMD[0]}" == slayer && "${CMD[1]}" == train ]]; then
  [[ " ${CMD[*]} " == *" --config.workdir="* ]] || CMD+=("--config.workdir=$WORKDIR")
  [[ $has_export -eq 1 ]] || CMD+=("--config.export_dir=$WORKDIR/export")
fi

EXPORTS="ALL,SLAYER_WORKDIR=$WORKDIR"
[[ -z "$VENV" ]] || EXPORTS+=",SLAYER_VENV=$VENV"
SBATCH=(sbatch "--job-name=$JOB" "--nodes=$NODES" "--gpus-per-node=$GPUS" "--ntasks-per-node=$TASKS"
        --requeue "--signal=TERM@$GRACE")
[[ -z "$PARTITION" ]] || SBATCH+=("--partition=$PARTITION")
[[ -z "$TIME" ]] || SBATCH+=("--time=$TIME")
SBATCH+=("--export=$EXPORTS" "$HERE/slurm.sbatch" "${CMD[@]}")

if [[ $DRY_RUN -eq 1 ]]; then
  q "${SBATCH[@]}"
  echo "# the job, on each of its $NODES nodes ($TASKS task(s) a node):"
  SLAYER_DRY_RUN=1 SLAYER_WORKDIR="$WORKDIR" SLAYER_VENV="" SLURM_JOB_ID=JOBID SLURM_NTASKS_PER_NODE="$TASKS" \
    SLURM_GPUS_ON_NODE="$GPUS" bash "$HERE/slurm.sbatch" "${CMD[@]}"
else
  "${SBATCH[@]}"
fi
