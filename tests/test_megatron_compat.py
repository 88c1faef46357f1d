"""Every shim of nemo_rlsr/compat/megatron.py is still needed on the installed megatron-core.

Each test runs megatron's own code without the shim (its gate closed, or megatron's module as it
imports in a fresh interpreter) and asserts that the defect shows exactly where the shim's gate says
it applies, then that the shim removes it. After a megatron-core upgrade a failing test here names a
shim whose gate is wrong: megatron fixed it (set `fixed_in`, and delete the shim when the oldest
supported release has the fix), or a gated-off shim is needed again. Two shims need 2 TP ranks to
show their defect: tests/test_mla_tensor_parallel.py (MLA_ROPE_KEY_GRAD, MLA_LATENT_NORM_GRAD).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_rlsr.compat import megatron as compat
from nemo_rlsr.config import ModelConfig
from nemo_rlsr.models.precision import installed_te_version

REPO = Path(__file__).resolve().parent.parent
CLOSED = compat.Gate(fixed_in=(0, 0))  # a gate no release passes: megatron's behaviour without the shim
MLA = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, max_sequence_length=32,
                  multi_latent_attention=True, qk_layernorm=True, q_lora_rank=32, kv_lora_rank=24, qk_head_dim=16,
                  qk_pos_emb_head_dim=8, v_head_dim=16)


def fresh_megatron(code: str) -> object:
    """What `code` prints (JSON, last line) in a new interpreter: megatron's modules as they import,
    before any of our patches."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def fails(build, error: type, match: str) -> bool:
    """Whether `build()` raises `error` with `match` in its message (any other exception propagates)."""
    try:
        build()
    except error as exc:
        assert match in str(exc), exc
        return True
    return False


def torch_adam() -> bool:
    """Whether megatron's DistributedOptimizer runs torch's Adam (no TE / apex fused optimizer): the
    case its `step` handling gets wrong."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def test_gates_follow_the_installed_release():
    installed = tuple(int(x) for x in importlib.metadata.version("megatron-core").split(".")[:2])
    assert compat.mcore_version() == installed
    fixed_in_17, since_18 = compat.Gate(fixed_in=(0, 17)), compat.Gate(since=(0, 18))
    assert fixed_in_17.applies((0, 16)) and not fixed_in_17.applies((0, 17)) and not fixed_in_17.applies((1, 0))
    assert not since_18.applies((0, 17)) and since_18.applies((0, 18)) and since_18.applies((0, 19))
    assert compat.Gate().applies((0, 16)) and not CLOSED.applies((0, 16))


def test_router_gemm_name(single_rank):
    """megatron-core 0.16 moe_utils: NameError in the router's GEMM without Transformer Engine."""
    missing = fresh_megatron(
        "import json, torch\n"
        "from megatron.core.transformer.moe import moe_utils\n"
        "try:\n"
        "    moe_utils.router_gating_linear(torch.ones(2, 4), torch.ones(3, 4), None, torch.float32)\n"
        "    print(json.dumps(False))\n"
        "except NameError:\n"
        "    print(json.dumps(True))\n")
    assert missing == (compat.ROUTER_GEMM_NAME.applies() and installed_te_version() is None)
    from megatron.core.transformer.moe import moe_utils

    compat.patch_module_globals()
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    torch.testing.assert_close(moe_utils.router_gating_linear(x, w, None, torch.float32), x @ w.T)


def test_mla_te_flag(single_rank, monkeypatch):
    """megatron-core 0.16 multi_latent_attention: HAVE_TE true without Transformer Engine, then a
    TypeError building MLA."""
    from megatron.core.transformer import multi_latent_attention

    from nemo_rlsr.models.gpt import build_gpt

    their_flag = fresh_megatron("import json\nfrom megatron.core.transformer import multi_latent_attention as m\n"
                                "print(json.dumps(m.HAVE_TE))")
    wrong = their_flag and installed_te_version() is None
    assert wrong == (compat.MLA_TE_FLAG.applies() and installed_te_version() is None)
    monkeypatch.setattr(compat, "MLA_TE_FLAG", CLOSED)
    monkeypatch.setattr(multi_latent_attention, "HAVE_TE", their_flag)
    assert fails(lambda: build_gpt(MLA, 100), TypeError, "isinstance") == wrong
    monkeypatch.undo()
    build_gpt(MLA, 100)  # with the shim


