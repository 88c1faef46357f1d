"""The policy's megatron optimizer (`build_optimizer`) and one step of it that refuses a non-finite update, with a single gradient-norm pass.

megatron's `optimizer.step()` prepares the gradients, computes their global norm (one pass over
every gradient plus an all-reduce over the model-parallel group), clips and steps; it has no hook
to refuse a NaN/Inf norm (with bf16 or fp32 there is no grad scaler to catch it). Asking for the
norm first and then calling `step()` would compute it twice. Here the steps of `step()` run one by
one, with the decision in the middle: `prepare_grads()`, `get_grad_norm()`, then either nothing or
clipping by that norm (`clip_grad_by_total_norm_fp32`, what `clip_grad_norm` / ChainedOptimizer.step
do after their own norm pass) and `step_with_ready_grads()`.

Read from megatron-core's `megatron/core/optimizer/optimizer.py` at core_v0.16.1 and core_v0.19.0
(FP32Optimizer / MixedPrecisionOptimizer / ChainedOptimizer `step`): those are the public methods
every optimizer class has in both. 0.19's separately clipped "grad norm groups" are a per-parameter
opt-in (`_get_param_grad_norm_group`) that nothing here registers.
"""

from __future__ import annotations

import math

import torch

from nemo_rlsr.config import OptimizerConfig


def step_unless_nonfinite(optimizer, loss: float) -> tuple[bool, float, bool]:
    """(applied, grad_norm, nonfinite): the update is applied only if `loss` and the global gradient norm are
    finite (and megatron's grad scaler, if any, found no inf). Every rank decides alike: both
    numbers are globally reduced."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    found_inf = optimizer.prepare_grads()
    norm = float(optimizer.get_grad_norm())
    if found_inf or not (math.isfinite(norm) and math.isfinite(loss)):
        return False, norm, True
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(part, "is_stub_optimizer", False):  # a rank without parameters of this kind
            continue
        params = part.get_parameters()
        if part.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(params, part.config.clip_grad, norm,
                                         part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), norm, False


def build_optimizer(cfg: OptimizerConfig, models: list):
    """megatron's Adam over the policy's (DDP-wrapped) chunks; bf16 parameters get fp32 main weights."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    return get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            clip_grad=cfg.clip_grad,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
            # bf16 parameters: megatron keeps fp32 main weights and Adam state (mixed precision).
            bf16=models[0].config.params_dtype == torch.bfloat16,
            params_dtype=models[0].config.params_dtype,
        ),
        models,
    )
