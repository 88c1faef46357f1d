"""The frozen KL reference policy, in one of two placements (`grpo.reference_placement`).

GRPO needs log pi_ref(token) of every sampled token once per step, from weights that never train.

- `resident`: a second MegatronPolicy (no optimizer, no grads) kept on the device. Memory: +1x the
  parameters in the parameter dtype on every GPU (2 bytes/param in bf16: 3 GB for a 1.5B model,
  16 GB for 8B at TP=1), plus nothing per step.
- `cpu_swap`: the reference weights live in host memory (pinned when CUDA is present). For the
  reference pass they are swapped, tensor by tensor, with the policy's own weights, the policy
  computes the logprobs, and the same swap puts everything back bit for bit. Memory: +1x the
  parameters in host memory per rank, one parameter tensor of device scratch at a time; time:
  each weight crosses PCIe twice per direction per step (params x 2 bytes / ~25 GB/s each way).

The swap writes through `param.data` in place, so megatron DDP's contiguous parameter buffers
(each param a view into one), the DistributedOptimizer's views, and the rollout engine's handle
on the module all stay valid; no optimizer step runs while the reference weights are in. With FP8
delayed scaling the reference pass also updates the shared amax history (TE state, not weights).
"""

from __future__ import annotations

from pathlib import Path

import torch

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.config.rules import REFERENCE_PLACEMENTS
from nemo_rlsr.distributed.parallel import ParallelContext
from nemo_rlsr.models.policy import MegatronPolicy, TokenBatch


class ResidentReference:
    """Its own frozen MegatronPolicy on the device."""

    def __init__(self, model_cfg: ModelConfig, vocab_size: int, ctx: ParallelContext) -> None:
        self.policy = MegatronPolicy(model_cfg, None, vocab_size, ctx)

    def freeze_from(self, policy: MegatronPolicy) -> None:
        self.policy.weights.load_state_dict(policy.weights.state_dict())

    def load(self, path: Path) -> None:
        from nemo_rlsr.trainer.checkpoint import load_checkpoint

        load_checkpoint(path, self.policy, load_optimizer=False)

    def logprobs(self, batch: TokenBatch, micro_batch_size: int, temperature: float = 1.0,
                 max_tokens: int | None = None) -> torch.Tensor:
        return self.policy.logprobs(batch, micro_batch_size, temperature, max_tokens)


class CpuSwapReference:
    """Reference weights in host memory, swapped into `policy`'s module for each reference pass."""

    def __init__(self, policy: MegatronPolicy) -> None:
        self.policy = policy
        self.host: dict[str, torch.Tensor] = {}

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.policy.weights.named_parameters())

    def freeze_from(self, policy: MegatronPolicy) -> None:
        if policy is not self.policy:
            raise ValueError("a cpu_swap reference freezes the policy it swaps into")
        pin = torch.cuda.is_available()
        self.host = {name: p.detach().to("cpu", copy=True) for name, p in self._params().items()}
        if pin:
            self.host = {name: t.pin_memory() for name, t in self.host.items()}

    @torch.no_grad()
    def _swap(self) -> None:
        """Exchange the module's weights with the host copy (an involution: twice is identity)."""
        for name, param in self._params().items():
            scratch = param.detach().clone()
            param.detach().copy_(self.host[name])
            self.host[name].copy_(scratch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the device->host copies above must land before host reuse

    def load(self, path: Path) -> None:
        """Load a checkpoint's weights as the reference, through the policy's module; the
        policy's own weights (and its optimizer's main copies) are put back afterwards."""
        from nemo_rlsr.trainer.checkpoint import load_checkpoint

        self.freeze_from(self.policy)  # host := the policy's weights, for the moment
        load_checkpoint(path, self.policy, load_optimizer=False)
        self._swap()  # host := the checkpoint's weights, module := the policy's again
        if self.policy.optimizer is not None:
            self.policy.optimizer.reload_model_params()

    def logprobs(self, batch: TokenBatch, micro_batch_size: int, temperature: float = 1.0,
                 max_tokens: int | None = None) -> torch.Tensor:
        self._swap()
        try:
            return self.policy.logprobs(batch, micro_batch_size, temperature, max_tokens)
        finally:
            self._swap()


def build_reference(placement: str, policy: MegatronPolicy, model_cfg: ModelConfig, vocab_size: int,
                    ctx: ParallelContext):
    if placement == "resident":
        return ResidentReference(model_cfg, vocab_size, ctx)
    if placement == "cpu_swap":
        return CpuSwapReference(policy)
    raise ValueError(f"grpo.reference_placement={placement!r}: choose one of {', '.join(REFERENCE_PLACEMENTS)}")
