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


def plain_text_batch(tokenizer: WordTokenizer, texts: list[str]) -> TokenBatch:
    """Rows `text <eos>` right-padded; every real next token is a target."""
    rows = [tokenizer.encode(t) + [tokenizer.eos_id] for t in texts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)
    valid = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        valid[i, : len(row)] = True
    loss_mask = torch.zeros(len(rows), length)
    loss_mask[:, :-1] = valid[:, 1:].float()
    return TokenBatch(ids, valid, loss_mask, {})


def nll_loss(logprobs: torch.Tensor, entropy: torch.Tensor, mb: TokenBatch):
    loss = -(logprobs * mb.loss_mask).sum()
    return loss, {"loss": loss.detach()}


def pretrain_on_text(
    policy: MegatronPolicy,
    data: TokenBatch,
    cfg: PretrainConfig,
    micro_batch_size: int,
    seed: int,
    progress=None,
) -> list[float]:
    """`cfg.steps` optimizer steps on random rows of `data`; returns the per-step mean NLL."""
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(cfg.steps):
        rows = torch.randint(len(data), (cfg.batch_size,), generator=generator)
        batch = TokenBatch(data.input_ids[rows], data.valid[rows], data.loss_mask[rows], {})
        metrics = policy.train_step(batch, micro_batch_size, nll_loss)
        losses.append(metrics["loss"])
        if progress is not None:
            progress.set_postfix(nll=f"{metrics['loss']:.3f}")
            progress.update(1)
    return losses
