"""Shard-only refit: each engine worker receives only the part TensorRT-LLM's loader reads.

`trtllm_reads` below re-states, from TensorRT-LLM 1.2's source (tensorrt_llm/_torch/modules/linear.py
`load_weight_shard`, tensorrt_llm/_torch/models/checkpoints/hf/weight_mapper.py `_duplicate_kv`,
stored 1.2-line versions; see nemo_rlsr/weight_sync/engine_slices.py), what a worker of TP rank r
ends up with from a full HF tensor; the parts we send must give it the same values.
"""

import math
from pathlib import Path

import pytest
import torch

from nemo_rlsr.weight_sync.engine_slices import EngineLayout, EngineNeed, engine_groups, engine_need
from nemo_rlsr.weight_sync.shard_refit import EngineSlice

WORKER = Path(__file__).parent / "weight_sync_worker.py"


def trtllm_reads(full: torch.Tensor, name: str, layout: EngineLayout, rank: int, dim: int) -> torch.Tensor:
    """What a TensorRT-LLM worker of `rank` keeps of `full` when its module splits `dim`."""
    if name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")) and layout.tp > layout.kv_heads:
        reps = layout.tp // layout.kv_heads
        if full.ndim == 1:
            full = full.repeat_interleave(reps)
        else:
            size = full.shape[0] // layout.kv_heads
            full = full.reshape(layout.kv_heads, size, -1)[:, None].expand(-1, reps, -1, -1).reshape(-1, full.shape[1])
    width = full.shape[dim]
    step = math.ceil(width / layout.tp)
    return full.narrow(dim, rank * step, min((rank + 1) * step, width) - rank * step)


@pytest.mark.parametrize("name,shape,dim,kv_heads,tp", [
    ("model.layers.0.self_attn.q_proj.weight", (24, 8), 0, 2, 4),
    ("model.layers.0.self_attn.k_proj.weight", (6, 8), 0, 2, 4),   # 2 KV heads of 3 rows over 4 ranks
    ("model.layers.0.self_attn.v_proj.bias", (6,), 0, 2, 4),      # biases repeat element-wise
    ("model.layers.0.self_attn.k_proj.weight", (12, 8), 0, 4, 2),
    ("model.layers.3.mlp.down_proj.weight", (8, 10), 1, 2, 4),     # 10 columns: blocks of 3, 3, 3, 1
    ("model.embed_tokens.weight", (61, 8), 0, 2, 4),               # unpadded vocabulary: 16, 16, 16, 13
    ("lm_head.weight", (61, 8), 0, 2, 2),
])
def test_a_workers_part_gives_it_what_trtllm_would_read_from_the_full_tensor(name, shape, dim, kv_heads, tp):
    layout = EngineLayout(tp, kv_heads)
    full = torch.randn(shape)
    covered = torch.zeros(shape, dtype=torch.bool)
    for rank in range(tp):
        need = engine_need(name, shape, layout, rank)
        assert need.dim == dim
        part = EngineSlice(shape, full.dtype, need, full[need.box(shape)].clone())
        assert part.nbytes < full.numel() * full.element_size()
        # what the loader reads from our tensor (rest uninitialised) = what it reads from the full one
        assert torch.equal(trtllm_reads(part.materialize(), name, layout, rank, dim),
                           trtllm_reads(full, name, layout, rank, dim))
        covered[need.box(shape)] = True
    assert covered.all()


def test_needs_by_hand():
    layout = EngineLayout(4, kv_heads=2)
    assert [engine_need("model.layers.0.mlp.down_proj.weight", (8, 10), layout, r) for r in range(4)] == [
        EngineNeed(1, 0, 3), EngineNeed(1, 3, 6), EngineNeed(1, 6, 9), EngineNeed(1, 9, 10)]
    # repeat_interleave(2) of 6 bias entries, blocks of 3: originals [0,0,1], [1,2,2], [3,3,4], [4,5,5]
    assert [engine_need("model.layers.0.self_attn.k_proj.bias", (6,), layout, r) for r in range(4)] == [
        EngineNeed(0, 0, 2), EngineNeed(0, 1, 3), EngineNeed(0, 3, 5), EngineNeed(0, 4, 6)]
    for name in ("model.norm.weight", "model.layers.1.input_layernorm.weight", "model.layers.1.mlp.gate.weight"):
        assert engine_need(name, (8,), layout, 3) == EngineNeed(None)
    mla = EngineLayout(4, kv_heads=4, mla=True)
    assert engine_need("model.layers.0.self_attn.kv_b_proj.weight", (64, 8), mla, 1) == EngineNeed(None)


