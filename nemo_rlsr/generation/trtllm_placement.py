"""Where the TensorRT-LLM Ray workers run: on the very GPUs of the trainer ranks whose weights they take.

Why this matters: TensorRT-LLM's `WorkerExtension.update_weights` (1.2, tensorrt_llm/llmapi/rlhf_utils.py)
reads only the entry of its own device UUID from the {device_uuid: handles} dict, so each engine worker
must sit on the GPU of the trainer rank that prepared its part of the weights (that rank's CUDA IPC
handles are the ones it can open). An engine's workers take the trainer ranks of one engine group
(weight_sync/engine_slices.engine_groups: part of a TP x PP model-parallel group, or whole ones), and
each of those ranks receives just what its worker loads (weight_sync/shard_refit.py).

The trainer is SPMD (torchrun / srun), outside Ray, so Ray does not know which GPU a trainer rank holds.
Ray does pin a placement-group bundle with {"GPU": 1} to one GPU instance for the bundle's life, and a
TensorRT-LLM worker scheduled into a bundle uses `ray.get_gpu_ids()[0]` of that bundle
(tensorrt_llm/executor/ray_gpu_worker.py, RayWorkerWrapper). So: one placement group per node, one GPU
bundle per GPU of the node, a probe task per bundle to read the UUID of the GPU Ray gave it, then each
engine takes the bundles whose GPUs are its ranks' GPUs (same UUIDs). `plan_engines` is that matching, pure;
`node_bundles` / `probe_bundle_gpus` are the Ray calls.
"""

from __future__ import annotations

from dataclasses import dataclass

# (node IP as Ray reports it, the GPU's key): the CUDA device UUID on GPUs, which no CUDA_VISIBLE_DEVICES
# renumbering (Slurm steps, Ray) changes; Ray's GPU id where there is no CUDA (logical GPUs in tests)
Slot = tuple[str, int | str]


@dataclass(frozen=True)
class EnginePlacement:
    """One engine: the trainer ranks whose GPUs its workers take and, per node (in `nodes` order), the
    bundle indices of that node's placement group (TensorRT-LLM's `placement_bundle_indices`)."""

    ranks: tuple[int, ...]
    nodes: tuple[str, ...]
    bundle_indices: tuple[tuple[int, ...], ...]


def local_device_index(ray_gpu_id: int, visible_devices: str | None) -> int:
    """The `cuda:i` index, in a process with this CUDA_VISIBLE_DEVICES, of the GPU Ray calls
    `ray_gpu_id` (Ray numbers GPUs by the raylet's CUDA_VISIBLE_DEVICES entries, as TensorRT-LLM's
    RayWorkerWrapper.physical_to_local_id assumes)."""
    if not visible_devices:
        return ray_gpu_id
    entries = [e.strip() for e in visible_devices.split(",") if e.strip()]
    if str(ray_gpu_id) not in entries:
        raise ValueError(f"Ray GPU {ray_gpu_id} is not in CUDA_VISIBLE_DEVICES={visible_devices!r}")
    return entries.index(str(ray_gpu_id))


def device_key(index: int) -> str:
    """The UUID of `cuda:index`: the same GPU gets the same key in the trainer and in a Ray task."""
    import torch

    return str(torch.cuda.get_device_properties(index).uuid)


def check_groups(groups: list[list[int]], world: int, engine_tp: int) -> None:
    """The layout rules that need no Ray: the engine groups partition the ranks, `engine_tp` each."""
    ranks = sorted(r for group in groups for r in group)
    if ranks != list(range(world)):
        raise ValueError(f"engine groups {groups} must cover ranks 0..{world - 1} once each")
    for group in groups:
        if len(group) != engine_tp:
            raise ValueError(f"rollout.tensor_parallel={engine_tp} but an engine group has {len(group)} ranks "
                             f"(weight_sync.engine_slices.engine_groups makes them {engine_tp} each)")


