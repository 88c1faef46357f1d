"""Step throughput: tokens/s per rank, achieved TFLOP/s per rank, and MFU on known GPUs.

FLOPs per RLSR step, with N = parameters of this rank's model shard and T = valid tokens of its
batch (prompt + response): 2NT to generate (prefill + decode, one forward per token), 2NT each for
the pi_old and reference logprobs, 6NT for the training forward + backward, so 12NT in all. Under
context parallelism a rank computes the logprobs and the training pass on T/CP of the tokens, but
generates whole rows (the torch sampler runs with CP off): 2NT + 10NT/CP. The
attention score term is left out (small at these sequence lengths); MFU is therefore a slight
underestimate. MFU is reported only where the peak is known (H100/H200, from the planner's table):
a CPU has no meaningful peak.
"""

from __future__ import annotations

import torch

from nemo_rlsr.distributed.parallel import ParallelContext

FLOPS_PER_PARAM_TOKEN = 12


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    from nemo_rlsr.planner.hardware import DEVICES

    name = torch.cuda.get_device_name(device).upper()
    for key, spec in (("H200", DEVICES["h200-141gb"]), ("H100", DEVICES["h100-80gb"])):
        if key in name:
            return spec.peak_flops
    return None


def step_throughput(tokens: torch.Tensor | int, parameters: int, step_s: float, ctx: ParallelContext) -> dict[str, float]:
    tokens = float(tokens)
    generate = 2  # of FLOPS_PER_PARAM_TOKEN: whole rows on every CP rank; the rest on 1/CP of them
    achieved = (generate + (FLOPS_PER_PARAM_TOKEN - generate) / ctx.cp) * parameters * tokens / step_s
    metrics = {"perf/tokens_per_s_per_rank": tokens / ctx.cp / step_s, "perf/tflops_per_rank": achieved / 1e12}
    peak = device_peak_flops(ctx.device)
    if peak:
        metrics["perf/mfu"] = achieved / peak
    return metrics
