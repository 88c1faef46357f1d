"""Engine selection, the shared output layout, and TensorRT-LLM's adapter up to its API boundary.

The real TensorRT-LLM and megatron-core inference runs are `gpu` tests (skipped on CPU machines);
everything before their boundary (options, sampling arguments, IPC-handle buckets, conversion of
their outputs into a RolloutBatch) is checked here on the CPU.
"""

import base64
import pickle
from types import SimpleNamespace

import pytest
import torch

from nemo_rlsr.config import ConfigError, ModelConfig, RLSRConfig
from nemo_rlsr.generation.factory import check_engine
from nemo_rlsr.generation.interface import SamplingParams
from nemo_rlsr.generation.layout import rollout_batch
from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine
from nemo_rlsr.generation.trtllm import (
    TRTLLMOptions,
    completions,
    completions_to_rollout,
    llm_kwargs,
    sampling_kwargs,
    serialize_handles,
)

VOCAB, PAD, EOS = 61, 0, 1
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


@pytest.fixture(scope="module")
def module(single_rank):
    from nemo_rlsr.models.gpt import build_gpt

    torch.manual_seed(0)
    return build_gpt(ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                                 max_sequence_length=32), VOCAB)


def config(**rollout) -> RLSRConfig:
    cfg = RLSRConfig()
    for key, value in rollout.items():
        setattr(cfg.rollout, key, value)
    return cfg


# ---------------------------------------------------------------- selection


def test_engine_combinations_that_cannot_run_are_refused_at_startup():
    check_engine(config(), cuda=False, trtllm_importable=False)  # torch on a CPU machine
    check_engine(config(engine="megatron"), cuda=True, trtllm_importable=False)
    check_engine(config(engine="trtllm", fp8=True, tensor_parallel=1), cuda=True, trtllm_importable=True)
    refused = {
        "needs CUDA": (config(engine="megatron"), False, False),
        "has none": (config(engine="trtllm"), False, True),
        "import tensorrt_llm": (config(engine="trtllm"), True, False),
        "choose one of": (config(engine="vllm"), True, True),
        "TensorRT-LLM option": (config(fp8=True), True, True),
        "trainer's module": (config(tensor_parallel=2), True, True),
        "stop strings need": (config(engine="trtllm", stop=["\n"]), True, True),
        "one trainer model-parallel group": (config(engine="trtllm", tensor_parallel=4), True, True),
    }
    for message, (cfg, cuda, importable) in refused.items():
        with pytest.raises(ConfigError, match=message):
            check_engine(cfg, cuda=cuda, trtllm_importable=importable)
    pipelined = config()
    pipelined.parallel.pipeline_parallel = 2
    with pytest.raises(ConfigError, match="pipeline_parallel=1"):
        check_engine(pipelined, cuda=True, trtllm_importable=True)
    pipelined.rollout.engine = "trtllm"  # PP->TP: the engine has its own layout
    check_engine(pipelined, cuda=True, trtllm_importable=True)


# ---------------------------------------------------------------- layout


def test_layout_of_engine_outputs_equals_the_torch_samplers_own(module):
    params = SamplingParams(max_new_tokens=6, n=2)
    ours = TorchRolloutEngine(module, PAD, EOS, VOCAB).generate(PROMPTS, params, seed=1)
    rows = [p for p in PROMPTS for _ in range(2)]
    logprobs = [ours.engine_logprobs[r][ours.response_mask[r].bool()].tolist() for r in range(len(rows))]
    rebuilt = rollout_batch(rows, ours.response_ids, logprobs, (~ours.truncated).tolist(), PAD, 6)
    for field in ("input_ids", "valid", "response_mask", "engine_logprobs", "truncated"):
        assert torch.equal(getattr(rebuilt, field), getattr(ours, field)), field
    with pytest.raises(ValueError, match="logprobs"):
        rollout_batch([[3]], [[4, 5]], [[-1.0]], [True], PAD, 6)


# ---------------------------------------------------------------- TensorRT-LLM boundary


def test_trtllm_llm_and_sampling_arguments():
    opts = TRTLLMOptions(model_dir="/m", tensor_parallel=2, max_batch_size=64, max_seq_len=4096, fp8=True)
    kwargs = llm_kwargs(opts)
    assert kwargs["orchestrator_type"] == "ray" and kwargs["enable_sleep"] and kwargs["load_format"] == "dummy"
    assert kwargs["ray_worker_extension_cls"] == "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["kv_cache_config"]["enable_block_reuse"]
    assert kwargs["quant_config"]["quant_algo"] == "FP8"
    assert "quant_config" not in llm_kwargs(TRTLLMOptions("/m", 1, 8, 128))
    with pytest.raises(ValueError):
        TRTLLMOptions("/m", 0, 8, 128)

    params = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=20, n=4)
    args = sampling_kwargs(params, seed=5, eos_id=EOS, pad_id=PAD)
    assert args == {"max_tokens": 12, "n": 4, "seed": 5, "logprobs": 1, "pad_id": PAD, "detokenize": False,
                    "temperature": 0.7, "top_p": 0.9, "top_k": 20, "end_id": EOS, "ignore_eos": False}
    greedy = sampling_kwargs(SamplingParams(4, greedy=True, stop_on_eos=False), 0, EOS, PAD)
    assert greedy["top_k"] == 1 and greedy["ignore_eos"]
    with pytest.raises(ValueError, match="stop"):
        sampling_kwargs(SamplingParams(4, stop=("x",)), 0, EOS, PAD)


