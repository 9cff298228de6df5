#!/usr/bin/env bash
# Shared code of the Slurm job scripts (sourced by slurm/*_t5xl.sh and slurm/prep_*.sh; not submitted itself).
#
# Training jobs (train_job):
#   one node      the batch shell runs the `deepspeed` launcher
#   several nodes `srun` starts one `torchrun --rdzv_backend c10d` per node (rendezvous on the first node);
#                 each runs under `bash slurm/lib.sh node ...`, which passes stop requests to its local ranks
# Stop signals: USR1 (Slurm's warning, `--signal=B:USR1@T`, or `scancel --batch --signal=USR1 JOB`) makes the
# training ranks checkpoint and exit 0, then the job requeues itself (`scontrol requeue`) and resumes from
# RUN_DIR on restart. TERM (`scancel --batch --signal=TERM JOB`) stops with a checkpoint but does not requeue.
# The launchers never receive these signals (DeepSpeed's and torchrun's die on USR1, and kill their ranks with a
# short grace period on TERM): they go straight to the ranks, found as the topmost processes under the launcher
# whose environment holds LOCAL_RANK (data-loader workers below them are left alone), and USR1 only once every
# rank has installed its handler (until then the request is retried every second). On several nodes the batch
# shell writes the request to a file in RUN_DIR (shared storage) that each node's wrapper polls every second.
#
# Every setting is an environment variable; docs/cluster.md lists them with their defaults.

hypertrain_log() { echo "[$(date '+%Y-%m-%d %H:%M:%S')] hypertrain-slurm: $*"; }

hypertrain_die() {
  echo "[$(date '+%Y-%m-%d %H:%M:%S')] hypertrain-slurm: error: $*" >&2
  exit 1
}

