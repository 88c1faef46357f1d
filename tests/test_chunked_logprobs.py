"""Lean logprobs (models/logprobs.py): chunked over tokens, entropy only where logged, one norm pass.

Each number is checked against log_softmax of the gathered vocabulary (plain torch) and against the
path it replaced (megatron's vocab_parallel_cross_entropy on the whole micro-batch), at TP=1 in this
process and at TP=2 on 2 gloo ranks (tests/logprob_worker.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed_helpers import run_workers
from logprob_worker import CHUNKS, compare_with_references

WORKER = Path(__file__).resolve().parent / "logprob_worker.py"
TOLERANCE = {"float32": 2e-6, "bfloat16": 2e-2}  # bf16: the gradient is rounded to bf16 either way


def check(result: dict, tolerance: float) -> None:
    for name, value in result["before_vs_reference"].items():
        assert value < tolerance, f"the replaced path is itself off the reference ({name}: {value})"
    for chunk in CHUNKS:
        got = result[chunk]
        assert got["no_entropy"], "entropy computed although not asked for"
        for name in ("logprobs", "entropy", "grad", "forward_only"):
            assert got[name] < tolerance, f"chunk_tokens={chunk}: {name} off by {got[name]}"


def test_chunked_logprobs_entropy_and_gradient_equal_the_references_at_tp1(single_rank):
    check(compare_with_references(0, 1), TOLERANCE["float32"])
    check(compare_with_references(0, 1, torch.bfloat16), TOLERANCE["bfloat16"])


@pytest.mark.slow
def test_chunked_logprobs_entropy_and_gradient_equal_the_references_at_tp2(tmp_path):
    for rank in run_workers("tp2", tmp_path, worker=WORKER):
        for dtype, result in rank.items():
            check(result, TOLERANCE[dtype])
