"""One rank of tests/test_device_boundary.py's DP=2 scenario: `python device_boundary_worker.py dp2 <out>`.

On the fake accelerator (each rank its own): the trainer's DP gather of this rank's host rewards,
the same gather left in host memory (must be caught: NCCL would refuse it), and a policy train step
on this rank's half of the batch (DDP's gradient all-reduce, the metric reduction over DP).
"""

from __future__ import annotations

from pathlib import Path

import torch

from distributed_helpers import VOCAB, nll_loss, optimizer_config, tiny_model_config, token_batch, worker_main
from fake_accelerator import DEVICE, HostTensorOnDevice, fake_accelerator, place
from nemo_rlsr.distributed.dims import ParallelDims
from nemo_rlsr.distributed.parallel import init_distributed
from nemo_rlsr.models.policy import MegatronPolicy
from nemo_rlsr.trainer.rollout_metrics import gather_over_dp


def scenario_dp2(out: Path) -> dict:
    ctx = init_distributed(ParallelDims(seed=1))
    rewards = torch.tensor([[0.5, -0.25], [1.0, 0.75]][ctx.dp_rank])  # host, as the encoders return them
    with fake_accelerator():
        gathered = gather_over_dp(rewards, DEVICE)
        try:
            gather_over_dp(rewards, torch.device("cpu"))
            host_gather_caught = False
        except HostTensorOnDevice:
            host_gather_caught = True
        policy = MegatronPolicy(tiny_model_config(), optimizer_config(), VOCAB, ctx)
        metrics = policy.train_step(token_batch().slice(2 * ctx.dp_rank, 2 * ctx.dp_rank + 2), 2, nll_loss)
    return {"gathered": gathered.tolist(), "gathered_place": place(gathered), "host_gather_caught": host_gather_caught,
            **metrics}


if __name__ == "__main__":
    worker_main({"dp2": scenario_dp2})
