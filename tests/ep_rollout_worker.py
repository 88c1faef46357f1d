"""One rank of the expert-parallel rollout test: `python ep_rollout_worker.py rollout <out_dir>`.

A tiny MoE MegatronPolicy is built at EP=1 (DP=2) and saved as a dist checkpoint, then rebuilt at
EP=2 (each rank holds half the experts) from that checkpoint. In each CASE the two ranks own
different prompt sets (different counts and lengths). At EP=1 every rank generates BOTH sets, one
call each: the single-process reference. At EP=2 each rank generates only its own set, in
lockstep with the other rank (the MoE layers exchange tokens). EOS is the token that the first row
of the one-prompt set draws at step 1 in the reference, so that rank runs out of rows after two
steps while the other goes on. Also which layouts lock at all (`lockstep_group`): EP=2 yes, EP=1
and TP=2+EP=2 (the expert group is the TP group, whose ranks share prompts) no.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from distributed_helpers import VOCAB, optimizer_config, share_weights, worker_main
from moe_worker import tiny_moe_config
from nemo_rlsr.distributed.dims import ParallelDims
from nemo_rlsr.distributed.parallel import destroy_distributed, init_distributed
from nemo_rlsr.generation.interface import SamplingParams
from nemo_rlsr.generation.lockstep import lockstep_group
from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine
from nemo_rlsr.models.policy import MegatronPolicy

PAD = 0
LONG_SET = [[5, 17, 42, 99, 3, 60, 64], [9, 33], [12, 7, 81, 45, 2]]
SHORT_SET = [[23, 77, 11]]
# (name, prompt set of rank 0, prompt set of rank 1, sampling): greedy with one row per prompt,
# then sampled with 2 rows per prompt (their prompt's cache shared) and the roles swapped.
CASES = (
    ("greedy", SHORT_SET, LONG_SET, SamplingParams(max_new_tokens=6, greedy=True)),
    ("sampled", LONG_SET, SHORT_SET, SamplingParams(max_new_tokens=6, temperature=0.8, n=2)),
)
SEED = 11


def outputs(batch) -> dict:
    """What must not depend on the layout: the tokens, their logprobs, and which rows were cut."""
    return {"tokens": batch.response_ids, "truncated": batch.truncated.tolist(),
            "logprobs": [row[mask > 0] for row, mask in zip(batch.engine_logprobs, batch.response_mask)]}


def randomize(module) -> None:
    """Weights far from megatron's small init (same on both ranks: one seed, one parameter order), so
    that tokens depend on the prompt and routing differs from token to token; a near-uniform model
    would repeat its last prompt token whatever the layers compute."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.3 * noise if param.dim() == 1 else 0.15 * noise)


def eos_token(module, sets, params) -> int:
    """The step-1 token of the first row of the one-prompt set, without EOS stops."""
    short = next(s for s in sets if len(s) == 1)
    engine = TorchRolloutEngine(module, PAD, PAD, VOCAB)
    free = engine.generate(short, dataclasses.replace(params, stop_on_eos=False), SEED)
    return free.response_ids[0][1]


def scenario_rollout(out: Path) -> dict:
    result = {}
    for ep in (1, 2):
        # another seed per layout: weights come from the checkpoint
        ctx = init_distributed(ParallelDims(seed=ep, ep=ep))
        policy = MegatronPolicy(tiny_moe_config(), optimizer_config(), VOCAB, ctx)
        share_weights(policy, out, first=ep == 1, prepare=randomize)
        result[f"lockstep_ep{ep}"] = lockstep_group() is not None
        for name, set0, set1, params in CASES:
            if ep == 1:
                result[f"{name}_eos"] = eos_token(policy.module, (set0, set1), params)
            engine = TorchRolloutEngine(policy.module, PAD, result[f"{name}_eos"], VOCAB)
            if ep == 1:  # each set alone, as a single process would
                result[f"{name}_ep1"] = [outputs(engine.generate(s, params, SEED)) for s in (set0, set1)]
            else:  # each rank its own set, in lockstep
                result[f"{name}_ep2"] = outputs(engine.generate((set0, set1)[ctx.dp_rank], params, SEED))
        result["dp_rank"] = ctx.dp_rank
        destroy_distributed()
    init_distributed(ParallelDims(tp=2, ep=2))  # both ranks hold the same prompts (one TP group): nothing to lock
    result["lockstep_tp2_ep2"] = lockstep_group() is not None
    return result


if __name__ == "__main__":
    worker_main({"rollout": scenario_rollout})
