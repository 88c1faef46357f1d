"""MoE HF checkpoints -> our megatron model -> HF: logits equal transformers' own, tensors exact.

The references are transformers' models (random weights from configs, saved with
`save_pretrained` in several safetensors shards + index), never our code: the megatron model is
built from config.json alone and streams its weights in through hf/load.py. In process at TP=1;
multi-rank (moe_worker.py, 2 gloo processes, one launch per model) at EP=2, TP=2, PP=2, TP=2+EP=2 and
TP=2 with experts split over expert-TP=2; exported back to HF at TP=1, EP=2 and expert-TP=2. Every
layout's ranks read only their slices and their own experts (bytes counted, hf_read_bytes.py).
Also: one EP=2 training step equals the EP=1 step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed_helpers import run_workers
from hf_read_bytes import checkpoint_bytes, expected_bytes_read

WORKER = Path(__file__).resolve().parent / "moe_worker.py"
VOCAB = 200
ATOL = 2e-5


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from init (norm gains around 1, larger matrices), so a swapped or transposed
    tensor changes the logits clearly; router weights especially (transformers inits some at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=g))
            else:
                param.copy_(0.15 * torch.randn(param.shape, generator=g))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # routing-only bias: it must change routes
                buffer.copy_(0.2 * torch.randn(buffer.shape, generator=g))


def qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    )
    return config, Qwen3MoeForCausalLM


def deepseek_v3():
    """MLA with a q latent, one dense layer then an MoE layer: 8 routed experts in 4 groups, top-4
    from the best 2 groups, one shared expert, routed scaling 2.5."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False, num_nextn_predict_layers=0,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    )
    return config, DeepseekV3ForCausalLM


def qwen3_moe_unnormalized():
    """norm_topk_prob=false: the top-k softmax probabilities are not renormalized (megatron's
    pre-softmax router)."""
    config, cls = qwen3_moe()
    config.norm_topk_prob = False
    return config, cls


MODELS = {"qwen3_moe": qwen3_moe, "deepseek_v3": deepseek_v3}
TP1_ONLY = {"qwen3_moe_unnormalized": qwen3_moe_unnormalized}


