"""Prompt/reference datasets in JSONL, and the tiny demo model's chat template.

RLSR needs, per prompt, the human reference answer the reward compares against. A silently skipped or
mangled line would quietly change what the policy is rewarded for, so the reader is strict: every line
must be a valid example, and an error names the file and the 1-based line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nemo_rlsr.data.tokenizer import WordTokenizer

SPLITS: frozenset[str] = frozenset({"train", "heldout"})

BUNDLED_DATASET: Path = Path(__file__).parent / "assets" / "tiny_instructions.jsonl"
"""The embedded demo's dataset: 24 topics x 3 train prompts, plus 1 unseen prompt template per topic
("explain what a X is .") as split "heldout", to check the policy answers the asked question."""


class DatasetError(ValueError):
    """A dataset file that cannot be trusted; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class InstructionExample:
    prompt: str
    reference: str
    split: str
    topic: str | None


def render_prompt(question: str) -> str:
    """The tiny word-level demo model's chat template: ``"question : {question} answer :"``.

    Only for the demo's WordTokenizer world, whose base model was pre-trained on plain references;
    real models will use their tokenizer's own chat template.
    """
    return f"question : {question} answer :"


def build_word_tokenizer(examples: list[InstructionExample]) -> WordTokenizer:
    """The tiny model's vocabulary: every word of the rendered prompts and the references, of all
    splits (so held-out prompts encode without <unk>). One rule for RLSR, SFT and the planner, so
    their checkpoints are interchangeable."""
    return WordTokenizer.build([render_prompt(e.prompt) for e in examples] + [e.reference for e in examples])


def encode_prompt(tokenizer: WordTokenizer, question: str) -> list[int]:
    """Token ids of the rendered prompt, closed by ``<bos>``: in base pre-training every document
    starts with ``<bos>``, so it is where the base begins a fresh answer (as an assistant header
    does in a real chat template)."""
    return tokenizer.encode(render_prompt(question)) + [tokenizer.bos_id]


def _parse_line(text: str) -> InstructionExample:
    """One JSONL line -> example, or ValueError with the problem (the caller adds file and line)."""
    if not text.strip():
        raise ValueError("blank line (every line must be a JSON object)")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    fields: dict[str, str] = {}
    for key in ("prompt", "reference"):
        if key not in obj:
            raise ValueError(f"missing field {key!r}")
        value = obj[key]
        if not isinstance(value, str):
            raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"empty {key}")
        fields[key] = value
    split = obj.get("split", "train")
    if split not in SPLITS:
        raise ValueError(f"field 'split' must be one of {sorted(SPLITS)}, got {split!r}")
    topic = obj.get("topic")
    if topic is not None and not isinstance(topic, str):
        raise ValueError(f"field 'topic' must be a string or null, got {type(topic).__name__}")
    return InstructionExample(fields["prompt"], fields["reference"], split, topic)


def load_instructions(path: str | Path = BUNDLED_DATASET, split: str | None = None) -> list[InstructionExample]:
    """Read a JSONL file of ``{"prompt", "reference", "split"?, "topic"?}`` objects, in file order.

    ``split`` (None = all) filters after the whole file has been validated. ``split`` defaults to
    "train" for lines without one. Any bad line (blank, invalid JSON or UTF-8, missing/empty/non-string
    prompt or reference, unknown split) raises DatasetError naming the file and 1-based line number.
    Bytes are decoded line by line so that a bad byte is reported at its line.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)} or None, got {split!r}")
    path = Path(path)
    raw_lines = path.read_bytes().split(b"\n")
    if raw_lines[-1] == b"":  # the final newline ends the last line; it does not start a blank one
        raw_lines.pop()
    if not raw_lines:
        raise DatasetError(f"{path}: empty dataset file")
    examples: list[InstructionExample] = []
    for lineno, raw in enumerate(raw_lines, start=1):
        try:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"not valid UTF-8 (byte {raw[e.start]:#04x} at byte offset {e.start})") from None
            example = _parse_line(text)
        except ValueError as e:
            raise DatasetError(f"{path}:{lineno}: {e}") from None
        if split is None or example.split == split:
            examples.append(example)
    return examples
