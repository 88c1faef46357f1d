"""The torch sampler's own KV cache (generation/kv_cache.py) against megatron-core's static
inference context, the decode mask, and the decode loop outside the CPU-compat function mode."""

import pytest
import torch

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.generation import kv_cache
from nemo_rlsr.generation.interface import SamplingParams
from nemo_rlsr.generation.kv_cache import KVCache, MegatronStaticCache, new_cache
from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine, decode_mask, direct_linears
from nemo_rlsr.models.policy import MegatronPolicy, attention_mask

VOCAB = 61
PAD, EOS = 0, 10
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15]]
SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, max_sequence_length=32)


def far_from_init(module) -> None:
    """Weights far from megatron's small init (as tests/test_torch_sampler_golden.py), so that the
    tokens depend on the prompt and on every position's key."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.3 * noise if param.dim() == 1 else 0.15 * noise)


MODELS = {"mha": {}, "gqa": {"num_query_groups": 2},
          # a head dim half outside RoPE (kv_cache.Rope's pass-through) and the bias direct_linears adds
          "partial_rope_qkv_bias": {"rotary_percent": 0.5, "add_qkv_bias": True}}


@pytest.fixture(scope="module", params=sorted(MODELS))
def module(single_rank, request):
    policy = MegatronPolicy(ModelConfig(**SHAPE, **MODELS[request.param]), None, VOCAB, single_rank)
    far_from_init(policy.module)
    return policy.module


CASES = {
    "greedy_rows_leave_at_eos": (SamplingParams(12, greedy=True), {}),
    "n_samples_share_the_prompt_cache": (SamplingParams(12, temperature=0.9, top_k=8, n=3), {}),
    "unshared": (SamplingParams(12, temperature=0.9, top_k=8, n=3), {"share_prompt_kv": False}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_cache_samples_what_megatrons_static_context_samples(module, monkeypatch, case, request):
    """Same tokens and logprobs as megatron-core's own static-batching KV cache (the sampler's
    path before; kept for MLA), with rows leaving the batch and prompt caches copied to samples."""
    params, options = CASES[case]
    assert isinstance(new_cache(module, 4, 16), KVCache)
    ours = TorchRolloutEngine(module, PAD, EOS, VOCAB, **options).generate(PROMPTS, params, seed=5)
    monkeypatch.setattr(kv_cache, "supports", lambda m: False)
    assert isinstance(new_cache(module, 4, 16), MegatronStaticCache)
    theirs = TorchRolloutEngine(module, PAD, EOS, VOCAB, **options).generate(PROMPTS, params, seed=5)
    assert ours.response_ids == theirs.response_ids
    if case == "greedy_rows_leave_at_eos" and request.node.callspec.params["module"] != "partial_rope_qkv_bias":
        # (that model's greedy rows happen to run to the end: the others cover rows leaving)
        assert len({len(r) for r in ours.response_ids}) > 1, "no row left early: the case tests less than it says"
    assert torch.equal(ours.response_mask, theirs.response_mask)
    torch.testing.assert_close(ours.engine_logprobs, theirs.engine_logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rotary_percent", [1.0, 0.5])
def test_rope_rotates_bit_for_bit_as_megatron(single_rank, rotary_percent):
    """`Rope` (cos and sin once per forward) = megatron's own unfused rotation of the same table."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    model = MegatronPolicy(ModelConfig(**SHAPE, rotary_percent=rotary_percent), None, VOCAB, single_rank).module
    freqs = model.rotary_pos_emb(5, offset=3)
    assert freqs.shape[-1] == int(16 * rotary_percent)
    t = torch.randn(5, 2, 4, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kv_cache.Rope(freqs)(t), apply_rotary_pos_emb(t, freqs, config=model.config))


def test_only_unfused_plain_rope_is_rotated_by_the_cache(module, monkeypatch):
    """The cache rotates plain RoPE itself; with TE's fused RoPE (the TE spec) megatron keeps it."""
    with KVCache(8).attached(module):
        assert module.rotary_pos_emb.rotate_here
    monkeypatch.setattr(module.config, "apply_rope_fusion", True)
    with KVCache(8).attached(module):
        assert not module.rotary_pos_emb.rotate_here