# The repository (sbatch copies the job script to a spool directory, so $0 does not point into the repo).
hypertrain_repo() {
  local repo=${HYPERTRAIN_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
  [ -f "$repo/hypertrain/main.py" ] || hypertrain_die "$repo is not a hypertrain checkout; submit from the \
repository root or set HYPERTRAIN_REPO"
  echo "$repo"
}

# Activate VENV (default: <repo>/.venv) when it exists; otherwise use whatever python/deepspeed is on PATH.
hypertrain_activate() {
  local venv=${VENV:-$1/.venv}
  if [ -f "$venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    . "$venv/bin/activate"
  elif [ -n "${VENV:-}" ]; then
    hypertrain_die "VENV=$VENV has no bin/activate"
  fi
}

# rank_pids ROOT: the topmost descendants of ROOT whose environment holds LOCAL_RANK (the training ranks).
rank_pids() {
  local table queue pid child
  table=$(ps -e -o pid=,ppid=)
  queue=("$1")
  while [ "${#queue[@]}" -gt 0 ]; do
    pid=${queue[0]}
    queue=("${queue[@]:1}")
    while read -r child; do
      if tr '\0' '\n' <"/proc/$child/environ" 2>/dev/null | grep -q '^LOCAL_RANK='; then
        echo "$child"
      else
        queue+=("$child")
      fi
    done < <(awk -v parent="$pid" '$2 == parent { print $1 }' <<<"$table")
  done
}

# catches SIGNAL PID: PID has a handler for SIGNAL (the SigCgt mask of /proc/PID/status has its bit).
catches() {
  local number mask
  number=$(kill -l "$1" 2>/dev/null) || return 1
  mask=$(awk '/^SigCgt:/ { print $2 }' "/proc/$2/status" 2>/dev/null)
  [ -n "$mask" ] && (( (16#$mask >> (number - 1)) & 1 ))
}

# signal_ranks SIGNAL ROOT: send SIGNAL to the training ranks under ROOT. Fails, sending nothing, while there is no
# rank yet or (USR1) some rank has not installed its handler yet: USR1 would kill a rank that is still starting.
signal_ranks() {
  local pids pid
  pids=$(rank_pids "$2" | tr '\n' ' ')
  [ -n "${pids// /}" ] || return 1
  if [ "$1" = USR1 ]; then
    for pid in $pids; do
      catches USR1 "$pid" || return 1
    done
  fi
  hypertrain_log "sending SIG$1 to training ranks (pids ${pids% })"
  # shellcheck disable=SC2086
  kill -s "$1" $pids 2>/dev/null
  return 0
}

# run_forwarding MODE CMD...: run CMD in the background and wait for it, passing on a USR1/TERM received meanwhile:
#   MODE=ranks  send it to the training ranks under CMD (retried until a rank exists); also act on a request
#               written to $HYPERTRAIN_STOP_FILE (how the batch shell reaches the ranks of every node)
#   MODE=file   write it to $HYPERTRAIN_STOP_FILE (multi-node batch shell; RUN_DIR is on a shared file system)
# A signal is never sent to srun or a launcher: Slurm would deliver it to every process of the step (launchers and
# data-loader workers included), and the launchers die on USR1. Sets HYPERTRAIN_STATUS (CMD's exit code) and
# HYPERTRAIN_STOP (the last signal asked for).
run_forwarding() {
  local mode=$1
  shift
  HYPERTRAIN_STOP=""
  local pending="" seen="" request=""
  trap 'pending=USR1; HYPERTRAIN_STOP=USR1' USR1
  trap 'pending=TERM; HYPERTRAIN_STOP=TERM' TERM
  "$@" &
  local pid=$! deferred=0
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$mode" = ranks ] && [ -n "${HYPERTRAIN_STOP_FILE:-}" ] && [ -s "$HYPERTRAIN_STOP_FILE" ]; then
      request=$(cat "$HYPERTRAIN_STOP_FILE" 2>/dev/null)
      if [ -n "$request" ] && [ "$request" != "$seen" ]; then
        seen=$request
        pending=${request%% *}
        HYPERTRAIN_STOP=$pending
      fi
    fi
    if [ -n "$pending" ]; then
      if [ "$mode" = file ]; then
        echo "$pending $(date +%s.%N)" >"$HYPERTRAIN_STOP_FILE.tmp" && mv -f "$HYPERTRAIN_STOP_FILE.tmp" "$HYPERTRAIN_STOP_FILE"
        hypertrain_log "asked every node for SIG$pending to its training ranks (via $HYPERTRAIN_STOP_FILE)"
        pending=""
      elif signal_ranks "$pending" "$pid"; then
        pending=""
      else
        [ $((deferred % 10)) -eq 0 ] && hypertrain_log "SIG$pending received but the training ranks are not \
running (or not ready) yet; retrying every second"
        deferred=$((deferred + 1))
      fi
    fi
    sleep 1 &
    wait "$!" 2>/dev/null  # returns at once when a trapped signal arrives
  done
  wait "$pid"
  HYPERTRAIN_STATUS=$?
  trap - USR1 TERM
}

# The reason stored with RUN_DIR's latest checkpoint ("signal SIGUSR1", "end of training", ...), or nothing.
checkpoint_reason() {
  python - "$1" <<'EOF'
import json, sys
from pathlib import Path
root = Path(sys.argv[1]) / "checkpoints"
pointer = root / "latest"
if pointer.is_file():
    state = json.loads((root / pointer.read_text().strip() / "hypertrain_state.json").read_text())
    print(state.get("reason", ""))
EOF
}

# train_job CONFIG RUN_DIR [override ...]: the body of slurm/{hart,hypertuning,pha}_t5xl.sh.
train_job() {
  local repo
  repo=$(hypertrain_repo) || exit 1
  cd "$repo" || exit 1
  hypertrain_activate "$repo"

  local config=$1 run_dir=$2
  shift 2
  local ds_config=${DS_CONFIG:-ds_configs/zero2.json}
  local gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
  local nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  local job=${SLURM_JOB_ID:-0}
  local port=${MASTER_PORT:-$((29500 + job % 10000))}
  local launcher=${LAUNCHER:-auto}
  local head
  head=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname -s)}" 2>/dev/null | head -n 1)
  head=${head:-$(hostname -s)}
  [ "$launcher" = auto ] && { [ "$nnodes" -gt 1 ] && launcher=torchrun || launcher=deepspeed; }

  [ -f "$config" ] || hypertrain_die "CONFIG=$config not found (relative paths are relative to $repo)"
  [ -f "$ds_config" ] || hypertrain_die "DS_CONFIG=$ds_config not found"
  [[ "$gpus" =~ ^[1-9][0-9]*$ ]] || hypertrain_die "GPUS_PER_NODE must be a positive integer, got '$gpus' \
(ranks per node; on CPU-only nodes set it explicitly)"
  if [ "$launcher" = deepspeed ] && [ "$nnodes" -gt 1 ]; then
    hypertrain_die "LAUNCHER=deepspeed runs one node only; several nodes use LAUNCHER=torchrun (the default)"
  fi

  local overrides=()
  read -r -a overrides <<<"${OVERRIDES:-}"
  local args=(hypertrain/main.py --config "$config" --ds_config "$ds_config" "run.dir=$run_dir" "${overrides[@]}" "$@")

  hypertrain_log "job ${job} SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0} nodes=${nnodes} (${SLURM_JOB_NODELIST:-local}) \
ranks/node=${gpus} launcher=${launcher} head=${head}:${port}"
  hypertrain_log "config=${config} ds_config=${ds_config} run_dir=${run_dir} \
tracking=${MLFLOW_TRACKING_URI:-sqlite:///${run_dir}/mlflow.db} overrides: ${overrides[*]} $*"

  if [ "$launcher" = deepspeed ]; then
    run_forwarding ranks deepspeed --num_gpus "$gpus" --master_port "$port" "${args[@]}"
  elif [ "$launcher" = torchrun ]; then
    if [ -n "${SLURM_JOB_ID:-}" ]; then
      mkdir -p "$run_dir" || hypertrain_die "cannot create RUN_DIR=$run_dir"
      export HYPERTRAIN_STOP_FILE="$run_dir/.slurm-stop-${job}-${SLURM_RESTART_COUNT:-0}"
      rm -f "$HYPERTRAIN_STOP_FILE"
      run_forwarding file srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 \
        --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 --export=ALL \
        bash "$repo/slurm/lib.sh" node \
        torchrun --nnodes "$nnodes" --nproc_per_node "$gpus" --rdzv_backend c10d \
        --rdzv_endpoint "$head:$port" --rdzv_id "$job" "${args[@]}"
    else
      run_forwarding ranks torchrun --nnodes 1 --nproc_per_node "$gpus" --rdzv_backend c10d \
        --rdzv_endpoint "localhost:$port" --rdzv_id "$job" "${args[@]}"
    fi
  else
    hypertrain_die "LAUNCHER must be auto, deepspeed or torchrun, got '$launcher'"
  fi

  local status=$HYPERTRAIN_STATUS
  [ -n "${HYPERTRAIN_STOP_FILE:-}" ] && rm -f "$HYPERTRAIN_STOP_FILE"
  hypertrain_log "trainer exited with status ${status}${HYPERTRAIN_STOP:+ after SIG$HYPERTRAIN_STOP}"
  if [ "$HYPERTRAIN_STOP" = USR1 ] && [ "$status" -eq 0 ] && [ "${REQUEUE_ON_SIGNAL:-1}" = 1 ]; then
    local reason
    reason=$(checkpoint_reason "$run_dir")
    if [[ "$reason" == signal* ]] && [ -n "${SLURM_JOB_ID:-}" ]; then
      hypertrain_log "checkpoint written ($reason); requeueing job $SLURM_JOB_ID to resume from $run_dir"
      scontrol requeue "$SLURM_JOB_ID" || hypertrain_die "scontrol requeue $SLURM_JOB_ID failed; resubmit \
the same command to resume from $run_dir"
    else
      hypertrain_log "not requeueing: the latest checkpoint's reason is '${reason:-none}'"
    fi
  fi
  return "$status"
}

# prep_array_job MODULE SRC OUT SPLITS [extra prep args...]: one piece of a prep job array (data_prep.sni or
# data_prep.p3) for each split, as piece (task id - first id) of (array size); the first task submits the merge job
# (slurm/prep_merge.sh, --dependency=afterok on the whole array) unless SUBMIT_MERGE=0.
prep_array_job() {
  local repo
  repo=$(hypertrain_repo) || exit 1
  cd "$repo" || exit 1
  hypertrain_activate "$repo"
  local module=$1 src=$2 out=$3 splits=$4
  shift 4
  local extra=()
  read -r -a extra <<<"${PREP_ARGS:-}"
  local first=${SLURM_ARRAY_TASK_MIN:-0}
  local index=$(( ${SLURM_ARRAY_TASK_ID:-0} - first ))
  local pieces=${NUM_JOBS:-${SLURM_ARRAY_TASK_COUNT:-1}}
  local workers=${WORKERS:-${SLURM_CPUS_PER_TASK:-1}}
  [ -e "$src" ] || hypertrain_die "source $src not found (relative paths are relative to $repo)"
  if [ "$index" -eq 0 ] && [ "${SUBMIT_MERGE:-1}" = 1 ] && [ "${SLURM_RESTART_COUNT:-0}" = 0 ] \
    && [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
    local dirs=() split merge_id
    for split in $splits; do dirs+=("$out/$split"); done
    local merge_args=()
    read -r -a merge_args <<<"${MERGE_SBATCH_ARGS:-}"
    merge_id=$(MERGE_DIRS="${dirs[*]}" sbatch --parsable --dependency="afterok:${SLURM_ARRAY_JOB_ID}" \
      --job-name="${SLURM_JOB_NAME:-prep}_merge" --export=ALL "${merge_args[@]}" "$repo/slurm/prep_merge.sh") \
      || hypertrain_die "could not submit the merge job"
    hypertrain_log "submitted merge job ${merge_id} (after array ${SLURM_ARRAY_JOB_ID} succeeds): ${dirs[*]}"
  fi
  hypertrain_log "array ${SLURM_ARRAY_JOB_ID:-none} task ${SLURM_ARRAY_TASK_ID:-0}: piece ${index} of ${pieces}, \
splits: ${splits}, workers ${workers}"
  for split in $splits; do
    python -m "$module" --src "$src" --out "$out/$split" --split "$split" --num-jobs "$pieces" \
      --job-index "$index" --workers "$workers" "${extra[@]}" "$@" || hypertrain_die "$module --split $split failed"
  done
}

# Per-node wrapper of multi-node jobs: `bash slurm/lib.sh node CMD...` runs CMD and sends its ranks the signal the
# batch shell writes to $HYPERTRAIN_STOP_FILE (and any USR1/TERM it receives itself).
if [ "${BASH_SOURCE[0]}" = "$0" ] && [ "${1:-}" = node ]; then
  shift
  run_forwarding ranks "$@"
  exit "$HYPERTRAIN_STATUS"
fi
