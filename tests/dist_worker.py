"""One rank of a multi-rank test: `python dist_worker.py <scenario> <out_dir>` (see distributed_helpers).

Each scenario writes `out_dir/rank{RANK}.pt`, a dict the test asserts on. Scenarios that compare two
parallel layouts run both in one process group lifetime each: build at layout A, save a dist
checkpoint, `destroy_distributed()`, re-init at layout B, load the checkpoint (resharding), so
both layouts start from the same weights.
"""

from __future__ import annotations

import hashlib
import logging
import random
from functools import partial
from pathlib import Path

import torch

from distributed_helpers import worker_main, nll_loss, optimizer_config, tiny_model_config, token_batch, VOCAB
from nemo_rlsr.distributed.dims import ParallelDims
from nemo_rlsr.distributed.parallel import destroy_distributed, init_distributed
from nemo_rlsr.models.gpt import mask_padded_vocab
from nemo_rlsr.models.logprobs import token_logprobs
from nemo_rlsr.models.policy import MegatronPolicy, attention_mask
from nemo_rlsr.trainer.checkpoint import load_checkpoint, save_checkpoint

MICRO_BATCH = 2


def param_hash(policy: MegatronPolicy) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(policy.module.state_dict().items()):
        if isinstance(value, torch.Tensor):
            digest.update(name.encode())
            digest.update(value.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def full_vocab_logits(policy: MegatronPolicy) -> torch.Tensor:
    """[B, T, V] masked logits of the whole vocabulary at TP=1, PP=1 (plain-torch reference)."""
    batch = token_batch()
    positions = torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids)
    policy.module.eval()
    with torch.no_grad():
        logits = policy.module(batch.input_ids, positions, attention_mask(batch.valid))
    return mask_padded_vocab(logits.float(), VOCAB)


def vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of this TP rank's vocabulary shard of `logits` (no padded ids), as the loss computes it."""
    with torch.no_grad():
        return token_logprobs(logits, torch.zeros(logits.shape[:-1], dtype=torch.long), 1.0, 10**9, 5, True)[1]


def dp_half(rank: int):
    """This DP rank's half of the batch (rows 0-1 or 2-3: 16 vs 15 loss tokens)."""
    return token_batch().slice(2 * rank, 2 * rank + 2)


def scenario_tp(out: Path) -> dict:
    batch = token_batch()
    ctx = init_distributed(ParallelDims(seed=1))
    policy = MegatronPolicy(tiny_model_config(), None, VOCAB, ctx)
    logprobs_tp1 = policy.logprobs(batch, MICRO_BATCH)
    logits = full_vocab_logits(policy)
    reference_logprobs = torch.log_softmax(logits, -1).gather(-1, batch.targets[..., None])[..., 0]
    entropy_tp1 = vocab_parallel_entropy(logits)
    reference_entropy = torch.distributions.Categorical(logits=logits).entropy()
    save_checkpoint(out / "ckpt", 0, policy, {})
    destroy_distributed()

    ctx = init_distributed(ParallelDims(tp=2, seed=2))  # another seed: the weights must come from the checkpoint
    policy = MegatronPolicy(tiny_model_config(), None, VOCAB, ctx)
    load_checkpoint(out / "ckpt" / "step_0000000", policy)
    logprobs_tp2 = policy.logprobs(batch, MICRO_BATCH)
    # Entropy of a vocab-sharded tensor: each rank holds its half of the same random logits.
    full = torch.randn(4, 16, 128, generator=torch.Generator().manual_seed(3)) * 3
    shard = full.chunk(2, dim=-1)[ctx.rank]
    entropy_sharded = vocab_parallel_entropy(shard)
    return {
        "logprobs_tp1": logprobs_tp1,
        "reference_logprobs": reference_logprobs,
        "logprobs_tp2": logprobs_tp2,
        "entropy_tp1": entropy_tp1,
        "reference_entropy": reference_entropy,
        "entropy_tp2_sharded": entropy_sharded,
        "entropy_tp2_reference": torch.distributions.Categorical(logits=full).entropy(),
    }


def scenario_pp(out: Path) -> dict:
    batch = token_batch()
    # PP=1 on 2 ranks is DP=2; both ranks get the whole batch, which is the same step as DP=1.
    ctx = init_distributed(ParallelDims(seed=1))
    policy = MegatronPolicy(tiny_model_config(), optimizer_config(), VOCAB, ctx)
    save_checkpoint(out / "ckpt", 0, policy, {})
    metrics_pp1 = policy.train_step(batch, MICRO_BATCH, nll_loss)
    logprobs_pp1 = policy.logprobs(batch, MICRO_BATCH)
    destroy_distributed()

    ctx = init_distributed(ParallelDims(pp=2, seed=2))
    policy = MegatronPolicy(tiny_model_config(), optimizer_config(), VOCAB, ctx)
    load_checkpoint(out / "ckpt" / "step_0000000", policy)
    metrics_pp2 = policy.train_step(batch, MICRO_BATCH, nll_loss)
    logprobs_pp2 = policy.logprobs(batch, MICRO_BATCH)
    return {"metrics_pp1": metrics_pp1, "metrics_pp2": metrics_pp2, "logprobs_pp1": logprobs_pp1, "logprobs_pp2": logprobs_pp2}


