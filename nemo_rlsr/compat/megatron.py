"""Every place our code depends on which megatron-core is installed, or works around what it does.

The only module that reads megatron-core's version or probes its attributes. Each shim has a `Gate`:
the releases it applies to, read in Megatron-LM's tags (core_v0.16.1, core_v0.17.1, core_v0.18.2,
core_v0.19.0; paths below are under megatron/core/) and checked against the installed one (0.16.1 on
the CPU machines, 0.19.x on GPU boxes). tests/test_megatron_compat.py runs megatron's own code without
each shim on the installed release and asserts that the defect shows exactly where the gate says the
shim applies, so after an upgrade a failing test names the shim to retire (set `fixed_in`) or extend.
That test passed in CI on 0.16.1 and, by hand, with the 0.17.1, 0.18.2 and 0.19.2 wheels' `megatron`
first on PYTHONPATH (Python 3.11; the triton kernels of the MoE paged stash stubbed, nothing here
calls them): each gate's boundary is the release where the test sees megatron change.

| shim | megatron-core does | gate | still-needed test |
|---|---|---|---|
| `patch_module_globals` router GEMM | moe/moe_utils.py reads `te_general_gemm`, undefined without TE | < 0.17 | test_megatron_compat |
| `patch_module_globals` MLA TE flag | multi_latent_attention.py sets HAVE_TE from TE's mock extension | < 0.17 | test_megatron_compat |
| `mark_gradient_reductions` experts | tensor_parallel/layers.py tags experts for expert DP only at EP > 1 | < 0.19 | test_megatron_compat |
| `mark_gradient_reductions` MLA q norm | finalize_model_grads sums the replicated latent norm over TP | all | test_mla_tensor_parallel |
| `LocalMLASelfAttention` | drops the other TP ranks' rope-key gradient on the local spec | all | test_mla_tensor_parallel |
| `MLADotProductAttention` | puts DotProductAttention, without k/v_channels, under local MLA | all | test_megatron_compat |
| `SequenceParallelNorm` | the local spec's WrappedTorchNorm refuses sequence parallelism | all | test_megatron_compat |
| `forget_rotary_tables` | memoises RoPE tables per length, not per CP group (lru_cache) | all | test_megatron_compat |
| `allocate_optimizer_state` | torch-Adam DistributedOptimizer asserts on empty state | all | test_megatron_compat |
| `unshare_adam_steps` | torch-Adam DistributedOptimizer loads one `step` tensor for all | all | test_megatron_compat |
| `checkpoint_metadata` | default optimizer format fails ("flattened_range") | not gated | test_megatron_compat |
| `static_inference_wrapper` | InferenceWrapperConfig API, replaced by StaticInferenceContext | < 0.17 | test_megatron_compat |
| `restored_inference_mode` | StaticInferenceEngine sets InferenceMode, never cleared | >= 0.18 | test_megatron_compat |

Not here: capabilities the local spec lacks by design and that we add (context parallel attention,
models/context_parallel.py), and the CPU stand-ins for torch.cuda (distributed/cpu_compat.py).
"""

from __future__ import annotations

import copy
import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.utils import get_pg_size

from nemo_rlsr.models.spec import replace_module


@functools.lru_cache(maxsize=None)
def mcore_version() -> tuple[int, int]:
    """(major, minor) of the installed megatron-core."""
    from megatron.core import package_info

    major, minor = package_info.__version__.split(".")[:2]
    return int(major), int(minor)


@dataclass(frozen=True)
class Gate:
    """The megatron-core releases a shim applies to: from `since` (None: every release we support,
    0.16 on) up to, not including, `fixed_in` (None: not fixed in the newest release read, 0.19)."""

    since: tuple[int, int] | None = None
    fixed_in: tuple[int, int] | None = None

    def applies(self, version: tuple[int, int] | None = None) -> bool:
        version = version or mcore_version()
        return (self.since is None or version >= self.since) and (self.fixed_in is None or version < self.fixed_in)


# ---- module globals megatron-core 0.16 leaves wrong without Transformer Engine --------------------

# 0.16.1 moe/moe_utils.py imports `te_general_gemm` inside a try that defines nothing when TE is
# missing, and RouterGatingLinearFunction reads it (NameError); 0.17.1 on set it to None there.
ROUTER_GEMM_NAME = Gate(fixed_in=(0, 17))
# 0.16.1 transformer/multi_latent_attention.py sets HAVE_TE = True once megatron's TE extension
# imports, which it does with mock classes, and then calls isinstance(linear_proj, <mock>) (TypeError
# at build time); 0.17.1 on take HAVE_TE from extensions/transformer_engine.py, False without TE.
MLA_TE_FLAG = Gate(fixed_in=(0, 17))