def plan_engines(groups: list[list[int]], slots: list[Slot], bundle_gpus: dict[str, list],
                 engine_tp: int) -> list[EnginePlacement]:
    """One engine per model-parallel group. `groups`: the groups' trainer ranks (each rank in exactly
    one); `slots[r]`: rank r's GPU; `bundle_gpus[node][b]`: the GPU key of bundle b of `node`'s
    placement group. Raises ValueError for a layout that cannot be colocated."""
    world = len(slots)
    check_groups(groups, world, engine_tp)
    if len(set(slots)) != world:
        raise ValueError(f"two trainer ranks report the same GPU: {slots}")
    where: dict[Slot, int] = {}
    for node, gpus in bundle_gpus.items():
        if len(set(gpus)) != len(gpus):
            raise ValueError(f"placement group of {node} has two bundles on one GPU: {gpus}")
        where |= {(node, gpu): b for b, gpu in enumerate(gpus)}
    missing = [s for s in slots if s not in where]
    if missing:
        raise ValueError(f"no placement-group bundle holds the trainer GPUs {missing} (Ray started with "
                         f"fewer GPUs than the trainer uses? bundles: {bundle_gpus})")
    plan = []
    for group in groups:
        nodes: list[str] = []
        per_node: dict[str, list[int]] = {}
        for rank in group:  # TensorRT-LLM flattens (group, indices) in order: worker i <-> ranks[i]
            node = slots[rank][0]
            if node not in per_node:
                nodes.append(node)
                per_node[node] = []
            per_node[node].append(where[slots[rank]])
        flattened = [rank for node in nodes for rank in group if slots[rank][0] == node]
        if flattened != list(group):  # worker i must be on ranks[i]'s GPU: that rank prepared its weights
            raise ValueError(f"engine ranks {group} interleave nodes ({[slots[r][0] for r in group]}): TensorRT-LLM "
                             f"numbers the workers node by node; launch ranks node by node")
        plan.append(EnginePlacement(tuple(group), tuple(nodes), tuple(tuple(per_node[n]) for n in nodes)))
    return plan


# --- Ray calls (need a running Ray; `ray` imported lazily) -------------------------------------------

def node_bundles(nodes: list[str], timeout_s: float = 120.0) -> dict:
    """{node: placement group of one {"GPU": 1} bundle per GPU Ray has on that node}, pinned to the node
    by Ray's `node:<ip>` resource. Every GPU gets a bundle, so whichever GPU instance Ray hands a
    bundle, each trainer GPU is in one. The bundle's CPU lets a TensorRT-LLM worker actor into it."""
    import ray
    from ray.util.placement_group import placement_group

    counts = {n["NodeManagerAddress"]: int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["Alive"]}
    unknown = [n for n in nodes if not counts.get(n)]
    if unknown:
        raise RuntimeError(f"trainer nodes {unknown} are not Ray nodes with GPUs (Ray nodes: {counts}); "
                           f"slurm/launch.sh starts Ray on every node when rollout.engine=trtllm")
    groups = {}
    for node in nodes:
        bundle = {"GPU": 1.0, "CPU": 0.1, f"node:{node}": 0.001}
        groups[node] = placement_group([dict(bundle) for _ in range(counts[node])], strategy="STRICT_PACK")
    for node, group in groups.items():
        try:
            ray.get(group.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise RuntimeError(f"Ray could not reserve the {counts[node]} GPUs of {node} within "
                               f"{timeout_s:.0f}s (`ray status` shows what holds them)") from exc
    return groups


def probe_bundle_gpus(group, share: float) -> list:
    """The GPU key of each bundle of `group` (see Slot), read by a task scheduled the way TensorRT-LLM
    schedules its workers (num_gpus=share in that bundle)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0)
    def gpu_ids() -> list:
        import os

        import torch

        ids = [int(i) for i in ray.get_gpu_ids()]
        if len(ids) != 1 or not torch.cuda.is_available():
            return ids
        return [device_key(local_device_index(ids[0], os.environ.get("CUDA_VISIBLE_DEVICES")))]

    refs = [gpu_ids.options(num_gpus=share, scheduling_strategy=PlacementGroupSchedulingStrategy(group, b)
                            ).remote() for b in range(len(group.bundle_specs))]
    found = ray.get(refs)
    if any(len(ids) != 1 for ids in found):
        raise RuntimeError(f"each GPU bundle should hold one GPU, got {found}")
    return [ids[0] for ids in found]


def connect_ray(local_ok: bool = False) -> None:
    """Join the job's Ray cluster (slurm/launch.sh starts it when rollout.engine=trtllm; `local_ok`: a
    single-process run may start its own). Workers see every GPU of their node and pick theirs from
    ray.get_gpu_ids(), as TensorRT-LLM's executor expects."""
    import os

    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or (None if local_ok else "auto")
        ray.init(address=address, namespace="nemo_rlsr", configure_logging=False,
                 runtime_env={"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}})


def reserve_and_plan(groups: list[list[int]], slots: list[Slot], engine_tp: int, share: float
                     ) -> tuple[list[EnginePlacement], dict]:
    """Rank 0's part: check the layout, reserve every GPU of the trainer nodes, read the bundles' GPUs,
    plan. Returns the plan and {node: placement group} (picklable: broadcast to the engine leaders; the
    groups live as long as rank 0's Ray driver, i.e. the job)."""
    check_groups([list(g) for g in groups], len(slots), engine_tp)
    connect_ray(local_ok=len(slots) == 1)
    node_groups = node_bundles(list(dict.fromkeys(node for node, _ in slots)))
    bundle_gpus = {node: probe_bundle_gpus(group, share) for node, group in node_groups.items()}
    return plan_engines([list(g) for g in groups], slots, bundle_gpus, engine_tp), node_groups
