"""One rank of the real model's tensor-parallel check: `python real_model_worker.py tp3 <out_dir>`.

Builds our megatron GPT from `out_dir/hf` (the converted SmolLM2 folder) at TP=3, the only TP size
its 9 query / 3 key-value heads allow besides 1, loads each rank's slices and computes the
full-vocabulary logits of the prompts in `out_dir/prompts.pt` (gathered over TP); every rank saves
them to `out_dir/rank{RANK}.pt`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from hf_worker import megatron_logits


@torch.no_grad()
def main(scenario: str, out: Path) -> None:
    from nemo_rlsr.distributed.dims import ParallelDims
    from nemo_rlsr.distributed.parallel import init_distributed
    from nemo_rlsr.models.gpt import build_gpt
    from nemo_rlsr.models.hf import adapter_and_config
    from nemo_rlsr.models.hf.load import load_hf_weights

    assert scenario == "tp3", scenario
    ctx = init_distributed(ParallelDims(tp=3, seed=1))
    adapter, cfg = adapter_and_config(out / "hf")
    model = build_gpt(cfg, cfg.vocab_size, ctx).eval()
    load_hf_weights(model, adapter, cfg, out / "hf")
    logits = [megatron_logits(model, torch.tensor([p]), cfg.vocab_size) for p in torch.load(out / "prompts.pt")]
    torch.save(logits, out / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
