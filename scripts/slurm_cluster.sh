#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, to try slurm/*.sh on a laptop or a CI runner.
#
#   sudo bash scripts/slurm_cluster.sh up       # write slurm.conf, start munged, slurmctld, slurmd; wait for the node
#   sudo bash scripts/slurm_cluster.sh status   # daemons and node state
#   sudo bash scripts/slurm_cluster.sh down     # stop the daemons this script started
#
# Needs root (the daemons run as root, SlurmUser=root) and Debian/Ubuntu's packages:
#   apt-get install -y slurm-wlm munge
# `up` is idempotent: daemons already running are left alone, a node left DOWN/DRAINED is resumed.
#
# Environment (defaults in brackets):
#   SLURM_CONF          slurm.conf to write [/etc/slurm/slurm.conf]; an existing file not written by this
#                       script is never overwritten unless SLURM_CLUSTER_FORCE=1
#   SLURM_CLUSTER_DIR   state, spool, logs and pid files [/var/lib/hypertrain-slurm]
#   SLURM_CLUSTER_NAME  ClusterName and PartitionName [hypertrain / debug]
#   SLURM_CLUSTER_WAIT  seconds to wait for the node to become idle [60]
#
# The configuration is the smallest that runs the job scripts without cgroups: ProctrackType=proctrack/linuxproc,
# TaskPlugin=task/none, SelectType=select/cons_tres (cores; memory is not a consumable resource), no accounting
# database (use `squeue`/`scontrol show job`; `sacct` is not available), the node described by `slurmd -C`.
set -uo pipefail

ACTION=${1:-up}
SLURM_CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
STATE=${SLURM_CLUSTER_DIR:-/var/lib/hypertrain-slurm}
CLUSTER=${SLURM_CLUSTER_NAME:-hypertrain}
WAIT=${SLURM_CLUSTER_WAIT:-60}
MARKER="# written by hypertrain scripts/slurm_cluster.sh"
export SLURM_CONF

die() {
  echo "slurm_cluster: $*" >&2
  exit 1
}

log() { echo "slurm_cluster: $*"; }

require_tools() {
  local missing=()
  for tool in munged munge unmunge slurmctld slurmd sinfo scontrol sbatch; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    die "missing ${missing[*]}; install them with: apt-get install -y slurm-wlm munge"
  fi
  [ "$(id -u)" -eq 0 ] || die "must run as root (the daemons run as root with SlurmUser=root); try sudo"
}

pid_alive() {  # pid_alive FILE: the pid in FILE is a running process
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_conf() {
  local host node_line
  host=$(hostname -s)
  # slurmd -C prints this machine's NodeName line (CPUs, sockets, cores, threads, RealMemory)
  node_line=$(slurmd -C 2>/dev/null | grep '^NodeName=') || die "slurmd -C could not describe this node"
  # announce 95% of the memory: a node that reports less than slurm.conf says is drained ("Low RealMemory")
  local memory
  memory=$(sed -nE 's/.*RealMemory=([0-9]+).*/\1/p' <<<"$node_line")
  [ -n "$memory" ] && node_line=${node_line/RealMemory=$memory/RealMemory=$((memory * 95 / 100))}
  if [ -e "$SLURM_CONF" ] && ! grep -qF "$MARKER" "$SLURM_CONF" && [ "${SLURM_CLUSTER_FORCE:-0}" != 1 ]; then
    die "$SLURM_CONF exists and was not written by this script; set SLURM_CLUSTER_FORCE=1 to replace it"
  fi
  mkdir -p "$(dirname "$SLURM_CONF")" "$STATE/ctld" "$STATE/spool" "$STATE/log" "$STATE/run"
  local tmp="$SLURM_CONF.tmp.$$"
  cat >"$tmp" <<EOF
$MARKER
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  if [ -e "$SLURM_CONF" ] && cmp -s "$tmp" "$SLURM_CONF"; then
    rm -f "$tmp"
  else
    mv "$tmp" "$SLURM_CONF"
    log "wrote $SLURM_CONF ($node_line)"
  fi
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null 2>&1; then
      mungekey --create --keyfile=/etc/munge/munge.key || die "mungekey could not create /etc/munge/munge.key"
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none || die "could not create a munge key"
    fi
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
  fi
  # munged runs as root here (like the Slurm daemons), so its directories belong to root
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown root:root /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  chmod 0755 /run/munge
  chmod 0700 /var/log/munge /var/lib/munge
  # --force: start although it runs as root and owns the socket directory (containers, CI)
  munged --force --pid-file="$STATE/run/munged.pid" || die "munged did not start (see /var/log/munge/munged.log)"
  for _ in $(seq 20); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  die "munged started but credentials do not verify (munge -n | unmunge fails)"
}

start_daemon() {  # start_daemon NAME
  local name=$1 pidfile="$STATE/run/$1.pid"
  if pid_alive "$pidfile"; then
    return 0
  fi
  "$name" -f "$SLURM_CONF" || die "$name did not start; see $STATE/log/$name.log"
  for _ in $(seq 20); do
    pid_alive "$pidfile" && return 0
    sleep 0.5
  done
  die "$name exited right after starting; last lines of $STATE/log/$name.log:
$(tail -n 15 "$STATE/log/$name.log" 2>/dev/null)"
}

node_state() {
  sinfo -h -N -o '%T' 2>/dev/null | head -n 1
}

up() {
  require_tools
  write_conf
  start_munge
  # a changed slurm.conf needs a restart of running daemons
  if pid_alive "$STATE/run/slurmctld.pid" && [ "$SLURM_CONF" -nt "$STATE/run/slurmctld.pid" ]; then
    stop_daemon slurmd
    stop_daemon slurmctld
  fi
  start_daemon slurmctld
  start_daemon slurmd
  local state=""
  for _ in $(seq "$((WAIT * 2))"); do
    state=$(node_state)
    case "$state" in
      idle* | mixed* | allocated* | completing*) break ;;
      down* | drain* | fail*)
        scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  case "$state" in
    idle* | mixed* | allocated* | completing*) ;;
    *) die "node state is '${state:-unknown}' after ${WAIT}s; slurmd log:
$(tail -n 15 "$STATE/log/slurmd.log" 2>/dev/null)
slurmctld log:
$(tail -n 15 "$STATE/log/slurmctld.log" 2>/dev/null)" ;;
  esac
  log "up: $(sinfo -h -N -o '%N %T cpus=%c mem=%mMB' | head -n 1) (SLURM_CONF=$SLURM_CONF)"
}

stop_daemon() {  # stop_daemon NAME
  local pidfile="$STATE/run/$1.pid" pid
  pid_alive "$pidfile" || return 0
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null
  for _ in $(seq 40); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
    sleep 0.25
  done
  kill -9 "$pid" 2>/dev/null
  rm -f "$pidfile"
}

down() {
  require_tools
  stop_daemon slurmd
  stop_daemon slurmctld
  stop_daemon munged
  log "down"
}

status() {
  local name
  for name in munged slurmctld slurmd; do
    if pid_alive "$STATE/run/$name.pid"; then
      echo "$name: running (pid $(cat "$STATE/run/$name.pid"))"
    else
      echo "$name: not started by this script"
    fi
  done
  if command -v sinfo >/dev/null 2>&1 && sinfo >/dev/null 2>&1; then
    sinfo -N -o '%N %P %T %c %m'
  else
    echo "sinfo: no controller answers (run: sudo bash scripts/slurm_cluster.sh up)"
    return 1
  fi
}

case "$ACTION" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) die "usage: $0 up|down|status" ;;
esac
