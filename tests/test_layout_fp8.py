"""Start-up validation of parallel layouts, activation recompute and FP8 (no TE or GPU needed:
the installed TE version and the GPU's compute capability are passed in)."""

from __future__ import annotations

import pytest
import torch

from nemo_rlsr.config import load_config
from nemo_rlsr.distributed.dims import ParallelDims
from nemo_rlsr.distributed.layout import run_problems
from nemo_rlsr.models.precision import (
    fp8_problems,
    gemm_alignment,
    sequence_multiple,
    te_kwargs,
    token_multiple,
)

HOPPER, AMPERE, BLACKWELL = (9, 0), (8, 0), (10, 0)
# A Qwen2.5-1.5B-shaped model in bf16 (dims all multiples of 32), batches of whole micro-batches.
QWEN = [
    "model.num_layers=28", "model.hidden_size=1536", "model.num_attention_heads=12",
    "model.num_query_groups=2", "model.ffn_hidden_size=8960", "model.max_sequence_length=4096",
    "model.params_dtype=bfloat16", "grpo.prompts_per_step=8", "grpo.micro_batch_size=8",
]


# A routed-expert model (no dense layer) and a DeepSeek-V3-like multi-latent attention, on the same shape.
MOE = ["model.num_moe_experts=8", "model.moe_ffn_hidden_size=1408"]
MLA = ["model.multi_latent_attention=true", "model.q_lora_rank=1536", "model.kv_lora_rank=512",
       "model.qk_head_dim=128", "model.qk_pos_emb_head_dim=64", "model.v_head_dim=128"]


def cfg(*overrides: str):
    return load_config(None, list(QWEN) + list(overrides))


def fp8(*overrides: str):
    return cfg("model.fp8=hybrid", *overrides)


# ---- FP8 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe,te", [("delayed", "1.13"), ("tensorwise", "2.2.0"), ("blockwise", "2.3.0+cu12"),
                                       ("blockwise", "2.10.0.dev0")])
def test_fp8_on_hopper_accepted(recipe, te):
    assert fp8_problems(fp8(f"model.fp8_recipe={recipe}"), te, HOPPER) == []
    # TP=4 leaves 8960 / 4 = 2240 MLP columns per rank, still a multiple of 16.
    assert fp8_problems(fp8(f"model.fp8_recipe={recipe}", "parallel.tensor_parallel=4"), te, HOPPER) == []


def test_mxfp8_accepted_on_blackwell_only():
    c = fp8("model.fp8_recipe=mxfp8")
    assert fp8_problems(c, "2.1", BLACKWELL) == []
    (problem,) = fp8_problems(c, "2.1", HOPPER)
    assert "mxfp8 needs Blackwell" in problem and "sm90" in problem


