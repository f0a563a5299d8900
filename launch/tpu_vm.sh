#!/usr/bin/env bash
# Run a slayer_jax command on a Cloud TPU VM or pod slice, on every worker at once.
#
#   launch/tpu_vm.sh create  --name NAME --zone ZONE --type v5p-32 [--version tpu-ubuntu2204-base] [--spot]
#   launch/tpu_vm.sh install --name NAME --zone ZONE [--repo GIT_URL --ref REF]   # default: ship this checkout
#   launch/tpu_vm.sh run     --name NAME --zone ZONE -- slayer train --config configs/slayer_llama2_7b.py ...
#   launch/tpu_vm.sh logs    --name NAME --zone ZONE [--out DIR]
#   launch/tpu_vm.sh delete  --name NAME --zone ZONE
#   launch/tpu_vm.sh all     --name NAME --zone ZONE --type v5p-32 -- <command>   # create, install, run, logs, delete
#
# --dry-run prints every gcloud command instead of running it. Multi-host: the same command
# runs on --worker=all; jax.distributed.initialize() picks the coordinator up from the TPU
# metadata, so nothing else is needed. Each worker's output goes to
# ~/slayer_logs/worker-HOSTNAME.log on each worker; `logs` copies them all back.
set -euo pipefail

DRY_RUN=0
NAME=""
ZONE=""
TYPE=""
VERSION="tpu-ubuntu2204-base"
PROJECT=""
SPOT=0
REPO=""  # empty: ship this checkout's HEAD with git archive + scp
REF="main"
TARBALL="${TMPDIR:-/tmp}/slayer_jax_src.tgz"
OUT="tpu_logs"
CMD=()

usage() { sed -n '2,16p' "$0"; exit 2; }

[[ $# -ge 1 ]] || usage
ACTION="$1"; shift
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name) NAME="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    --type) TYPE="$2"; shift ;;
    --version) VERSION="$2"; shift ;;
    --project) PROJECT="$2"; shift ;;
    --spot) SPOT=1 ;;
    --repo) REPO="$2"; shift ;;
    --ref) REF="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --) shift; CMD=("$@"); break ;;
    *) echo "tpu_vm.sh: unknown argument '$1'" >&2; usage ;;
  esac
  shift
done
[[ -n "$NAME" && -n "$ZONE" ]] || { echo "tpu_vm.sh: --name and --zone are required" >&2; exit 2; }

PROJECT_ARGS=()
[[ -n "$PROJECT" ]] && PROJECT_ARGS=(--project "$PROJECT")

run() {  # print (dry run) or execute one command
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}

ssh_all() {  # run a shell snippet on every worker
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all --command "$1"
}

do_create() {
  [[ -n "$TYPE" ]] || { echo "tpu_vm.sh: --type is required to create" >&2; exit 2; }
  local extra=()
  [[ $SPOT -eq 1 ]] && extra=(--spot)
  run gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" "${PROJECT_ARGS[@]}" \
    --accelerator-type "$TYPE" --version "$VERSION" "${extra[@]}"
}

do_install() {
  local fetch
  if [[ -n "$REPO" ]]; then
    fetch="git clone --depth 1 --branch $REF $REPO ~/slayer_jax"
  else
    run git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$TARBALL" HEAD
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:~/slayer_jax_src.tgz" --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all
    fetch="mkdir -p ~/slayer_jax && tar -xzf ~/slayer_jax_src.tgz -C ~/slayer_jax"
  fi
  ssh_all "set -e; rm -rf ~/slayer_jax && $fetch && python3 -m pip install -U pip && python3 -m pip install -e ~/slayer_jax 'jax[tpu]' && mkdir -p ~/slayer_logs"
}

do_run() {
  [[ ${#CMD[@]} -gt 0 ]] || { echo "tpu_vm.sh: give the command after --" >&2; exit 2; }
  local quoted
  quoted=$(printf '%q ' "${CMD[@]}")
  ssh_all "cd ~/slayer_jax && export SLAYER_MULTIHOST=1 && ($quoted) 2>&1 | tee ~/slayer_logs/worker-\$(hostname).log"
}

do_logs() {
  run mkdir -p "$OUT"
  run gcloud compute tpus tpu-vm scp "$NAME:~/slayer_logs/*" "$OUT/" --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all
}

do_delete() {
  run gcloud compute tpus tpu-vm delete "$NAME" --zone "$ZONE" "${PROJECT_ARGS[@]}" --quiet
}

case "$ACTION" in
  create) do_create ;;
  install) do_install ;;
  run) do_run ;;
  logs) do_logs ;;
  delete) do_delete ;;
  all)
    do_create
    do_install
    status=0
    do_run || status=$?
    do_logs || true
    do_delete
    exit "$status"
    ;;
  *) usage ;;
esac
