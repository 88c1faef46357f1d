"""Shared by the multi-rank tests and their worker script: launching, and the tiny model and batch.

Each test starts real processes (gloo over localhost) running `dist_worker.py <scenario>`; every
rank torch.saves a dict of results that the test compares. Processes, not threads: megatron's
parallel state is global per process.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

# free_port lives in cli_runner; the Slurm tests (tests/test_slurm*.py) import it from here
from cli_runner import free_port, logs, start_ranks, wait_all  # noqa: F401
from nemo_rlsr.config import ModelConfig, OptimizerConfig
from nemo_rlsr.models.policy import TokenBatch

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
VOCAB = 100
SEQ_LEN = 16
# Where each row's response starts: rows 0-1 have 16 loss tokens in all, rows 2-3 have 15, so the
# two DP halves of the batch have different valid-token counts.
RESPONSE_START = (8, 8, 11, 6)
LEFT_PADS = (3, 0, 5, 1)


def tiny_model_config() -> ModelConfig:
    return ModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, max_sequence_length=32
    )


def random_tiny_gpt(cfg: ModelConfig, vocab: int):
    """A one-rank GPTModel with seeded random weights, norms included (megatron inits them to 1,
    which would hide a swapped or misplaced norm in a conversion test)."""
    from nemo_rlsr.models.gpt import build_gpt

    torch.manual_seed(0)
    module = build_gpt(cfg, vocab).eval()
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "layernorm" in name:
                param.uniform_(0.5, 1.5)
    return module


def share_weights(policy, out: Path, first: bool, prepare: Callable | None = None) -> None:
    """One set of weights for every layout a scenario compares: the first layout (after `prepare`
    of its module, e.g. `randomize_norms`) saves a dist checkpoint, later layouts (any TP / PP / EP /
    CP: megatron reshards on load) load it."""
    from nemo_rlsr.trainer.checkpoint import load_checkpoint, save_checkpoint

    if first:
        if prepare is not None:
            prepare(policy.module)
        save_checkpoint(out / "ckpt", 0, policy, {})
    else:
        load_checkpoint(out / "ckpt" / "step_0000000", policy, load_optimizer=False)


@torch.no_grad()
def randomize_norms(module) -> None:
    """Norm weights away from megatron's all-ones init (one seed and parameter order: the same on
    every rank), so that a norm's gradient or placement error shows."""
    generator = torch.Generator().manual_seed(0)
    for name, param in module.named_parameters():
        if "layernorm" in name:
            param.copy_(torch.rand(param.shape, generator=generator) + 0.5)


def optimizer_config(distributed: bool = False) -> OptimizerConfig:
    # A large lr so that one step visibly moves the weights (and the logprobs after it).
    return OptimizerConfig(lr=1e-2, clip_grad=1.0, use_distributed_optimizer=distributed)


def token_batch() -> TokenBatch:
    """4 left-padded sequences x 16 tokens; the loss counts the response part of each row."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (len(LEFT_PADS), SEQ_LEN), generator=g)
    valid = torch.ones_like(ids, dtype=torch.bool)
    loss_mask = torch.zeros(ids.shape)
    for row, (pads, start) in enumerate(zip(LEFT_PADS, RESPONSE_START)):
        ids[row, :pads] = 0
        valid[row, :pads] = False
        loss_mask[row, start - 1 : SEQ_LEN - 1] = 1.0  # targets[:, t] is token t+1
    return TokenBatch(ids, valid, loss_mask, {})


def nll_loss(logprobs: torch.Tensor, entropy: torch.Tensor, mb: TokenBatch):
    loss = (-logprobs * mb.loss_mask).sum()
    return loss, {"loss": loss.detach()}


def worker_main(scenarios: dict[str, Callable[[Path], dict]]) -> None:
    """A worker script's entry point: run scenario argv[1] with output folder argv[2] and save this
    rank's result dict as rank<R>.pt (what `run_workers` reads back)."""
    import torch.distributed as dist

    from nemo_rlsr.distributed.parallel import destroy_distributed

    scenario, out = sys.argv[1], Path(sys.argv[2])
    result = scenarios[scenario](out)
    rank = dist.get_rank()
    destroy_distributed()
    torch.save(result, out / f"rank{rank}.pt")


def run_workers(
    scenario: str, out_dir: Path, nprocs: int = 2, timeout_s: float = 120.0, worker: Path = WORKER
) -> list[dict]:
    """Run `<worker> scenario out_dir` (dist_worker.py unless told) on `nprocs` ranks
    (cli_runner.start_ranks); return each rank's result dict.

    When a rank fails the others are killed at once (they would wait on collectives until the
    timeout); the error shows every rank's output.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = start_ranks([str(worker), scenario, str(out_dir)], out_dir, nprocs, tag=scenario)
    try:
        codes = wait_all(procs, timeout_s)
    except AssertionError as timeout:
        raise AssertionError(f"scenario {scenario!r}: {timeout}\n{logs(out_dir, scenario, tail=6000)}") from None
    if codes != [0] * nprocs:
        raise AssertionError(f"scenario {scenario!r}: exit codes {codes}\n{logs(out_dir, scenario, tail=6000)}")
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(nprocs)]
