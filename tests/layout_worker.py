"""One rank of tests/test_uneven_pipeline.py: `python layout_worker.py <scenario> <out_dir>` (see
distributed_helpers.run_workers); writes `out_dir/rank{RANK}.pt`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from distributed_helpers import worker_main, VOCAB, nll_loss, optimizer_config, tiny_model_config, token_batch
from nemo_rlsr.distributed.dims import ParallelDims
from nemo_rlsr.distributed.parallel import destroy_distributed, init_distributed
from nemo_rlsr.models.policy import MegatronPolicy
from nemo_rlsr.trainer.checkpoint import load_checkpoint, save_checkpoint

MICRO_BATCH = 2
THREE_LAYERS = dataclasses.replace(tiny_model_config(), num_layers=3)


def scenario_uneven(out: Path) -> dict:
    """3 layers: PP=1 (DP=2, both ranks the whole batch: the same step as one process) against PP=2
    split 1 + 2 from the same checkpoint; then the uneven layout's checkpoint back into PP=1."""
    batch = token_batch()
    ctx = init_distributed(ParallelDims(seed=1))
    policy = MegatronPolicy(THREE_LAYERS, optimizer_config(), VOCAB, ctx)
    save_checkpoint(out / "even", 0, policy, {})
    metrics_pp1 = policy.train_step(batch, MICRO_BATCH, nll_loss)
    logprobs_pp1 = policy.logprobs(batch, MICRO_BATCH)
    destroy_distributed()

    # another seed: weights from the checkpoint
    ctx = init_distributed(ParallelDims(pp=2, seed=2, first_stage_layers=1))
    policy = MegatronPolicy(THREE_LAYERS, optimizer_config(), VOCAB, ctx)
    stage_layers = len(policy.module.decoder.layers)
    load_checkpoint(out / "even" / "step_0000000", policy)
    metrics_pp2 = policy.train_step(batch, MICRO_BATCH, nll_loss)
    logprobs_pp2 = policy.logprobs(batch, MICRO_BATCH)
    save_checkpoint(out / "uneven", 1, policy, {})
    destroy_distributed()

    ctx = init_distributed(ParallelDims(seed=3))
    policy = MegatronPolicy(THREE_LAYERS, optimizer_config(), VOCAB, ctx)
    load_checkpoint(out / "uneven" / "step_0000001", policy)
    return {"metrics_pp1": metrics_pp1, "metrics_pp2": metrics_pp2, "logprobs_pp1": logprobs_pp1,
            "logprobs_pp2": logprobs_pp2, "stage_layers": stage_layers,
            "logprobs_reloaded": policy.logprobs(batch, MICRO_BATCH)}


SCENARIOS = {"uneven": scenario_uneven}


# dist_checkpointing's writer starts a `spawn` multiprocessing Manager, which re-imports this module.
if __name__ == "__main__":
    worker_main(SCENARIOS)
