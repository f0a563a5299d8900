#!/usr/bin/env bash
# Run slayer_jax on a Cloud TPU VM or pod slice (a queued resource), on every worker at once.
#
#   launch/tpu_vm.sh all     --name N --zone Z --type v5p-32 --workdir gs://BUCKET/RUN [--spot|--best-effort] -- slayer train ...
#   launch/tpu_vm.sh create  --name N --zone Z --type v5p-32 [--spot|--best-effort]   # queue it, wait for ACTIVE
#   launch/tpu_vm.sh install --name N --zone Z --type v5p-32                           # ship the code, Python venv
#   launch/tpu_vm.sh run     --name N --zone Z --type v5p-32 --workdir gs://BUCKET/RUN -- slayer train ...
#   launch/tpu_vm.sh status  --name N --zone Z [--workdir gs://BUCKET/RUN]
#   launch/tpu_vm.sh logs    --name N --zone Z [--out DIR]     # each worker's ~/slayer_logs/*.log
#   launch/tpu_vm.sh delete  --name N --zone Z
#
# all: create, install, run. When the run was preempted (run_status.json says "preempted", or the
#   slice is SUSPENDED or gone), it deletes the queued resource, recreates it, reinstalls and reruns;
#   `slayer train` resumes from WORKDIR's last checkpoint. At most --max-retries N (default 5)
#   times. A run that stops on an ACTIVE slice without a preemption (a crash) is not retried. The slice is deleted only once run_status.json says
#   "complete" and EXPORT/config.json is on gs://; otherwise it is kept, and this says so.
# --workdir gs://...: required for `slayer train` (checkpoints, export, TensorBoard, metrics,
#   run_status.json; the workers' disks go with the slice). Appended to the command as
#   --config.workdir=WORKDIR and --config.export_dir=WORKDIR/export unless the command sets them.
# What is shipped, printed with its commit: --working-tree (default: tracked and untracked,
#   not ignored files, uncommitted edits included) or --ref REF (git archive of REF).
# Workers: a Python >= 3.11 from uv (--python, default 3.11) in ~/slayer_venv, with the package,
#   its [tpu] extra and jax[tpu]. Every worker's exit status is collected and printed; local
#   copies of their output go to --out (default tpu_logs).
# Other options: --version IMAGE (default by type: v4 tpu-ubuntu2204-base, v5litepod/v5e
#   v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e), --workers N (default from the
#   type), --project P, --wait-timeout S (for ACTIVE; default 21600), --dry-run (print every command
#   instead of running it; every poll then says ACTIVE and the run completes). Poll interval:
#   $SLAYER_TPU_POLL_S seconds (default 30).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DRY_RUN=0
NAME=""
ZONE=""
TYPE=""
VERSION=""
PROJECT=""
TIER=""         # --spot | --best-effort
WORKERS=""
WORKDIR=""
EXPORT=""
REF=""          # empty: ship the working tree
PYVER="3.11"
OUT="tpu_logs"
MAX_RETRIES=5
WAIT_TIMEOUT=21600
POLL="${SLAYER_TPU_POLL_S:-30}"
CMD=()

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2; }
say() { echo "tpu_vm.sh: $*" >&2; }
die() { say "$*"; exit 2; }

[[ $# -ge 1 && "$1" != -h && "$1" != --help ]] || usage
ACTION="$1"; shift
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name) NAME="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    --type) TYPE="$2"; shift ;;
    --version) VERSION="$2"; shift ;;
    --project) PROJECT="$2"; shift ;;
    --spot) TIER="--spot" ;;
    --best-effort) TIER="--best-effort" ;;
    --workers) WORKERS="$2"; shift ;;
    --workdir) WORKDIR="${2%/}"; shift ;;
    --ref) REF="$2"; shift ;;
    --working-tree) REF="" ;;
    --python) PYVER="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --max-retries) MAX_RETRIES="$2"; shift ;;
    --wait-timeout) WAIT_TIMEOUT="$2"; shift ;;
    --) shift; CMD=("$@"); break ;;
    -h|--help) usage ;;
    *) die "unknown argument '$1' (--help lists them)" ;;
  esac
  shift
done
[[ -n "$NAME" && -n "$ZONE" ]] || die "--name and --zone are required"
LOC=(--zone "$ZONE")
[[ -z "$PROJECT" ]] || LOC+=(--project "$PROJECT")
QR=(gcloud compute tpus queued-resources)
SSH=(gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}")

