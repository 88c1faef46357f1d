#!/usr/bin/env bash
# Runs inside the container, one task per node (torchrun) or per GPU (task), started by launch.sh.
#
#   node.sh torchrun ARGS...   torchrun with SIGUSR1 ignored; SIGUSR1/SIGTERM relayed to its workers
#   node.sh task CMD...        one rank per Slurm task: RANK/LOCAL_RANK/WORLD_SIZE from SLURM_*
#
# Why the relay: torchrun dies of a SIGUSR1 it does not handle (the default action), and when it
# does handle one (--signals-to-handle, torch >= 2.9) it kills its workers 30 s later, too soon
# for a large preemption checkpoint. So torchrun ignores SIGUSR1 (an ignored disposition survives
# exec; the trainer installs its own handler) and this shell delivers the signal to torchrun's
# children, the trainer ranks. Where Slurm signals every process of the step (proctrack/cgroup) a
# rank sees the signal twice; its handler only sets a flag, so that is harmless.
set -euo pipefail

mode=${1:?usage: node.sh torchrun|task ARGS...}
shift

case $mode in
  torchrun)
    (trap '' USR1 && exec torchrun "$@") &
    child=$!
    # shellcheck disable=SC2317 # called from the traps below
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
  *)
    echo "node.sh: unknown mode $mode (torchrun|task)" >&2
    exit 2
    ;;
esac