def test_refit_bucket_becomes_ipc_handles_keyed_by_device():
    bucket = [("model.layers.0.mlp.up_proj.weight", torch.randn(4, 3)), ("model.norm.weight", torch.randn(3))]
    payload = serialize_handles(bucket, "GPU-1234")
    assert list(payload) == ["GPU-1234"]
    handles = pickle.loads(base64.b64decode(payload["GPU-1234"]))
    assert [name for name, _ in handles] == [name for name, _ in bucket]
    for (_, (rebuild, args)), (_, tensor) in zip(handles, bucket):
        assert torch.equal(rebuild(*args), tensor)  # the same storage, rebuilt from its handle


def fake_output(tokens, logprobs, reason):
    entries = [{t: SimpleNamespace(logprob=lp, rank=1)} for t, lp in zip(tokens, logprobs)]
    return SimpleNamespace(token_ids=tokens, logprobs=entries, finish_reason=reason)


def test_trtllm_outputs_become_a_rollout_batch():
    results = [SimpleNamespace(outputs=[fake_output([20, EOS], [-0.5, -0.25], "stop"),
                                        fake_output([21, 22, 23], [-1.0, -2.0, -3.0], "length")]),
               SimpleNamespace(outputs=[fake_output([24], [-0.125], "stop"),
                                        fake_output([25, 26, 27], [-0.1, -0.2, -0.3], "length")])]
    per_prompt = completions(results, n=2)
    batch = completions_to_rollout([[5, 6, 7], [8]], per_prompt, PAD, max_new_tokens=3, device="cpu")
    assert batch.response_ids == [[20, EOS], [21, 22, 23], [24], [25, 26, 27]]
    assert batch.truncated.tolist() == [False, True, False, True]
    assert batch.input_ids[0].tolist() == [5, 6, 7, 20, EOS, PAD]
    assert batch.input_ids[2].tolist() == [PAD, PAD, 8, 24, PAD, PAD]
    assert batch.response_mask[2].tolist() == [0, 0, 1, 0, 0, 0]  # column 2 predicts the token at 3
    assert batch.engine_logprobs[1].tolist() == pytest.approx([0, 0, -1.0, -2.0, -3.0, 0])
    with pytest.raises(ValueError, match="completions"):
        completions(results, n=3)


# ---------------------------------------------------------------- GPU engines


@pytest.mark.gpu
def test_megatron_engine_greedy_equals_torch_sampler_greedy(module):
    from nemo_rlsr.generation.megatron_engine import MegatronRolloutEngine

    params = SamplingParams(max_new_tokens=8, greedy=True, stop_on_eos=False)
    ours = TorchRolloutEngine(module, PAD, EOS, VOCAB).generate(PROMPTS, params, seed=0)
    theirs = MegatronRolloutEngine(module, PAD, EOS, VOCAB, max_batch_size=8, max_sequence_length=32).generate(
        PROMPTS, params, seed=0)
    assert theirs.response_ids == ours.response_ids


@pytest.mark.gpu
def test_trtllm_engine_after_refit_greedy_equals_torch_sampler(module, tmp_path):
    pytest.importorskip("tensorrt_llm")
    import json

    from nemo_rlsr.generation.factory import trtllm_model_config
    from nemo_rlsr.generation.trtllm import TRTLLMRolloutEngine
    from nemo_rlsr.models.hf import adapter_for_model
    from nemo_rlsr.weight_sync.source import hf_named_tensors

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                      max_sequence_length=32)
    adapter = adapter_for_model(cfg)
    (tmp_path / "config.json").write_text(json.dumps(trtllm_model_config(adapter, cfg, VOCAB, PAD, EOS)))
    engine = TRTLLMRolloutEngine(TRTLLMOptions(str(tmp_path), 1, 8, 32),
                                 lambda: hf_named_tensors(module, adapter, cfg, VOCAB), 2**20, EOS, PAD)
    metrics = engine.update_weights()
    assert metrics["refit/buckets"] >= 1
    engine.wake()
    params = SamplingParams(max_new_tokens=8, greedy=True, stop_on_eos=False)
    theirs = engine.generate(PROMPTS, params, seed=0)
    engine.sleep()
    ours = TorchRolloutEngine(module, PAD, EOS, VOCAB).generate(PROMPTS, params, seed=0)
    assert theirs.response_ids == ours.response_ids


# ---------------------------------------------------------------- through the trainer


def cli_train(tmp_path, *overrides):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    args = [sys.executable, "-m", "nemo_rlsr.cli", "train", "--config", str(repo / "conf" / "rlsr_tiny.yaml"),
            "pretrain.steps=5", "grpo.prompts_per_step=2", "grpo.num_generations=4", "grpo.micro_batch_size=8",
            "rollout.max_new_tokens=8", "trainer.progress_bar=false", "trainer.heldout_eval=false",
            f"trainer.output_dir={tmp_path / 'run'}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_trainer_uses_sampling_options_and_logs_tis(tmp_path):
    import json

    result = cli_train(tmp_path, "trainer.steps=2", "grpo.tis_cap=2.0", "rollout.top_k=20", "rollout.stop=[the]")
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert 1.0 <= row["token_mult_prob_error"] < 1.001  # the torch engine is the trainer's module
        assert row["tis/weight_max"] <= 2.0 and row["tis/weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert not any(k.startswith("refit/") for k in row)  # the torch engine has nothing to copy
    refused = cli_train(tmp_path / "megatron", "trainer.steps=1", "rollout.engine=megatron")
    assert refused.returncode != 0 and "needs CUDA GPUs" in refused.stderr


def test_generation_benchmark_smoke():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = ("import json, sys; sys.path.insert(0, 'benchmarks'); import generation_bench as g; "
            "print(json.dumps(g.main(['--prompts', '2', '--new-tokens', '4', '--iterations', '1'])))")
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["identical_rows"] == 2  # same weights, greedy: HF generate and ours agree
    assert summary["torch_sampler_tok_s"] > 0 and summary["hf_generate_tok_s"] > 0