def patch_module_globals() -> None:
    """Set the two module globals above to what megatron-core 0.17 sets them to. Idempotent; called
    before any model is built (models/gpt.build_gpt)."""
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    from nemo_rlsr.models.precision import installed_te_version

    if ROUTER_GEMM_NAME.applies() and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # None selects its plain-torch GEMM
    if MLA_TE_FLAG.applies() and installed_te_version() is None:
        multi_latent_attention.HAVE_TE = False


# ---- gradient reductions megatron tags wrongly ---------------------------------------------------

# tensor_parallel/layers.py, 0.16.1 to 0.18.2: an expert linear's weight gets `allreduce=False`
# (reduce over the expert-data-parallel group) only at EP > 1. At EP = 1 with ETP != TP (e.g. TP=2,
# ETP=1 under sequence parallelism) each TP rank routes its own tokens through whole experts, so its
# expert gradient is a partial sum, and DDP's dense DP group excludes the TP peers: the ranks' experts
# drift apart. 0.19.0 tags them whenever EP > 1 or ETP != TP (`use_expert_pgs`).
EXPERT_GRADS_AT_EP1 = Gate(fixed_in=(0, 19))
# distributed/finalize_model_grads.py sums every `*q_layernorm*` gradient over TP under qk_layernorm
# (right for per-head qk norms); MLA's q latent norm acts on the replicated latent, so at TP>1 without
# sequence parallelism every rank already holds the whole gradient and the sum multiplies it by TP.
MLA_LATENT_NORM_GRAD = Gate()


def mark_gradient_reductions(model: torch.nn.Module) -> None:
    """Tag the parameters whose gradient reduction megatron gets wrong (the two gates above). Call
    before DDP wraps the model: it sorts parameters into its buffers by these tags."""
    config = model.config
    experts_split_otherwise = (config.num_moe_experts and config.expert_model_parallel_size == 1
                               and config.expert_tensor_parallel_size != config.tensor_model_parallel_size)
    if EXPERT_GRADS_AT_EP1.applies() and experts_split_otherwise:
        for module in model.modules():
            if getattr(module, "is_expert", False):
                for param in module.parameters(recurse=False):
                    param.allreduce = False
    latent_norm_summed = (config.multi_latent_attention and not config.sequence_parallel
                          and config.tensor_model_parallel_size > 1)
    if MLA_LATENT_NORM_GRAD.applies() and latent_norm_summed:
        for name, param in model.named_parameters():
            if "self_attention.q_layernorm." in name:
                param.average_gradients_across_tp_domain = True  # the average of equal gradients


# ---- multi-latent attention on the local layer spec ----------------------------------------------

# models/gpt/gpt_layer_specs.py puts the local backend's DotProductAttention under MLASelfAttention,
# which builds it with `k_channels` / `v_channels` (TypeError: transformer/dot_product_attention.py
# takes neither) and would size its output by `kv_channels`, not the value head dim. 0.16.1 to 0.19.0.
MLA_CORE_ATTENTION = Gate()
# The local spec's MLA down projections are ColumnParallelLinears whose outputs are all-gathered over
# TP; the gather's backward keeps only this rank's columns, assuming every rank holds the whole
# gradient. The q and kv latents' up projections all-reduce theirs, but the shared rope key
# (`k_pos_emb`, the last qk_pos_emb_head_dim columns) feeds the heads directly: each rank's gradient
# holds only its own heads' part, so `linear_kv_down_proj` and every earlier layer get a wrong
# gradient (a few % per parameter at TP=2), with or without sequence parallelism. 0.16.1 to 0.19.0.
MLA_ROPE_KEY_GRAD = Gate()


class MLADotProductAttention(DotProductAttention):
    """megatron's local core attention, taking MLA's separate q/k and v head dims: the output is
    sized by the value head dim; the attention math (baddbmm over whatever head dim q and k have)
    is megatron's."""

    def __init__(self, config, *args, k_channels: int | None = None, v_channels: int | None = None, **kwargs):
        if v_channels is not None:
            config = copy.copy(config)  # the output width is heads * v_channels; the model's config is untouched
            config.kv_channels = v_channels
        super().__init__(config, *args, **kwargs)


