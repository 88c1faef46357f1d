"""Which FP8 recipe Transformer Engine runs on which GPU and CUDA, as TE itself decides it.

TE refuses a recipe the GPU cannot run only when the first FP8 layer executes (`check_recipe_support`
inside `fp8_autocast`), i.e. after the job has started, read its checkpoint and built the model on
every GPU. These are TE's own rules as a pure function of the recipe, the installed TE version, the
GPU's compute capability and the CUDA version, so that the trainer refuses at start-up and every
boundary is tested on a CPU. Read from TE's sources (`check_fp8_support`, `check_mxfp8_support`,
`check_fp8_block_scaling_support`, `check_recipe_support`): transformer_engine/pytorch/fp8.py at
tags v2.3 to v2.8, transformer_engine/pytorch/quantization.py from v2.9 (read at v2.9, v2.12, v2.18):

* per-tensor scaling (`delayed`, `tensorwise`): compute capability >= 9.0, or 8.9 (Ada) with
  CUDA >= 12.1 (and cuBLASLt >= 12.1.3, which that CUDA ships).
* `blockwise`: CUDA >= 12.9 and compute capability 9.x (`>= (9, 0) and < (10, 0)`) up to TE 2.8;
  from TE 2.9 any compute capability >= 9.0.
* `mxfp8`: compute capability >= 10.0; from TE 2.6 refused on 12.0 and newer ("MXFP8 (for all gemm
  layouts) is not supported on 12.0+ architectures yet", unchanged at v2.18). TE 2.1 to 2.5 do not
  check it; refused here on every version, since no release runs all of MXFP8's GEMM layouts there.

TE compares `float(torch.version.cuda)`; versions are compared as (major, minor) here.
"""

from __future__ import annotations

ADA = (8, 9)  # the first compute capability with FP8 tensor cores
HOPPER = (9, 0)
BLACKWELL = (10, 0)  # MX (block-scaled) FP8 formats
MXFP8_UNSUPPORTED_FROM = (12, 0)  # consumer Blackwell (sm120) and newer
ADA_MIN_CUDA = (12, 1)
BLOCKWISE_MIN_CUDA = (12, 9)
BLOCKWISE_HOPPER_ONLY_UNTIL_TE = (2, 8)  # TE 2.9 dropped the upper bound on the compute capability


def version_tuple(version: str) -> tuple[int, int]:
    """"2.3.0.dev0+abc" -> (2, 3); "12.9" -> (12, 9)."""
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def cuda_runtime_version() -> str | None:
    """The CUDA version torch was built with (what TE reads, `torch.version.cuda`) where a GPU is
    present, else None."""
    import torch

    return torch.version.cuda if torch.cuda.is_available() else None


def _sm(capability: tuple[int, int]) -> str:
    return f"sm{capability[0]}{capability[1]}"


def recipe_support_problems(recipe: str, te_version: str | None, capability: tuple[int, int] | None,
                            cuda_version: str | None) -> list[str]:
    """Why TE would refuse `model.fp8_recipe=recipe` on this GPU, as sentences; empty when it runs.
    An unknown input (None: no GPU, no TE, unknown CUDA) skips the rules that need it: the planner
    checks a target GPU's capability without TE or CUDA at hand."""
    cap = tuple(capability) if capability is not None else None
    cuda = version_tuple(cuda_version) if cuda_version else None
    te = version_tuple(te_version) if te_version else None
    out: list[str] = []
    if cap is not None and cap < ADA:
        return [f"model.fp8 needs FP8 tensor cores (compute capability >= 8.9, Ada/Hopper); this GPU is {_sm(cap)}"]
    if recipe in ("delayed", "tensorwise"):
        if cap is not None and cap < HOPPER and cuda is not None and cuda < ADA_MIN_CUDA:
            out.append(f"model.fp8 on Ada ({_sm(cap)}) needs CUDA >= 12.1 (Transformer Engine's check); "
                       f"CUDA here: {cuda_version}")
    elif recipe == "blockwise":
        if cuda is not None and cuda < BLOCKWISE_MIN_CUDA:
            out.append(f"model.fp8_recipe=blockwise needs CUDA >= 12.9 (Transformer Engine's check); "
                       f"CUDA here: {cuda_version}")
        if cap is not None and cap < HOPPER:
            out.append(f"model.fp8_recipe=blockwise needs compute capability >= 9.0; this GPU is {_sm(cap)}: "
                       f"use tensorwise or delayed")
        elif cap is not None and cap >= BLACKWELL and te is not None and te <= BLOCKWISE_HOPPER_ONLY_UNTIL_TE:
            out.append(f"model.fp8_recipe=blockwise runs on compute capability 9.x only with Transformer Engine "
                       f"<= 2.8 (installed: {te_version}); this GPU is {_sm(cap)}: use mxfp8, or TE >= 2.9")
    elif recipe == "mxfp8" and cap is not None:
        if cap < BLACKWELL:
            out.append(f"model.fp8_recipe=mxfp8 needs Blackwell (compute capability 10.x or 11.x); this GPU is "
                       f"{_sm(cap)}: use tensorwise or blockwise")
        elif cap >= MXFP8_UNSUPPORTED_FROM:
            out.append(f"model.fp8_recipe=mxfp8 is not supported on compute capability 12.0 and newer (Transformer "
                       f"Engine refuses it there from 2.6); this GPU is {_sm(cap)}: use tensorwise")
    return out
