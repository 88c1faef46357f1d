"""TensorRT-LLM engines on GPUs of their own (generation/trtllm_worker.py) up to TensorRT-LLM itself:
the actor, its placement groups on a local Ray of logical GPUs, the extension mixed into each Ray
worker (generation/trtllm_refit_ext.py), the refit broadcast to 2 engines x 2 workers, the finalise,
the prompts shared out between engines and put back in order. TensorRT-LLM cannot be installed here,
so tests/stand_ins/tensorrt_llm stands in for it in the actor's processes (transformers Llamas as
the engines' models, gloo for NCCL); what only TensorRT-LLM on GPUs can show is
benchmarks/gpu_check.py's and the `gpu` test's business."""

from __future__ import annotations

import pytest
import torch

from cli_runner import REPO, run_python

from nemo_rlsr.config import load_config
from nemo_rlsr.generation.factory import build_rollout_worker
from nemo_rlsr.generation.trtllm import llm_kwargs
from nemo_rlsr.generation.trtllm_refit_ext import EXTENSION_QUALNAME
from nemo_rlsr.generation.trtllm_worker import group_ranks, separate_options

CHECK = REPO / "tests" / "trtllm_worker_check.py"
SEPARATE = ["rollout.placement=separate", "rollout.engine=trtllm", "rollout.gpus=4", "rollout.tensor_parallel=2",
            "grpo.max_staleness=1", "grpo.tis_cap=2.0"]


def test_each_engine_is_sized_for_the_whole_prompts_it_may_get(tmp_path):
    cfg = load_config(REPO / "conf/rlsr_tiny.yaml", SEPARATE + ["grpo.prompts_per_step=6", "grpo.num_generations=8"])
    opts = separate_options(cfg, tmp_path, dp=2)  # 3 prompts per trainer rank over 2 engines: 2 and 1
    assert opts.max_batch_size == 2 * 8 and opts.tensor_parallel == 2
    kwargs = llm_kwargs(opts)
    assert kwargs["ray_worker_extension_cls"] == EXTENSION_QUALNAME and kwargs["enable_sleep"] is False
    assert kwargs["max_input_len"] == cfg.model.max_sequence_length - cfg.rollout.max_new_tokens
    assert group_ranks(2, 2) == [[1, 2], [3, 4]]  # the trainer's rank 0 is rank 0 of the refit group


def test_separate_engines_need_a_ray_cluster_of_the_rollout_gpus(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(REPO / "conf/rlsr_tiny.yaml", SEPARATE)
    with pytest.raises(RuntimeError, match="needs a Ray cluster that holds the rollout GPUs"):
        build_rollout_worker(cfg, None, None, tmp_path, 1)


@pytest.mark.slow
def test_engines_refitted_by_broadcast_generate_what_our_sampler_does_on_the_trainers_weights(tmp_path):
    result = run_python([str(CHECK), str(tmp_path)], timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    for version in (0, 1):
        run = results[version]
        engine, ours = run["engine"], run["ours"]
        assert run["version"] == version  # the generate after refit v samples on v
        assert engine.response_ids == ours.response_ids, version  # 4 prompts x 2 samples, greedy
        assert torch.equal(engine.input_ids, ours.input_ids) and torch.equal(engine.response_mask, ours.response_mask)
        torch.testing.assert_close(engine.engine_logprobs, ours.engine_logprobs, atol=1e-5, rtol=0)
        assert run["metrics"]["refit/buckets"] > 1 and run["metrics"]["async/refit_wait_s"] >= 0
    # the comparison can fail: version 1's weights give other logprobs than version 0's
    assert not torch.allclose(results[1]["engine"].engine_logprobs, results[0]["ours"].engine_logprobs, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.slow
def test_real_engines_on_their_own_gpus(tmp_path):
    """TensorRT-LLM 1.2 (NGC image nvcr.io/nvidia/tensorrt-llm/release:1.2.0) on >= 5 GPUs: 2 engines
    of 2 GPUs refitted over NCCL from a trainer on the fifth. Its kernels are not ours, so tokens are
    compared by agreement and logprobs by their mean difference. Written, not run."""
    import importlib.util

    if importlib.util.find_spec("tensorrt_llm") is None or torch.cuda.device_count() < 5:
        pytest.skip("needs TensorRT-LLM and >= 5 GPUs")
    result = run_python([str(CHECK), str(tmp_path), "real"], timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    for version in (0, 1):
        run = results[version]
        engine, ours = run["engine"], run["ours"]
        assert run["version"] == version
        same = sum(a == b for a, b in zip(engine.response_ids, ours.response_ids))
        assert same >= 0.75 * len(ours.response_ids), (version, engine.response_ids, ours.response_ids)
        mask = ours.response_mask.bool() & engine.response_mask.bool()
        assert (engine.engine_logprobs - ours.engine_logprobs.cpu())[mask].abs().mean() < 0.05
