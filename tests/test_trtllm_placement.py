"""Colocating TensorRT-LLM's Ray workers with the trainer ranks (nemo_rlsr/generation/trtllm_placement.py).

The model-parallel groups come from megatron-core's own RankGenerator (the code that builds the
trainer's groups), so the layouts are the real ones, e.g. with PP the groups are not contiguous ranks.
The checks are the contract TensorRT-LLM's update_weights imposes: every engine worker on the GPU of a
rank of its own group, each GPU used by exactly one engine. The Ray part runs on a local Ray with
logical GPUs (keyed by Ray GPU ids: no CUDA here, so no UUIDs) and checks, from a second Ray driver
as the engine leaders are, that the planned bundles hold the planned GPUs.
"""

from __future__ import annotations

import ast
import itertools
import textwrap

import pytest

from cli_runner import run_python
from nemo_rlsr.generation.trtllm import TRTLLMOptions, WORKER_GPU_SHARE, llm_kwargs, placement_kwargs
from nemo_rlsr.generation.trtllm_placement import check_groups, local_device_index, plan_engines, reserve_and_plan


def megatron_groups(world: int, tp: int, pp: int, cp: int = 1) -> list[list[int]]:
    from megatron.core.parallel_state import RankGenerator

    dp = world // (tp * pp * cp)
    return RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp").get_ranks("tp-pp")


def cluster(world: int, gpus_per_node: int, shuffle: int = 0):
    """Slots of ranks packed node by node, and bundles whose GPUs Ray handed out in another order
    (rotated by `shuffle` per node), so the plan cannot pass by mapping bundle b to GPU b."""
    slots = [(f"10.0.0.{r // gpus_per_node}", r % gpus_per_node) for r in range(world)]
    nodes = sorted({n for n, _ in slots})
    bundles = {n: [(b + shuffle * (i + 1)) % gpus_per_node for b in range(gpus_per_node)] for i, n in enumerate(nodes)}
    return slots, bundles


def worker_slots(placement, bundles) -> list[tuple[str, int]]:
    """(node, GPU) of each engine worker, read the way TensorRT-LLM's RayExecutor flattens the
    placement groups and bundle indices."""
    return [(node, bundles[node][b]) for node, indices in zip(placement.nodes, placement.bundle_indices)
            for b in indices]


@pytest.mark.parametrize("world,tp,pp,cp,gpn", [
    (8, 2, 2, 1, 4),    # PP: groups {0,1,4,5} and {2,3,6,7} span both nodes
    (8, 1, 1, 1, 8),    # 8 engines of 1 GPU on one node
    (16, 8, 2, 1, 8),   # TP=8 x PP=2: one engine over two nodes
    (16, 2, 1, 2, 4),   # CP: its ranks are separate data-parallel copies of the weights
    (4, 4, 1, 1, 2),    # a TP group wider than a node
])
def test_each_engine_sits_on_its_groups_gpus(world, tp, pp, cp, gpn):
    groups = megatron_groups(world, tp, pp, cp)
    slots, bundles = cluster(world, gpn, shuffle=1)
    plan = plan_engines(groups, slots, bundles, engine_tp=tp * pp)

    assert len(plan) == world // (tp * pp)
    used = []
    for placement, group in zip(plan, groups):
        assert list(placement.ranks) == group
        workers = worker_slots(placement, bundles)
        assert len(workers) == tp * pp  # the engine's tensor_parallel_size
        assert sorted(workers) == sorted(slots[r] for r in group)  # on its own ranks' GPUs, no others
        used += workers
    assert sorted(used) == sorted(slots)  # each GPU by exactly one engine worker


@pytest.mark.parametrize("engine_tp", [1, 2, 8])
def test_engines_of_another_layout_than_the_trainers_put_worker_i_on_rank_i(engine_tp):
    """Engine groups that divide or join megatron's TP=2 x PP=2 groups (DP=2, 2 nodes of 4 GPUs):
    TensorRT-LLM's worker i (flattened node by node) is on the GPU of the engine's rank i, the rank
    that prepared engine rank i's part of the weights (weight_sync/shard_refit.py)."""
    from nemo_rlsr.weight_sync.engine_slices import engine_groups

    groups = engine_groups(megatron_groups(8, 2, 2), engine_tp)
    slots, bundles = cluster(8, 4, shuffle=1)
    for placement, group in zip(plan_engines(groups, slots, bundles, engine_tp), groups, strict=True):
        assert worker_slots(placement, bundles) == [slots[r] for r in group]
    interleaved = [[0, 4, 1, 5], [2, 6, 3, 7]]  # ranks alternating nodes: the workers would be numbered otherwise
    with pytest.raises(ValueError, match="interleave nodes"):
        plan_engines(interleaved, slots, bundles, 4)


