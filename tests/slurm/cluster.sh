#!/usr/bin/env bash
# A real single-node Slurm on this machine, on loopback, for the tests (tests/test_slurm_cluster.py).
#
#   tests/slurm/cluster.sh start    install (apt) if missing, start munged + slurmctld + slurmd
#   tests/slurm/cluster.sh status   exit 0 and print SLURM_CONF=... when the node takes jobs
#   tests/slurm/cluster.sh stop     cancel its jobs, stop the three daemons, remove the state
#
# Debian's slurm-wlm (22.05 on Debian 12) and munge. Everything lives under one folder,
# $NEMO_RLSR_SLURM_DIR [/tmp/nemo_rlsr_slurm]: the config, the munge key and socket, state, spool,
# logs and pid files; nothing under /etc is used, so a site's own Slurm or munge on the same machine
# is left alone (own munge socket via AuthInfo=socket=, own ports: $NEMO_RLSR_SLURM_PORT [26817] and
# the next one, own plugstack.conf so no site SPANK plugin loads). One node, `localhost`
# (127.0.0.1), with this machine's CPUs, in partition `debug`. Clients find it by SLURM_CONF:
#
#   tests/slurm/cluster.sh start && export SLURM_CONF=/tmp/nemo_rlsr_slurm/etc/slurm.conf
#
# Needs root (or sudo) to install packages and run slurmd. Why these settings:
#   proctrack/linuxproc, task/none  no cgroups needed (containers and sandboxes often have none);
#                                   linuxproc signals a step's whole process tree, as cgroup does
#   SlurmUser=root                  no slurm user to create
#   AuthInfo cred_expire            default (120 s): it is also how long a requeued job waits
#                                   before it may start again (slurmctld job_mgr.c, begin_time =
#                                   now + credential lifetime + 1); the tests keep it and move the
#                                   job's begin time with `scontrol update`, as an admin would
#   KillWait=30                     Slurm's default: TERM, then KILL 30 s later
set -euo pipefail

dir=${NEMO_RLSR_SLURM_DIR:-/tmp/nemo_rlsr_slurm}
port=${NEMO_RLSR_SLURM_PORT:-26817}
conf=$dir/etc/slurm.conf
export SLURM_CONF=$conf
sudo=()
((EUID == 0)) || sudo=(sudo)

say() { echo "[slurm-cluster] $*" >&2; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null &&
    command -v sbatch >/dev/null && return 0
  say "installing slurmctld slurmd munge slurm-client (apt)"
  local packages=(slurmctld slurmd munge slurm-client) apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get)
  "${apt[@]}" install -y -q "${packages[@]}" >/dev/null ||
    { "${apt[@]}" update -q >/dev/null && "${apt[@]}" install -y -q "${packages[@]}" >/dev/null; }
}

write_config() {
  "${sudo[@]}" mkdir -p "$dir"/{etc,state,spool,log,run,munge}
  "${sudo[@]}" chown munge:munge "$dir/munge"
  "${sudo[@]}" chmod 0755 "$dir/munge" # the socket must be reachable by every user
  if ! "${sudo[@]}" test -s "$dir/munge/munge.key"; then
    "${sudo[@]}" dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    "${sudo[@]}" chown munge:munge "$dir/munge/munge.key"
    "${sudo[@]}" chmod 0400 "$dir/munge/munge.key"
  fi
  : | "${sudo[@]}" tee "$dir/etc/plugstack.conf" >/dev/null
  "${sudo[@]}" tee "$conf" >/dev/null <<EOF
# Written by tests/slurm/cluster.sh: a single-node test cluster on loopback.
ClusterName=nemorlsr
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket.2
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
PlugStackConfig=$dir/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=30
MinJobAge=600
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

ready_ctld() { scontrol ping >/dev/null 2>&1; }

node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -1; }

ready() { [[ -f $conf ]] && scontrol ping >/dev/null 2>&1 && [[ $(node_state) =~ ^(idle|mixed|allocated|completing) ]]; }

wait_until() { # wait_until SECONDS what command...
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@"; do
    ((SECONDS < deadline)) || { say "timed out waiting for $what"; return 1; }
    sleep 0.5
  done
}

pid_alive() { [[ -f $1 ]] && "${sudo[@]}" kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  if ready; then say "already up ($conf)"; echo "SLURM_CONF=$conf"; return 0; fi
  install_packages
  write_config
  if ! pid_alive "$dir/munge/munged.pid"; then
    "${sudo[@]}" runuser -u munge -- munged --socket="$dir/munge/munge.socket.2" --key-file="$dir/munge/munge.key" \
      --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
  fi
  wait_until 20 munged test -S "$dir/munge/munge.socket.2"
  pid_alive "$dir/run/slurmctld.pid" || "${sudo[@]}" env SLURM_CONF="$conf" slurmctld -c
  wait_until 30 slurmctld ready_ctld
  pid_alive "$dir/run/slurmd.pid" || "${sudo[@]}" env SLURM_CONF="$conf" slurmd -N localhost
  if ! wait_until 60 "node localhost to become idle" ready; then
    say "node state: $(node_state)"; tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
    return 1
  fi
  say "up: $(sinfo --version), node localhost with $(nproc) CPUs; export SLURM_CONF=$conf"
  echo "SLURM_CONF=$conf"
}

stop_daemon() { # stop_daemon PIDFILE: TERM the daemon by its pid file, wait for it to go
  local pidfile=$1 pid
  pid_alive "$pidfile" || return 0
  pid=$(cat "$pidfile")
  "${sudo[@]}" kill "$pid" 2>/dev/null || true
  wait_until 30 "pid $pid to exit" bash -c "! ${sudo[*]} kill -0 $pid 2>/dev/null" || "${sudo[@]}" kill -9 "$pid" 2>/dev/null || true
}

no_jobs() { [[ -z $(squeue -h -o %i 2>/dev/null) ]]; }

stop() {
  if [[ -f $conf ]] && scontrol ping >/dev/null 2>&1; then
    scancel --partition=debug 2>/dev/null || true
    wait_until 60 "jobs to end" no_jobs || true
  fi
  stop_daemon "$dir/run/slurmd.pid"
  stop_daemon "$dir/run/slurmctld.pid"
  stop_daemon "$dir/munge/munged.pid"
  "${sudo[@]}" rm -rf "$dir"
  say "stopped"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) if ready; then echo "SLURM_CONF=$conf"; else say "not running ($conf)"; exit 1; fi ;;
  *) sed -n '2,6p' "$0"; exit 2 ;;
esac
