"""A Qwen3-Embedding-shaped sentence-transformers folder with random weights.

Why: the Qwen-EM path (last-token pooling, left padding, an instruction prompt, bf16 on
GPUs) must be tested and benchmarked on machines that cannot download
Qwen/Qwen3-Embedding-*. The folder has the same layout as the real ones (a Qwen3
transformer, last-token Pooling, Normalize, a "query" prompt); its tokenizer is the
bundled MiniLM WordPiece one with an end-of-text token appended to every text, as the
Qwen3-Embedding tokenizer does. Scores from it are meaningless; shapes, code paths and
cost per token are the real ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .encoders import bundled_minilm_path

__all__ = ["QWEN3_SHAPES", "QUERY_PROMPT", "build_random_qwen3_embedding"]

QWEN3_SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=30522, max_position_embeddings=32768),
    # Qwen3-Embedding-8B's config.json (Qwen3 architecture).
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151665, max_position_embeddings=32768),
}
QUERY_PROMPT = "Instruct: Given a text, retrieve semantically similar text\nQuery:"


def _tokenizer(max_length: int, eos: str = "[SEP]"):
    """MiniLM's WordPiece tokenizer, with only ``eos`` appended (no [CLS]) and left padding."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(os.path.join(bundled_minilm_path(), "tokenizer.json"))
    backend.no_truncation()
    backend.no_padding()
    backend.post_processor = TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, backend.token_to_id(eos))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token="[PAD]", unk_token="[UNK]",
                                   padding_side="left", model_max_length=max_length)


def build_random_qwen3_embedding(path: str | os.PathLike, shape: str = "tiny", seed: int = 0,
                                 device: str = "cpu", dtype: torch.dtype = torch.float32,
                                 max_seq_length: int = 512) -> str:
    """Write the folder to ``path`` (random weights from ``seed``, built on ``device`` in
    ``dtype``) and return it as a string, ready for ``SentenceEncoder.load``.

    The sentence-transformers files are written as JSON, in the layout of the published
    Qwen3-Embedding repositories, rather than by loading the model into sentence-transformers
    and saving it again: for the 8B shape that would read and write 16 GB twice."""
    from transformers import Qwen3Config, Qwen3Model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = Path(path)
    config = Qwen3Config(**QWEN3_SHAPES[shape], tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: no fp32 copy of an 8B model
    try:
        with torch.device(device):
            model = Qwen3Model(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(root)
    del model
    _tokenizer(max_seq_length).save_pretrained(root)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    pooling = {"word_embedding_dimension": config.hidden_size, "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
               "pooling_mode_lasttoken": True, "include_prompt": True}
    files = {
        "modules.json": modules,
        "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
        "config_sentence_transformers.json": {"prompts": {"query": QUERY_PROMPT, "document": ""},
                                              "default_prompt_name": None, "similarity_fn_name": "cosine"},
        "1_Pooling/config.json": pooling,
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content, indent=2))
    (root / "2_Normalize").mkdir(exist_ok=True)
    return str(root)
