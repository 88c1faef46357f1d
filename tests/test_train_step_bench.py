"""Smoke test of benchmarks/train_step_bench.py on a CPU: the tiny shape runs every variant it can
and prints the fields the GPU runs are read by."""

from __future__ import annotations

import subprocess

import pytest
import torch

from cli_runner import run_python


def fields(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split() if "=" in item)


def bench(*args: str) -> subprocess.CompletedProcess:
    result = run_python(["benchmarks/train_step_bench.py", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_tiny_bench_prints_throughput_and_ratio():
    result = bench("--tiny", "--steps", "1", "--warmup", "1")
    lines = {fields(line).get("variant"): fields(line) for line in result.stdout.splitlines() if "variant=" in line}
    header = fields(result.stdout.splitlines()[0])
    assert header["shape"] == "tiny" and int(header["tokens_per_step"]) == 2 * 32
    hf, megatron = lines["hf"], lines["megatron"]
    for line in (hf, megatron):
        assert float(line["tokens_per_s"]) > 0 and float(line["step_s"]) > 0
        if not torch.cuda.is_available():
            assert line["mfu"] == "n/a"  # no peak FLOP/s to divide by on a CPU
    assert megatron["spec"] in ("local", "transformer_engine") and float(megatron["ratio_vs_hf"]) > 0
    assert megatron["same_shape"] == "True", (megatron["params"], hf["params"])  # GQA, qkv bias, tied
    # Without Transformer Engine the FP8 variant is skipped with the validator's reason.
    fp8 = next(line for line in result.stdout.splitlines() if line.startswith("variant=megatron_fp8"))
    assert ("skipped:" in fp8 and "model.fp8 needs Transformer Engine" in fp8) or "tokens_per_s=" in fp8


@pytest.mark.gpu
def test_qwen_shape_on_gpu_reports_mfu():
    """The real shape, short: bf16 on both sides, an MFU on H100/H200, the same architecture."""
    result = bench("--batch", "1", "--seq-len", "1024", "--steps", "2", "--warmup", "1")
    lines = {fields(line).get("variant"): fields(line) for line in result.stdout.splitlines() if "tokens_per_s=" in line}
    assert lines["hf"]["param_dtype"] == "bfloat16"
    megatron = lines["megatron"]
    assert megatron["same_shape"] == "True" and megatron["param_dtype"] == "bfloat16"
    if "H100" in result.stdout or "H200" in result.stdout:
        assert 0.0 < float(megatron["mfu"]) < 1.0 and 0.0 < float(lines["hf"]["mfu"]) < 1.0
