"""Word-level tokenizer for the embedded CPU demo.

Why word level: the demo's tiny policy (2 layers, d=128) could not learn under the embedding reward
over a 30k WordPiece vocabulary (it collapsed to one repeated token, so GRPO groups had no reward
variance). Over a few hundred words, pre-trained briefly on the references, it does learn. Real models
use their own Hugging Face tokenizers; this class only serves the tiny demo world.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD, EOS, UNK, BOS = "<pad>", "<eos>", "<unk>", "<bos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, UNK, BOS)

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
# Decoding glues these back onto the previous word, so the reward encoder (MiniLM) reads natural text.
_SPACE_BEFORE_PUNCT_RE = re.compile(r" ([.,?!;:])")


def split_words(text: str) -> list[str]:
    """Lowercase and split into words and single punctuation marks (the tokenizer's pre-tokenisation)."""
    return _TOKEN_RE.findall(text.lower())


def detokenize(words: Iterable[str]) -> str:
    """Join words with spaces, dropping the space before . , ? ! ; : (the inverse the demo relies on)."""
    return _SPACE_BEFORE_PUNCT_RE.sub(r"\1", " ".join(words))


class WordTokenizer:
    """Maps lowercase words and punctuation marks to ids; ids 0-3 are ``<pad> <eos> <unk> <bos>``.

    ``<bos>`` opens every document in base pre-training and closes the tiny chat template, so it
    marks "an answer starts here" for the base and the policy alike.
    """

    pad_id: int = 0
    eos_id: int = 1
    unk_id: int = 2
    bos_id: int = 3

    def __init__(self, tokens: Sequence[str]) -> None:
        """``tokens`` is the full id -> token table and must start with the special tokens."""
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with {list(SPECIAL_TOKENS)}, got {list(tokens[: len(SPECIAL_TOKENS)])}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary has duplicate tokens")
        self._id_to_token: list[str] = list(tokens)
        self._token_to_id: dict[str, int] = {t: i for i, t in enumerate(self._id_to_token)}

    @classmethod
    def build(cls, texts: Iterable[str]) -> WordTokenizer:
        """Vocabulary = specials + sorted set of all words in ``texts``: same texts, same ids, any order.

        Build it from everything the model will see: the rendered prompts (chat template included) and
        the references.
        """
        words: set[str] = set()
        for text in texts:
            words.update(split_words(text))
        words.difference_update(SPECIAL_TOKENS)
        return cls([*SPECIAL_TOKENS, *sorted(words)])

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    @property
    def tokens(self) -> list[str]:
        """The id -> token table (a copy)."""
        return list(self._id_to_token)

    def encode(self, text: str) -> list[int]:
        """Word ids of ``text``; unknown words become ``unk_id`` (never dropped, so lengths stay honest)."""
        return [self._token_to_id.get(w, self.unk_id) for w in split_words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: pad and bos skipped, eos rendered as nothing (not a stop), natural punctuation spacing.

        Truncating at eos is the sampler's job; decode shows whatever ids it is given.
        """
        words: list[str] = []
        for i in ids:
            i = int(i)
            if i in (self.pad_id, self.eos_id, self.bos_id):
                continue
            if not 0 <= i < len(self._id_to_token):
                raise ValueError(f"token id {i} out of range for vocabulary of {len(self._id_to_token)}")
            words.append(self._id_to_token[i])
        return detokenize(words)

    def to_json(self) -> str:
        return json.dumps({"type": "word", "version": 1, "tokens": self._id_to_token})

    @classmethod
    def from_json(cls, data: str) -> WordTokenizer:
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("type") != "word" or not isinstance(obj.get("tokens"), list):
            raise ValueError("not a serialized WordTokenizer (expected {'type': 'word', 'tokens': [...]})")
        return cls(obj["tokens"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordTokenizer) and self._id_to_token == other._id_to_token

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"
