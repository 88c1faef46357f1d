"""`model.params_dtype=bfloat16`: every parameter in bf16 (megatron's local-spec norms included),
megatron's mixed-precision optimizer with fp32 main weights, a step close to the fp32 one, and an
exact checkpoint round trip (CPU, the real MegatronPolicy)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nemo_rlsr.trainer.fingerprint import module_sha256
from tests.distributed_helpers import VOCAB, nll_loss, optimizer_config, tiny_model_config, token_batch


def build(ctx, dtype: str, state=None):
    from nemo_rlsr.models.policy import MegatronPolicy

    policy = MegatronPolicy(dataclasses.replace(tiny_model_config(), params_dtype=dtype), optimizer_config(), VOCAB, ctx)
    if state is not None:
        with torch.no_grad():
            for p, value in zip(policy.module.parameters(), state):
                p.copy_(value)
        policy.optimizer.reload_model_params()  # the fp32 main copies follow the new weights
    return policy


def test_bf16_policy_is_mixed_precision_and_checkpoints_exactly(single_rank, tmp_path):
    from nemo_rlsr.trainer.checkpoint import load_checkpoint, save_checkpoint

    fp32 = build(single_rank, "float32")
    bf16 = build(single_rank, "bfloat16", [p.detach().to(torch.bfloat16) for p in fp32.module.parameters()])
    assert {p.dtype for p in bf16.module.parameters()} == {torch.bfloat16}
    (inner,) = bf16.optimizer.chained_optimizers
    main = [p for group in inner.fp32_from_float16_groups for p in group]
    assert len(main) == len(list(bf16.module.parameters())) and {p.dtype for p in main} == {torch.float32}

    metrics = [policy.train_step(token_batch(), 2, nll_loss) for policy in (fp32, bf16)]
    assert metrics[1]["loss"] == pytest.approx(metrics[0]["loss"], rel=2e-2)
    assert metrics[1]["grad_norm"] == pytest.approx(metrics[0]["grad_norm"], rel=5e-2)

    path = save_checkpoint(tmp_path, 1, bf16, {"step": 1}, checksums=False)
    expected_next = bf16.train_step(token_batch(), 2, nll_loss)
    expected_weights = module_sha256(bf16.module)
    restored = build(single_rank, "bfloat16")
    load_checkpoint(path, restored)
    assert restored.train_step(token_batch(), 2, nll_loss) == expected_next
    assert module_sha256(restored.module) == expected_weights


def test_bf16_attention_softmax_runs_in_fp32(single_rank):
    """TransformerConfig.bf16 follows model.params_dtype, so megatron's local attention upcasts its
    scores to fp32 for the softmax (FusedScaleMaskSoftmax does only for inputs flagged bf16/fp16);
    the fused softmax stays off, its causal kernel would ignore the batch's mask (models/gpt.py)."""
    from torch.overrides import TorchFunctionMode

    softmax_inputs = []

    class RecordSoftmax(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.softmax:
                softmax_inputs.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    bf16 = build(single_rank, "bfloat16")
    assert (bf16.config.bf16, bf16.config.fp16) == (True, False)
    assert build(single_rank, "float32").config.bf16 is False
    attention = [m.scale_mask_softmax for m in bf16.module.modules() if hasattr(m, "scale_mask_softmax")]
    assert len(attention) == 2 and not any(s.scaled_masked_softmax_fusion for s in attention)
    with RecordSoftmax():
        bf16.logprobs(token_batch(), 2)
    assert softmax_inputs and set(softmax_inputs) == {torch.float32}, softmax_inputs
