"""One rank of the HF conversion tests: `python hf_worker.py <tp2|pp2|tp4> <out_dir>`.

For every HF checkpoint under `out_dir/hf/` (written by the test): build our megatron model from
its config.json at this layout, load the weights with load.py (each rank its own shard), compute
the full-vocabulary logits of `input_ids()` (TP shards gathered, PP stages chained by send/recv),
and export it back with save.py to `out_dir/export/<scenario>/<name>`. Every rank saves in
`out_dir/rank{RANK}.pt` the logits (None off the last stage), what `iter_all_hf_tensors` gave it
and how many checkpoint bytes its load read.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "tp4": (4, 1)}  # tp4: 4 ranks, fewer KV heads (2) than TP ranks


def input_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(7))


def megatron_logits(model, ids: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """[B, T, vocab] on the last stage (every TP rank), None on other stages."""
    from megatron.core import parallel_state

    from nemo_rlsr.models.policy import attention_mask

    positions = torch.arange(ids.shape[1]).expand_as(ids)
    mask = attention_mask(torch.ones_like(ids, dtype=torch.bool))
    if not parallel_state.is_pipeline_first_stage():
        hidden = torch.empty(ids.shape[1], ids.shape[0], model.config.hidden_size)
        dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor([hidden])
    out = model(ids, positions, mask)
    if not parallel_state.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        return None
    tp = parallel_state.get_tensor_model_parallel_world_size()
    shards = [torch.empty_like(out) for _ in range(tp)]
    dist.all_gather(shards, out.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)[..., :vocab]


@torch.no_grad()
def main(scenario: str, out: Path) -> None:
    from nemo_rlsr.distributed.dims import ParallelDims
    from nemo_rlsr.distributed.parallel import init_distributed
    from nemo_rlsr.models.gpt import build_gpt
    from nemo_rlsr.models.hf import adapter_and_config
    from nemo_rlsr.models.hf.load import load_hf_weights
    from nemo_rlsr.models.hf.save import iter_all_hf_tensors, save_hf_checkpoint

    tp, pp = LAYOUTS[scenario]
    ctx = init_distributed(ParallelDims(tp=tp, pp=pp, seed=1))
    results = {}
    for hf_dir in sorted((out / "hf").iterdir()):
        adapter, cfg = adapter_and_config(hf_dir)
        model = build_gpt(cfg, cfg.vocab_size, ctx).eval()
        results[f"{hf_dir.name}/bytes_read"] = load_hf_weights(model, adapter, cfg, hf_dir).bytes_read
        results[hf_dir.name] = megatron_logits(model, input_ids(cfg.vocab_size), cfg.vocab_size)
        results[f"{hf_dir.name}/all_stages"] = {name: tensor.clone()
                                               for name, tensor in iter_all_hf_tensors(model, adapter, cfg)}
        save_hf_checkpoint(model, adapter, cfg, out / "export" / scenario / hf_dir.name, max_shard_bytes=40_000)
    torch.save(results, out / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