def test_expert_parallel_engine_takes_its_own_experts_split_over_moe_tp():
    # TensorRT-LLM's Mapping: moe_ep_rank = tp_rank % ep, moe_tp_rank = tp_rank // ep
    layout = EngineLayout(4, kv_heads=4, ep=2, num_experts=8)
    gate = "model.layers.1.mlp.experts.{}.gate_proj.weight"
    down = "model.layers.1.mlp.experts.{}.down_proj.weight"
    assert engine_need(gate.format(5), (16, 8), layout, 0) is None          # EP rank 0 holds experts 0-3
    assert engine_need(gate.format(5), (16, 8), layout, 1) == EngineNeed(0, 0, 8)   # EP 1, moe-TP 0
    assert engine_need(gate.format(5), (16, 8), layout, 3) == EngineNeed(0, 8, 16)  # EP 1, moe-TP 1
    assert engine_need(down.format(2), (8, 16), layout, 2) == EngineNeed(1, 8, 16)  # EP 0, moe-TP 1
    with pytest.raises(ValueError, match="expert_parallel"):
        EngineLayout(4, kv_heads=4, ep=3, num_experts=9)


def test_engine_groups_divide_or_join_model_parallel_groups():
    assert engine_groups([[4, 5, 6, 7], [0, 1, 2, 3]], 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert engine_groups([[0, 1, 2, 3], [4, 5, 6, 7]], 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert engine_groups([[0, 1, 2, 3]] * 4, 2) == [[0, 1], [2, 3]]  # every rank reports its group
    assert engine_groups([[0, 1], [2, 3], [4, 5], [6, 7]], 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # megatron's TP=2 x PP=2 groups at DP=2 ({0,1,4,5}, {2,3,6,7}): an engine over both, ascending
    assert engine_groups([[0, 1, 4, 5], [2, 3, 6, 7]], 8) == [list(range(8))]
    for bad in (3, 6):
        with pytest.raises(ValueError, match="divide or be a multiple"):
            engine_groups([[0, 1, 2, 3], [4, 5, 6, 7]], bad)


def reassemble(ranks: list[dict], engine_tp: int) -> list[dict[str, torch.Tensor]]:
    """Per engine: every HF tensor put together from its workers' parts (each entry covered)."""
    engines = []
    for group in sorted({tuple(r[engine_tp]["group"]) for r in ranks}):
        full, covered = {}, {}
        for rank in group:
            for name, (need, data) in ranks[rank][engine_tp]["parts"].items():
                shape = list(data.shape)
                if need.dim is not None:
                    shape[need.dim] = ranks[0]["full"][name].shape[need.dim]
                full.setdefault(name, torch.full(shape, float("nan")))[need.box(tuple(shape))] = data
                covered.setdefault(name, torch.zeros(shape, dtype=torch.bool))[need.box(tuple(shape))] = True
        assert all(c.all() for c in covered.values())
        engines.append(full)
    return engines


@pytest.fixture(scope="module")
def shard_runs(tmp_path_factory):
    from distributed_helpers import run_workers

    return run_workers("shard_refit", tmp_path_factory.mktemp("shard"), nprocs=4, timeout_s=300, worker=WORKER)


@pytest.mark.slow
@pytest.mark.parametrize("engine_tp", [4, 2])
def test_engine_parts_reassembled_give_our_logits_in_transformers(shard_runs, engine_tp):
    from distributed_helpers import VOCAB, tiny_model_config
    from hf_worker import input_ids
    from test_weight_sync import hf_llama_for

    ours = next(r["logits"] for r in shard_runs if r["logits"] is not None)
    engines = reassemble(shard_runs, engine_tp)
    assert len(engines) == 4 // engine_tp
    for weights in engines:
        assert set(weights) == set(shard_runs[0]["full"])
        for name, tensor in shard_runs[0]["full"].items():
            assert torch.equal(weights[name], tensor), name
        with torch.no_grad():
            theirs = hf_llama_for(tiny_model_config(), VOCAB, weights)(input_ids=input_ids(VOCAB)).logits
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("engine_tp", [4, 2])
def test_bytes_received_per_rank_match_the_planner_and_stay_within_the_engine_shard(shard_runs, engine_tp):
    from distributed_helpers import VOCAB, tiny_model_config

    from nemo_rlsr.config import ParallelConfig, RLSRConfig, RolloutConfig
    from nemo_rlsr.planner.layout import Layout
    from nemo_rlsr.planner.memory import engine_weight_bytes
    from nemo_rlsr.planner.refit import received_fractions
    from nemo_rlsr.planner.shapes import ModelShape

    cfg = RLSRConfig(model=tiny_model_config(), parallel=ParallelConfig(tensor_parallel=2, pipeline_parallel=2),
                     rollout=RolloutConfig(engine="trtllm", tensor_parallel=engine_tp))
    layout = Layout.of(cfg, nodes=1, gpus_per_node=4)
    # the planner's bf16 engine shard, in the fp32 the test model has
    planned_shard = engine_weight_bytes(cfg, ModelShape.build(cfg.model, VOCAB), layout) * 4 / 2
    full_bytes = sum(t.numel() * t.element_size() for t in shard_runs[0]["full"].values())
    fractions = received_fractions(2, 2, engine_tp)
    for rank, run in enumerate(shard_runs):
        got = run[engine_tp]
        shard = sum(d.numel() * d.element_size() for _, d in got["parts"].values())
        planned = fractions[rank % len(fractions)] * planned_shard
        print(f"engine TP {engine_tp} rank {rank}: received {got['received']} B, engine shard {shard} B "
              f"(full model {full_bytes} B), planner {planned:.0f} B")
        assert got["received"] <= 1.2 * shard
        # negative control: the full-tensor stream (source.py) hands every rank every full tensor, of
        # which it holds at most its own shard: it receives at least full - own, over the bound
        assert full_bytes - run["own_bytes"] > 1.2 * shard
        assert shard <= 1.2 * full_bytes / engine_tp
        assert got["received"] == pytest.approx(planned, rel=0.15)


def test_cells_share_prompts_among_engines_and_give_each_group_its_own_back():
    from nemo_rlsr.generation.trtllm_cells import cells, own_completions, shares

    mp = [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert cells(mp, engine_groups(mp, 2)) == mp                   # 2 engines per group
    assert cells(mp, engine_groups(mp, 8)) == [list(range(8))]      # 1 engine over both groups
    # two groups of 3 and 2 prompts over 2 engines: shares of whole prompts, 3 + 2
    work = shares([3, 2], 2)
    assert work == [[(0, 0), (0, 1), (0, 2)], [(1, 0), (1, 1)]]
    results = [[f"g{g}p{p}" for g, p in share] for share in work]  # an engine's completions, in share order
    assert own_completions(work, results, 0, 3) == ["g0p0", "g0p1", "g0p2"]
    assert own_completions(work, results, 1, 2) == ["g1p0", "g1p1"]
    # one group's 5 prompts over 2 engines of its ranks: 3 + 2, back in prompt order
    work = shares([5], 2)
    assert [len(w) for w in work] == [3, 2]
    assert own_completions(work, [[f"p{p}" for _, p in w] for w in work], 0, 5) == [f"p{i}" for i in range(5)]
    with pytest.raises(RuntimeError, match="got no completion"):
        own_completions(work[:1], [["p0", "p1", "p2"]], 0, 5)


@pytest.mark.slow
def test_moe_trained_at_expert_parallel_2_reaches_engines_with_and_without_expert_parallel(tmp_path):
    """Experts come from the data-parallel rank that holds them; an engine EP rank gets only its own
    experts, whole (reassembled engine weights = the EP=1 trainer's full tensors in both layouts)."""
    from distributed_helpers import run_workers

    ranks = run_workers("shard_refit_ep", tmp_path, nprocs=2, timeout_s=300, worker=WORKER)
    for engine_ep in (1, 2):
        (weights,) = reassemble(ranks, engine_ep)
        assert set(weights) == set(ranks[0]["full"])
        for name, tensor in ranks[0]["full"].items():
            assert torch.equal(weights[name], tensor), name
    experts = [n for n in ranks[0]["full"] if ".mlp.experts." in n]
    assert experts
    for rank, run in enumerate(ranks):
        own = [n for n in experts if n in run[2]["parts"]]
        assert own and all(int(n.split(".experts.")[1].split(".")[0]) // 2 == rank for n in own)
        assert all(run[2]["parts"][n][0].dim is None for n in own)  # whole experts at engine EP 2
        assert all(n in run[1]["parts"] and run[1]["parts"][n][0].dim is not None for n in experts)
        # engine EP rank r's experts are the ones training EP rank r holds: none of them is sent
        print(f"rank {rank}: received {run[1]['received']} B at engine EP 1, {run[2]['received']} B at EP 2")
        assert run[2]["received"] < run[1]["received"]


def test_plan_run_in_process_gives_each_worker_what_trtllm_reads_qwen2_gqa_over_two_replicas(single_rank):
    """The plan alone, run in one process on a simulated TP=2 trainer with 2 data-parallel replicas
    (ranks 0-1 and 2-3) and one engine of 4 workers over both: a Qwen2-style model with qkv biases and
    2 KV heads, so k/v are duplicated before TensorRT-LLM cuts them. Every worker's part, handed over
    full-shaped, gives it what TensorRT-LLM reads from the true full tensor."""

    from distributed_helpers import random_tiny_gpt

    from nemo_rlsr.config import ModelConfig
    from nemo_rlsr.models.hf import adapter_for
    from nemo_rlsr.models.hf.fused import glu_shard, is_glu_fc1
    from nemo_rlsr.models.hf.load import global_parameters, is_tp_sharded
    from nemo_rlsr.weight_sync.shard_plan import ParamMeta, Worker, place, plan_param, take
    from nemo_rlsr.weight_sync.shard_refit import engine_layout

    vocab = 61
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                      max_sequence_length=32, add_qkv_bias=True, tie_embeddings=False, vocab_size=vocab)
    adapter = adapter_for("qwen2")
    model = random_tiny_gpt(cfg, vocab)
    layout = engine_layout(cfg, 4)
    workers = [Worker(r, r, (0, 1) if r < 2 else (2, 3)) for r in range(4)]
    received = [0] * 4
    full_stream = {}
    for name, param in global_parameters(model):
        full = param.detach()
        split = param.partition_dim if is_tp_sharded(param) else None
        shards = [full if split is None else glu_shard(full, t, 2) if is_glu_fc1(name) else full.chunk(2, split)[t]
                  for t in range(2)]
        meta = ParamMeta(name, tuple(full.shape), full.dtype, split, is_glu_fc1(name), 1 if split is None else 2)
        holders = {0: [0, 1, 2, 3]} if split is None else {t: [t, 2 + t] for t in range(2)}
        trimmed = full[:vocab] if name in ("embedding.word_embeddings.weight", "output_layer.weight") else full
        full_stream |= adapter.to_hf(cfg, name, trimmed)
        for planned in plan_param(meta, adapter, cfg, layout, workers, holders):
            truth = full_stream[planned.name]
            for rank, need in planned.needs.items():
                box = torch.empty(need.shape(planned.shape))
                for piece in (p for p in planned.pieces if p.dst == rank):
                    place(box, piece.box, take(shards[0 if split is None else piece.src % 2], piece.local))
                    received[rank] += 0 if piece.src == rank else box.dtype.itemsize * len(take(
                        shards[0 if split is None else piece.src % 2], piece.local).flatten())
                handed = EngineSlice(planned.shape, planned.dtype, need, box).materialize()
                assert torch.equal(trtllm_reads(handed, planned.name, layout, rank, need.dim or 0),
                                   trtllm_reads(truth, planned.name, layout, rank, need.dim or 0)), (planned.name, rank)
    assert {"model.layers.0.self_attn.k_proj.bias", "lm_head.weight"} <= set(full_stream)
    # worker 0 (TP rank 0) finds its quarter in its own half, worker 1 gets all of its quarter from
    # rank 0; worker 3 only vocabulary rows that megatron's padded split put on TP rank 0
    from nemo_rlsr.planner.refit import received_fractions

    shard = sum(t.numel() * t.element_size() for t in full_stream.values()) / 4
    assert received_fractions(2, 1, 4) == [0.0, 1.0, 1.0, 0.0]
    for got, fraction in zip(received, received_fractions(2, 1, 4)):
        assert abs(got - fraction * shard) <= 0.15 * shard, (received, shard)


def test_planner_received_fractions_by_hand():
    from nemo_rlsr.planner.refit import received_fractions, refit_received_bytes

    # TP=2 x PP=2, engine TP 4: ranks 0 and 3 hold their quarter for their own stage's layers (half)
    assert received_fractions(2, 2, 4) == [0.5, 1.0, 1.0, 0.5]
    assert received_fractions(2, 2, 2) == [0.5] * 4
    assert received_fractions(8, 1, 8) == [0.0] * 8            # the trainer's own layout: nothing moves
    assert received_fractions(2, 1, 4) == [0.0, 1.0, 1.0, 0.0]  # one engine over two replicas
    assert refit_received_bytes(100.0, 2, 2, 4) == 100.0        # the busiest GPU sets the refit's time
