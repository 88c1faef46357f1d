"""Brief language-model pre-training of the tiny random-init base on plain reference text.

The embedded demo starts from random weights, which do not learn under the embedding reward (the
policy collapses to one token and every group's rewards tie, so GRPO's advantages are all zero).
A few hundred LM steps on the references, with no prompts, give a base that writes varied answer-like
sentences but does not know which answer goes with which question: that mapping is what RLSR learns.
"""

from __future__ import annotations

import torch

from nemo_rlsr.config import PretrainConfig
from nemo_rlsr.data.tokenizer import WordTokenizer
from nemo_rlsr.models.policy import MegatronPolicy, TokenBatch


def text_stream_batch(
    tokenizer: WordTokenizer, texts: list[str], rows: int, length: int, generator: torch.Generator
) -> TokenBatch:
    """`rows` windows of `length` tokens cut from a stream of the texts in random order, each as
    `<bos> text <eos>`, as LM pre-training sees documents. A text thus appears after arbitrary
    context, so the base learns to start a fresh answer whatever precedes it."""
    encoded = [[tokenizer.bos_id] + tokenizer.encode(t) + [tokenizer.eos_id] for t in texts]
    ids = torch.empty(rows, length, dtype=torch.long)
    for row in range(rows):
        stream: list[int] = []
        while len(stream) < 2 * length:
            for index in torch.randperm(len(encoded), generator=generator).tolist():
                stream.extend(encoded[index])
        start = int(torch.randint(len(stream) - length, (1,), generator=generator))
        ids[row] = torch.tensor(stream[start : start + length])
    valid = torch.ones(rows, length, dtype=torch.bool)
    loss_mask = torch.ones(rows, length)
    loss_mask[:, -1] = 0.0  # the last position has no next token in the window
    return TokenBatch(ids, valid, loss_mask, {})


def nll_loss(logprobs: torch.Tensor, entropy: torch.Tensor, mb: TokenBatch):
    loss = -(logprobs * mb.loss_mask).sum()
    return loss, {"loss": loss.detach()}


def pretrain_on_text(
    policy: MegatronPolicy,
    tokenizer: WordTokenizer,
    texts: list[str],
    cfg: PretrainConfig,
    length: int,
    micro_batch_size: int,
    seed: int,
    progress=None,
) -> list[float]:
    """`cfg.steps` optimizer steps of next-token prediction on `texts`; returns the mean NLL per step."""
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(cfg.steps):
        batch = text_stream_batch(tokenizer, texts, cfg.batch_size, length, generator)
        metrics = policy.train_step(batch, micro_batch_size, nll_loss)
        losses.append(metrics["loss"])
        if progress is not None:
            progress.set_postfix(nll=f"{metrics['loss']:.3f}")
            progress.update(1)
    return losses
