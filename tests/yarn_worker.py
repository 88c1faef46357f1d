"""One rank of the 2-rank YaRN test: `python yarn_worker.py <layout> <out_dir>` (layout tp2 | pp2).

Every directory `<out_dir>/hf/<name>` is an HF checkpoint written by the test (transformers,
random weights). For each, the rank builds our megatron model from its config.json at the layout,
streams its own shard in, computes the logits of test_hf_yarn.IDS and exports the model back to
`<out_dir>/export_<layout>/<name>`. Each rank saves {name: logits} (last pipeline stage only) to
`<out_dir>/rank{RANK}.pt` (see distributed_helpers.run_workers).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from moe_worker import megatron_logits
from test_hf_yarn import IDS
from nemo_rlsr.distributed.dims import ParallelDims
from nemo_rlsr.distributed.parallel import destroy_distributed, init_distributed
from nemo_rlsr.models.gpt import build_gpt
from nemo_rlsr.models.hf import adapter_and_config
from nemo_rlsr.models.hf.load import load_hf_weights
from nemo_rlsr.models.hf.save import save_hf_checkpoint

LAYOUTS = {"tp2": {"tp": 2}, "pp2": {"pp": 2}}


def main() -> None:
    layout, out = sys.argv[1], Path(sys.argv[2])
    result = {}
    ctx = init_distributed(ParallelDims(seed=7, **LAYOUTS[layout]))  # the weights must all come from the checkpoint
    for hf_dir in sorted((out / "hf").iterdir()):
        adapter, cfg = adapter_and_config(hf_dir)
        model = build_gpt(cfg, cfg.vocab_size, ctx)
        load_hf_weights(model, adapter, cfg, hf_dir)
        logits = megatron_logits(model, IDS)
        if logits is not None:
            result[hf_dir.name] = logits
        save_hf_checkpoint(model, adapter, cfg, out / f"export_{layout}" / hf_dir.name)
    destroy_distributed()
    torch.save(result, out / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main()