def scenario_dp_reference(out: Path) -> dict:
    """World size 1: the whole batch in one process."""
    ctx = init_distributed(ParallelDims(seed=1))
    policy = MegatronPolicy(tiny_model_config(), optimizer_config(), VOCAB, ctx)
    save_checkpoint(out / "ckpt", 0, policy, {})
    return {"metrics": policy.train_step(token_batch(), MICRO_BATCH, nll_loss)}


def scenario_dp_split(out: Path) -> dict:
    """DP=2 from the reference's checkpoint, each rank half the batch, one micro-batch per sequence."""
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("nemo_rlsr.trainer.checkpoint").addHandler(handler)
    ctx = init_distributed(ParallelDims(seed=2))
    policy = MegatronPolicy(tiny_model_config(), optimizer_config(), VOCAB, ctx)
    load_checkpoint(out / "ckpt" / "step_0000000", policy)
    half = dp_half(ctx.dp_rank)
    return {
        "metrics": policy.train_step(half, 1, nll_loss),
        "local_tokens": float(half.loss_mask.sum()),
        "warnings": warnings,
    }


def rng_draws() -> dict:
    """Draws from every RNG a checkpoint restores (megatron's tracker: the model-parallel stream)."""
    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracker = torch.rand(3)
    return {"torch": torch.rand(3), "tracker": tracker, "python": random.random(), "numpy": np.random.rand()}


def scenario_roundtrip(out: Path, distributed_optimizer: bool) -> dict:
    """DP=2, each rank its own half: train, save, train; then re-init, load, train the same step."""
    root = out / "ckpt"
    ctx = init_distributed(ParallelDims(seed=1))
    policy = MegatronPolicy(tiny_model_config(), optimizer_config(distributed_optimizer), VOCAB, ctx)
    half = dp_half(ctx.dp_rank)
    policy.train_step(half, 1, nll_loss)
    extra = {"step": 1, "sampler": {"epoch": 0, "index": 8}, "tokenizer": '{"vocab": ["a"]}'}
    # Different RNG states per rank, so a checkpoint that handed a rank another's would show.
    torch.manual_seed(100 + ctx.rank)
    random.seed(100 + ctx.rank)
    save_checkpoint(root, 1, policy, extra)
    draws_saved = rng_draws()
    metrics_2 = policy.train_step(half, 1, nll_loss)
    hash_2 = param_hash(policy)
    save_checkpoint(root, 2, policy, {**extra, "step": 2})
    latest_after_2 = (root / "latest").read_text().strip()
    destroy_distributed()

    ctx = init_distributed(ParallelDims(seed=2))
    policy = MegatronPolicy(tiny_model_config(), optimizer_config(distributed_optimizer), VOCAB, ctx)
    hash_fresh = param_hash(policy)
    extra_loaded = load_checkpoint(root / "step_0000001", policy)
    draws_loaded = rng_draws()
    metrics_2_resumed = policy.train_step(half, 1, nll_loss)
    hash_2_resumed = param_hash(policy)
    save_checkpoint(root, 3, policy, {**extra, "step": 3}, keep_last=2)
    return {
        "extra": extra,
        "extra_loaded": extra_loaded,
        "draws_saved": draws_saved,
        "draws_loaded": draws_loaded,
        "loss_2": metrics_2["loss"],
        "loss_2_resumed": metrics_2_resumed["loss"],
        "grad_norm_2": metrics_2["grad_norm"],
        "grad_norm_2_resumed": metrics_2_resumed["grad_norm"],
        "hash_2": hash_2,
        "hash_2_resumed": hash_2_resumed,
        "hash_fresh": hash_fresh,
        "latest_after_2": latest_after_2,
    }


SCENARIOS = {
    "tp": scenario_tp,
    "pp": scenario_pp,
    "dp_reference": scenario_dp_reference,
    "dp_split": scenario_dp_split,
    "roundtrip_distributed_optimizer": partial(scenario_roundtrip, distributed_optimizer=True),
    "roundtrip_optimizer": partial(scenario_roundtrip, distributed_optimizer=False),
}


# The guard matters: dist_checkpointing's writer starts a `spawn` multiprocessing Manager, which
# re-imports the main module.
if __name__ == "__main__":
    worker_main(SCENARIOS)