q() {  # the words, quoted only where the shell needs it (readable, and safe to paste)
  local w out=()
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$w"); else out+=("'${w//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

run() {  # dry run: print the command; else show it on stderr and run it
  if [[ $DRY_RUN -eq 1 ]]; then q "$@"; else echo "+ $(q "$@")" >&2; "$@"; fi
}

# ------------------------------------------------------------------ accelerator type -> image, workers
default_version() {
  case "$TYPE" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime image for --type '$TYPE'; give --version" ;;
  esac
}

default_workers() {  # 4 chips a VM; v4/v5p-N count TensorCores (2 a chip), v5e/v6e-N chips (8 fit one VM)
  local n=${TYPE##*-}
  [[ "$n" =~ ^[0-9]+$ ]] || die "cannot tell the number of workers of --type '$TYPE'; give --workers"
  case "$TYPE" in
    v4-*|v5p-*) n=$((n / 2)); [[ $n -gt 4 ]] || n=4 ;;
    *) [[ $n -gt 8 ]] || n=4 ;;
  esac
  echo $((n / 4))
}

need_workers() {
  if [[ -z "$WORKERS" ]]; then
    [[ -n "$TYPE" ]] || die "give --type (or --workers) to $ACTION"
    WORKERS=$(default_workers)
  fi
}