class _SumRopeKeyGradOverTP(torch.autograd.Function):
    """Identity forward; backward sums the gradient of the keys' rope columns (after the first
    `nope_dim`) over the TP group: every local head's rope key is the same copy of `k_pos_emb`, so
    the sum over local heads of the summed gradients is the sum over all heads."""

    @staticmethod
    def forward(ctx, key: torch.Tensor, nope_dim: int, group) -> torch.Tensor:
        ctx.nope_dim, ctx.group = nope_dim, group
        return key

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rope = grad[..., ctx.nope_dim:].contiguous()
        dist.all_reduce(rope, group=ctx.group)
        return torch.cat([grad[..., :ctx.nope_dim], rope], dim=-1), None, None


class LocalMLASelfAttention(MLASelfAttention):
    """megatron's MLASelfAttention with the rope key's gradient summed over TP (MLA_ROPE_KEY_GRAD)."""

    def get_query_key_value_tensors(self, *args, **kwargs):
        query, key, value, *latents = super().get_query_key_value_tensors(*args, **kwargs)
        if key.requires_grad and get_pg_size(self.tp_group) > 1:
            key = _SumRopeKeyGradOverTP.apply(key, self.config.qk_head_dim, self.tp_group)
        return (query, key, value, *latents)


def with_local_mla_attention(layer_spec):
    """A local layer spec whose MLA gets the two classes above (where their gates apply). In place."""
    attention = layer_spec.submodules.self_attention
    if MLA_ROPE_KEY_GRAD.applies():
        attention.module = LocalMLASelfAttention
    if MLA_CORE_ATTENTION.applies():
        attention.submodules.core_attention = MLADotProductAttention
    return layer_spec


# ---- norms of the local spec under sequence parallelism ------------------------------------------

# transformer/torch_norm.py: WrappedTorchNorm asserts `not config.sequence_parallel` (0.16.1 to
# 0.19.0). Under sequence parallelism each TP rank normalises its own slice of the sequence, so a norm
# weight's gradient covers that slice only; finalize_model_grads sums over TP every parameter tagged
# `sequence_parallel=True` (what TE's and apex's norms tag), and that tag is all the norm needs.
SP_NORMS = Gate()


class SequenceParallelNorm:
    """The torch.nn.RMSNorm / LayerNorm WrappedTorchNorm returns (parameter names `weight` / `bias`:
    HF adapters and checkpoints unchanged), parameters tagged `sequence_parallel=config.sequence_parallel`.
    A class with `__new__`, like WrappedTorchNorm: 0.16's `build_module` instantiates classes (and
    returns plain functions as they are), 0.19 calls the spec entry with keyword arguments; both get a
    plain torch module back."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused_megatron_options) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma is not supported by the local spec's torch norms")
        norms = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization={config.normalization!r}: the local spec builds {', '.join(norms)}")
        norm = norms[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def with_sequence_parallel_norms(spec, config, vp_stage: int | None = None):
    """`spec` (a local layer ModuleSpec or block spec) with SequenceParallelNorm for every
    WrappedTorchNorm: the layers' input / pre-MLP norms, qk-norms, MLA's latent norms, and the block's
    final norm, which megatron takes from the block spec or, for a single layer spec, from
    `transformer_block.LayerNormImpl` (such a spec becomes the block spec megatron would build for
    this stage's layers). A new spec tree: megatron's spec objects are left as they are."""
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if not SP_NORMS.applies():
        return spec
    if isinstance(spec, ModuleSpec):
        layers = transformer_block.get_num_layers_to_build(config, vp_stage=vp_stage)
        spec = transformer_block.TransformerBlockSubmodules(layer_specs=[spec] * layers,
                                                            layer_norm=transformer_block.LayerNormImpl)
    return replace_module(spec, WrappedTorchNorm, SequenceParallelNorm)


# ---- rotary tables -------------------------------------------------------------------------------

# models/common/embeddings/rotary_pos_embedding.py (and yarn_rotary_pos_embedding.py): `forward` is a
# functools.lru_cache keyed by (module, length, ...), not by the CP group it slices the table for, so
# switching a model's CP off and on (models/context_parallel.context_parallel_off) returns stale
# tables unless the memo is emptied. 0.16.1 to 0.19.0.
ROTARY_MEMO = Gate()


def forget_rotary_tables(rotaries: list[torch.nn.Module]) -> None:
    """Empty megatron's memo of RoPE tables for these rotary embeddings' classes."""
    if not ROTARY_MEMO.applies():
        return
    for forward in {type(r).forward for r in rotaries}:
        if hasattr(forward, "cache_clear"):
            forward.cache_clear()


# ---- the distributed optimizer's checkpoint ------------------------------------------------------

# optimizer/distrib_optimizer.py without TE / apex (torch Adam, `not HAVE_APEX_OR_TE`), 0.16.1 to
# 0.19.0: state_dict() reads Adam's `step` out of the per-parameter state and asserts there is one
# (none before the first step), and load_state_dict() puts ONE `step` tensor into every parameter's
# state, which torch Adam increments in place once per parameter per update (wrong bias correction).
ADAM_STEP_STATE = Gate()
def checkpoint_metadata() -> dict:
    """The `metadata=` of megatron's sharded_state_dict calls (the keyword 0.16 and 0.19 both take;
    `sharding_type=` is deprecated): the DistributedOptimizer's state in 'dp_reshardable', one shard
    per DP rank, no gather, reshardable across DP sizes only. Not gated: it is the format of our
    checkpoints, which load only in it. Why this one: optimizer/distrib_optimizer.py's default,
    'fully_sharded_model_space', makes ShardedTensors with a flattened_range that
    dist_checkpointing/mapping.py refuses (0.16.1 to 0.19.0), and 'fully_reshardable' /
    'dp_zero_gather_scatter' gather everything on DP rank 0. A new dict per call: megatron adds this
    process group's `dp_cp_group` to it (transformer/utils.py ensure_metadata_has_dp_cp_group)."""
    return {"distrib_optim_sharding_type": "dp_reshardable"}


