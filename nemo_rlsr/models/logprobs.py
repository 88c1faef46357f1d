"""Per-token logprobs (and, where it is logged, entropy) of vocab-parallel logits, a chunk of tokens at a time.

Why chunked: the loss sees logits of [tokens, vocab / TP] entries. Computing log-softmax on all of
them at once builds several fp32 tensors of that size (the fp32 copy, logits / temperature, the
softmax the cross-entropy keeps for backward, and the entropy's exp and product): 20 bytes per
entry in fp32, about 5 GB each at 4 x 2048 tokens and a 152k vocabulary. Here the forward walks the
tokens in chunks of `chunk_tokens`, keeping only one fp32 number per token (its log-sum-exp) for the
backward, which recomputes each chunk's softmax and writes that chunk's gradient into the logits'
own storage (the logits are used by nothing else once the loss has read them: the output layer's
backward needs only their gradient). Peak temporaries are then O(chunk x vocab / TP) on top of the
logits themselves, whatever the sequence length: two fp32 chunk-sized tensors in the forward with
the entropy (logits / temperature and their exp), one without it and in the backward.

The numbers are those of megatron-core's `vocab_parallel_cross_entropy` (max-shifted log-sum-exp,
all-reduced over the TP group) with the temperature and the padded-vocabulary mask of
`models/gpt.mask_padded_vocab` applied first (tests/test_chunked_logprobs.py checks logprobs,
entropy and gradients against log_softmax of the gathered logits at TP=1 and TP=2).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _shard_bounds(local_vocab: int) -> tuple[int, int]:
    """Global vocabulary ids [start, end) of this TP rank's logits."""
    from megatron.core import parallel_state

    start = parallel_state.get_tensor_model_parallel_rank() * local_vocab
    return start, start + local_vocab


def _scaled(chunk: torch.Tensor, temperature: float, padded: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits / temperature of a chunk, padded vocabulary ids at a finite minimum (probability
    exactly 0, no NaN in p*log(p); the same value mask_padded_vocab uses). Always a new tensor."""
    scaled = chunk.float() / temperature
    if padded is not None:
        scaled.masked_fill_(padded, torch.finfo(torch.float32).min / 2)
    return scaled


def _local_targets(targets: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets shifted into this shard's columns, 0 where another rank holds them; mask of those here)."""
    here = (targets >= start) & (targets < end)
    return torch.where(here, targets - start, 0), here


class _ChunkedLogprobs(torch.autograd.Function):
    """log p(target) per token [N] of vocab-parallel logits [N, V/TP], and optionally the entropy [N]
    (a metric: no gradient). Backward overwrites the logits' storage with their gradient."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, true_vocab_size, chunk_tokens, with_entropy):
        group = _tp_group()
        tokens, local_vocab = logits.shape
        start, end = _shard_bounds(local_vocab)
        padded = None
        if end > true_vocab_size:
            padded = torch.arange(start, end, device=logits.device) >= true_vocab_size
        local_targets, here = _local_targets(targets, start, end)
        step = chunk_tokens if chunk_tokens > 0 else max(tokens, 1)
        lse = torch.empty(tokens, dtype=torch.float32, device=logits.device)
        picked = torch.empty(tokens, dtype=torch.float32, device=logits.device)
        entropy = torch.empty(tokens if with_entropy else 0, dtype=torch.float32, device=logits.device)
        for first in range(0, tokens, step):
            rows = slice(first, min(first + step, tokens))
            scaled = _scaled(logits[rows], temperature, padded)
            top = scaled.max(dim=-1).values
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            scaled -= top[:, None]
            target = scaled.gather(1, local_targets[rows, None])[:, 0] * here[rows]
            if with_entropy:  # sum p*x as a batched dot product: no third chunk-sized tensor
                exp = scaled.exp()
                sums = torch.stack([exp.sum(-1), target, torch.bmm(exp[:, None, :], scaled[:, :, None])[:, 0, 0]])
                del exp
            else:
                sums = torch.stack([scaled.exp_().sum(-1), target])
            del scaled
            dist.all_reduce(sums, group=group)
            log_z = sums[0].log()
            lse[rows] = top + log_z
            picked[rows] = sums[1] - log_z
            if with_entropy:
                entropy[rows] = log_z - sums[2] / sums[0]
        ctx.save_for_backward(logits, local_targets, here, lse, padded)
        ctx.temperature, ctx.step = temperature, step
        ctx.mark_non_differentiable(entropy)
        return picked, entropy

    @staticmethod
    def backward(ctx, grad_picked, _grad_entropy):
        logits, local_targets, here, lse, padded = ctx.saved_tensors
        temperature = ctx.temperature
        # d log p(t) / d logit_j = (onehot(t)_j - p_j) / temperature; p of padded ids is 0 (exp underflows).
        for first in range(0, logits.shape[0], ctx.step):
            rows = slice(first, min(first + ctx.step, logits.shape[0]))
            grad = _scaled(logits[rows], temperature, padded)
            grad.sub_(lse[rows, None]).exp_()  # p, from the forward's log-sum-exp
            scale = grad_picked[rows].float() / temperature
            grad.mul_(-scale[:, None])
            grad.scatter_add_(1, local_targets[rows, None], (scale * here[rows])[:, None])
            logits[rows] = grad  # this chunk of logits is not read again: its storage takes the gradient
        return logits, None, None, None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, true_vocab_size: int,
                   chunk_tokens: int, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(target) [b, T], entropy [b, T] or None) of softmax(logits / temperature) where
    `logits` [b, T, V/TP] are this TP rank's vocabulary shard (ids >= `true_vocab_size` are padding),
    `chunk_tokens` tokens at a time (0: all at once). The entropy is computed only `with_entropy`
    (it costs one more vocabulary-sized product per chunk). Autograd flows into `logits`, whose
    storage then holds their gradient: read nothing from them after backward."""
    shape = targets.shape
    flat = logits.reshape(-1, logits.shape[-1])
    picked, entropy = _ChunkedLogprobs.apply(flat, targets.reshape(-1), temperature, true_vocab_size,
                                             chunk_tokens, with_entropy)
    return picked.view(shape), entropy.view(shape) if with_entropy else None
