"""The trainers' data: read -> chat form -> prompt/reference split -> filters -> token ids, with counts.

Rows a user dataset cannot use are dropped and counted by reason (`DataReport`), and the count is
checked: rows in = rows kept + rows dropped, so nothing is silently lost. `data.strict: true` turns the
first bad row into an error naming its file, row and reason instead. The bundled demo set
(`data.format: instructions`) keeps its own strict reader (instructions.py) and no filters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from nemo_rlsr.config import ConfigError, DataConfig
from nemo_rlsr.config.rules import data_config_problems
from nemo_rlsr.data.chat import HFTokenizer, Tokenizer, encode_chat_prompt, render_chat_prompt, word_prompt_text
from nemo_rlsr.data.instructions import (
    BUNDLED_DATASET,
    DatasetError,
    InstructionExample,
    build_word_tokenizer,
    load_instructions,
)
from nemo_rlsr.data.readers import read_rows
from nemo_rlsr.data.schemas import Conversation, RowProblem, row_messages, split_reference

PROMPT_TOO_LONG = "prompt_too_long"
REFERENCE_TOO_LONG = "reference_too_long"
DUPLICATE_PROMPT = "duplicate_prompt"


@dataclass
class DataReport:
    """Rows read from `source`, kept, and dropped per reason."""

    source: str
    rows_in: int = 0
    rows_kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def check(self) -> None:
        lost = self.rows_in - self.rows_kept - sum(self.dropped.values())
        if lost:
            raise AssertionError(f"{self.source}: {lost} rows neither kept nor counted as dropped: {self}")

    def lines(self) -> list[str]:
        """One summary line, then one line per drop reason (the log the trainers print)."""
        head = f"data {self.source}: {self.rows_in} rows read, {self.rows_kept} kept, {sum(self.dropped.values())} dropped"
        return [head] + [f"  dropped {n} rows: {reason}" for reason, n in sorted(self.dropped.items())]


class _Dropper:
    """Counts a dropped row, or raises on it in strict mode."""

    def __init__(self, report: DataReport, strict: bool) -> None:
        self.report, self.strict = report, strict

    def __call__(self, source: str, row: int, reason: str, detail: str) -> None:
        if self.strict:
            raise DatasetError(f"{source}:{row}: {reason}: {detail} (data.strict=true)")
        self.report.dropped[reason] += 1


def read_conversations(cfg: DataConfig, drop: _Dropper) -> list[Conversation]:
    """Every row of `cfg.path` that parses, fits its schema and has a reference, split into prompt/reference."""
    conversations = []
    for raw in read_rows(cfg.path, cfg.hf_split, cfg.max_row_bytes):
        drop.report.rows_in += 1
        if raw.reason is not None:
            drop(raw.source, raw.row, raw.reason, raw.detail)
            continue
        try:
            conversations.append(split_reference(row_messages(raw.value, cfg), raw.source, raw.row))
        except RowProblem as p:
            drop(raw.source, raw.row, p.reason, p.detail)
    return conversations


@dataclass(frozen=True)
class TrainingExample:
    """`example.prompt` is the prompt as plain text (for logs and the reward actor); the ids are the model's."""

    example: InstructionExample
    prompt_ids: list[int]
    reference_ids: list[int]  # without the closing eos


def select_examples(conversations: Iterable[Conversation], tokenizer: Tokenizer, cfg: DataConfig,
                    drop: _Dropper) -> list[TrainingExample]:
    """Encode, then drop prompts / references over the token limits and repeats of an exact rendered prompt."""
    kept, seen = [], set()
    for c in conversations:
        prompt_ids = encode_chat_prompt(tokenizer, c.context)
        reference_ids = tokenizer.encode(c.reference)
        rendered = render_chat_prompt(tokenizer, c.context)
        if cfg.max_prompt_tokens is not None and len(prompt_ids) > cfg.max_prompt_tokens:
            drop(c.source, c.row, PROMPT_TOO_LONG, f"{len(prompt_ids)} tokens > data.max_prompt_tokens={cfg.max_prompt_tokens}")
        elif cfg.max_reference_tokens is not None and len(reference_ids) > cfg.max_reference_tokens:
            drop(c.source, c.row, REFERENCE_TOO_LONG,
                 f"{len(reference_ids)} tokens > data.max_reference_tokens={cfg.max_reference_tokens}")
        elif cfg.drop_duplicate_prompts and rendered in seen:
            drop(c.source, c.row, DUPLICATE_PROMPT, "the same rendered prompt as an earlier row")
        else:
            seen.add(rendered)
            example = InstructionExample(word_prompt_text(c.context), c.reference, "train", None)
            kept.append(TrainingExample(example, prompt_ids, reference_ids))
            drop.report.rows_kept += 1
    return kept


@dataclass
class TrainingData:
    tokenizer: Tokenizer
    train: list[TrainingExample]
    heldout: list[TrainingExample]
    report: DataReport | None  # None for the bundled set, which has no filters


def _bundled(cfg: DataConfig) -> TrainingData:
    examples = load_instructions(cfg.path or BUNDLED_DATASET)
    tokenizer = HFTokenizer(cfg.tokenizer_path) if cfg.tokenizer_path else build_word_tokenizer(examples)
    encoded = [TrainingExample(e, encode_chat_prompt(tokenizer, [{"role": "user", "content": e.prompt}]),
                               tokenizer.encode(e.reference)) for e in examples]
    return TrainingData(tokenizer, [t for t in encoded if t.example.split == "train"],
                        [t for t in encoded if t.example.split == "heldout"], None)


def load_training_data(cfg: DataConfig, log: Callable[[str], None] = print) -> TrainingData:
    """The examples and tokenizer of a run (`data.*`); logs the per-reason drop counts of user data.

    Without `data.tokenizer_path` the word tokenizer is built from every row that reached the length
    filters (the demo's rule: the vocabulary covers everything the model reads)."""
    if cfg.format == "instructions":
        return _bundled(cfg)
    problems = data_config_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    report = DataReport(cfg.path)
    drop = _Dropper(report, cfg.strict)
    conversations = read_conversations(cfg, drop)
    if cfg.tokenizer_path:
        tokenizer = HFTokenizer(cfg.tokenizer_path)
    else:
        tokenizer = build_word_tokenizer([InstructionExample(word_prompt_text(c.context), c.reference, "train", None)
                                          for c in conversations])
    train = select_examples(conversations, tokenizer, cfg, drop)
    report.check()
    for line in report.lines():
        log(line)
    if not train:
        raise DatasetError(f"{cfg.path}: no usable rows ({'; '.join(report.lines())})")
    return TrainingData(tokenizer, train, [], report)