def expert_linears(config):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    common = dict(config=config, init_method=config.init_method, bias=False, is_expert=True, skip_bias_add=True)
    return (ColumnParallelLinear(64, 32, gather_output=False, **common),
            RowParallelLinear(32, 64, input_is_parallel=True, **common))


def test_expert_grads_at_ep1(single_rank):
    """megatron-core < 0.19 tensor_parallel/layers.py: at EP=1 with ETP != TP the experts' weights are
    not tagged for the expert-data-parallel reduction (their TP peers' partial sums are never added;
    tests/test_sequence_parallel.py's MoE run at TP=2 + SP shows the drift)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_moe_experts=2,
                               tensor_model_parallel_size=2, expert_tensor_parallel_size=1, sequence_parallel=True,
                               use_cpu_initialization=True, add_bias_linear=False)
    linears = expert_linears(config)
    untagged = [lin.weight.allreduce for lin in linears]
    assert untagged == [compat.EXPERT_GRADS_AT_EP1.applies()] * 2
    holder = torch.nn.Module()
    holder.config, holder.linears = config, torch.nn.ModuleList(linears)
    compat.mark_gradient_reductions(holder)
    assert [lin.weight.allreduce for lin in linears] == [False, False]
    # negative control: ETP = TP, the experts are split like the dense layers and reduced with them
    same = dataclasses.replace(config, expert_tensor_parallel_size=2)
    holder.config, holder.linears = same, torch.nn.ModuleList(expert_linears(same))
    compat.mark_gradient_reductions(holder)
    assert [lin.weight.allreduce for lin in holder.linears] == [True, True]


def test_mla_core_attention(single_rank):
    """megatron's local MLA spec builds the plain DotProductAttention with k/v_channels: TypeError."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.spec_utils import build_module

    from nemo_rlsr.models.gpt import transformer_config

    compat.patch_module_globals()
    config = transformer_config(MLA)

    def first_layer(fixed: bool):
        layer = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm").layer_specs[0]
        return build_module(compat.with_local_mla_attention(layer) if fixed else layer, config=config, layer_number=1)

    assert fails(lambda: first_layer(fixed=False), TypeError, "k_channels") == compat.MLA_CORE_ATTENTION.applies()
    attention = first_layer(fixed=True).self_attention
    assert isinstance(attention.core_attention, compat.MLADotProductAttention)
    assert attention.core_attention.hidden_size_per_partition == MLA.num_attention_heads * MLA.v_head_dim


def test_sequence_parallel_norms(single_rank):
    """megatron's WrappedTorchNorm (the local spec's norm) refuses sequence parallelism."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from nemo_rlsr.models.gpt import transformer_config

    config = transformer_config(MLA)
    config.sequence_parallel = True
    assert fails(lambda: WrappedTorchNorm(config, 64), AssertionError, "sequence parallel") == compat.SP_NORMS.applies()
    norm = compat.SequenceParallelNorm(config, 64)
    assert [(name, p.sequence_parallel) for name, p in norm.named_parameters()] == [("weight", True)]


class _TwoRankGroup:
    """The two methods megatron's RoPE reads of its CP group."""

    def size(self) -> int:
        return 2

    def rank(self) -> int:
        return 0