# ------------------------------------------------------------------ the command and its workdir
is_train() { [[ ${#CMD[@]} -ge 2 && "${CMD[0]}" == slayer && "${CMD[1]}" == train ]]; }

with_workdir() {  # append --config.workdir/export_dir unless given; EXPORT = where the HF export goes
  local a has_export=0
  [[ -n "$WORKDIR" ]] || die "give --workdir gs://BUCKET/RUN: checkpoints and the export must outlive the slice"
  [[ "$WORKDIR" == gs://* ]] || die "--workdir must be on gs:// (the workers' disks are deleted with the slice): '$WORKDIR'"
  EXPORT="$WORKDIR/export"
  for a in "${CMD[@]}"; do
    case "$a" in
      --config.workdir=*)
        [[ "${a#*=}" == "$WORKDIR" || "${a#*=}" == "$WORKDIR/" ]] || die "the command's $a is not --workdir $WORKDIR" ;;
      --config.export_dir=*) has_export=1; EXPORT="${a#*=}"; EXPORT="${EXPORT%/}" ;;
    esac
  done
  [[ " ${CMD[*]} " == *" --config.workdir="* ]] || CMD+=("--config.workdir=$WORKDIR")
  [[ $has_export -eq 1 ]] || CMD+=("--config.export_dir=$EXPORT")
}

# ------------------------------------------------------------------ queued resource
QR_STATE=""
read_qr_state() {  # QR_STATE: ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ... or GONE
  if [[ $DRY_RUN -eq 1 ]]; then
    run "${QR[@]}" describe "$NAME" "${LOC[@]}" --format='value(state.state)'
    QR_STATE=ACTIVE
    return
  fi
  QR_STATE=$("${QR[@]}" describe "$NAME" "${LOC[@]}" --format='value(state.state)' 2>/dev/null) || QR_STATE=GONE
  QR_STATE=${QR_STATE:-GONE}
}

do_create() {  # queue the slice, wait for ACTIVE; 1: it FAILED or was reclaimed meanwhile, 2: not created
  local create=("${QR[@]}")
  [[ -n "$TYPE" ]] || die "--type is required to create"
  [[ -n "$VERSION" ]] || VERSION=$(default_version)
  [[ "$TIER" != --best-effort ]] || create=(gcloud alpha compute tpus queued-resources)  # not in GA gcloud
  create+=(create "$NAME" --node-id "$NAME" "${LOC[@]}" --accelerator-type "$TYPE" --runtime-version "$VERSION")
  [[ -z "$TIER" ]] || create+=("$TIER")
  run "${create[@]}" || return 2
  local start=$SECONDS
  while :; do
    read_qr_state
    case "$QR_STATE" in
      ACTIVE) say "queued resource $NAME is ACTIVE"; return 0 ;;
      FAILED|SUSPENDING|SUSPENDED|GONE) say "queued resource $NAME is $QR_STATE"; return 1 ;;
    esac
    if [[ $((SECONDS - start)) -ge $WAIT_TIMEOUT ]]; then
      say "queued resource $NAME still $QR_STATE after ${WAIT_TIMEOUT}s: left queued (launch/tpu_vm.sh delete --name $NAME --zone $ZONE removes it)"
      exit 1
    fi
    sleep "$POLL"
  done
}

do_delete() {
  run "${QR[@]}" delete "$NAME" "${LOC[@]}" --force --quiet
}

# ------------------------------------------------------------------ code and environment on the workers
TARBALL=""
ship() {  # build the tarball of what is shipped (once) and say what it is
  local top head changed
  top=$(git -C "$HERE/.." rev-parse --show-toplevel)
  head=$(git -C "$top" rev-parse HEAD)
  if [[ $DRY_RUN -eq 1 ]]; then
    TARBALL="${TMPDIR:-/tmp}/slayer_jax_src.tgz"
  else
    TMP=$(mktemp -d)
    TARBALL="$TMP/slayer_jax_src.tgz"
  fi
  if [[ -n "$REF" ]]; then
    head=$(git -C "$top" rev-parse --verify --quiet "$REF^{commit}") || die "--ref $REF: no such commit"
    say "shipping git ref $REF = commit $head (uncommitted changes are not shipped)"
    run git -C "$top" archive --format=tar.gz -o "$TARBALL" "$head"
    return
  fi
  changed=$(git -C "$top" status --porcelain | wc -l | tr -d ' ')
  if [[ "$changed" -gt 0 ]]; then
    say "shipping the working tree: commit $head + $changed uncommitted or untracked files (dirty)"
  else
    say "shipping the working tree: commit $head (clean)"
  fi
  if [[ $DRY_RUN -eq 1 ]]; then
    echo "git -C $(q "$top") ls-files -z -co --exclude-standard | tar -C $(q "$top") --null -T - -czf $(q "$TARBALL")"
  else
    git -C "$top" ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
      if [[ -e "$top/$f" || -L "$top/$f" ]]; then printf '%s\0' "$f"; fi   # tracked but deleted: left out
    done | tar -C "$top" --null -T - -czf "$TARBALL"
    say "tarball: $(du -h "$TARBALL" | cut -f1)"
  fi
}

install_cmd() {  # the remote install: unpack, uv, a Python >= 3.11 venv, the package
  echo "set -euo pipefail; rm -rf ~/slayer_jax ~/slayer_venv; mkdir -p ~/slayer_jax ~/slayer_logs;" \
    "tar -xzf ~/slayer_jax_src.tgz -C ~/slayer_jax; export PATH=\"\$HOME/.local/bin:\$PATH\";" \
    "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh;" \
    "uv python install $PYVER; uv venv --python $PYVER ~/slayer_venv;" \
    "uv pip install --python ~/slayer_venv/bin/python -e \"\$HOME/slayer_jax[tpu]\" \"jax[tpu]\""
}

run_cmd() {  # the remote run: pipefail; a SIGTERM lets the command save and stop, and its status is kept
  local env=""
  [[ "$WORKERS" -le 1 ]] || env="export SLAYER_MULTIHOST=1 && "
  echo "set -o pipefail; trap \"echo SIGTERM: waiting for the command to stop >&2\" TERM;" \
    "cd ~/slayer_jax && source ~/slayer_venv/bin/activate && $env{ $(q "${CMD[@]}") 2>&1" \
    "| (trap \"\" TERM; exec tee -p -a ~/slayer_logs/worker-\$(hostname).log); }; rc=\$?;" \
    "echo \"worker \$(hostname): exit \$rc\"; exit \$rc"
}

on_workers() {  # $1 what, $2 remote command: on every worker at once; prints each one's exit status
  local what=$1 cmd=$2 i rc pids=() summary="" bad=""
  if [[ $DRY_RUN -eq 1 ]]; then
    for ((i = 0; i < WORKERS; i++)); do run "${SSH[@]}" --worker="$i" --command "$cmd"; done
    return 0
  fi
  mkdir -p "$OUT"
  echo "+ $(q "${SSH[@]}" --worker=I --command "$cmd")  # I = 0..$((WORKERS - 1)), at once" >&2
  for ((i = 0; i < WORKERS; i++)); do
    if [[ $i -eq 0 ]]; then   # worker 0 on the terminal as well
      ( "${SSH[@]}" --worker=0 --command "$cmd" 2>&1 | tee -a "$OUT/$what-worker-0.log" ) &
    else
      "${SSH[@]}" --worker="$i" --command "$cmd" >>"$OUT/$what-worker-$i.log" 2>&1 &
    fi
    pids+=($!)
  done
  for ((i = 0; i < WORKERS; i++)); do
    rc=0
    wait "${pids[$i]}" || rc=$?
    summary+=" $i:$rc"
    [[ $rc -eq 0 ]] || bad+=" $i"
  done
  say "$what: exit status per worker (worker:status):$summary; output in $OUT/$what-worker-*.log"
  if [[ -n "$bad" ]]; then say "$what: FAILED on workers$bad"; return 1; fi
}

do_install() {
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:~/slayer_jax_src.tgz" "${LOC[@]}" --worker=all || return 1
  on_workers install "$(install_cmd)"
}

do_run() {
  [[ ${#CMD[@]} -gt 0 ]] || die "give the command after --"
  on_workers run "$(run_cmd)"
}

# ------------------------------------------------------------------ results
RUN_STATE=""
read_run_state() {  # RUN_STATE: running | preempted | complete (slayer train's run_status.json) | none
  local json
  if [[ $DRY_RUN -eq 1 ]]; then
    run gcloud storage cat "$WORKDIR/run_status.json"
    RUN_STATE=complete
    return
  fi
  echo "+ $(q gcloud storage cat "$WORKDIR/run_status.json")" >&2
  json=$(gcloud storage cat "$WORKDIR/run_status.json" 2>/dev/null) || json=""
  RUN_STATE=$(sed -n 's/.*"state": *"\([a-z]*\)".*/\1/p' <<<"$json")
  RUN_STATE=${RUN_STATE:-none}
  say "run status: ${json:-no $WORKDIR/run_status.json}"
}

export_on_gcs() {
  if [[ -z "$EXPORT" ]]; then say "no export asked for (--config.export_dir is empty)"; return 0; fi
  run gcloud storage ls "$EXPORT/config.json"
}

keep_slice() {
  say "$1: the slice is KEPT (launch/tpu_vm.sh delete --name $NAME --zone $ZONE deletes it); checkpoints: $WORKDIR"
  exit 1
}

do_all() {
  is_train || die "all runs \`slayer train ...\` (its run_status.json says when it is done)"
  with_workdir
  need_workers
  say "$NAME: $TYPE, $WORKERS worker(s); results in $WORKDIR"
  ship
  local attempt workers_ok reason rc
  for ((attempt = 1; ; attempt++)); do
    say "attempt $attempt (of at most $((MAX_RETRIES + 1)))"
    rc=0
    do_create || rc=$?
    if [[ $rc -eq 2 && $attempt -eq 1 ]]; then
      say "could not queue $NAME (see above; one of that name already? launch/tpu_vm.sh delete removes it)"
      exit 1
    elif [[ $rc -ne 0 ]]; then
      reason="the slice did not become ACTIVE (${QR_STATE:-not created})"
    elif ! do_install; then
      read_qr_state
      [[ "$QR_STATE" != ACTIVE ]] || keep_slice "install failed on an ACTIVE slice (not retried)"
      reason="install failed, slice $QR_STATE"
    else
      workers_ok=1
      do_run || workers_ok=0
      read_run_state
      if [[ "$RUN_STATE" == complete && $workers_ok -eq 1 ]]; then break; fi
      read_qr_state
      reason="run status $RUN_STATE, slice $QR_STATE, every worker exit 0: $([[ $workers_ok -eq 1 ]] && echo yes || echo no)"
      if [[ "$QR_STATE" == ACTIVE && "$RUN_STATE" != preempted ]]; then  # a crash, not a preemption
        keep_slice "the run stopped on an ACTIVE slice without a preemption ($reason); not retried, a rerun would fail the same way (launch/tpu_vm.sh logs fetches the logs)"
      fi
    fi
    [[ $attempt -le $MAX_RETRIES ]] || keep_slice "giving up after $attempt attempts ($reason)"
    say "attempt $attempt did not finish ($reason): deleting the slice, then recreate, reinstall, resume"
    do_delete || say "delete failed (already gone?); creating again"
  done
  export_on_gcs || keep_slice "the run says complete but $EXPORT/config.json is not on gs://"
  say "results verified on gs:// ($WORKDIR); deleting the slice"
  do_delete
}

TMP=""
cleanup() {
  local pid
  for pid in $(jobs -p); do kill "$pid" 2>/dev/null || true; done   # workers' ssh sessions, on an interrupt
  [[ -z "$TMP" ]] || rm -rf "$TMP"
}
trap cleanup EXIT

case "$ACTION" in
  create) do_create ;;
  install) need_workers; ship; do_install ;;
  run)
    need_workers
    if is_train; then with_workdir; fi
    do_run
    ;;
  status)
    run "${QR[@]}" describe "$NAME" "${LOC[@]}"
    if [[ -n "$WORKDIR" ]]; then read_run_state; echo "$RUN_STATE"; fi
    ;;
  logs) run mkdir -p "$OUT"; run gcloud compute tpus tpu-vm scp "$NAME:~/slayer_logs/*" "$OUT/" "${LOC[@]}" --worker=all ;;
  delete) do_delete ;;
  all) do_all ;;
  *) usage ;;
esac
