"""The sections of benchmarks/gpu_check.py, in the order they run (most important first: a lease
may end before the last one). Each is a function `(SectionRecord, Options) -> None` in one of this
package's modules, run in its own process by the driver.

Limits are wall seconds of one section on one H200 (`limit_s`) and on 2 CPU cores under `--smoke`
(`smoke_limit_s`), imports and process start included; the driver also stops starting sections
when its overall budget (`--budget-s`) runs out.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .options import Options
from .record import SectionRecord


@dataclass(frozen=True)
class Section:
    name: str
    target: str  # "module:function" in this package
    needs_cuda: bool
    limit_s: float
    smoke_limit_s: float
    what: str


SECTIONS = (
    Section("environment", "environment:environment", False, 60, 90,
            "versions, GPU, driver, env vars, nemo_rlsr imports, NCCL all-reduce, copy and bf16 matmul ceilings"),
    Section("train_step", "policy_checks:train_step", False, 120, 120,
            "MegatronPolicy RLSR step: logprobs = plain forward = transformers Llama, loss and grad norm = direct"),
    Section("bf16_vs_fp32", "policy_checks:bf16_vs_fp32", False, 90, 120,
            "same weights, params_dtype float32 vs bfloat16: logprob differences (weights vs compute)"),
    Section("torch_sampler", "generation_checks:torch_sampler", False, 120, 120,
            "greedy = teacher-forced argmax, logprobs at T = policy's, seeds, no padded vocab id"),
    Section("megatron_engine", "engine_checks:megatron_engine", False, 150, 150,
            "megatron-core engine: EOS kept, finished, seeds, logprobs at T, training after generate, padded ids"),
    Section("refit_broadcast", "refit_checks:refit_broadcast", False, 90, 90,
            "refit to an engine in another process: NCCL refit group, buckets into transformers = policy logprobs"),
    Section("reward_encoder", "reward_checks:reward_encoder", False, 120, 150,
            "MiniLM encoder: our batching = sentence-transformers encode(), sentences/s of both"),
    Section("train_step_1p5b", "run_checks:train_step_1p5b", False, 240, 180,
            "Qwen2.5-1.5B-shaped bf16 train step, MegatronPolicy vs transformers: tokens/s, MFU"),
    Section("cli_train", "run_checks:cli_train", False, 150, 300,
            "nemo-rlsr train conf/rlsr_tiny.yaml, 2 RLSR steps, torch engine"),
    Section("cli_train_megatron_engine", "run_checks:cli_train_megatron_engine", True, 150, 0,
            "nemo-rlsr train conf/rlsr_tiny.yaml, 2 RLSR steps, rollout.engine=megatron"),
)
BY_NAME = {section.name: section for section in SECTIONS}


def run_section(name: str, rec: SectionRecord, opts: Options) -> None:
    module, function = BY_NAME[name].target.split(":")
    getattr(importlib.import_module(f"{__name__}.{module}"), function)(rec, opts)
