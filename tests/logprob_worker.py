"""Chunked vocab-parallel logprobs against two references, on this rank's TP shard of shared logits:
`python logprob_worker.py tp2 OUT` on 2 gloo ranks (distributed_helpers.run_workers), or
`compare_with_references()` in-process at TP=1.

References, both on the same full logits [b, T, V] (every rank draws them from one seed):
- plain torch: log_softmax / Categorical entropy of the whole vocabulary, padded ids masked;
- today's path before chunking: megatron's vocab_parallel_cross_entropy of this shard's
  mask_padded_vocab(logits.float() / temperature).
Gradients: every path is back-propagated from the same upstream gradient, d(GRPO loss)/d(logprobs)
taken at the reference logprobs (clip, k3 KL, masked tokens), so that the loss's exponentials do
not amplify the logprobs' last-bit differences into the comparison of the logprob gradients.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distributed_helpers import worker_main
from nemo_rlsr.algorithms.grpo import GRPOLossConfig, grpo_loss

ROWS, LENGTH, PADDED_VOCAB, TRUE_VOCAB = 3, 11, 128, 121  # 7 padded ids, all on the last TP rank
TEMPERATURE = 0.7
CHUNKS = (0, 1, 4, 7)  # 0: all tokens at once; 4 and 7 do not divide the 33 tokens


def shared_inputs(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(ROWS, LENGTH, PADDED_VOCAB, generator=gen) * 2).to(dtype)
    targets = torch.randint(0, TRUE_VOCAB, (ROWS, LENGTH), generator=gen)
    mask = (torch.rand(ROWS, LENGTH, generator=gen) > 0.3).float()
    return {"logits": logits, "targets": targets, "mask": mask,
            "old": -torch.rand(ROWS, LENGTH, generator=gen) * 8, "ref": -torch.rand(ROWS, LENGTH, generator=gen) * 8,
            "adv": torch.randn(ROWS, generator=gen)}


def loss_of(logprobs: torch.Tensor, x: dict) -> torch.Tensor:
    return grpo_loss(logprobs, x["old"], x["ref"], x["adv"], x["mask"], GRPOLossConfig(kl_coef=0.1))[0]


def compare_with_references(tp_rank: int, tp: int, dtype: torch.dtype = torch.float32) -> dict:
    """Max abs differences of logprobs and entropy, and of the gradient of this rank's shard relative
    to the reference gradient's largest entry, per chunk size."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from nemo_rlsr.models.gpt import mask_padded_vocab
    from nemo_rlsr.models.logprobs import token_logprobs

    x = shared_inputs(dtype)
    local = PADDED_VOCAB // tp
    columns = slice(tp_rank * local, (tp_rank + 1) * local)

    full = x["logits"].float().clone().requires_grad_()
    scaled = full / TEMPERATURE
    scaled = scaled.masked_fill(torch.arange(PADDED_VOCAB) >= TRUE_VOCAB, float("-inf"))
    reference_logprobs = torch.log_softmax(scaled, -1).gather(-1, x["targets"][..., None])[..., 0]
    reference_entropy = torch.distributions.Categorical(logits=scaled.detach()).entropy()
    at_reference = reference_logprobs.detach().requires_grad_()
    upstream = torch.autograd.grad(loss_of(at_reference, x), at_reference)[0]
    reference_logprobs.backward(upstream)
    reference_grad = full.grad[..., columns]
    grad_scale = full.grad.abs().max().item()

    shard = x["logits"][..., columns].clone().requires_grad_()
    before = -vocab_parallel_cross_entropy(mask_padded_vocab(shard.float() / TEMPERATURE, TRUE_VOCAB), x["targets"])
    before.backward(upstream)
    result = {"before_vs_reference": {"logprobs": (before - reference_logprobs).abs().max().item(),
                                      "grad": (shard.grad.float() - reference_grad).abs().max().item() / grad_scale}}
    for chunk in CHUNKS:
        shard = x["logits"][..., columns].clone().requires_grad_()
        # `shard * 1`: like the model's logits, a non-leaf whose storage backward may take over
        logprobs, entropy = token_logprobs(shard * 1, x["targets"], TEMPERATURE, TRUE_VOCAB, chunk, True)
        logprobs.backward(upstream)
        result[chunk] = {"logprobs": (logprobs - reference_logprobs).abs().max().item(),
                         "entropy": (entropy - reference_entropy).abs().max().item(),
                         "grad": (shard.grad.float() - reference_grad).abs().max().item() / grad_scale}
        with torch.no_grad():
            lean, none = token_logprobs(x["logits"][..., columns], x["targets"], TEMPERATURE, TRUE_VOCAB, chunk, False)
        result[chunk]["no_entropy"] = none is None
        result[chunk]["forward_only"] = (lean - reference_logprobs).abs().max().item()
    return result


def scenario_tp2(out: Path) -> dict:
    from nemo_rlsr.distributed.dims import ParallelDims
    from nemo_rlsr.distributed.parallel import init_distributed

    from megatron.core import parallel_state

    init_distributed(ParallelDims(tp=2, seed=1))
    rank = parallel_state.get_tensor_model_parallel_rank()
    return {"float32": compare_with_references(rank, 2), "bfloat16": compare_with_references(rank, 2, torch.bfloat16)}


if __name__ == "__main__":
    worker_main({"tp2": scenario_tp2})
