"""Measure the peak memory of one real `MegatronPolicy.train_step` on CPU (run as a subprocess).

    python tests/memory_probe.py CONFIG '[[key=value, ...], ...]'   -> one JSON line per variant

Method (there is no CUDA allocator to ask on a CPU):
1. One warm-up `train_step`, so that everything persistent exists: parameters, megatron's fp32
   gradient buffer, Adam's moment tensors (created lazily at the first step).
2. `base` = the bytes of every distinct tensor storage alive after `gc.collect()` (tensors found
   with `gc.get_objects()`, de-duplicated by storage pointer), minus the same sum taken before the
   policy was built (module-level tensors, a previous variant's leftovers).
3. A second `train_step` under `torch.profiler.profile(profile_memory=True)`. The profiler sees
   every CPU allocator call as a `[memory]` event with its signed size; sorted by time, their
   running sum is the memory allocated (minus freed) since the step began, and its maximum is the
   step's peak on top of `base`. (Frees of blocks allocated before profiling are not reported,
   so the running sum never goes below the true value.)
Peak = base + that maximum. A fresh process keeps other tests' tensors out of the measurement.
"""

from __future__ import annotations

import gc
import json
import sys
import warnings

import torch


def live_tensor_bytes() -> int:
    storages: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
            except Exception:  # noqa: BLE001 - half-built or exotic objects
                continue
    return sum(storages.values())


def profiled_peak_increase(step) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def measure(config: str, overrides: list[str]) -> dict:
    from nemo_rlsr.algorithms.grpo import GRPOLossConfig
    from nemo_rlsr.config import load_config
    from nemo_rlsr.distributed.dims import ParallelDims
    from nemo_rlsr.distributed.parallel import init_distributed
    from nemo_rlsr.models.policy import MegatronPolicy, TokenBatch
    from nemo_rlsr.planner.plan import vocab_size
    from nemo_rlsr.trainer.rlsr import grpo_loss_fn

    cfg = load_config(config, overrides)
    ctx = init_distributed(ParallelDims(seed=cfg.parallel.seed))
    vocab = vocab_size(cfg)
    gc.collect()
    before = live_tensor_bytes()
    policy = MegatronPolicy(cfg.model, cfg.optimizer, vocab, ctx)
    g = cfg.grpo
    rows = g.prompts_per_step * g.num_generations // g.mini_batches_per_step  # one mini-batch
    length = cfg.model.max_sequence_length
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (rows, length), generator=gen)
    batch = TokenBatch(ids, torch.ones_like(ids, dtype=torch.bool), torch.ones(rows, length), {
        "old_logprobs": -torch.rand(rows, length, generator=gen),
        "ref_logprobs": -torch.rand(rows, length, generator=gen),
        "advantages": torch.randn(rows, generator=gen),
    })
    loss_fn = grpo_loss_fn(GRPOLossConfig(g.clip_low, g.clip_high, g.kl_coef))

    def step():
        policy.train_step(batch, g.micro_batch_size, loss_fn, max_tokens=g.max_tokens_per_microbatch,
                          with_entropy=True)  # as the RLSR trainer's

    step()
    gc.collect()
    base = live_tensor_bytes() - before
    increase = profiled_peak_increase(step)
    params = sum(p.numel() for p in policy.module.parameters())
    return {"overrides": overrides, "base": base, "increase": increase, "peak": base + increase,
            "params": params, "vocab": vocab}


def main(argv: list[str]) -> None:
    for overrides in json.loads(argv[1]):
        print(json.dumps(measure(argv[0], overrides)), flush=True)
        gc.collect()


if __name__ == "__main__":
    main(sys.argv[1:])