def test_rotary_memo(single_rank):
    """megatron memoises the RoPE table per (module, length), not per CP group: after switching the
    group, the old table comes back until the memo is emptied."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rotary = RotaryEmbedding(kv_channels=8, rotary_percent=1.0)
    rotary.cp_group = None
    whole = rotary(16)
    rotary.cp_group = _TwoRankGroup()
    assert (rotary(16).shape[0] == 16) == compat.ROTARY_MEMO.applies()  # stale: this rank holds 8 positions
    compat.forget_rotary_tables([rotary])
    assert rotary(16).shape[0] == 8 and whole.shape[0] == 16


@pytest.fixture
def distributed_optimizer_policy(single_rank):
    from distributed_helpers import VOCAB, optimizer_config, tiny_model_config

    from nemo_rlsr.models.policy import MegatronPolicy

    return MegatronPolicy(tiny_model_config(), optimizer_config(distributed=True), VOCAB, single_rank)


def train_once(policy) -> None:
    from distributed_helpers import nll_loss, token_batch

    policy.train_step(token_batch(), 2, nll_loss)


def optimizer_sharded_state(policy, metadata: dict, is_loading: bool = False):
    model = policy.chunks[0].sharded_state_dict(metadata=dict(metadata))
    return policy.optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=dict(metadata))


def test_adam_state_allocated_before_a_load(distributed_optimizer_policy):
    """The torch-Adam DistributedOptimizer asserts when asked for a state to load into before its
    first step."""
    if not torch_adam():
        pytest.skip("TE / apex fused Adam keeps its step per parameter group: nothing to allocate")
    policy = distributed_optimizer_policy
    empty = fails(lambda: optimizer_sharded_state(policy, compat.checkpoint_metadata(), is_loading=True),
                  AssertionError, "")
    assert empty == compat.ADAM_STEP_STATE.applies()
    compat.allocate_optimizer_state(policy.optimizer)
    assert optimizer_sharded_state(policy, compat.checkpoint_metadata(), is_loading=True)


def test_adam_steps_unshared_after_a_load(distributed_optimizer_policy):
    """The torch-Adam DistributedOptimizer loads one `step` tensor into every parameter's state."""
    if not torch_adam():
        pytest.skip("TE / apex fused Adam keeps its step per parameter group")
    policy = distributed_optimizer_policy
    train_once(policy)

    def step_tensors() -> int:
        states = policy.optimizer.optimizer.state.values()
        return len({id(s["step"]) for s in states}), len(states)

    assert step_tensors()[0] == step_tensors()[1] > 1  # torch Adam: one per parameter
    policy.optimizer.load_state_dict(policy.optimizer.state_dict())  # what a checkpoint load ends with
    shared, params = step_tensors()
    assert (shared == 1) == compat.ADAM_STEP_STATE.applies()
    compat.unshare_adam_steps(policy.optimizer)
    assert step_tensors() == (params, params)


def test_distributed_optimizer_checkpoint_format(distributed_optimizer_policy):
    """megatron's default DistributedOptimizer format fails: hence our checkpoints' dp_reshardable."""
    from megatron.core.dist_checkpointing.core import CheckpointingException

    policy = distributed_optimizer_policy
    train_once(policy)
    assert fails(lambda: optimizer_sharded_state(policy, {}), CheckpointingException, "flattened_range")
    assert optimizer_sharded_state(policy, compat.checkpoint_metadata())["param_state_sharding_type"] == "dp_reshardable"
    first = compat.checkpoint_metadata()
    first["dp_cp_group"] = object()  # what megatron adds to it
    assert compat.checkpoint_metadata() == {"distrib_optim_sharding_type": "dp_reshardable"}


def test_static_inference_wrapper(single_rank):
    """GPTInferenceWrapper takes an InferenceWrapperConfig up to 0.16 and the KV-cache context from 0.17."""
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper

    from distributed_helpers import VOCAB, tiny_model_config
    from nemo_rlsr.models.gpt import build_gpt

    module = build_gpt(tiny_model_config(), VOCAB)
    try:
        from megatron.core.inference.contexts import StaticInferenceContext

        GPTInferenceWrapper(module, StaticInferenceContext(4, 32))
        context_api = True
    except (ImportError, AttributeError, TypeError):
        context_api = False
    assert context_api != compat.INFERENCE_WRAPPER_CONFIG.applies()
    wrapper = compat.static_inference_wrapper(module, 4, 32)
    assert wrapper.inference_context.max_batch_size == 4 and wrapper.inference_context.max_sequence_length == 32


def test_inference_mode_flag(single_rank):
    """megatron-core 0.18+: StaticInferenceEngine sets the process-wide InferenceMode and leaves it."""
    from megatron.core.inference import utils

    if not compat.INFERENCE_MODE_FLAG.applies():
        assert not hasattr(utils, "InferenceMode")  # nothing to restore before 0.18
        with compat.restored_inference_mode():
            pass
        return
    from distributed_helpers import VOCAB, tiny_model_config
    from nemo_rlsr.generation.megatron_engine import MegatronRolloutEngine, RowSampler
    from nemo_rlsr.generation.interface import SamplingParams
    from nemo_rlsr.models.gpt import build_gpt

    engine = MegatronRolloutEngine(build_gpt(tiny_model_config(), VOCAB), 0, 1, VOCAB, 4, 32)
    assert not utils.InferenceMode.is_active()
    with compat.restored_inference_mode():
        engine._engine(4, RowSampler(SamplingParams(4), VOCAB, {}))
        assert utils.InferenceMode.is_active()  # megatron leaves it on
    assert not utils.InferenceMode.is_active()
