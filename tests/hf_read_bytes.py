"""The bytes each rank must read of an HF checkpoint, modelled by hand from the tensors' names.

What a rank at a given layout needs, written down independently of the loader (which derives its
slices from the adapter and megatron's parameter attributes):

* vocabulary tensors (embed_tokens, lm_head): the rank's rows of the padded vocabulary, clamped to
  the checkpoint's rows (padding rows are zeros, never read);
* norms (every `*norm.weight`), the MoE router (`mlp.gate.weight`) and its score bias: replicated,
  read whole by every rank;
* routed experts (`mlp.experts.{e}.*`): only the EP rank's experts (e // (experts / ep) == ep_rank),
  each split over expert-TP;
* everything else (attention, MLA projections, dense and shared-expert MLPs): split over TP.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
REPLICATED = re.compile(r"(norm\.weight|\.mlp\.gate\.weight|\.e_score_correction_bias)$")
ROUTED_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


def checkpoint_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(hf_dir).glob("*.safetensors")):
        tensors |= load_file(file)
    return tensors


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def checkpoint_bytes(hf_dir: Path) -> int:
    return sum(nbytes(t) for t in checkpoint_tensors(hf_dir).values())


def expected_bytes_read(hf_dir: Path, padded_vocab: int, tp: int = 1, tp_rank: int = 0, ep: int = 1,
                        ep_rank: int = 0, etp: int = 1, num_experts: int = 0) -> int:
    """Bytes one rank (TP rank `tp_rank` of `tp`, EP rank `ep_rank` of `ep`, experts split over `etp`)
    reads of the checkpoint at `hf_dir` when it reads only its own slices (one pipeline stage)."""
    total = 0
    for name, tensor in checkpoint_tensors(hf_dir).items():
        if name in VOCAB_TENSORS:
            rows = tensor.shape[0]
            per_rank = padded_vocab // tp
            start, stop = min(tp_rank * per_rank, rows), min((tp_rank + 1) * per_rank, rows)
            total += nbytes(tensor) // rows * (stop - start)
        elif REPLICATED.search(name):
            total += nbytes(tensor)
        elif match := ROUTED_EXPERT.search(name):
            local = num_experts // ep
            total += nbytes(tensor) // etp if int(match[1]) // local == ep_rank else 0
        else:
            total += nbytes(tensor) // tp
    return total
