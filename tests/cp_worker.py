"""One rank of tests/test_context_parallel.py: `python cp_worker.py <scenario> <out_dir>` (see
distributed_helpers.run_workers); writes `out_dir/rank{RANK}.pt`.

* `attention`: CP=2 `ContextParallelAttention` on each rank's chunks of random q/k/v (GQA), its
  output and q/k/v gradients gathered back to the whole sequence; the test compares them with
  plain full attention computed in one process.
* `policy`: the same work at two layouts of 2 ranks from one set of weights (a dist checkpoint
  saved by the first): CP=1 (DP=2: both ranks take the whole batch, i.e. one process's step) and
  CP=2; `tp2_policy` the same on 4 ranks with TP=2 in both layouts and the distributed optimizer, `moe_policy` with a Qwen3-MoE-like
  model (a dense first layer, routed + shared experts). The work: greedy generation with the torch sampler, logprobs of a padded batch and of a
  packed one, one optimizer step, logprobs again, every weight after the step; then a dist
  checkpoint saved at CP=2 is loaded back at CP=1.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import torch

from distributed_helpers import (VOCAB, nll_loss, optimizer_config, randomize_norms, share_weights, tiny_model_config,
                                 token_batch, worker_main)
from moe_worker import tiny_moe_config
from nemo_rlsr.distributed.dims import ParallelDims
from nemo_rlsr.distributed.parallel import destroy_distributed, init_distributed
from nemo_rlsr.generation.interface import SamplingParams
from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine
from nemo_rlsr.models.policy import MegatronPolicy, TokenBatch
from nemo_rlsr.trainer.checkpoint import load_checkpoint, save_checkpoint

MICRO_BATCH = 2
PROMPTS = [[5, 17, 42], [9, 33, 2, 80, 45, 61, 7], [11]]
# GQA: 4 query heads share 2 key/value heads
MODEL = dataclasses.replace(tiny_model_config(), num_query_groups=2)
# attention scenario: sequence, batch, query heads, kv heads, head dim
T, B, HEADS, GROUPS, DIM = 8, 2, 4, 2, 16


def attention_inputs() -> dict[str, torch.Tensor]:
    """Whole-sequence q/k/v [T, B, heads, dim], an output-gradient and a padding+causal mask, the
    same on every rank (and in the test)."""
    g = torch.Generator().manual_seed(0)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :3] = False  # a left-padded row
    return {
        "q": torch.randn(T, B, HEADS, DIM, generator=g), "k": torch.randn(T, B, GROUPS, DIM, generator=g),
        "v": torch.randn(T, B, GROUPS, DIM, generator=g), "grad": torch.randn(T, B, HEADS * DIM, generator=g),
        "valid": valid,
    }


def scenario_attention(out: Path) -> dict:
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_rlsr.models.context_parallel import ContextParallelAttention, gather_from_cp, split_for_cp
    from nemo_rlsr.models.gpt import transformer_config
    from nemo_rlsr.models.policy import attention_mask

    init_distributed(ParallelDims(cp=2, seed=1))
    cfg = dataclasses.replace(MODEL, hidden_size=HEADS * DIM, num_attention_heads=HEADS, num_query_groups=GROUPS)
    attention = ContextParallelAttention(transformer_config(cfg, ParallelDims(cp=2)), layer_number=1,
                                         attn_mask_type=AttnMaskType.causal, attention_type="self")
    x = attention_inputs()
    local = {k: split_for_cp(x[k], dim=0).requires_grad_() for k in ("q", "k", "v")}
    mask = attention_mask(x["valid"])  # whole [B, 1, T, T]: the module picks this rank's rows
    output = attention(local["q"], local["k"], local["v"], mask)
    (output * split_for_cp(x["grad"], dim=0)).sum().backward()

    def whole(t: torch.Tensor) -> torch.Tensor:  # [t, ...] -> the whole sequence, via the [B, T] gather
        return gather_from_cp(t.detach().movedim(0, 1)).movedim(1, 0)

    return {"output": whole(output), **{f"grad_{k}": whole(v.grad) for k, v in local.items()}}


def packed_batch() -> TokenBatch:
    """Two rows of 16 tokens, each packing two examples (segment ids), the last position padding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 16), generator=g)
    segments = torch.tensor([[0] * 6 + [1] * 9 + [-1], [0] * 11 + [1] * 4 + [-1]])
    valid = segments >= 0
    ids[~valid] = 0
    loss_mask = (valid & (torch.roll(segments, -1, 1) == segments)).float()  # no target across examples
    return TokenBatch(ids, valid, loss_mask, {}, segment_ids=segments)


def run_layout(out: Path, index: int, model, distributed: bool, **layout) -> dict:
    # another seed per layout: weights come from the checkpoint
    ctx = init_distributed(ParallelDims(seed=index + 1, **layout))
    policy = MegatronPolicy(model, optimizer_config(distributed), VOCAB, ctx)
    share_weights(policy, out, first=index == 0, prepare=randomize_norms)
    engine = TorchRolloutEngine(policy.module, pad_id=0, eos_id=VOCAB - 1, vocab_size=VOCAB)
    # 7 + 9 = 16 tokens: the length of the batch below, whose RoPE table megatron memoises by length alone
    rollout = engine.generate(PROMPTS, SamplingParams(max_new_tokens=9, greedy=True, stop_on_eos=False), seed=0)
    batch = token_batch()
    result = {
        "dp": ctx.dp, "sequence_multiple": policy.sequence_multiple,
        "context_parallel_size": policy.config.context_parallel_size,  # restored after generation
        "responses": rollout.response_ids, "engine_logprobs": rollout.engine_logprobs,
        "logprobs": policy.logprobs(batch, MICRO_BATCH),
        "packed_logprobs": policy.logprobs(packed_batch(), MICRO_BATCH),
    }
    metrics = policy.train_step(batch, MICRO_BATCH, nll_loss)
    result.update(loss=metrics["loss"], num_tokens=metrics["num_tokens"], grad_norm=metrics["grad_norm"],
                  logprobs_after=policy.logprobs(batch, MICRO_BATCH),
                  weights_after={k: v.detach().clone() for k, v in policy.module.named_parameters()})
    if ctx.cp > 1:  # save at CP=2 (with the optimizer), load back at CP=1 below
        save_checkpoint(out / "ckpt_cp", 1, policy, {})
    return result


def scenario_policy(out: Path, tp: int = 1, model=MODEL, distributed: bool = False) -> dict:
    """`distributed`: megatron's DistributedOptimizer, which shards its state over DP x CP."""
    results = {"cp1": run_layout(out, 0, model, distributed, tp=tp, cp=1)}
    destroy_distributed()
    results["cp2"] = run_layout(out, 1, model, distributed, tp=tp, cp=2)
    destroy_distributed()
    ctx = init_distributed(ParallelDims(tp=tp, cp=1, seed=7))
    policy = MegatronPolicy(model, optimizer_config(distributed), VOCAB, ctx)
    load_checkpoint(out / "ckpt_cp" / "step_0000001", policy)
    results["reloaded"] = {k: v.detach().clone() for k, v in policy.module.named_parameters()}
    return results


SCENARIOS = {"attention": scenario_attention, "policy": scenario_policy,
             # on 4 ranks: TP=2 x CP=2 against TP=2 x DP=2, distributed optimizer
             "tp2_policy": partial(scenario_policy, tp=2, distributed=True),
             "moe_policy": partial(scenario_policy, model=tiny_moe_config())}

# dist_checkpointing's writer starts a `spawn` multiprocessing Manager, which re-imports this module.
if __name__ == "__main__":
    worker_main(SCENARIOS)
