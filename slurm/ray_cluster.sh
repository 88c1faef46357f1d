# shellcheck shell=bash disable=SC2154 # nodes, nnodes, step_opts, ...: launch.sh's, which sources this
# Step 3 of slurm/launch.sh (sourced there; uses its variables and run_background): a Ray cluster over
# the allocation, ready before the trainer starts.
#
# The head on the first node, one worker on each other node, each `ray start --block` in a background
# srun (--overlap: the trainer step shares the nodes). Each gets --node-ip-address = its node's Slurm
# address (NodeAddr, resolved), so that Ray does not guess: its guess is the interface of the route
# to a public address, another network on multi-homed nodes and loopback on air-gapped ones. Then
# slurm/ray_ready.py polls the cluster until every node has joined with its GPUs; while it waits, a
# Ray srun that exits ends the job at once with its log, instead of a trainer meeting half a cluster.

node_addresses() { # "node=ip ..." for the job's nodes
  local node addr ip pairs=()
  for node in "${nodes[@]}"; do
    addr=$(scontrol show node "$node" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
    addr=${addr:-$node}
    if [[ $addr =~ ^[0-9]+(\.[0-9]+){3}$ ]]; then
      ip=$addr
    else
      ip=$(getent ahostsv4 "$addr" 2>/dev/null | awk 'NR == 1 {print $1}' || true)
    fi
    pairs+=("$node=${ip:-$addr}")
  done
  echo "${pairs[*]}"
}

start_ray_cluster() {
  local port=${NEMO_RLSR_RAY_PORT:-6379} ray_gpus=$ranks_per_node head_ip head_gpus workers
  [[ ${NEMO_RLSR_GPU:-} == cpu ]] && ray_gpus=0
  head_gpus=$ray_gpus
  workers=(--nodes=$((nnodes - 1)) --ntasks=$((nnodes - 1)) --ntasks-per-node=1 --exclude="$head_node")
  local ray_nodes=$nnodes gpu_nodes=$nnodes
  if ((engine_nodes)); then # separate rollout engines: Ray's GPUs are their nodes' only, never the trainer's
    head_gpus=0 ray_nodes=$((engine_nodes + 1)) gpu_nodes=$engine_nodes
    workers=(--nodes="$engine_nodes" --ntasks="$engine_nodes" --ntasks-per-node=1 -w "$(IFS=,; echo "${engine_hosts[*]}")")
  fi
  NEMO_RLSR_NODE_IPS=$(node_addresses)
  export NEMO_RLSR_NODE_IPS
  head_ip=${NEMO_RLSR_NODE_IPS%% *}
  head_ip=${head_ip#*=}
  export RAY_ADDRESS=$head_ip:$port
  say "starting Ray: head $head_node ($head_gpus GPU(s)), $((ray_nodes - 1)) worker node(s), $ray_gpus GPU(s) each; $NEMO_RLSR_NODE_IPS"
  local ray_opts=(--block --disable-usage-stats)
  run_background ray-head srun --overlap "${one_task[@]}" -w "$head_node" "${step_opts[@]}" \
    bash "$workdir/slurm/node.sh" ray --head --port="$port" --num-gpus="$head_gpus" "${ray_opts[@]}"
  if ((ray_nodes > 1)); then
    run_background ray-workers srun --overlap "${workers[@]}" "${step_opts[@]}" \
      bash "$workdir/slurm/node.sh" ray --address="$RAY_ADDRESS" --num-gpus="$ray_gpus" "${ray_opts[@]}"
  fi
  local timeout=${NEMO_RLSR_RAY_TIMEOUT_S:-600}
  run_background ray-ready srun --overlap "${one_task[@]}" -w "$head_node" "${step_opts[@]}" \
    python3 "$workdir/slurm/ray_ready.py" --nodes "$ray_nodes" --gpu-nodes "$gpu_nodes" --gpus-per-node "$ray_gpus" \
    --timeout "$timeout"
  ((dry_run)) || wait_for_ray $((SECONDS + timeout + 60))
}

wait_for_ray() { # wait_for_ray DEADLINE: until ray_ready.py is done; fail at once when a Ray srun ends first
  local name
  while kill -0 "${background[ray-ready]}" 2>/dev/null; do
    if ((SECONDS > $1)); then # ray_ready.py itself stuck (a driver blocked on a head that is not Ray)
      say "ray_ready.py did not finish in time ($log_dir/ray-ready.log):"
      tail -n 20 "$log_dir/ray-ready.log"
      exit 1
    fi
    for name in ray-head ray-workers; do
      if [[ -n ${background[$name]:-} ]] && ! kill -0 "${background[$name]}" 2>/dev/null; then
        say "the $name srun exited before Ray was ready ($log_dir/$name.log):"
        tail -n 20 "$log_dir/$name.log"
        exit 1
      fi
    done
    sleep 1
  done
  if ! wait "${background[ray-ready]}"; then
    say "ray_ready.py gave up ($log_dir/ray-ready.log):"
    tail -n 20 "$log_dir/ray-ready.log"
    exit 1
  fi
  cat "$log_dir/ray-ready.log"
}
