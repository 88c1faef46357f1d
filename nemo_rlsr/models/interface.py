"""What the trainers need from a trainable policy, independent of how it is built.

`MegatronPolicy` (models/policy.py) is the one implementation: a megatron-core GPTModel under
megatron DDP and optimizer. The trainers (trainer/run.py, rlsr.py, sft.py) and the base
pre-training call only what is listed here; the parts that are megatron's by nature stay with
the code that needs them (checkpoint.py saves megatron sharded state dicts, the rollout engines run
`MegatronPolicy.module`, the KL reference swaps its parameters).

Loss functions (`LossFn`) return the SUM of their per-token loss over a micro-batch; the policy
divides the gradients by the valid-token count of the whole step (all micro-batches and DP ranks),
so the objective is the step's token mean however the batch is split. (docs/design.md: the
protocols the trainers hold.)
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from nemo_rlsr.config import OptimizerConfig
from nemo_rlsr.models.policy import LossFn, TokenBatch


@runtime_checkable
class Policy(Protocol):
    @property
    def device(self) -> torch.device:
        """Where the model lives; batches are moved there."""

    @property
    def weights(self) -> torch.nn.Module:
        """Every parameter of this rank in one module (digests)."""

    @property
    def num_parameters(self) -> int:
        """Parameters of this rank's shard (throughput metrics)."""

    def logprobs(self, batch: TokenBatch, micro_batch_size: int, temperature: float = 1.0,
                 max_tokens: int | None = None) -> torch.Tensor:
        """log softmax(logits / temperature) of `batch.targets`, [B, T], no gradient. `max_tokens`:
        token-budget micro-batches instead of `micro_batch_size` rows (models/microbatches.py)."""

    def train_step(self, batch: TokenBatch, micro_batch_size: int, loss_fn: LossFn, skip_nonfinite: bool = False,
                   temperature: float = 1.0, max_tokens: int | None = None, with_entropy: bool = False
                   ) -> dict[str, float]:
        """One optimizer step; the loss sees logprobs at `temperature` (1: a likelihood objective),
        and their entropy `with_entropy` (else None)."""

    def set_learning_rate(self, lr: float) -> None:
        """The learning rate of the next optimizer steps (a schedule sets it before each step)."""

    def rebuild_optimizer(self, optim_cfg: OptimizerConfig) -> None:
        """A fresh optimizer (new settings, empty state)."""
