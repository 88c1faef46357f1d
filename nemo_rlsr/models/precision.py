"""FP8 through Transformer Engine: the config rules, checked on every machine, and the
TransformerConfig fields they turn into.

Megatron-core and TE check most of these themselves, but only once the model is being built on
the GPUs (after container start, checkpoint reads, process-group setup), and some mistakes never
raise: an FP8 GEMM on a shape TE cannot quantize fails deep inside a kernel. So the rules are pure
functions of the config, the installed TE version and the GPU's compute capability (both passed
in, so that CPU tests and the planner can check a GPU recipe without TE or a GPU).
"""

from __future__ import annotations

import math

from nemo_rlsr.config import ModelConfig, RLSRConfig
from nemo_rlsr.distributed.dims import ParallelDims
from nemo_rlsr.models.fp8_support import recipe_support_problems, version_tuple

FP8_FORMATS = ("e4m3", "hybrid")
# The oldest Transformer Engine whose PyTorch API runs each recipe with megatron-core.
RECIPE_MIN_TE = {"delayed": (1, 0), "tensorwise": (2, 2), "blockwise": (2, 3), "mxfp8": (2, 1)}
AMAX_ALGOS = ("max", "most_recent")
# Blockwise scales cover 1 x 128 tiles; TE all-gathers a sequence-parallel layer input in FP8 only when
# each rank's shard is a whole number of tiles both ways (see fp8_config_problems).
BLOCKWISE_TILE = 128


def installed_te_version() -> str | None:
    """The Transformer Engine version whose PyTorch extension imports here, else None.

    The distribution's metadata alone is not enough: TE's wheel for another CUDA installs but
    `transformer_engine.pytorch` fails to import.
    """
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or an OSError/RuntimeError from a mismatched CUDA build
        return None
    return str(transformer_engine.__version__)


def gpu_capability() -> tuple[int, int] | None:
    import torch

    return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None


TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")


def uses_te_spec(impl: str, te_version: str | None, capability: tuple[int, int] | None) -> bool:
    """Whether the model is built with Transformer Engine's layer spec: where `model.transformer_impl`
    asks for it, or under `auto` where TE imports and a GPU is there (TE's kernels are CUDA-only)."""
    if impl == "auto":
        return te_version is not None and capability is not None
    return impl == "transformer_engine"


def transformer_impl_problems(cfg: RLSRConfig, te_version: str | None,
                              capability: tuple[int, int] | None) -> list[str]:
    m = cfg.model
    if m.transformer_impl not in TRANSFORMER_IMPLS:
        return [f"model.transformer_impl={m.transformer_impl!r}: choose one of {', '.join(TRANSFORMER_IMPLS)}"]
    out = []
    if m.transformer_impl == "transformer_engine":
        if te_version is None:
            out.append("model.transformer_impl=transformer_engine, and transformer_engine.pytorch does not import here")
        if capability is None:
            out.append("model.transformer_impl=transformer_engine needs a CUDA GPU (TE's kernels are CUDA-only)")
    if m.transformer_impl == "local" and m.fp8:
        out.append("model.fp8 runs on Transformer Engine's layer spec, and model.transformer_impl=local builds "
                   "megatron's local spec")
    return out


def gemm_alignment(recipe: str) -> int:
    """What every FP8 GEMM dimension on a rank must be divisible by: 16 (TE's rule for the inner
    dimension, which is also a multiple of the 8 it needs on the outer ones) and 32 for MX formats,
    whose scales cover blocks of 32 values along either dimension."""
    return 32 if recipe == "mxfp8" else 16


def token_multiple(recipe: str) -> int:
    """The multiple a rank's token count (micro-batch x sequence after CP / sequence-parallel
    sharding) is padded to: the GEMM alignment, and 128 for blockwise, whose activation scales
    cover 1 x 128 tiles."""
    return 128 if recipe == "blockwise" else gemm_alignment(recipe)


def sequence_multiple(cfg: ModelConfig, dims: ParallelDims) -> int:
    """The multiple a batch's sequence length must be padded to before the forward pass of `cfg`
    split as `dims`.

    Context parallelism splits each sequence into 2 x CP chunks (load balancing of the causal
    mask); sequence parallelism splits it over TP; with FP8 each rank's share must still be a
    multiple of `token_multiple`.
    """
    shards = dims.cp * (dims.tp if dims.sequence_parallel else 1)
    multiple = math.lcm(2 * dims.cp if dims.cp > 1 else 1, shards)
    if cfg.fp8:
        multiple = math.lcm(multiple, shards * token_multiple(cfg.fp8_recipe))
    return multiple


