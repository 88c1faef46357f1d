"""One rank of tests/test_mla_tensor_parallel.py: `python mla_tp_worker.py <scenario> <out_dir>` (see
distributed_helpers.run_workers); writes `out_dir/rank{RANK}.pt`.

A DeepSeek-V3-style policy (multi-latent attention with a q latent; `moe`: sigmoid-routed experts
after a dense first layer) runs one optimizer step at several layouts of 2 ranks from the same
full weights: TP=1 (DP=2: both ranks take the whole batch, i.e. the step of one process), TP=2
(dense only: megatron refuses MoE at TP>1 without sequence parallelism) and TP=2 with sequence
parallelism. Every layout loads its shard of one seeded full state dict and reports every
parameter's gradient and updated weight gathered back to the full (TP=1) tensor, so the test
compares each parameter, not only the global gradient norm.

`dense_unfixed` runs the dense layouts with megatron's own MLA gradients (compat/megatron.py's two
fixes undone in this process), to show what the comparison catches.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from distributed_helpers import VOCAB, nll_loss, token_batch, worker_main
from moe_worker import tiny_moe_config
from nemo_rlsr.compat import megatron as compat
from nemo_rlsr.config import ModelConfig, OptimizerConfig
from nemo_rlsr.distributed.dims import ParallelDims
from nemo_rlsr.distributed.parallel import destroy_distributed, init_distributed
from nemo_rlsr.models.policy import MegatronPolicy

MICRO_BATCH = 2
MLA_FIELDS = dict(multi_latent_attention=True, qk_layernorm=True, q_lora_rank=32, kv_lora_rank=24, qk_head_dim=16,
                  qk_pos_emb_head_dim=8, v_head_dim=16)
LAYOUTS = {
    "dense": (("tp1", {"tp": 1}), ("tp2", {"tp": 2}), ("tp2_sp", {"tp": 2, "sequence_parallel": True})),
    "moe": (("tp1", {"tp": 1}), ("tp2_sp", {"tp": 2, "sequence_parallel": True})),
}
CONFIGS = {
    "dense": ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                         max_sequence_length=32, **MLA_FIELDS),
    "moe": dataclasses.replace(tiny_moe_config(), moe_router_score_function="sigmoid",
                               moe_router_enable_expert_bias=True, **MLA_FIELDS),
}
# No clipping: the gradients compared are the reduced ones the optimizer steps with.
OPTIMIZER = OptimizerConfig(lr=1e-2, clip_grad=0.0)


def _glu(name: str, model) -> bool:
    """megatron's gated fc1 holds [gate; up] per TP shard, so its full weight is not the plain concat."""
    return model.config.gated_linear_unit and "linear_fc1" in name


def to_full(name: str, tensor: torch.Tensor, param: torch.Tensor, full_shape: torch.Size, model) -> torch.Tensor:
    """The TP=1 tensor of `tensor`, this rank's shard of `param` or of its gradient (an all-gather
    over TP for split parameters; the experts are whole at expert_tensor_parallel=1)."""
    from megatron.core import parallel_state

    if param.shape == full_shape:
        return tensor.detach().clone()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    shards = [torch.empty_like(tensor) for _ in range(tp)]
    dist.all_gather(shards, tensor.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    dim = param.partition_dim
    if _glu(name, model):
        halves = [s.chunk(2, dim=dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(shards, dim=dim)


def to_shard(name: str, full: torch.Tensor, param: torch.Tensor, model, tp: int, tp_rank: int) -> torch.Tensor:
    """This rank's TP shard of the TP=1 tensor `full` (the inverse of `to_full`)."""
    if param.shape == full.shape:
        return full
    dim = param.partition_dim
    if _glu(name, model):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[tp_rank], up.chunk(tp, dim=dim)[tp_rank]], dim=dim)
    return full.chunk(tp, dim=dim)[tp_rank]


def full_weights(model) -> dict[str, torch.Tensor]:
    """One seeded TP=1 state dict, shaped from a TP=1 model's parameters (norms away from 1)."""
    g = torch.Generator().manual_seed(0)
    weights = {}
    for name, p in model.named_parameters():
        if "layernorm" in name:
            weights[name] = torch.rand(p.shape, generator=g) + 0.5
        else:
            weights[name] = torch.randn(p.shape, generator=g) * 0.05
    return weights


def run_layout(model_cfg: ModelConfig, index: int, layout: dict, weights: dict | None) -> tuple[dict, dict]:
    from megatron.core import parallel_state

    ctx = init_distributed(ParallelDims(seed=index + 1, **layout))
    policy = MegatronPolicy(model_cfg, OPTIMIZER, VOCAB, ctx)
    model, tp = policy.module, ctx.tp
    weights = weights or full_weights(model)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(to_shard(name, weights[name], p, model, tp, tp_rank))
    policy.optimizer.reload_model_params()  # the optimizer's copy of the weights
    batch = token_batch()
    before = policy.logprobs(batch, MICRO_BATCH)
    metrics = policy.train_step(batch, MICRO_BATCH, nll_loss)
    params = dict(model.named_parameters())
    result = {
        "logprobs": before, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
        # DDP's reduced gradient (finalize_model_grads done; no clipping, see OPTIMIZER)
        "grads": {n: to_full(n, p.main_grad, p, weights[n].shape, model) for n, p in params.items()},
        "weights_after": {n: to_full(n, p, p, weights[n].shape, model) for n, p in params.items()},
    }
    return result, weights


def scenario(name: str, fixes: bool):
    def run(out: Path) -> dict:
        if not fixes:  # megatron's own MLA gradients: the two shims' gates closed, as for a release that fixed them
            compat.MLA_ROPE_KEY_GRAD = compat.MLA_LATENT_NORM_GRAD = compat.Gate(fixed_in=(0, 0))
        results, weights = {}, None
        for i, (layout, kwargs) in enumerate(LAYOUTS[name]):
            if i:  # worker_main tears the last one down
                destroy_distributed()
            results[layout], weights = run_layout(CONFIGS[name], i, kwargs, weights)
        return results
    return run


SCENARIOS = {"dense": scenario("dense", True), "moe": scenario("moe", True),
             "dense_unfixed": scenario("dense", False)}

if __name__ == "__main__":
    worker_main(SCENARIOS)
