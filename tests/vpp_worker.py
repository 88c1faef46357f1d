"""One rank of tests/test_interleaved_pipeline.py: `python vpp_worker.py <scenario> <out_dir>` (see
distributed_helpers.run_workers); writes `out_dir/rank{RANK}.pt`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from distributed_helpers import (VOCAB, nll_loss, optimizer_config, share_weights, tiny_model_config, token_batch,
                                 worker_main)
from nemo_rlsr.distributed.dims import ParallelDims
from nemo_rlsr.distributed.parallel import destroy_distributed, init_distributed
from nemo_rlsr.models.hf import adapter_for_model
from nemo_rlsr.models.hf.load import load_hf_weights
from nemo_rlsr.models.hf.save import save_hf_checkpoint
from nemo_rlsr.models.policy import MegatronPolicy
from nemo_rlsr.trainer.checkpoint import load_checkpoint, save_checkpoint

MICRO_BATCH = 2  # 4 rows: 2 micro-batches, one group of PP=2 for the interleaved schedule
FOUR_LAYERS = dataclasses.replace(tiny_model_config(), num_layers=4, vocab_size=VOCAB)
ADAPTER = adapter_for_model(FOUR_LAYERS)


def scenario_interleaved(out: Path) -> dict:
    """4 layers: PP=1 (DP=2, both ranks the whole batch: the same step as one process) against
    PP=2 x VPP=2 (rank 0 holds layers 1 and 3, rank 1 layers 2 and 4) from the same checkpoint;
    then the interleaved layout's checkpoint back into PP=1. HF: the PP=1 start exported and read
    into interleaved chunks; the trained interleaved model exported (compared with PP=1's export)."""
    batch = token_batch()
    ctx = init_distributed(ParallelDims(seed=1))
    policy = MegatronPolicy(FOUR_LAYERS, optimizer_config(), VOCAB, ctx)
    save_checkpoint(out / "plain", 0, policy, {})
    save_hf_checkpoint(policy.module, ADAPTER, FOUR_LAYERS, out / "hf_start")
    logprobs_start = policy.logprobs(batch, MICRO_BATCH)
    metrics_pp1 = policy.train_step(batch, MICRO_BATCH, nll_loss)
    logprobs_pp1 = policy.logprobs(batch, MICRO_BATCH)
    destroy_distributed()

    ctx = init_distributed(ParallelDims(pp=2, seed=2, vpp=2))  # another seed: weights from the checkpoint
    policy = MegatronPolicy(FOUR_LAYERS, optimizer_config(), VOCAB, ctx)
    chunk_layers = [[layer.layer_number for layer in chunk.decoder.layers] for chunk in policy.chunks]
    load_checkpoint(out / "plain" / "step_0000000", policy)
    metrics_vpp = policy.train_step(batch, MICRO_BATCH, nll_loss)
    logprobs_vpp = policy.logprobs(batch, MICRO_BATCH)
    # one micro-batch of 4 rows: logprobs pads it to a whole group of PP micro-batches
    logprobs_vpp_one_micro = policy.logprobs(batch, len(batch))
    try:
        policy.module
        module_error = ""
    except ValueError as error:
        module_error = str(error)
    save_checkpoint(out / "interleaved", 1, policy, {})
    save_hf_checkpoint(policy.chunks, ADAPTER, FOUR_LAYERS, out / "hf_vpp")
    from_hf = MegatronPolicy(FOUR_LAYERS, None, VOCAB, ctx)
    load_hf_weights(from_hf.chunks, ADAPTER, FOUR_LAYERS, out / "hf_start")
    logprobs_hf_start = from_hf.logprobs(batch, MICRO_BATCH)
    destroy_distributed()

    ctx = init_distributed(ParallelDims(seed=3))
    policy = MegatronPolicy(FOUR_LAYERS, optimizer_config(), VOCAB, ctx)
    load_checkpoint(out / "interleaved" / "step_0000001", policy)
    save_hf_checkpoint(policy.module, ADAPTER, FOUR_LAYERS, out / "hf_pp1")
    return {"metrics_pp1": metrics_pp1, "metrics_vpp": metrics_vpp, "logprobs_pp1": logprobs_pp1,
            "logprobs_vpp": logprobs_vpp, "logprobs_vpp_one_micro": logprobs_vpp_one_micro,
            "chunk_layers": chunk_layers, "module_error": module_error,
            "logprobs_start": logprobs_start, "logprobs_hf_start": logprobs_hf_start,
            "logprobs_reloaded": policy.logprobs(batch, MICRO_BATCH)}


def scenario_interleaved_dp2(out: Path) -> dict:
    """4 ranks, distributed optimizer: PP=1 x DP=4 (one row per rank) against PP=2 x VPP=2 x DP=2
    (two rows per DP rank, one micro-batch each: one group of PP) from the same checkpoint. The same
    global batch, so the same step: the interleaved schedule's grads reduced over DP like plain ones."""
    batch = token_batch()
    result = {}
    for name, layout in (("pp1", {"pp": 1}), ("vpp", {"pp": 2, "vpp": 2})):
        if result:
            destroy_distributed()
        ctx = init_distributed(ParallelDims(seed=1 + len(result), **layout))
        policy = MegatronPolicy(FOUR_LAYERS, optimizer_config(distributed=True), VOCAB, ctx)
        share_weights(policy, out, first=name == "pp1")
        rows = len(batch) // ctx.dp
        mine = batch.slice(ctx.dp_rank * rows, (ctx.dp_rank + 1) * rows)
        result[name] = {"dp": ctx.dp, "metrics": policy.train_step(mine, 1, nll_loss),
                        "logprobs": policy.logprobs(batch, MICRO_BATCH)}
    return result


SCENARIOS = {"interleaved": scenario_interleaved, "interleaved_dp2": scenario_interleaved_dp2}


# dist_checkpointing's writer starts a `spawn` multiprocessing Manager, which re-imports this module.
if __name__ == "__main__":
    worker_main(SCENARIOS)