def _gemm_dims(cfg: ModelConfig, tp: int, etp: int) -> dict[str, int]:
    """Per-rank output/input sizes of the transformer's GEMMs (the ones TE runs in FP8): attention
    (multi-latent attention's down / up projections: megatron's MLASelfAttention, whose down
    projections are not split over TP on the TE spec), the dense MLPs, the routed experts (split
    over expert_tensor_parallel) and the shared expert (split over TP)."""
    heads = cfg.num_attention_heads
    dims = {"model.hidden_size": cfg.hidden_size}
    if cfg.multi_latent_attention:
        if cfg.q_lora_rank:
            dims["model.q_lora_rank"] = cfg.q_lora_rank
        dims["model.kv_lora_rank"] = cfg.kv_lora_rank
        dims["model.kv_lora_rank + qk_pos_emb_head_dim"] = cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim
        dims["model.num_attention_heads x (qk_head_dim + qk_pos_emb_head_dim) / tensor_parallel"] = (
            heads * (cfg.qk_head_dim + cfg.qk_pos_emb_head_dim) // tp)
        dims["model.num_attention_heads x (qk_head_dim + v_head_dim) / tensor_parallel"] = (
            heads * (cfg.qk_head_dim + cfg.v_head_dim) // tp)
        dims["model.num_attention_heads x v_head_dim / tensor_parallel"] = heads * cfg.v_head_dim // tp
    else:
        head_dim = cfg.kv_channels or cfg.hidden_size // heads
        groups = cfg.num_query_groups or heads
        dims["model.num_attention_heads x head dim / tensor_parallel"] = heads * head_dim // tp
        dims["model.num_query_groups x head dim / tensor_parallel"] = groups * head_dim // tp
    if not cfg.num_moe_experts or cfg.moe_first_dense_layers:  # some layer has a dense MLP
        dims["model.ffn_hidden_size / tensor_parallel"] = cfg.ffn_hidden_size // tp
    if cfg.num_moe_experts:
        expert_ffn = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
        dims["model.moe_ffn_hidden_size / expert_tensor_parallel"] = expert_ffn // etp
        if cfg.moe_shared_expert_intermediate_size:
            dims["model.moe_shared_expert_intermediate_size / tensor_parallel"] = (
                cfg.moe_shared_expert_intermediate_size // tp)
    return dims


PARAMS_DTYPES = ("float32", "bfloat16")


def mixed_precision_flags(dtype) -> dict[str, bool]:
    """TransformerConfig's `bf16` / `fp16` for parameters of `dtype` (a torch dtype).

    megatron reads them, not `params_dtype`, to decide the precision of the local spec's attention
    softmax: `DotProductAttention` passes them to `FusedScaleMaskSoftmax`, which upcasts the scores
    to fp32 (`attention_softmax_in_fp32`, default on) only for inputs flagged fp16/bf16
    (megatron/core/transformer/dot_product_attention.py and fusions/fused_softmax.py at core_v0.16.1
    and core_v0.19.0). Left False, bf16 weights run the softmax in bf16."""
    import torch

    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def params_dtype_problems(cfg: RLSRConfig) -> list[str]:
    """bf16 parameters train with megatron's mixed-precision optimizer (fp32 main weights and Adam
    state); fp16 would need a loss scaler, which the trainer does not run."""
    if cfg.model.params_dtype in PARAMS_DTYPES:
        return []
    return [f"model.params_dtype={cfg.model.params_dtype!r}: choose one of {', '.join(PARAMS_DTYPES)}"]


def fp8_environment_problems(cfg: RLSRConfig, te_version: str | None,
                             capability: tuple[int, int] | None) -> list[str]:
    """What FP8 needs from the machine the trainer runs on: an importable Transformer Engine new
    enough for the recipe, and a GPU."""
    m, out = cfg.model, []
    if m.fp8 is None or m.fp8_recipe not in RECIPE_MIN_TE:
        return out
    if te_version is None:
        out.append("model.fp8 needs Transformer Engine, and transformer_engine.pytorch does not import here "
                   "(run in the NGC container, or set model.fp8=null)")
    elif version_tuple(te_version) < RECIPE_MIN_TE[m.fp8_recipe]:
        need = ".".join(map(str, RECIPE_MIN_TE[m.fp8_recipe]))
        out.append(f"model.fp8_recipe={m.fp8_recipe} needs Transformer Engine >= {need}; installed: {te_version}")
    if capability is None:
        out.append("model.fp8 needs a CUDA GPU (FP8 GEMMs have no CPU kernels)")
    return out


def fp8_config_problems(cfg: RLSRConfig) -> list[str]:
    """The FP8 rules of the config itself: what the planner can check on a login node, without TE
    or a GPU."""
    m, p = cfg.model, cfg.parallel
    if m.fp8 is None:
        return [f"model.{key}=true needs model.fp8 (e4m3 or hybrid)"
                for key in ("fp8_param_gather", "first_last_layers_bf16") if getattr(m, key)]
    out: list[str] = []
    if m.fp8 not in FP8_FORMATS:
        out.append(f"model.fp8={m.fp8!r} is not an FP8 format: choose one of {', '.join(FP8_FORMATS)}")
    if m.fp8_recipe not in RECIPE_MIN_TE:
        out.append(f"model.fp8_recipe={m.fp8_recipe!r} is unknown: choose one of {', '.join(RECIPE_MIN_TE)}")
        return out
    if m.params_dtype != "bfloat16":
        out.append(f"model.fp8 needs model.params_dtype=bfloat16 (got {m.params_dtype}): FP8 GEMMs keep "
                   f"bf16 weights and activations around them")
    if m.fp8_param_gather and not cfg.optimizer.use_distributed_optimizer:
        # Megatron-LM's own rule (megatron/training/arguments.py, core_v0.16.1 and core_v0.19.0): the FP8
        # weights are all-gathered by the distributed optimizer's parameter gather.
        out.append("model.fp8_param_gather needs optimizer.use_distributed_optimizer=true (the distributed "
                   "optimizer all-gathers the FP8 weights)")
    if m.fp8_param_gather and cfg.optimizer.cpu_offload and m.fp8_recipe != "delayed":
        out.append(f"model.fp8_param_gather with optimizer.cpu_offload needs model.fp8_recipe=delayed "
                   f"(got {m.fp8_recipe})")
    if m.first_last_layers_bf16 and m.fp8_recipe == "delayed":
        out.append("model.first_last_layers_bf16 does not work with model.fp8_recipe=delayed (the amax "
                   "reduction spans the whole FP8 region): use tensorwise or blockwise")
    if m.fp8_amax_compute_algo not in AMAX_ALGOS:
        out.append(f"model.fp8_amax_compute_algo={m.fp8_amax_compute_algo!r}: choose one of {', '.join(AMAX_ALGOS)}")
    if m.fp8_amax_history_len < 1 or m.fp8_margin < 0:
        out.append(f"model.fp8_amax_history_len={m.fp8_amax_history_len} must be >= 1 and "
                   f"model.fp8_margin={m.fp8_margin} >= 0")
    tp = p.tensor_parallel
    align = gemm_alignment(m.fp8_recipe)
    for name, size in _gemm_dims(m, tp, p.expert_tensor_parallel).items():
        if size % align:
            out.append(f"{name} = {size} is not divisible by {align}, as FP8 GEMMs with "
                       f"model.fp8_recipe={m.fp8_recipe} need (tensor_parallel={tp}, "
                       f"expert_tensor_parallel={p.expert_tensor_parallel})")
    if m.fp8_recipe == "blockwise" and p.sequence_parallel and tp > 1 and m.hidden_size % BLOCKWISE_TILE:
        # TE all-gathers a layer's input over TP in FP8 only when the rank's shard is quantizable:
        # last dim and rows both multiples of 128 (Float8BlockQuantizer.is_quantizable); else it
        # gathers in BF16, synchronously (`_all_gather_fp8_blockwise`, transformer_engine/pytorch/
        # distributed.py at v2.5 to v2.18; TE 2.3 and 2.4 always do). The rows are multiples of 128
        # by the padding below (token_multiple); the hidden size is the config's.
        out.append(f"model.hidden_size={m.hidden_size} is not divisible by {BLOCKWISE_TILE}, as "
                   f"model.fp8_recipe=blockwise with parallel.sequence_parallel needs for the FP8 all-gather of "
                   f"each layer's input (Transformer Engine falls back to a synchronous BF16 all-gather)")
    shards = p.context_parallel * (tp if p.sequence_parallel else 1)
    tokens = token_multiple(m.fp8_recipe)
    if m.max_sequence_length % (shards * tokens):
        out.append(f"model.max_sequence_length={m.max_sequence_length} is not divisible by "
                   f"{shards * tokens} = {tokens} (FP8 token alignment for {m.fp8_recipe}) x {shards} "
                   f"sequence shards (context_parallel x tensor_parallel when sequence_parallel): "
                   f"batches are padded to that multiple and the longest must still fit")
    return out


def fp8_problems(cfg: RLSRConfig, te_version: str | None, capability: tuple[int, int] | None,
                 cuda_version: str | None = None) -> list[str]:
    """Every FP8 rule the config breaks on this machine (TE version, compute capability, CUDA
    version; None where unknown), as sentences naming the keys. Empty when FP8 is off and no
    FP8-only key is set."""
    out = fp8_config_problems(cfg)
    if cfg.model.fp8 is not None and cfg.model.fp8_recipe in RECIPE_MIN_TE:
        out += recipe_support_problems(cfg.model.fp8_recipe, te_version, capability, cuda_version)
    return out + fp8_environment_problems(cfg, te_version, capability)


def te_kwargs(cfg: ModelConfig) -> dict:
    """TransformerConfig fields for FP8 (names shared by megatron-core 0.16 and 0.19); empty when
    FP8 is off, so the bf16/fp32 path passes nothing TE-specific."""
    if cfg.fp8 is None:
        return {}
    return {
        "fp8": cfg.fp8,
        "fp8_recipe": cfg.fp8_recipe,
        "fp8_param": cfg.fp8_param_gather,
        "fp8_margin": cfg.fp8_margin,
        "fp8_amax_history_len": cfg.fp8_amax_history_len,
        "fp8_amax_compute_algo": cfg.fp8_amax_compute_algo,
        "first_last_layers_bf16": cfg.first_last_layers_bf16,
    }
