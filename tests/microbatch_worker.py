"""One rank of the unequal-micro-batch tests: `python microbatch_worker.py <reference | packed | budget> <out_dir>`.

Two DP ranks with unequal length mixes: rank 0 holds most of the examples (long ones), rank 1 a
few short ones, so rank 0 has more micro-batches than rank 1, both with SFT packing (fixed
micro-batches of packed rows) and with token budgets. Each scenario trains one step of a dense
policy (DP=2) and of a tiny MoE policy at EP=2 (its expert layers all-gather tokens across the two
DP ranks in every micro-batch: a rank that stops early leaves its peer waiting), then takes the
logprobs of a fixed probe batch. `pipeline`: the dense step at PP=2 with all examples under a
token budget (micro-batches of varying shapes cross the stage boundary). `thd_*`: the THD layout at
PP=2, TP=2 + SP and EP=2 (scenario_thd). `reference` runs the same steps on one rank with all examples,
one per row, fixed micro-batches; the test compares.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distributed_helpers import VOCAB, nll_loss, optimizer_config, worker_main
from moe_worker import tiny_moe_config
from nemo_rlsr.distributed.dims import ParallelDims
from nemo_rlsr.distributed.parallel import destroy_distributed, init_distributed
from nemo_rlsr.data.packing import packed_sft_batch
from nemo_rlsr.models.microbatches import plan_micro_batches
from nemo_rlsr.models.policy import MegatronPolicy
from nemo_rlsr.trainer.checkpoint import load_checkpoint, save_checkpoint
from nemo_rlsr.trainer.sft import sft_batch

PAD = 0
LENGTH = 32  # tiny_moe_config's max_sequence_length: the packed row and the probe width
MODELS = {"dense": {}, "moe": {"ep": 2}}  # name -> ParallelDims at 2 ranks (the reference runs them at 1)
BUDGET = 2 * LENGTH


def examples(rank: int) -> list[tuple[list[int], int]]:
    """(ids, prompt length) of rank `rank`'s share: rank 0 ten examples of 10-28 tokens, rank 1 two of 4-6."""
    g = torch.Generator().manual_seed(10 + rank)
    count, low, high = (10, 10, 29) if rank == 0 else (2, 4, 7)
    out = []
    for _ in range(count):
        length = int(torch.randint(low, high, (1,), generator=g))
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append((torch.randint(1, VOCAB, (length,), generator=g).tolist(), prompt))
    return out


def policy_for(name: str, dims: dict, out: Path, first: bool, layout: str = "auto") -> MegatronPolicy:
    """The model `name` with the weights every scenario shares (saved by the reference, loaded by the
    others), in a fresh process group (the previous model's is torn down first)."""
    if torch.distributed.is_initialized():
        destroy_distributed()
    ctx = init_distributed(ParallelDims(seed=7, **dims))
    cfg = tiny_moe_config()
    cfg.attention_layout = layout
    if name == "dense":
        cfg.num_moe_experts, cfg.moe_first_dense_layers = None, None
    policy = MegatronPolicy(cfg, optimizer_config(), VOCAB, ctx)
    if first:
        save_checkpoint(out / f"ckpt_{name}", 0, policy, {})
    else:
        load_checkpoint(out / f"ckpt_{name}" / "step_0000000", policy, load_optimizer=False)
    return policy


def step_and_probe(policy: MegatronPolicy, batch, micro_batch_size: int, max_tokens: int | None) -> dict:
    metrics = policy.train_step(batch, micro_batch_size, nll_loss, max_tokens=max_tokens)
    probe = sft_batch(examples(0) + examples(1), LENGTH, PAD)
    return {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "num_tokens": metrics["num_tokens"],
            "probe_logprobs": policy.logprobs(probe, 4) * probe.loss_mask}


def scenario_reference(out: Path) -> dict:
    result = {}
    for name in MODELS:
        policy = policy_for(name, {}, out, first=True)
        result[name] = step_and_probe(policy, sft_batch(examples(0) + examples(1), LENGTH, PAD), 1, None)
    return result


def scenario(out: Path, packed: bool) -> dict:
    result = {}
    for name, dims in MODELS.items():
        policy = policy_for(name, dims, out, first=False)
        mine = examples(policy.ctx.dp_rank)
        if packed:
            batch, micro, budget = packed_sft_batch(mine, LENGTH, PAD, rows_multiple=1), 1, None
        else:
            batch, micro, budget = sft_batch(mine, LENGTH, PAD), 1, BUDGET
        count = len(plan_micro_batches(batch, micro, budget, policy.sequence_multiple))
        result[name] = {**step_and_probe(policy, batch, micro, budget), "local_micro_batches": count}
    return result


def scenario_pipeline(out: Path) -> dict:
    """PP=2 under a token budget: stages exchange activations of a different shape per micro-batch."""
    policy = policy_for("dense", {"pp": 2}, out, first=False)
    batch = sft_batch(examples(0) + examples(1), LENGTH, PAD)
    return {"dense": step_and_probe(policy, batch, 1, BUDGET)}


THD_LAYOUTS = {"thd_pp2": {"pp": 2}, "thd_tp2_sp": {"tp": 2, "sequence_parallel": True}, "thd_moe_ep2": {"ep": 2}}


def scenario_thd(out: Path, layout: str) -> dict:
    """The THD layout (models/packed_seq.py) across ranks: packed rows, one per micro-batch, so every
    micro-batch is a stream of another length (PP: stages exchange each one's shape; TP + SP: the
    stream is padded to a multiple of TP and split along it; EP: ranks exchange streams of different
    lengths), and the probe's rows as streams too."""
    dims = THD_LAYOUTS[layout]
    name = "moe" if "ep" in dims else "dense"
    policy = policy_for(name, dims, out, first=False, layout="thd")
    assert policy.thd
    everything = examples(0) + examples(1)
    mine = everything if "ep" not in dims else examples(policy.ctx.dp_rank)
    return {name: step_and_probe(policy, packed_sft_batch(mine, LENGTH, PAD, rows_multiple=1), 1, None)}


if __name__ == "__main__":
    worker_main({"reference": scenario_reference,
                 "packed": lambda out: scenario(out, packed=True),
                 "budget": lambda out: scenario(out, packed=False),
                 "pipeline": scenario_pipeline,
                 **{layout: (lambda out, layout=layout: scenario_thd(out, layout)) for layout in THD_LAYOUTS}})
