"""One rank of the refit tests: `python weight_sync_worker.py <scenario> <out_dir>` (distributed_helpers).

`refit_tp` / `refit_pp`: stream the HF tensors of the tiny policy at TP=1, save a dist checkpoint,
re-init at TP=2 (or PP=2), load it (resharding) and stream again; each rank saves both streams.
`shard_refit`: the same TP=1 weights loaded at TP=2 x PP=2 (4 ranks); each rank saves the TP=1 full
stream, our logits (last stage), and per engine size (4 and 2) its engine group, the parts it got
from `ShardRefit` and the bytes it received. `shard_refit_ep`: the same for a tiny MoE trained at
expert parallel 2, engine TP 2 with engine expert parallel 1 and 2.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distributed_helpers import worker_main, VOCAB, tiny_model_config
from nemo_rlsr.distributed.dims import ParallelDims
from nemo_rlsr.distributed.parallel import destroy_distributed, init_distributed
from nemo_rlsr.models.policy import MegatronPolicy
from nemo_rlsr.trainer.checkpoint import load_checkpoint, save_checkpoint
from nemo_rlsr.weight_sync.buckets import iter_buckets
from nemo_rlsr.weight_sync.shard_refit import ShardRefit
from nemo_rlsr.weight_sync.source import hf_named_tensors


def bucketed_stream(policy) -> dict[str, torch.Tensor]:
    stream = hf_named_tensors(policy.module, policy.hf_adapter, tiny_model_config(), VOCAB)
    return {name: tensor.clone() for bucket in iter_buckets(stream, 16_384) for name, tensor in bucket}


def scenario_refit(out: Path, tp: int, pp: int) -> dict:
    ctx = init_distributed(ParallelDims(seed=1))
    policy = MegatronPolicy(tiny_model_config(), None, VOCAB, ctx)
    tp1 = bucketed_stream(policy)
    save_checkpoint(out / "ckpt", 0, policy, {})
    destroy_distributed()
    # another seed: the weights must come from the checkpoint
    ctx = init_distributed(ParallelDims(tp=tp, pp=pp, seed=2))
    policy = MegatronPolicy(tiny_model_config(), None, VOCAB, ctx)
    load_checkpoint(out / "ckpt" / "step_0000000", policy)
    return {"tp1": tp1, f"{'tp' if tp > 1 else 'pp'}2": bucketed_stream(policy)}


@torch.no_grad()
def scenario_shard_refit(out: Path) -> dict:
    from hf_worker import input_ids, megatron_logits

    ctx = init_distributed(ParallelDims(seed=1))
    policy = MegatronPolicy(tiny_model_config(), None, VOCAB, ctx)
    full = bucketed_stream(policy)
    save_checkpoint(out / "ckpt", 0, policy, {})
    destroy_distributed()
    ctx = init_distributed(ParallelDims(tp=2, pp=2, seed=2))
    policy = MegatronPolicy(tiny_model_config(), None, VOCAB, ctx)
    load_checkpoint(out / "ckpt" / "step_0000000", policy)
    result = {"full": full, "logits": megatron_logits(policy.module.eval(), input_ids(VOCAB), VOCAB),
              "own_bytes": sum(p.numel() * p.element_size() for chunk in policy.chunks for p in chunk.parameters())}
    for engine_tp in (4, 2):
        refit = ShardRefit(policy.chunks, policy.hf_adapter, tiny_model_config(), VOCAB, engine_tp)
        parts = {name: (part.need, part.data.clone()) for name, part in refit.stream() if part.need is not None}
        result[engine_tp] = {"group": refit.engine_group, "parts": parts, "received": refit.received_bytes}
    return result


@torch.no_grad()
def scenario_shard_refit_ep(out: Path) -> dict:
    """A tiny MoE trained at EP=2 (2 ranks, each with half the experts): the EP=1 full stream, and
    per engine expert parallel (1, 2) of an engine of TP 2 the parts each rank got."""
    from moe_worker import tiny_moe_config

    from nemo_rlsr.models.hf import adapter_for

    adapter = adapter_for("qwen3_moe")  # names only: the tiny MoE has no config.json to pick one from
    ctx = init_distributed(ParallelDims(seed=1))
    policy = MegatronPolicy(tiny_moe_config(), None, VOCAB, ctx)
    full = {name: t.clone() for name, t in hf_named_tensors(policy.module, adapter, tiny_moe_config(), VOCAB)}
    save_checkpoint(out / "ckpt", 0, policy, {})
    destroy_distributed()
    ctx = init_distributed(ParallelDims(ep=2, seed=2))
    policy = MegatronPolicy(tiny_moe_config(), None, VOCAB, ctx)
    load_checkpoint(out / "ckpt" / "step_0000000", policy)
    result = {"full": full}
    for engine_ep in (1, 2):
        refit = ShardRefit(policy.chunks, adapter, tiny_moe_config(), VOCAB, 2, engine_ep)
        parts = {name: (part.need, part.data.clone()) for name, part in refit.stream() if part.need is not None}
        result[engine_ep] = {"group": refit.engine_group, "parts": parts, "received": refit.received_bytes}
    return result


SCENARIOS = {"refit_tp": lambda out: scenario_refit(out, tp=2, pp=1),
             "refit_pp": lambda out: scenario_refit(out, tp=1, pp=2),
             "shard_refit": scenario_shard_refit,
             "shard_refit_ep": scenario_shard_refit_ep}


# The guard matters: dist_checkpointing's writer starts a `spawn` multiprocessing Manager.
if __name__ == "__main__":
    worker_main(SCENARIOS)