def test_plan_arguments_are_what_async_llm_takes():
    groups = megatron_groups(8, 2, 2)
    slots, bundles = cluster(8, 4, shuffle=3)
    placement = plan_engines(groups, slots, bundles, engine_tp=4)[1]
    kwargs = placement_kwargs(placement, {"10.0.0.0": "pg-a", "10.0.0.1": "pg-b"})
    assert kwargs["placement_groups"] == ["pg-a", "pg-b"]
    assert kwargs["per_worker_gpu_share"] == WORKER_GPU_SHARE
    # ranks 2,3 on node 0 (GPUs 2,3) and 6,7 on node 1 (GPUs 2,3): bundles rotated by 3 and 6 (mod 4)
    assert kwargs["placement_bundle_indices"] == [[3, 0], [0, 1]]
    assert sum(map(len, kwargs["placement_bundle_indices"])) == llm_kwargs(
        TRTLLMOptions("/m", 4, 8, 64))["tensor_parallel_size"]


@pytest.mark.parametrize("case,match", [
    ("engine_tp", "rollout.tensor_parallel=2 but an engine group has 4 ranks"),
    ("uncovered", "must cover ranks"),
    ("same_gpu", "same GPU"),
    ("no_bundle", "no placement-group bundle holds"),
    ("bundle_twice", "two bundles on one GPU"),
])
def test_impossible_layouts_are_refused(case, match):
    groups = megatron_groups(8, 2, 2)
    slots, bundles = cluster(8, 4)
    engine_tp = 4
    if case == "engine_tp":
        engine_tp = 2
    elif case == "uncovered":
        groups = groups[:1]
    elif case == "same_gpu":
        slots[1] = slots[0]
    elif case == "no_bundle":
        bundles["10.0.0.1"] = bundles["10.0.0.1"][:3]
    elif case == "bundle_twice":
        bundles["10.0.0.0"][1] = bundles["10.0.0.0"][0]
    with pytest.raises(ValueError, match=match):
        plan_engines(groups, slots, bundles, engine_tp)


def test_layout_check_needs_no_ray():
    check_groups(megatron_groups(8, 2, 2), 8, 4)
    with pytest.raises(ValueError, match="tensor_parallel=8"):
        check_groups(megatron_groups(8, 2, 2), 8, 8)


@pytest.mark.parametrize("ray_id,visible,expected", [(3, None, 3), (1, "", 1), (6, "4,5,6,7", 2), (3, "7, 3", 1)])
def test_local_device_index(ray_id, visible, expected):
    assert local_device_index(ray_id, visible) == expected


def test_local_device_index_refuses_a_gpu_the_process_cannot_see():
    with pytest.raises(ValueError, match="not in CUDA_VISIBLE_DEVICES"):
        local_device_index(2, "0,1")


PROBE = textwrap.dedent("""
    import pickle, sys
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    ray.init(address=sys.argv[1], configure_logging=False)
    jobs = pickle.loads(bytes.fromhex(sys.argv[2]))

    @ray.remote(num_cpus=0)
    def gpu():
        return int(ray.get_gpu_ids()[0])

    print([ray.get([gpu.options(num_gpus=share, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, b)).remote()
                    for b in indices]) for pg, indices, share in jobs])
""")


@pytest.mark.slow
def test_planned_bundles_hold_the_trainer_gpus_on_a_local_ray():
    """A local Ray with 4 logical GPUs, trainer ranks on them in a scrambled order (TP=2 x PP=1, two
    engines): rank 0's reservation + probe, then another driver schedules tasks the way TensorRT-LLM
    schedules its workers into the planned bundles and reads the GPU each one got."""
    import pickle

    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, num_gpus=4, include_dashboard=False, configure_logging=False)
    try:
        node = ray.nodes()[0]["NodeManagerAddress"]
        gpus = [2, 0, 3, 1]  # rank r holds GPU gpus[r]
        slots = [(node, g) for g in gpus]
        groups = megatron_groups(4, 2, 1)
        plan, node_groups = reserve_and_plan(groups, slots, 2, WORKER_GPU_SHARE)
        assert set(node_groups) == {node} and len(node_groups[node].bundle_specs) == 4

        jobs = [(node_groups[n], list(b), WORKER_GPU_SHARE) for p in plan for n, b in zip(p.nodes, p.bundle_indices)]
        address = ray.get_runtime_context().gcs_address
        out = run_python(["-c", PROBE, address, pickle.dumps(jobs).hex()], timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        seen = ast.literal_eval(out.stdout.strip().splitlines()[-1])
        assert seen == [[gpus[r] for r in p.ranks] for p in plan]  # worker i on rank i's GPU
        assert sorted(itertools.chain(*seen)) == [0, 1, 2, 3]
    finally:
        ray.shutdown()


@pytest.mark.gpu
def test_bundles_are_matched_by_cuda_uuid_on_a_gpu_machine():
    """With CUDA the keys are device UUIDs: a trainer on its last GPU gets the bundle Ray pinned there."""
    import torch

    from nemo_rlsr.generation.trtllm_placement import device_key

    ray = pytest.importorskip("ray")
    last = torch.cuda.device_count() - 1
    ray.init(include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}})
    try:
        node = ray.nodes()[0]["NodeManagerAddress"]
        plan, node_groups = reserve_and_plan([[0]], [(node, device_key(last))], 1, WORKER_GPU_SHARE)
        assert len(node_groups[node].bundle_specs) == torch.cuda.device_count()
        assert len(plan) == 1 and plan[0].nodes == (node,) and len(plan[0].bundle_indices[0]) == 1
    finally:
        ray.shutdown()
