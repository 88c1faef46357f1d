"""Sections that run whole programs: the 1.5B-shaped train-step benchmark and `nemo-rlsr train`.

* `train_step_1p5b`: benchmarks/train_step_bench.py (MegatronPolicy.train_step vs a transformers
  Qwen2 step of the same Qwen2.5-1.5B shape, bf16, batch 4 x 2048; `--smoke`: its tiny shape).
* `cli_train` / `cli_train_megatron_engine`: the real CLI on conf/rlsr_tiny.yaml, cut to a short
  base pre-training and 2 RLSR steps, with `rollout.engine` torch / megatron: the whole loop
  (sampling, MiniLM reward, logprobs, GRPO update, checkpoint) on the check's device. The CLI runs
  with the same packages hidden as the check (`--hide`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from .hidden import module_command
from .options import Options
from .record import SectionRecord

REPO = Path(__file__).resolve().parents[2]
MULT_PROB_TOL = 1.001  # the trainer's logprobs vs the engine's, same fp32 module
CLI_TIMEOUT_S = 1800  # the parent's section limit stops it first


def train_step_1p5b(rec: SectionRecord, opts: Options) -> None:
    import train_step_bench  # benchmarks/train_step_bench.py

    argv = ["--tiny", "--steps", "1", "--warmup", "1"] if opts.smoke else \
        ["--batch", "4", "--seq-len", "2048", "--steps", "3", "--warmup", "1"]
    rec.metric("argv", argv)
    lines: list[dict] = []
    try:
        train_step_bench.main(argv, lines)
    finally:
        rec.metric("lines", lines)
    by_variant = {line["variant"]: line for line in lines}
    hf, megatron = by_variant.get("hf"), by_variant.get("megatron")
    if not rec.check("both_variants_ran", hf is not None and megatron is not None, f"variants {sorted(by_variant)}"):
        return
    rec.check("same_architecture", megatron["same_shape"] is True, f"params {megatron['params']} vs hf {hf['params']}")
    rec.check("throughput_positive", float(hf["tokens_per_s"]) > 0 and float(megatron["tokens_per_s"]) > 0,
              f"hf {hf['tokens_per_s']} tokens/s, megatron {megatron['tokens_per_s']} tokens/s")
    if torch.cuda.is_available():
        rec.check("bf16_both", hf["param_dtype"] == "bfloat16" and megatron["param_dtype"] == "bfloat16",
                  f"hf {hf['param_dtype']}, megatron {megatron['param_dtype']}")
        if megatron["mfu"] != "n/a":
            rec.check("mfu_in_range", 0 < float(megatron["mfu"]) < 1 and 0 < float(hf["mfu"]) < 1,
                      f"megatron {megatron['mfu']}, hf {hf['mfu']}")
    rec.metric("headline", f"megatron {float(megatron['tokens_per_s']):.0f} tok/s (MFU {megatron['mfu']}) vs "
                           f"hf {float(hf['tokens_per_s']):.0f} tok/s: {megatron['ratio_vs_hf']}x")


def _cli_train(rec: SectionRecord, opts: Options, *overrides: str) -> None:
    steps = 2
    sizes = ["grpo.prompts_per_step=2", "grpo.num_generations=4", "grpo.micro_batch_size=8",
             "rollout.max_new_tokens=8", "pretrain.steps=5"] if opts.smoke else ["pretrain.steps=20"]
    with tempfile.TemporaryDirectory(prefix="gpu_check_cli_") as tmp:
        run_dir = Path(tmp) / "run"
        args = ["train", "--config", str(REPO / "conf" / "rlsr_tiny.yaml"), f"trainer.steps={steps}",
                "trainer.heldout_eval=false", "trainer.progress_bar=false", f"trainer.output_dir={run_dir}",
                *sizes, *overrides]
        rec.metric("args", args)
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
        start = time.perf_counter()
        result = subprocess.run(module_command("nemo_rlsr.cli", args, list(opts.hidden)), cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
        rec.metric("wall_s", time.perf_counter() - start)
        rec.metric("exit_code", result.returncode)
        if result.returncode != 0:
            rec.metric("stderr_tail", result.stderr.splitlines()[-40:])
        rec.check("exit_code_0", result.returncode == 0, f"exit code {result.returncode}")
        metrics_file = run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
        keep = ("reward/mean", "loss", "kl", "grad_norm", "token_mult_prob_error", "time/step", "time/generate",
                "time/reward", "time/logprobs", "time/train", "perf/tokens_per_s_per_rank", "perf/mfu")
        rec.metric("steps", [{k: row.get(k) for k in keep} for row in rows])
        rec.check("steps_logged", len(rows) == steps, f"{len(rows)} of {steps} steps in metrics.jsonl")
        finite = all(math.isfinite(row.get(k, math.nan)) for row in rows for k in ("reward/mean", "loss", "grad_norm"))
        rec.check("metrics_finite", bool(rows) and finite, "reward/mean, loss, grad_norm")
        errors = [row.get("token_mult_prob_error", math.nan) for row in rows]
        rec.check("engine_logprobs_match_trainer", bool(rows) and all(1.0 <= e < MULT_PROB_TOL for e in errors),
                  f"token_mult_prob_error {errors} in [1, {MULT_PROB_TOL})")
        rec.check("summary_written", (run_dir / "summary.json").exists())


def cli_train(rec: SectionRecord, opts: Options) -> None:
    _cli_train(rec, opts)


def cli_train_megatron_engine(rec: SectionRecord, opts: Options) -> None:
    _cli_train(rec, opts, "rollout.engine=megatron")
