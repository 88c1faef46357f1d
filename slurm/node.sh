#!/usr/bin/env bash
# Runs in the job's environment (container or not) on each node, started by launch.sh through srun.
#
#   node.sh torchrun ARGS...   torchrun with SIGUSR1 and SIGTERM ignored; both relayed to its workers
#   node.sh task CMD...        one rank per Slurm task: RANK/LOCAL_RANK/WORLD_SIZE from SLURM_*
#   node.sh ray ARGS...        `ray start ARGS` with --node-ip-address = this node's address in
#                              NEMO_RLSR_NODE_IPS ("node=ip node=ip ...", written by ray_cluster.sh)
#
# Why torchrun ignores both signals: it dies of a SIGUSR1 it does not handle (the default action),
# and it handles SIGTERM by killing its workers 30 s later, too soon for a large checkpoint
# (torch/distributed/elastic/multiprocessing/api.py). PET_SIGNALS_TO_HANDLE (--signals-to-handle,
# torch >= 2.9) leaves SIGTERM out of what it handles, so the ignored disposition stays. Slurm signals every process of a step (preemption's SIGTERM, srun's forwarded
# SIGUSR1), so torchrun gets them too. An ignored disposition survives exec; the trainer ranks
# install their own handlers (trainer/preemption.py), and this shell also delivers the signal to
# torchrun's children, for a Slurm that signals only the task's own process. A rank that sees a
# signal twice is fine: its handler only sets a flag.
set -euo pipefail

mode=${1:?usage: node.sh torchrun|task|ray ARGS...}
shift

case $mode in
  torchrun)
    (trap '' USR1 TERM && PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT exec torchrun "$@") &
    child=$!
    # shellcheck disable=SC2317,SC2329 # called from the traps below
    relay() { # signal torchrun's children (the ranks); /proc, so the image needs no procps
      local kids
      kids=$(cat /proc/"$child"/task/*/children 2>/dev/null || true)
      # shellcheck disable=SC2086 # a list of pids
      if [[ -n $kids ]]; then kill -s "$1" $kids 2>/dev/null || true; fi
    }
    trap 'relay USR1' USR1
    trap 'relay TERM' TERM
    status=0
    while true; do
      wait "$child" && status=0 || status=$?
      kill -0 "$child" 2>/dev/null || break # still running: wait was interrupted by a signal
    done
    exit "$status"
    ;;
  task)
    export RANK=${SLURM_PROCID:?} LOCAL_RANK=${SLURM_LOCALID:?} WORLD_SIZE=${SLURM_NTASKS:?}
    exec "$@"
    ;;
  ray)
    node=${SLURMD_NODENAME:-$(hostname)}
    ip=""
    for pair in ${NEMO_RLSR_NODE_IPS:-}; do
      if [[ ${pair%%=*} == "$node" ]]; then ip=${pair#*=}; fi
    done
    [[ -n $ip ]] || { echo "node.sh ray: no address for node $node in NEMO_RLSR_NODE_IPS='${NEMO_RLSR_NODE_IPS:-}'" >&2; exit 2; }
    exec ray start --node-ip-address="$ip" "$@"
    ;;
  *)
    echo "node.sh: unknown mode $mode (torchrun|task|ray)" >&2
    exit 2
    ;;
esac
