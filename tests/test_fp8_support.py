"""Transformer Engine's own FP8 support rules (models/fp8_support.py), at every boundary: compute
capability, CUDA version and TE version as TE's `check_fp8_support` / `check_mxfp8_support` /
`check_fp8_block_scaling_support` decide them (transformer_engine/pytorch/fp8.py at v2.3 and v2.8,
quantization.py at v2.9 and v2.18), and through the trainer's start-up check."""

from __future__ import annotations

import pytest

from nemo_rlsr.config import load_config
from nemo_rlsr.distributed.layout import run_problems
from nemo_rlsr.models.fp8_support import recipe_support_problems, version_tuple

ADA, HOPPER, B200, GB300, RTX5090 = (8, 9), (9, 0), (10, 0), (10, 3), (12, 0)


@pytest.mark.parametrize("recipe,te,capability,cuda,refused", [
    # per-tensor scaling: Hopper and newer whatever the CUDA; Ada from CUDA 12.1; nothing older
    ("delayed", "2.3", HOPPER, "11.8", None),
    ("tensorwise", "2.8", RTX5090, "12.8", None),
    ("delayed", "2.3", ADA, "12.1", None),
    ("delayed", "2.3", ADA, "12.0", "on Ada (sm89) needs CUDA >= 12.1"),
    ("tensorwise", "2.8", (8, 6), "12.8", "compute capability >= 8.9"),
    # blockwise: CUDA >= 12.9; compute capability 9.x up to TE 2.8, >= 9.0 from TE 2.9
    ("blockwise", "2.3", HOPPER, "12.9", None),
    ("blockwise", "2.3", HOPPER, "12.8", "needs CUDA >= 12.9"),
    ("blockwise", "2.9", HOPPER, "13.0", None),
    ("blockwise", "2.8", (9, 9), "12.9", None),
    ("blockwise", "2.8", B200, "12.9", "compute capability 9.x only with Transformer Engine <= 2.8"),
    ("blockwise", "2.8.0+cu129", B200, "12.9", "compute capability 9.x only"),
    ("blockwise", "2.9.0.dev0", B200, "12.9", None),
    ("blockwise", "2.18", RTX5090, "13.0", None),
    ("blockwise", "2.18", ADA, "13.0", "blockwise needs compute capability >= 9.0"),
    # mxfp8: Blackwell datacenter parts (10.x, 11.x); refused below and from 12.0
    ("mxfp8", "2.1", HOPPER, "12.8", "mxfp8 needs Blackwell"),
    ("mxfp8", "2.1", B200, "12.8", None),
    ("mxfp8", "2.8", GB300, "12.9", None),
    ("mxfp8", "2.8", (11, 0), "13.0", None),
    ("mxfp8", "2.6", RTX5090, "12.8", "not supported on compute capability 12.0 and newer"),
    ("mxfp8", "2.3", (12, 1), "12.8", "not supported on compute capability 12.0 and newer"),
])
def test_recipe_support_boundaries(recipe, te, capability, cuda, refused):
    problems = recipe_support_problems(recipe, te, capability, cuda)
    if refused is None:
        assert problems == []
    else:
        assert len(problems) == 1 and refused in problems[0], problems


def test_unknown_machine_parts_skip_their_rules():
    # the planner checks a target GPU without TE or CUDA at hand; a CPU machine knows neither
    assert recipe_support_problems("blockwise", None, B200, None) == []
    (problem,) = recipe_support_problems("blockwise", "2.3", None, "12.8")
    assert problem == "model.fp8_recipe=blockwise needs CUDA >= 12.9 (Transformer Engine's check); CUDA here: 12.8"
    assert recipe_support_problems("mxfp8", None, None, None) == []


def test_version_tuples():
    assert [version_tuple(v) for v in ("2.3.0.dev0+abc", "2.10", "12.9", "13.0", "2")] == [
        (2, 3), (2, 10), (12, 9), (13, 0), (2, 0)]


def test_trainer_start_up_check_applies_them():
    cfg = load_config(None, ["model.params_dtype=bfloat16", "model.fp8=hybrid", "model.fp8_recipe=blockwise",
                             "model.max_sequence_length=128"])
    assert run_problems(cfg, 1, "2.8", HOPPER, cuda_version="12.9") == []
    problems = run_problems(cfg, 1, "2.8", B200, cuda_version="12.8")
    assert any("needs CUDA >= 12.9" in p for p in problems) and any("9.x only" in p for p in problems), problems