def test_direct_linears_give_megatrons_logits_bit_for_bit(module):
    """The TP linears' plain product (`direct_linears`) changes no bit of a forward's logits."""
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    positions = torch.arange(5).expand_as(ids)
    mask = attention_mask(torch.ones_like(ids, dtype=torch.bool))
    module.eval()
    with torch.no_grad():
        megatrons = module(ids, positions, mask)
        with direct_linears(module):
            ours = module(ids, positions, mask)
        assert "_forward_impl" not in vars(module.output_layer), "the class's method is not back"
    assert torch.equal(ours, megatrons)


def test_decode_mask_hides_future_and_pad_keys_but_never_a_querys_own():
    valid = torch.tensor([[False, True, True]])
    expected = torch.tensor([[False, True, True],  # a pad query sees only itself
                             [True, False, True],
                             [True, False, False]])
    assert torch.equal(decode_mask(valid, 3), expected[None, None])
    # where a pad query does not occur it is megatron's training mask (models/policy.py)
    rows = torch.tensor([[True, True, True], [False, True, True]])
    assert torch.equal(decode_mask(rows, 3)[0], attention_mask(rows)[0])
    step = torch.tensor([[False, True, True, True]])
    assert torch.equal(decode_mask(step, 1), torch.tensor([[[[True, False, False, False]]]]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-compat mode is active on CPU-only machines")
def test_the_models_forward_runs_outside_the_cpu_compat_mode(module, monkeypatch):
    """The function mode sees no op of any prefill or decode forward (it is suspended around the
    loop), and none is needed: every other sampler test decodes that way on this CPU-only machine,
    where an op still asking for "cuda" would raise."""
    from nemo_rlsr.distributed import cpu_compat

    seen = []
    original = cpu_compat._CudaDeviceToCpu.__torch_function__

    def spy(self, func, types, args=(), kwargs=None):
        seen.append(func)
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(cpu_compat._CudaDeviceToCpu, "__torch_function__", spy)
    torch.ones(2).sum()
    assert seen, "the mode is not active: this test proves nothing"
    during = []
    pre = module.register_forward_pre_hook(lambda *_: during.append(len(seen)))
    post = module.register_forward_hook(lambda *_: during.append(len(seen)))
    try:
        TorchRolloutEngine(module, PAD, EOS, VOCAB).generate(PROMPTS, SamplingParams(6, greedy=True), seed=0)
    finally:
        pre.remove()
        post.remove()
    assert len(during) == 12  # prefill + 5 decode steps, before and after each
    assert during[0] == during[-1], "ops of the forward went through the CPU-compat mode"


def test_multi_latent_attention_decodes_on_megatrons_static_context(single_rank):
    """MLA rotates inside its own attention: `supports` refuses it, and megatron's static context
    still decodes it correctly (greedy tokens = the teacher-forced forward's argmax)."""
    cfg = ModelConfig(**SHAPE, multi_latent_attention=True, q_lora_rank=32, kv_lora_rank=16, qk_head_dim=16,
                      qk_pos_emb_head_dim=8, v_head_dim=16)
    model = MegatronPolicy(cfg, None, VOCAB, single_rank).module
    far_from_init(model)
    assert isinstance(new_cache(model, 4, 16), MegatronStaticCache)
    rollouts = TorchRolloutEngine(model, PAD, -1, VOCAB).generate(PROMPTS, SamplingParams(6, greedy=True), seed=0)
    batch = rollouts.to_token_batch()
    model.eval()
    with torch.no_grad():
        positions = torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids)
        argmax = model(batch.input_ids, positions, attention_mask(batch.valid))[..., :VOCAB].argmax(-1)
    mask = rollouts.response_mask.bool()
    assert int(mask.sum()) == 6 * len(PROMPTS)
    assert torch.equal(argmax[mask], batch.targets[mask])
