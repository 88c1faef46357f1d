"""One rank of tests/test_sequence_parallel.py: `python sp_worker.py <dense | moe> <out_dir>` (see
distributed_helpers.run_workers); writes `out_dir/rank{RANK}.pt`.

Each scenario runs the same work at three layouts of 2 ranks, all from one set of weights (a dist
checkpoint saved by the first): TP=1 (DP=2: both ranks take the whole batch, i.e. the step of one
process), TP=2 with sequence parallelism, and (dense only) TP=2+SP with the norms' `sequence_parallel`
tags removed, to show what the comparison catches when the norms' gradients are not summed over TP.
The work: greedy generation with the torch sampler, logprobs, one optimizer step, logprobs again,
and the norm weights after the step.
"""

from __future__ import annotations

import dataclasses
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

MICRO_BATCH = 2
PROMPTS = [[5, 17, 42], [9, 33, 2, 80, 45, 61, 7], [11]]
# Layouts: (name, init_distributed kwargs, keep the norms' sequence_parallel tags)
LAYOUTS = {
    "dense": (("tp1", {"tp": 1}, True), ("tp2_sp", {"tp": 2, "sequence_parallel": True}, True),
              ("tp2_sp_untagged", {"tp": 2, "sequence_parallel": True}, False)),
    "moe": (("tp1", {"tp": 1}, True), ("tp2_sp", {"tp": 2, "sequence_parallel": True}, True)),
}


def odd_length_batch() -> TokenBatch:
    """The shared 4-row batch cut to 15 tokens: not divisible by TP=2, so the policy must pad it."""
    full = token_batch()
    loss_mask = full.loss_mask[:, :15].clone()
    loss_mask[:, -1] = 0.0  # its target fell off the end
    return TokenBatch(full.input_ids[:, :15], full.valid[:, :15], loss_mask, {})


# Weights every TP rank holds whole: the norms, and (at expert_tensor_parallel=1) the router and experts.
REPLICATED = ("layernorm", "router", "local_experts")


def replicated_weights(policy: MegatronPolicy) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in policy.module.named_parameters()
            if any(part in name for part in REPLICATED)}


def run_layout(model_cfg, out: Path, index: int, layout: dict, tagged: bool) -> dict:
    # another seed per layout: weights come from the checkpoint
    ctx = init_distributed(ParallelDims(seed=index + 1, **layout))
    policy = MegatronPolicy(model_cfg, optimizer_config(), VOCAB, ctx)
    share_weights(policy, out, first=index == 0, prepare=randomize_norms)
    tags = {name: getattr(p, "sequence_parallel", None) for name, p in policy.module.named_parameters()
            if "layernorm" in name}
    if not tagged:
        for name, p in policy.module.named_parameters():
            if "layernorm" in name:
                p.sequence_parallel = False
    engine = TorchRolloutEngine(policy.module, pad_id=0, eos_id=VOCAB - 1, vocab_size=VOCAB)
    rollout = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, greedy=True, stop_on_eos=False), seed=0)
    batch = odd_length_batch()
    before = policy.logprobs(batch, MICRO_BATCH)
    metrics = policy.train_step(batch, MICRO_BATCH, nll_loss)
    result = {
        "sequence_parallel": policy.config.sequence_parallel,  # restored after generation
        "sequence_multiple": policy.sequence_multiple, "norm_tags": tags,
        "responses": rollout.response_ids, "engine_logprobs": rollout.engine_logprobs,
        "logprobs": before, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
        "logprobs_after": policy.logprobs(batch, MICRO_BATCH), "replicated_after": replicated_weights(policy),
    }
    return result


def scenario(model_cfg, name: str):
    def run(out: Path) -> dict:
        results = {}
        for i, (layout, kwargs, tagged) in enumerate(LAYOUTS[name]):
            if i:  # worker_main tears the last one down
                destroy_distributed()
            results[layout] = run_layout(model_cfg, out, i, kwargs, tagged)
        return results
    return run


SCENARIOS = {
    "dense": scenario(tiny_model_config(), "dense"),
    # Qwen3-MoE-like: qk-norm, a dense first layer, routed + shared experts
    "moe": scenario(dataclasses.replace(tiny_moe_config(), qk_layernorm=True), "moe"),
}

# dist_checkpointing's writer starts a `spawn` multiprocessing Manager, which re-imports this module.
if __name__ == "__main__":
    worker_main(SCENARIOS)
