"""HF checkpoints of each supported architecture -> our megatron model (load.py) -> HF (save.py).

References are independent of our code: tiny random models built by transformers from configs,
their logits and their safetensors files. Checked: logits equal (fp32) at TP=1, TP=2, PP=2 and TP=4,
and an HF -> megatron -> HF round trip reproduces every tensor bit for bit with the same names;
the bytes each rank reads (TP=1: the whole checkpoint once; TP=2: its slices, hf_read_bytes.py);
`sft` / `train` with model.hf_path start from the checkpoint's weights (real CLI runs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distributed_helpers import run_workers
from hf_read_bytes import checkpoint_bytes, expected_bytes_read
from hf_tokenizers import build_hf_tokenizer
from hf_worker import input_ids
from cli_runner import cli, run_cli
from test_data_training import DATA, FIXTURES, RLSR
from nemo_rlsr.models.policy import attention_mask

VOCAB = 203  # padded to 256 by megatron: exercises padding and trimming
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
ARCHITECTURES = {
    "llama3": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE)),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=False)),  # head_dim != hidden/heads
}
SHARD = "40KB"  # several safetensors files + an index


def make_hf_checkpoint(name: str, out: Path) -> Path:
    """A random HF model of architecture `name` saved (sharded) to out/name; norms and biases
    randomised too, so a swapped or dropped one changes the logits."""
    import transformers

    config_class, extra = ARCHITECTURES[name]
    config = getattr(transformers, config_class)(**COMMON, **extra)
    torch.manual_seed(sum(map(ord, name)))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.uniform_(0.5, 1.5)
            elif param_name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(out / name, safe_serialization=True, max_shard_size=SHARD)
    return out / name


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF checkpoint, read with safetensors alone."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if [f.name for f in files] == ["model.safetensors"]:
        return load_file(files[0])
    assert len(files) > 1 and (directory / "model.safetensors.index.json").is_file()
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for file in files:
        part = load_file(file)
        assert all(index[key] == file.name for key in part)
        tensors |= part
    assert set(index) == set(tensors)
    return tensors


def hf_logits(directory: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids(VOCAB)).logits


def assert_same_tensors(exported: Path, original: Path) -> None:
    ours, theirs = hf_tensors(exported), hf_tensors(original)
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf_archs")
    for name in ARCHITECTURES:
        make_hf_checkpoint(name, root / "hf")
    return root


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_tp1_logits_and_exact_round_trip(name, checkpoints, single_rank, tmp_path):
    from nemo_rlsr.models.gpt import build_gpt
    from nemo_rlsr.models.hf import adapter_and_config
    from nemo_rlsr.models.hf.load import load_hf_weights
    from nemo_rlsr.models.hf.save import save_hf_checkpoint

    hf_dir = checkpoints / "hf" / name
    adapter, cfg = adapter_and_config(hf_dir)
    model = build_gpt(cfg, cfg.vocab_size).eval()
    assert load_hf_weights(model, adapter, cfg, hf_dir).bytes_read == checkpoint_bytes(hf_dir)  # each tensor once
    ids = input_ids(VOCAB)
    with torch.no_grad():
        ours = model(ids, torch.arange(ids.shape[1]).expand_as(ids),
                     attention_mask(torch.ones_like(ids, dtype=torch.bool)))[..., :VOCAB]
    expected = hf_logits(hf_dir)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)

    save_hf_checkpoint(model, adapter, cfg, tmp_path, max_shard_bytes=40_000)
    assert_same_tensors(tmp_path, hf_dir)
    # the exported config.json builds the same HF model: same logits from the exported folder
    torch.testing.assert_close(hf_logits(tmp_path), expected, atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["tp2", "pp2", "tp4"])
def test_multi_rank_logits_and_exact_round_trip(scenario, checkpoints):
    """TP=2, PP=2 on 2 ranks; TP=4 on 4 ranks, where every architecture here has fewer KV heads (2)
    than TP ranks (megatron splits the fused QKV rows across a group's ranks)."""
    from hf_worker import LAYOUTS

    tp, pp = LAYOUTS[scenario]
    ranks = run_workers(scenario, checkpoints, nprocs=tp * pp, timeout_s=240,
                        worker=Path(__file__).parent / "hf_worker.py")
    logits = ranks[-1]  # PP: the last stage has them
    for name in ARCHITECTURES:
        hf_dir = checkpoints / "hf" / name
        if pp == 1:  # each rank reads its TP slices (norms whole): about 1/tp of TP=1's bytes
            read = [rank[f"{name}/bytes_read"] for rank in ranks]
            print(f"{name}: bytes read TP=1 {checkpoint_bytes(hf_dir)}, TP={tp} per rank {read}")
            assert read == [expected_bytes_read(hf_dir, 256, tp=tp, tp_rank=r) for r in range(tp)]
        torch.testing.assert_close(logits[name], hf_logits(hf_dir), atol=1e-4, rtol=1e-4)
        assert_same_tensors(checkpoints / "export" / scenario / name, hf_dir)
        original = hf_tensors(hf_dir)
        for rank in ranks:  # the refit view: every rank gets every stage's full tensors
            streamed = rank[f"{name}/all_stages"]
            assert set(streamed) == set(original)
            assert all(torch.equal(streamed[key], original[key]) for key in original)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    from nemo_rlsr.models.hf import adapter_and_config, adapter_for

    with pytest.raises(ValueError, match=r"'gpt2' is not supported; supported: .*llama.*qwen2.*qwen3"):
        adapter_for("gpt2")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **COMMON, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        adapter_and_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", **COMMON, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}}))
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        adapter_and_config(tmp_path)


def test_transformers_4_rope_keys_read_like_rope_parameters():
    """config.json files written by transformers 4.x carry `rope_theta` + `rope_scaling` instead."""
    from nemo_rlsr.models.hf import adapter_for

    legacy = {**COMMON, "rope_theta": 500000.0, "rope_scaling": {
        **{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}}}
    current = {**COMMON, "rope_parameters": LLAMA3_ROPE}
    llama = adapter_for("llama")
    assert llama.model_config(legacy) == llama.model_config(current)
    assert llama.model_config(current).rope_scaling_factor == 8.0


def test_weights_that_do_not_match_config_json_are_refused(checkpoints, single_rank, tmp_path):
    import shutil

    from nemo_rlsr.models.gpt import build_gpt
    from nemo_rlsr.models.hf import adapter_and_config
    from nemo_rlsr.models.hf.load import load_hf_weights

    shutil.copytree(checkpoints / "hf" / "qwen2", tmp_path / "wrong")
    config = json.loads((tmp_path / "wrong" / "config.json").read_text())
    (tmp_path / "wrong" / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    adapter, cfg = adapter_and_config(tmp_path / "wrong")
    with pytest.raises(ValueError, match=r"mlp.linear_fc1.weight has shape \(192, 64\).*the model's is \(256, 64\)"):
        load_hf_weights(build_gpt(cfg, cfg.vocab_size), adapter, cfg, tmp_path / "wrong")


def test_llama3_inv_freq_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from nemo_rlsr.models.rope import llama3_inv_freq

    rope = {**LLAMA3_ROPE, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(**COMMON, rope_parameters=rope)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = 16
    plain = 1.0 / rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ours = llama3_inv_freq(plain, 8.0, 2.0, 8.0, 64)
    torch.testing.assert_close(ours, expected.float(), atol=0, rtol=1e-6)
    assert not torch.equal(ours, plain) and not torch.equal(ours, plain / 8)  # all three bands present


def test_run_fields_that_contradict_config_json_are_refused():
    from nemo_rlsr.config import ConfigError, ModelConfig
    from nemo_rlsr.models.hf.start import merge_hf_shape

    shape = ModelConfig(num_layers=28, hidden_size=64, num_query_groups=4, max_sequence_length=32768)
    run = ModelConfig(hf_path="/m", params_dtype="bfloat16", max_sequence_length=4096, num_layers=28)
    merged = merge_hf_shape(run, shape)
    assert (merged.num_layers, merged.hidden_size, merged.num_query_groups) == (28, 64, 4)
    assert merged.params_dtype == "bfloat16" and merged.max_sequence_length == 4096  # the run's choices
    with pytest.raises(ConfigError, match=r"model.num_layers=32 but config.json gives 28"):
        merge_hf_shape(ModelConfig(num_layers=32), shape)


@pytest.fixture(scope="module")
def qwen2_and_tokenizer(tmp_path_factory) -> tuple[Path, Path]:
    """An HF tokenizer with a chat template and a random Qwen2 whose embedding has 37 rows more
    than the tokenizer has ids (as real Qwen checkpoints do)."""
    import transformers

    root = tmp_path_factory.mktemp("hf_run")
    tokenizer = build_hf_tokenizer(root / "tokenizer", "chatml")
    ids = len(transformers.AutoTokenizer.from_pretrained(tokenizer))
    config = transformers.Qwen2Config(vocab_size=ids + 37, hidden_size=128, intermediate_size=512,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(root / "hf", max_shard_size="300KB")
    return root / "hf", tokenizer


def hf_run_overrides(hf_dir: Path, tokenizer: Path, run: Path) -> list[str]:
    return DATA + [f"data.path={FIXTURES / 'tulu.jsonl'}", "data.format=tulu", f"data.tokenizer_path={tokenizer}",
                   f"model.hf_path={hf_dir}", f"trainer.output_dir={run}"]


@pytest.mark.slow
def test_sft_starts_from_the_hf_checkpoint_and_export_gives_it_back(qwen2_and_tokenizer, tmp_path):
    """The real trainer path: `nemo-rlsr sft` with model.hf_path (at lr 0, so the weights stay the
    checkpoint's), then `nemo-rlsr export-hf` of its checkpoint: every tensor back bit for bit,
    including the embedding rows past the tokenizer's ids."""
    hf_dir, tokenizer = qwen2_and_tokenizer
    run = tmp_path / "sft"
    out = cli("sft", "sft_tiny.yaml", hf_run_overrides(hf_dir, tokenizer, run) + [
        "sft.global_batch_size=4", "sft.micro_batch_size=4", "sft.steps=1", "optimizer.lr=0.0"])
    assert f"initialised from the HF checkpoint {hf_dir}" in out
    (checkpoint,) = sorted((run / "checkpoints").glob("step_*"))
    run_cli("export-hf", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export"))
    assert json.loads((tmp_path / "export" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert_same_tensors(tmp_path / "export", hf_dir)


@pytest.mark.slow
def test_rlsr_starts_policy_and_reference_from_the_hf_checkpoint(qwen2_and_tokenizer, tmp_path):
    hf_dir, tokenizer = qwen2_and_tokenizer
    run = tmp_path / "rlsr"
    out = cli("train", "rlsr_tiny.yaml", hf_run_overrides(hf_dir, tokenizer, run) + RLSR + ["pretrain.steps=0"])
    assert f"initialised policy and reference from the HF checkpoint {hf_dir}" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and abs(records[0]["kl"]) < 1e-7  # reference = loaded policy