@pytest.mark.parametrize("overrides,te,capability,expected", [
    (["model.fp8_recipe=fancy"], "2.5", HOPPER, "model.fp8_recipe='fancy' is unknown"),
    (["model.fp8=e5m2"], "2.5", HOPPER, "model.fp8='e5m2' is not an FP8 format"),
    (["model.fp8_recipe=tensorwise"], "2.1.0", HOPPER, "tensorwise needs Transformer Engine >= 2.2; installed: 2.1.0"),
    (["model.fp8_recipe=blockwise"], "2.2", HOPPER, "blockwise needs Transformer Engine >= 2.3"),
    (["model.fp8_recipe=mxfp8"], "2.0", BLACKWELL, "mxfp8 needs Transformer Engine >= 2.1"),
    ([], None, HOPPER, "model.fp8 needs Transformer Engine"),
    ([], "2.5", None, "model.fp8 needs a CUDA GPU"),
    ([], "2.5", AMPERE, "compute capability >= 8.9"),
    (["model.params_dtype=float32"], "2.5", HOPPER, "model.fp8 needs model.params_dtype=bfloat16"),
    (["model.fp8_recipe=tensorwise", "model.fp8_param_gather=true", "optimizer.cpu_offload=true"], "2.5", HOPPER,
     "fp8_param_gather with optimizer.cpu_offload needs model.fp8_recipe=delayed"),
    (["model.first_last_layers_bf16=true"], "2.5", HOPPER, "first_last_layers_bf16 does not work with model.fp8_recipe=delayed"),
    (["model.fp8_amax_compute_algo=mean"], "2.5", HOPPER, "model.fp8_amax_compute_algo='mean'"),
    (["model.hidden_size=1544"], "2.5", HOPPER, "model.hidden_size = 1544 is not divisible by 16"),
    (["model.ffn_hidden_size=8968"], "2.5", HOPPER, "model.ffn_hidden_size / tensor_parallel = 8968 is not divisible by 16"),
    (["model.num_query_groups=1", "model.kv_channels=8", "model.num_attention_heads=12"], "2.5", HOPPER,
     "model.num_query_groups x head dim / tensor_parallel = 8 is not divisible by 16"),
    (["model.max_sequence_length=4104"], "2.5", HOPPER, "model.max_sequence_length=4104 is not divisible by 16"),
    (["model.fp8_recipe=blockwise", "model.max_sequence_length=4160"], "2.5", HOPPER,
     "model.max_sequence_length=4160 is not divisible by 128"),
    (["parallel.context_parallel=2", "parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
      "model.max_sequence_length=4048"], "2.5", HOPPER, "4048 is not divisible by 64 = 16 (FP8 token alignment"),
    # Megatron-LM: the FP8 weights are all-gathered by the distributed optimizer
    (["model.fp8_recipe=tensorwise", "model.fp8_param_gather=true"], "2.5", HOPPER,
     "model.fp8_param_gather needs optimizer.use_distributed_optimizer=true"),
    # blockwise + sequence parallel: TE's FP8 all-gather of a layer's input needs whole 128-wide tiles
    (["model.fp8_recipe=blockwise", "parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
      "model.hidden_size=1600", "model.kv_channels=128"], "2.5", HOPPER,
     "model.hidden_size=1600 is not divisible by 128, as model.fp8_recipe=blockwise with parallel.sequence_parallel"),
    # MoE: routed experts split over expert_tensor_parallel, the shared expert over TP
    (MOE + ["model.moe_ffn_hidden_size=1400"], "2.5", HOPPER,
     "model.moe_ffn_hidden_size / expert_tensor_parallel = 1400 is not divisible by 16"),
    (MOE + ["model.moe_ffn_hidden_size=2064", "parallel.expert_tensor_parallel=2"], "2.5", HOPPER,
     "model.moe_ffn_hidden_size / expert_tensor_parallel = 1032 is not divisible by 16"),
    (MOE + ["model.moe_shared_expert_intermediate_size=2824", "parallel.tensor_parallel=2"], "2.5", HOPPER,
     "model.moe_shared_expert_intermediate_size / tensor_parallel = 1412 is not divisible by 16"),
    (MOE + ["model.moe_ffn_hidden_size=784", "model.fp8_recipe=mxfp8"], "2.5", BLACKWELL,
     "model.moe_ffn_hidden_size / expert_tensor_parallel = 784 is not divisible by 32"),
    # multi-latent attention's projections
    (MLA + ["model.kv_lora_rank=500"], "2.5", HOPPER, "model.kv_lora_rank = 500 is not divisible by 16"),
    (MLA + ["model.qk_pos_emb_head_dim=60"], "2.5", HOPPER,
     "model.kv_lora_rank + qk_pos_emb_head_dim = 572 is not divisible by 16"),
    (MLA + ["model.q_lora_rank=1000"], "2.5", HOPPER, "model.q_lora_rank = 1000 is not divisible by 16"),
    (MLA + ["model.v_head_dim=90"], "2.5", HOPPER,
     "model.num_attention_heads x v_head_dim / tensor_parallel = 1080 is not divisible by 16"),
    (MLA + ["model.qk_head_dim=130", "parallel.tensor_parallel=2"], "2.5", HOPPER,
     "model.num_attention_heads x (qk_head_dim + qk_pos_emb_head_dim) / tensor_parallel = 1164 is not divisible by 16"),
])
def test_fp8_refusals_name_key_and_reason(overrides, te, capability, expected):
    problems = fp8_problems(fp8(*overrides), te, capability)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("overrides", [
    ["model.fp8_recipe=tensorwise", "model.fp8_param_gather=true", "optimizer.use_distributed_optimizer=true"],
    # 1536 = 12 x 128: the FP8 all-gather's tiles fit; without sequence parallel no all-gather at all
    ["model.fp8_recipe=blockwise", "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
    ["model.fp8_recipe=blockwise", "parallel.tensor_parallel=2", "model.hidden_size=1600", "model.kv_channels=128"],
    # no dense layer: the dense ffn_hidden_size is never a GEMM
    MOE + ["model.ffn_hidden_size=1000"],
    MOE + ["model.moe_ffn_hidden_size=2080", "parallel.expert_tensor_parallel=2",
           "model.moe_shared_expert_intermediate_size=2816", "parallel.tensor_parallel=2",
           "parallel.sequence_parallel=true"],
    MLA + ["parallel.tensor_parallel=4"],
    MLA + ["model.q_lora_rank=null"],
])
def test_fp8_gemm_and_gather_rules_accept_good_shapes(overrides):
    assert fp8_problems(fp8(*overrides), "2.5", HOPPER) == []


def test_fp8_only_keys_need_fp8():
    (problem,) = fp8_problems(cfg("model.fp8_param_gather=true"), None, None)
    assert "model.fp8_param_gather=true needs model.fp8" in problem
    assert fp8_problems(cfg(), None, None) == []  # bf16: nothing to check, nothing installed needed


def test_alignments_and_sequence_multiple():
    assert (gemm_alignment("delayed"), gemm_alignment("mxfp8")) == (16, 32)
    assert (token_multiple("tensorwise"), token_multiple("blockwise"), token_multiple("mxfp8")) == (16, 128, 32)
    m = cfg().model
    assert sequence_multiple(m, ParallelDims(tp=2)) == 1
    assert sequence_multiple(m, ParallelDims(tp=2, cp=2, sequence_parallel=True)) == 4
    m = fp8("model.fp8_recipe=blockwise").model
    assert sequence_multiple(m, ParallelDims(tp=2, cp=2, sequence_parallel=True)) == 4 * 128
    assert sequence_multiple(m, ParallelDims(tp=4)) == 128


def test_te_kwargs_are_transformer_config_fields():
    from dataclasses import fields

    from megatron.core.transformer.transformer_config import TransformerConfig

    assert te_kwargs(cfg().model) == {}
    kwargs = te_kwargs(fp8("model.fp8_recipe=tensorwise", "model.fp8_param_gather=true").model)
    names = {f.name for f in fields(TransformerConfig)}
    assert set(kwargs) <= names, set(kwargs) - names
    assert kwargs["fp8"] == "hybrid" and kwargs["fp8_recipe"] == "tensorwise" and kwargs["fp8_param"] is True


# ---- parallel layouts and recompute ------------------------------------------------------------


@pytest.mark.parametrize("world,overrides", [
    (8, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]),
    (4, ["parallel.pipeline_parallel=4", "parallel.virtual_pipeline_parallel=7"]),
    (2, ["parallel.pipeline_parallel=2", "parallel.num_layers_in_first_pipeline_stage=13"]),
    (1, ["model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=2"]),
    (2, ["model.recompute_granularity=full", "model.recompute_method=block", "model.recompute_num_layers=14",
         "parallel.pipeline_parallel=2"]),
    (1, ["model.recompute_granularity=selective"]),
    (4, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]),
])
def test_good_layouts_accepted(world, overrides):
    assert run_problems(cfg(*overrides), world, "2.5", HOPPER) == []


