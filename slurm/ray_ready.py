"""Wait until the job's Ray cluster has every node, each with its GPUs (slurm/ray_cluster.sh).

    python3 slurm/ray_ready.py --nodes N --gpus-per-node G [--gpu-nodes K] [--address HOST:PORT] [--timeout S]

Exit 0 once N nodes are live and K of them (default: all N) report at least G GPUs each; 1 at the
timeout, saying what had joined. (K < N: separate rollout engines, whose nodes alone give Ray GPUs.)
`ray status` succeeding only says that the head is up, and one read of `ray.nodes()` only what
had joined at that moment: a trainer started then meets a cluster whose workers are still joining
(or never will). Every poll here is a fresh read from the GCS. Runs on the head node (a Ray driver
needs a local raylet), as soon as the head's srun is started: it also waits for the head.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import time


def missing(nodes: list[dict], expected: int, gpus_per_node: int, gpu_nodes: int | None = None) -> str:
    """What the cluster still lacks, or "" when `expected` nodes are live and `gpu_nodes` of them
    (default: all) have `gpus_per_node` GPUs each."""
    gpu_nodes = expected if gpu_nodes is None else gpu_nodes
    alive = [n for n in nodes if n.get("Alive")]
    full = [n for n in alive if n.get("Resources", {}).get("GPU", 0) >= gpus_per_node]
    if len(alive) >= expected and len(full) >= gpu_nodes:
        return ""
    have = ", ".join(f"{n['NodeManagerAddress']} ({n.get('Resources', {}).get('GPU', 0):g} GPUs)" for n in alive)
    return (f"{len(alive)} of {expected} nodes, {len(full)} of {gpu_nodes} with {gpus_per_node} GPUs each; "
            f"live: {have or 'none'}")


def connect(address: str, deadline: float) -> None:
    """Connect a driver once the head's GCS port accepts connections (ray.init itself would block
    for minutes on a head that is not up yet)."""
    import ray

    host, port = address.rsplit(":", 1)
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            return
        except (OSError, ConnectionError, RuntimeError) as exc:  # not listening yet, or not serving yet
            if time.monotonic() > deadline:
                raise SystemExit(f"ray_ready: no Ray head at {address}: {exc}") from None
            time.sleep(2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--gpu-nodes", type=int, default=None, help="nodes that give GPUs (default: --nodes)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="default: $RAY_ADDRESS")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    args = parser.parse_args()
    if not re.fullmatch(r".+:\d+", args.address or ""):
        parser.error(f"--address (or RAY_ADDRESS) must be HOST:PORT, got {args.address!r}")
    import ray

    deadline = time.monotonic() + args.timeout
    connect(args.address, deadline)
    last = None
    while True:
        lacking = missing(ray.nodes(), args.nodes, args.gpus_per_node, args.gpu_nodes)
        if not lacking:
            ready = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
            print(f"ray_ready: {args.nodes} node(s) joined: {' '.join(ready)}", flush=True)
            return 0
        if lacking != last:
            print(f"ray_ready: waiting: {lacking}", flush=True)
            last = lacking
        if time.monotonic() > deadline:
            print(f"ray_ready: timed out after {args.timeout:.0f}s: {lacking}", flush=True)
            return 1
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
