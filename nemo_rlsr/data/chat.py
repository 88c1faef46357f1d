"""Prompt rendering: a Hugging Face tokenizer's own chat template, or the tiny demo's word template.

With a real tokenizer the prompt is exactly ``apply_chat_template(context, add_generation_prompt=True)``
(text, then ids without extra special tokens, which is how transformers tokenizes a rendered chat), so
the policy sees the format its base was trained on. The word-level demo model has no chat template:
its prompt is ``render_prompt`` of the context flattened to one line (a single user turn is just its
text, so plain prompt/response data renders exactly as the bundled set does).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from nemo_rlsr.data.instructions import encode_prompt, render_prompt
from nemo_rlsr.data.tokenizer import WordTokenizer


class HFTokenizer:
    """A local Hugging Face tokenizer directory behind the interface the trainers use for WordTokenizer
    (ids of pad/eos/bos, encode/decode, vocab_size, to_json for the checkpoint's identity check)."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self.path = str(path)
        if not Path(path).is_dir():  # else transformers takes it for a hub name and tries the network
            raise FileNotFoundError(f"data.tokenizer_path={path}: no such directory (a local Hugging Face "
                                    f"tokenizer folder, e.g. the model's; `nemo-rlsr import-gguf` writes one)")
        self.hf = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        if not self.hf.chat_template:
            raise ValueError(f"{path}: the tokenizer has no chat template (needed to render prompts)")
        if self.hf.eos_token_id is None:
            raise ValueError(f"{path}: the tokenizer has no eos token (rollouts and SFT targets end with it)")
        self.eos_id: int = self.hf.eos_token_id
        self.pad_id: int = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id
        # Base pre-training opens each document with bos; tokenizers without one (Qwen) use eos.
        self.bos_id: int = self.hf.bos_token_id if self.hf.bos_token_id is not None else self.eos_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def render(self, context: list[dict[str, str]]) -> str:
        return self.hf.apply_chat_template(context, tokenize=False, add_generation_prompt=True)

    def to_json(self) -> str:
        """Identity of the vocabulary and template (not the path: a moved copy is the same tokenizer)."""
        vocab = json.dumps(sorted(self.hf.get_vocab().items()))
        return json.dumps({"type": "hf", "version": 1,
                           "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
                           "chat_template_sha256": hashlib.sha256(self.hf.chat_template.encode()).hexdigest()})


Tokenizer = WordTokenizer | HFTokenizer


def word_prompt_text(context: list[dict[str, str]]) -> str:
    """The context as one line for the word template: a lone user turn is its text, else ``role : text`` turns."""
    if len(context) == 1 and context[0]["role"] == "user":
        return context[0]["content"]
    return " ".join(f"{t['role']} : {t['content']}" for t in context)


def render_chat_prompt(tokenizer: Tokenizer | None, context: list[dict[str, str]]) -> str:
    """The prompt text the model reads (``None``: the word template, whose vocabulary is not built yet)."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.render(context)
    return render_prompt(word_prompt_text(context))


def encode_chat_prompt(tokenizer: Tokenizer, context: list[dict[str, str]]) -> list[int]:
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.encode(tokenizer.render(context))
    return encode_prompt(tokenizer, word_prompt_text(context))