@pytest.mark.parametrize("world,overrides,expected", [
    (6, ["parallel.tensor_parallel=4"], "world size 6 is not divisible by tensor x pipeline x context parallel"),
    (8, ["parallel.tensor_parallel=8"], "model.num_attention_heads=12 is not divisible by tensor_parallel=8"),
    (4, ["parallel.tensor_parallel=4"], "model.num_query_groups=2 is not divisible by tensor_parallel=4"),
    (3, ["parallel.pipeline_parallel=3", "model.num_layers=28"], "model.num_layers=28 is not divisible by pipeline_parallel"),
    (2, ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline_parallel=3"], "pipeline_parallel x virtual = 2 x 3"),
    (1, ["parallel.virtual_pipeline_parallel=2", "model.num_layers=28"], "virtual_pipeline_parallel needs pipeline_parallel > 1"),
    (2, ["parallel.pipeline_parallel=2", "parallel.num_layers_in_first_pipeline_stage=30"], "does not split into pipeline stages"),
    (1, ["parallel.sequence_parallel=true"], "parallel.sequence_parallel needs tensor_parallel > 1"),
    (2, ["parallel.context_parallel=2", "model.max_sequence_length=4098"], "is not divisible by 2 x context_parallel=2"),
    (2, ["parallel.expert_parallel=2"], "parallel.expert_parallel > 1 needs an MoE model"),
    (2, ["grpo.prompts_per_step=3"], "grpo.prompts_per_step=3 is not divisible by DP=2"),
    (1, ["model.recompute_granularity=partial"], "model.recompute_granularity='partial'"),
    (1, ["model.recompute_granularity=full"], "needs model.recompute_method in uniform, block"),
    (1, ["model.recompute_granularity=full", "model.recompute_method=uniform"], "recompute_num_layers between 1 and"),
    (2, ["model.recompute_granularity=full", "model.recompute_method=block", "model.recompute_num_layers=15",
         "parallel.pipeline_parallel=2"], "layers per pipeline stage (14); got 15"),
    (1, ["model.recompute_granularity=selective", "model.recompute_num_layers=1"], "must be null with model.recompute_granularity=selective"),
    (1, ["model.recompute_method=uniform"], "model.recompute_method needs model.recompute_granularity=full"),
    (1, ["model.params_dtype=float16"], "model.params_dtype='float16': choose one of float32, bfloat16"),
])
def test_bad_layouts_refused_with_reason(world, overrides, expected):
    problems = run_problems(cfg(*overrides), world, "2.5", HOPPER)
    assert any(expected in p for p in problems), problems


def test_context_parallel_runs_on_the_local_spec_only_and_not_under_mla():
    # the local spec does CP itself (models/context_parallel.py), but not under MLA's core attention;
    # TE's CP attention cannot take the explicit mask the TE spec runs with (models/spec.py)
    layout = ("parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "parallel.context_parallel=2")
    assert run_problems(cfg(*layout), 8, None, None) == []
    problems = run_problems(cfg(*layout), 8, "2.5", HOPPER)
    assert any(p.startswith("parallel.context_parallel=2 runs on megatron's local layer spec only, and this job "
                            "builds Transformer Engine's (model.transformer_impl=auto, TE 2.5)") for p in problems), problems
    # with TE installed, the local spec can be asked for
    assert run_problems(cfg(*layout, "model.transformer_impl=local"), 8, "2.5", HOPPER) == []
    problems = run_problems(cfg("parallel.context_parallel=2", "model.multi_latent_attention=true"), 2, None, None)
    assert any(p.startswith("parallel.context_parallel=2 with model.multi_latent_attention=true is not built")
               for p in problems), problems


@pytest.mark.parametrize("overrides,te,capability,expected", [
    (["model.transformer_impl=te"], "2.5", HOPPER, "model.transformer_impl='te': choose one of auto, local, transformer_engine"),
    (["model.transformer_impl=transformer_engine"], None, HOPPER, "transformer_engine.pytorch does not import here"),
    (["model.transformer_impl=transformer_engine"], "2.5", None, "needs a CUDA GPU"),
    (["model.transformer_impl=local", "model.fp8=hybrid", "model.params_dtype=bfloat16"], "2.5", HOPPER,
     "model.fp8 runs on Transformer Engine's layer spec, and model.transformer_impl=local"),
])
def test_transformer_impl_refused_where_it_cannot_build(overrides, te, capability, expected):
    assert any(expected in p for p in run_problems(cfg(*overrides), 1, te, capability)), expected


def test_layer_spec_choice():
    from nemo_rlsr.models.precision import uses_te_spec

    assert [uses_te_spec("auto", te, cap) for te, cap in ((None, None), ("2.5", None), (None, HOPPER), ("2.5", HOPPER))] \
        == [False, False, False, True]
    assert not uses_te_spec("local", "2.5", HOPPER) and uses_te_spec("transformer_engine", None, None)


def test_every_problem_reported_at_once():
    c = cfg("parallel.tensor_parallel=8", "model.recompute_method=block", "model.fp8=hybrid")
    problems = run_problems(c, 8, None, None)
    assert len(problems) >= 4  # heads % TP, kv groups % TP, recompute key, FP8 without TE, FP8 without GPU


# ---- FP8 sequence padding (runs on the CPU policy with the multiple forced) --------------------


def test_padding_to_fp8_multiple_changes_nothing(single_rank):
    from nemo_rlsr.models.policy import MegatronPolicy
    from tests.distributed_helpers import VOCAB, nll_loss, optimizer_config, tiny_model_config, token_batch

    policies = [MegatronPolicy(tiny_model_config(), optimizer_config(), VOCAB, single_rank) for _ in range(2)]
    policies[1].module.load_state_dict(policies[0].module.state_dict())
    policies[1].sequence_multiple = 24  # the 16-token batch runs as 24 tokens (8 masked positions)
    batch = token_batch()
    batch.extras["per_row"] = torch.ones(len(batch))  # per-row extras are left as they are
    logprobs = [p.logprobs(batch, 2) for p in policies]
    assert logprobs[1].shape == batch.input_ids.shape
    # Equal wherever the input is real (left-pad query positions attend to nothing: no meaning).
    torch.testing.assert_close(logprobs[1][batch.valid], logprobs[0][batch.valid], rtol=0, atol=1e-5)
    metrics = [p.train_step(batch, 2, nll_loss) for p in policies]
    assert metrics[1]["num_tokens"] == metrics[0]["num_tokens"]
    assert metrics[1]["loss"] == pytest.approx(metrics[0]["loss"], rel=1e-6)
    assert metrics[1]["grad_norm"] == pytest.approx(metrics[0]["grad_norm"], rel=1e-5)
    for a, b in zip(policies[0].module.parameters(), policies[1].module.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