def _inner_optimizers(optimizer) -> list:
    """The megatron optimizers inside `optimizer` (a ChainedOptimizer holds several)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def allocate_optimizer_state(optimizer) -> None:
    """Give a never-stepped optimizer its state by one zero-gradient step of the inner torch
    optimizers (what megatron's own FSDP loader does); the load overwrites the values, and the
    weights too, so the step's weight decay does not matter."""
    if not ADAM_STEP_STATE.applies():
        return
    for part in _inner_optimizers(optimizer):
        for group in part.optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        part.optimizer.step()
        part.optimizer.zero_grad()


def unshare_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam `step` tensor after a load."""
    if not ADAM_STEP_STATE.applies():
        return
    for part in _inner_optimizers(optimizer):
        for state in part.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


# ---- the static inference engine ----------------------------------------------------------------

# inference/model_inference_wrappers/inference_wrapper_config.py exists up to 0.16.1: GPTInferenceWrapper
# takes an InferenceWrapperConfig; from 0.17.1 it takes the KV-cache context (StaticInferenceContext).
INFERENCE_WRAPPER_CONFIG = Gate(fixed_in=(0, 17))
# inference/utils.py InferenceMode (0.18.2 on): engines/static_engine.py sets the process-wide flag in
# StaticInferenceEngine.__init__ and nothing clears it; GPTModel.forward and the attention read it.
INFERENCE_MODE_FLAG = Gate(since=(0, 18))


def static_inference_wrapper(module, max_rows: int, max_sequence_length: int):
    """megatron's GPTInferenceWrapper over `module` with a KV cache of `max_rows` rows."""
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper

    if INFERENCE_WRAPPER_CONFIG.applies():
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig

        config = InferenceWrapperConfig(
            hidden_size=module.config.hidden_size, params_dtype=module.config.params_dtype,
            inference_batch_times_seqlen_threshold=-1, padded_vocab_size=module.vocab_size,
            inference_max_requests=max_rows, inference_max_seq_length=max_sequence_length)
        return GPTInferenceWrapper(module, config)
    from megatron.core.inference.contexts import StaticInferenceContext

    return GPTInferenceWrapper(module, StaticInferenceContext(max_rows, max_sequence_length))


@contextmanager
def restored_inference_mode() -> Iterator[None]:
    """megatron's InferenceMode flag as it was before the block (0.18+; nothing to do before)."""
    if not INFERENCE_MODE_FLAG.applies():
        yield
        return
    from megatron.core.inference.utils import InferenceMode

    active = InferenceMode.is_active()
    try:
        yield
    finally:
        if not active:
            InferenceMode.unset_active()