def save_hf(name: str, root: Path):
    """(HF model in eval mode, its checkpoint directory `root/name`, saved in several shards)."""
    config, cls = {**MODELS, **TP1_ONLY}[name]()
    torch.manual_seed(0)
    model = cls(config).float().eval()
    _randomize(model, seed=1)
    model.save_pretrained(root / name, max_shard_size="60KB")
    return model, root / name


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def read_all(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same_tensors(exported: Path, original: Path) -> None:
    mine, theirs = read_all(exported), read_all(original)
    assert sorted(mine) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key


@pytest.fixture(scope="module", params=sorted(MODELS))
def checkpoint(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model, hf_dir = save_hf(request.param, root)
    assert len(list(hf_dir.glob("*.safetensors"))) > 1  # the loader must follow the index
    return request.param, model, root, hf_dir


def check_tp1(hf_model, hf_dir: Path, export_dir: Path) -> None:
    """In this process (TP=1): logits equal transformers', and the export reproduces every tensor."""
    from moe_worker import INPUT_IDS, megatron_logits
    from nemo_rlsr.models.gpt import build_gpt
    from nemo_rlsr.models.hf import adapter_and_config
    from nemo_rlsr.models.hf.load import load_hf_weights
    from nemo_rlsr.models.hf.save import save_hf_checkpoint

    adapter, cfg = adapter_and_config(hf_dir)
    model = build_gpt(cfg, cfg.vocab_size)
    assert load_hf_weights(model, adapter, cfg, hf_dir).bytes_read == checkpoint_bytes(hf_dir)  # each tensor once
    ours = megatron_logits(model, INPUT_IDS)[..., :VOCAB]
    reference = hf_logits(hf_model, INPUT_IDS)
    assert reference.std() > 0.1  # the test has something to compare
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)
    save_hf_checkpoint(model, adapter, cfg, export_dir)
    assert_same_tensors(export_dir, hf_dir)


def test_tp1_logits_and_roundtrip(checkpoint, single_rank, tmp_path):
    _, hf_model, _, hf_dir = checkpoint
    check_tp1(hf_model, hf_dir, tmp_path / "export")


@pytest.mark.parametrize("name", sorted(TP1_ONLY))
def test_tp1_router_variants(name, single_rank, tmp_path):
    hf_model, hf_dir = save_hf(name, tmp_path)
    check_tp1(hf_model, hf_dir, tmp_path / "export")


@pytest.mark.slow
def test_parallel_layouts_logits_and_ep_roundtrip(checkpoint):
    from moe_worker import EXPORT_LAYOUTS, LAYOUTS

    name, hf_model, root, hf_dir = checkpoint
    results = run_workers(name, root, nprocs=2, timeout_s=240.0, worker=WORKER)
    reference = hf_logits(hf_model, results[0]["input_ids"])
    for layout, _ in LAYOUTS:
        logits = [r[layout] for r in results if layout in r]
        assert logits, f"no rank returned logits at {layout}"
        for value in logits:
            error = (value[..., :VOCAB] - reference).abs().max().item()
            assert error < ATOL, f"{layout}: logits differ from transformers' by up to {error:.2e}"
    for layout in EXPORT_LAYOUTS:
        assert_same_tensors(root / f"{name}_export_{layout}", hf_dir)
    check_bytes_read(hf_dir, results, [layout for layout, _ in LAYOUTS if layout != "pp2"])


def check_bytes_read(hf_dir: Path, results: list[dict], layouts: list[str]) -> None:
    """Each rank read exactly its TP slices and its EP rank's experts (norms and router whole)."""
    from nemo_rlsr.models.gpt import padded_vocab_size
    from nemo_rlsr.models.hf import adapter_and_config

    experts = adapter_and_config(hf_dir)[1].num_moe_experts
    for layout in layouts:
        reads = [result[f"{layout}/read"] for result in results]
        print(f"{hf_dir.name} {layout}: bytes read per rank {[r['bytes'] for r in reads]} "
              f"(TP=1: {checkpoint_bytes(hf_dir)})")
        for read in reads:
            expected = expected_bytes_read(hf_dir, padded_vocab_size(VOCAB, read["tp"]), tp=read["tp"],
                                           tp_rank=read["tp_rank"], ep=read["ep"], ep_rank=read["ep_rank"],
                                           etp=read["etp"], num_experts=experts)
            assert read["bytes"] == expected, f"{layout}: {read}, expected {expected} bytes"


@pytest.mark.slow
def test_ep2_train_step_equals_ep1(tmp_path):
    """Expert parallelism in training: DDP's expert-parallel gradient groups, the dispatcher's
    backward and a dist checkpoint resharded from EP=1 to EP=2 give the EP=1 step (each rank its
    own half of the batch, with different token counts)."""
    results = run_workers("train_ep", tmp_path, nprocs=2, timeout_s=240.0, worker=WORKER)
    for result in results:
        ep1, ep2 = result["ep1"], result["ep2"]
        assert ep1["loss"] == pytest.approx(ep2["loss"], rel=1e-6)
        assert ep1["grad_norm"] == pytest.approx(ep2["grad_norm"], rel=1e-6)
        torch.testing.assert_close(ep2["logprobs"], ep1["logprobs"], atol=1e-5, rtol=0)
    assert results[0]["ep1"]["grad_norm"] > 0


MOE_OVERRIDES = ["model.num_moe_experts=4", "model.moe_ffn_hidden_size=64",
                 "model.moe_shared_expert_intermediate_size=64", "model.moe_first_dense_layers=1"]


@pytest.mark.slow
def test_sft_cli_runs_with_expert_parallelism(tmp_path):
    """The real trainer path: `nemo-rlsr sft` on 2 gloo ranks with an MoE policy at EP=2 (the config
    keys reach init_distributed and the layer builder; SFT batches have one shape on every rank)."""
    import json

    from cli_runner import cli

    cli("sft", "sft_tiny.yaml", ["sft.steps=3", "sft.micro_batch_size=8", f"trainer.output_dir={tmp_path}",
                                 "trainer.progress_bar=false", "parallel.expert_parallel=2", *MOE_OVERRIDES], nprocs=2)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]
