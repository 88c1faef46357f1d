"""`rollout.engine` -> a RolloutEngine; combinations that cannot run are refused at start-up.

`engine_problems` is pure (config + what a machine has): the trainers' start-up checks and
`nemo-rlsr plan` run it (trainer/startup.py) before any model is built, tests with any machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nemo_rlsr.config import RLSRConfig

if TYPE_CHECKING:
    from nemo_rlsr.generation.interface import RolloutEngine

ENGINES = ("torch", "megatron", "trtllm")


def engine_problems(cfg: RLSRConfig, cuda: bool, trtllm_importable: bool) -> list[str]:
    """Every reason `rollout.engine` cannot run with this config on a machine with (or without) CUDA
    and an importable TensorRT-LLM, as sentences naming the keys."""
    rollout, parallel = cfg.rollout, cfg.parallel
    engine = rollout.engine
    if engine not in ENGINES:
        return [f"rollout.engine={engine!r}: choose one of {', '.join(ENGINES)}"]
    out = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            out.append(message)

    need(rollout.refit_bucket_mb >= 1, f"rollout.refit_bucket_mb={rollout.refit_bucket_mb} must be >= 1")
    need(engine == "torch" or cuda, f"rollout.engine={engine} needs CUDA GPUs and this machine has none: "
                                    f"use rollout.engine=torch (our sampler runs on the CPU)")
    need(engine != "trtllm" or trtllm_importable,
         "rollout.engine=trtllm needs TensorRT-LLM 1.2 (NGC image nvcr.io/nvidia/tensorrt-llm/release:1.2.0); "
         "`import tensorrt_llm` fails here")
    need(not rollout.fp8 or engine == "trtllm",
         f"rollout.fp8 is a TensorRT-LLM option; rollout.engine={engine} samples in the trainer's precision")
    need(not (rollout.fp8 and engine == "trtllm"),
         "rollout.fp8=true is refused: a refit sends bf16 weights, and nothing yet shows TensorRT-LLM's loader "
         "quantizing them to FP8 (generation/trtllm.py); use rollout.fp8=false")
    # the torch sampler runs the trainer's module with CP switched off (models/context_parallel.py), so
    # every CP rank of a DP rank samples the same rollouts; the other engines have no such path yet
    need(engine == "torch" or parallel.context_parallel <= 1,
         f"rollout.engine={engine} at parallel.context_parallel={parallel.context_parallel} is not built: "
         f"use rollout.engine=torch")
    if engine == "trtllm":
        need(not rollout.stop, "rollout.stop strings need a detokenizer inside TensorRT-LLM; use stop_on_eos "
                               "or rollout.engine=torch")
        engine_tp = engine_gpus(cfg)
        ep, experts = rollout.expert_parallel, cfg.model.num_moe_experts or 0
        need(ep == 1 or (ep >= 1 and engine_tp % ep == 0 and experts and experts % ep == 0),
             f"rollout.expert_parallel={ep} must divide rollout.tensor_parallel={engine_tp} and the number of "
             f"experts (model.num_moe_experts={experts or None})")
        if rollout.placement == "separate":  # GPUs of its own: the rest is config/rules.placement_problems'
            return out
        # TensorRT-LLM's TorchSampler draws every request's tokens from one generator seeded once
        # (tensorrt_llm/_torch/pyexecutor/sampler.py, `get_generator`, `_global_seed = 42`, in the
        # 1.2-line source read at commit 28edbcdbab): a request's samples depend on the batch it
        # runs in, so generating a step in chunks would change them. Our torch and megatron engines
        # seed a generator per sample from its request's seed (generation/sampling.py).
        need(cfg.reward.overlap_chunks == 1,
             f"reward.overlap_chunks={cfg.reward.overlap_chunks} with rollout.engine=trtllm is refused: its "
             f"sampler ignores per-request seeds, so chunked generation would change the samples; use 1")
        model_parallel = parallel.tensor_parallel * parallel.pipeline_parallel
        # each engine worker reads the refit IPC handles of its own GPU, so an engine sits on trainer
        # GPUs: part of one model-parallel group or whole ones (weight_sync/engine_slices.engine_groups)
        need(engine_tp >= 1 and (model_parallel % engine_tp == 0 or engine_tp % model_parallel == 0),
             f"rollout.tensor_parallel={rollout.tensor_parallel} must divide or be a multiple of the trainer's "
             f"tensor_parallel x pipeline_parallel = {model_parallel} (a TensorRT-LLM engine sits on trainer GPUs)")
        return out
    # torch / megatron run the trainer's own module: its layout is theirs
    need(rollout.expert_parallel == 1, f"rollout.expert_parallel={rollout.expert_parallel} is a TensorRT-LLM option; "
                                       f"rollout.engine={engine} runs the trainer's module (parallel.expert_parallel)")
    need(rollout.tensor_parallel in (None, parallel.tensor_parallel),
         f"rollout.tensor_parallel={rollout.tensor_parallel}: rollout.engine={engine} runs on the trainer's module "
         f"(tensor_parallel={parallel.tensor_parallel}); only trtllm has its own layout")
    need(parallel.pipeline_parallel <= 1,
         f"rollout.engine={engine} needs the whole model on each rank (pipeline_parallel=1); with pipeline "
         f"parallelism use rollout.engine=trtllm (weights resharded PP->TP)")
    if engine == "megatron":
        # its MoE layers exchange tokens across ranks that sample different prompts; only our torch
        # sampler steps those ranks in lockstep (generation/lockstep.py)
        need(parallel.expert_parallel <= 1, f"rollout.engine=megatron at expert_parallel={parallel.expert_parallel} "
                                            f"is not built: use rollout.engine=torch")
        need(not rollout.stop, "rollout.stop strings are built for rollout.engine=torch only")
    return out


def engine_gpus(cfg: RLSRConfig) -> int:
    """GPUs per rollout engine instance: rollout.tensor_parallel, else the trainer's module layout
    (trtllm: one model-parallel group, tensor_parallel x pipeline_parallel; torch and megatron run
    the trainer's module itself: its tensor_parallel). The planner sizes engines by this too."""
    p = cfg.parallel
    if cfg.rollout.tensor_parallel:
        return cfg.rollout.tensor_parallel
    return p.tensor_parallel * p.pipeline_parallel if cfg.rollout.engine == "trtllm" else p.tensor_parallel


def trtllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt_llm") is not None


def build_engine(cfg: RLSRConfig, policy, tokenizer, run_dir) -> RolloutEngine:
    """The configured engine over `policy` (our MegatronPolicy); `run_dir` holds trtllm's config.
    Under rollout.placement=separate the training rollouts come from the separate worker and this
    engine samples held-out prompts on the trainer's module: our torch sampler."""
    rollout = cfg.rollout
    vocab = tokenizer.vocab_size
    if rollout.engine == "torch" or rollout.placement == "separate":
        from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine

        return TorchRolloutEngine(policy.module, tokenizer.pad_id, tokenizer.eos_id, vocab,
                                  detokenize=tokenizer.decode)
    if rollout.engine == "megatron":
        from nemo_rlsr.generation.megatron_engine import MegatronRolloutEngine

        # KV-cache rows: the rows this data-parallel rank samples per step, not the global batch
        rows = cfg.grpo.prompts_per_step // policy.ctx.dp * cfg.grpo.num_generations
        return MegatronRolloutEngine(policy.module, tokenizer.pad_id, tokenizer.eos_id, vocab, max_batch_size=rows,
                                     max_sequence_length=cfg.model.max_sequence_length)
    return _build_trtllm(cfg, policy, tokenizer, run_dir)


def build_rollout_worker(cfg: RLSRConfig, adapter, tokenizer, run_dir, dp: int):
    """rollout.placement=separate: the client of the rollout worker (trainer rank 0 only): TensorRT-LLM
    engines on GPUs of their own (generation/trtllm_worker.py) or our torch sampler in a Ray actor
    (generation/rollout_worker.py). `dp`: the trainer's data-parallel ranks (one generate call each)."""
    if cfg.rollout.engine == "trtllm":
        from nemo_rlsr.generation.trtllm_worker import trtllm_rollout_worker

        return trtllm_rollout_worker(cfg, adapter, tokenizer, run_dir, dp)
    from nemo_rlsr.generation.rollout_worker import torch_rollout_worker

    return torch_rollout_worker(cfg.model, adapter, tokenizer, cfg.parallel.seed, cfg.rollout.refit_bucket_mb,
                                cfg.parallel.collective_timeout_s, cfg.reward.ray_address)


def trtllm_model_config(adapter, model, vocab_size: int, pad_id: int, eos_id: int) -> dict:
    """The config.json of the TensorRT-LLM engine's model folder: the policy's own architecture
    (`adapter`, MegatronPolicy.hf_adapter: its `architectures` entry picks the engine's model class),
    with the vocabulary the refit sends (`vocab_size`, weight_sync.shard_refit.ShardRefit)."""
    import dataclasses

    config = adapter.hf_config(dataclasses.replace(model, vocab_size=vocab_size))
    return config | {"pad_token_id": pad_id, "eos_token_id": eos_id}


def write_model_dir(cfg: RLSRConfig, adapter, tokenizer, run_dir):
    """The engine's model folder, `run_dir`/trtllm_model: config.json only (`load_format: dummy`, the
    weights come with the first refit). Every engine worker reads it: `run_dir` must be on a
    filesystem they all see."""
    import json
    from pathlib import Path

    model_dir = Path(run_dir) / "trtllm_model"
    model_dir.mkdir(parents=True, exist_ok=True)
    config = trtllm_model_config(adapter, cfg.model, tokenizer.vocab_size, tokenizer.pad_id, tokenizer.eos_id)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    return model_dir


def _build_trtllm(cfg: RLSRConfig, policy, tokenizer, run_dir):
    from pathlib import Path

    import torch.distributed as dist

    from nemo_rlsr.generation.trtllm import TRTLLMOptions, TRTLLMRolloutEngine
    from nemo_rlsr.weight_sync.shard_refit import ShardRefit

    vocab = tokenizer.vocab_size
    adapter = policy.hf_adapter  # one architecture for the engine's config.json and every refit
    if dist.get_rank() == 0:
        write_model_dir(cfg, adapter, tokenizer, run_dir)
    dist.barrier()
    model_dir = Path(run_dir) / "trtllm_model"
    engine_tp = engine_gpus(cfg)
    model_parallel = cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel
    rows = cfg.grpo.prompts_per_step // policy.ctx.dp * cfg.grpo.num_generations  # one DP rank's rollouts
    opts = TRTLLMOptions(
        model_dir=str(model_dir),
        tensor_parallel=engine_tp,
        expert_parallel=cfg.rollout.expert_parallel,
        # an engine's share of its cell's rows (trtllm_cells.py): E / (TP x PP) DP ranks' worth
        max_batch_size=max(1, -(-rows * engine_tp // model_parallel)),
        max_seq_len=cfg.model.max_sequence_length,
        max_input_len=cfg.model.max_sequence_length - cfg.rollout.max_new_tokens)  # the trainer's prompt limit
    return TRTLLMRolloutEngine(opts, lambda: ShardRefit(policy.chunks, adapter, cfg.model, vocab, engine_tp,
                                                           cfg.rollout.expert_parallel),
                               cfg.rollout.refit_bucket_mb * 2**20, tokenizer.eos_id, tokenizer.pad_id)
