"""Tests for the data side of the embedded demo: bundled dataset, word tokenizer, strict loader, sampler."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nemo_rlsr.data.instructions import (
    BUNDLED_DATASET,
    DatasetError,
    InstructionExample,
    load_instructions,
    render_prompt,
)
from nemo_rlsr.data.sampler import PromptSampler
from nemo_rlsr.data.tokenizer import WordTokenizer


def _all_texts() -> list[str]:
    examples = load_instructions(BUNDLED_DATASET)
    return [render_prompt(e.prompt) for e in examples] + [e.reference for e in examples]


def _natural(text: str) -> str:
    return re.sub(r" ([.,?!;:])", r"\1", text)


# --- bundled dataset ---------------------------------------------------------------------------------


def test_bundled_dataset_shape() -> None:
    train = load_instructions(BUNDLED_DATASET, split="train")
    heldout = load_instructions(BUNDLED_DATASET, split="heldout")
    assert len(train) == 72 and len(heldout) == 24
    assert len(load_instructions(BUNDLED_DATASET)) == 96
    train_topics = {e.topic for e in train}
    assert len(train_topics) == 24 and None not in train_topics
    assert {e.topic for e in heldout} <= train_topics
    heldout_prompts = {e.prompt for e in heldout}
    assert not heldout_prompts & {e.prompt for e in train}
    refs = {}
    for e in train + heldout:
        refs.setdefault(e.topic, set()).add(e.reference)
        assert e.topic is not None and e.topic in e.prompt.split() and e.topic in e.reference.split()
        assert e.reference == e.reference.lower() and e.prompt == e.prompt.lower()
        assert 10 <= len(re.findall(r"\w+", e.reference)) <= 16
    assert all(len(r) == 1 for r in refs.values())  # one reference per topic


def test_render_prompt() -> None:
    assert render_prompt("what is a dog ?") == "question : what is a dog ? answer :"


# --- tokenizer ---------------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_vocab() -> None:
    texts = _all_texts()
    tok = WordTokenizer.build(texts)
    assert 250 <= tok.vocab_size <= 450
    for t in texts:
        ids = tok.encode(t)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == _natural(t)
    assert tok.decode([tok.bos_id] + tok.encode("what is a dog ?") + [tok.eos_id, tok.pad_id]) == "what is a dog?"


def test_tokenizer_specials_unknown_and_determinism(tmp_path: Path) -> None:
    tok = WordTokenizer.build(["A Dog, barks!", "the cat"])
    assert tok.tokens[:4] == ["<pad>", "<eos>", "<unk>", "<bos>"]
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, 3)
    assert tok.tokens[4:] == sorted(["!", ",", "a", "barks", "cat", "dog", "the"])
    assert WordTokenizer.build(["the cat", "A Dog, barks!"]) == tok
    ids = tok.encode("the zebra barks")
    assert ids == [tok.tokens.index("the"), tok.unk_id, tok.tokens.index("barks")]
    assert tok.decode(ids) == "the <unk> barks"
    assert WordTokenizer.from_json(tok.to_json()) == tok
    tok.save(tmp_path / "tok.json")
    assert WordTokenizer.load(tmp_path / "tok.json") == tok


# --- strict loader -----------------------------------------------------------------------------------

GOOD = json.dumps({"prompt": "what is a dog ?", "reference": "a dog barks .", "split": "train"}).encode()


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        (b'{"prompt": "x", "reference": ', "invalid JSON"),
        (json.dumps({"prompt": "what is a dog ?"}).encode(), "missing field 'reference'"),
        (json.dumps({"prompt": "p", "reference": 7}).encode(), "must be a string"),
        (json.dumps({"prompt": "p", "reference": "  "}).encode(), "empty reference"),
        (b'{"prompt": "p", "reference": "caf\xe9"}', "UTF-8"),
        (b"", "blank line"),
        (json.dumps({"prompt": "p", "reference": "r", "split": "test"}).encode(), "split"),
        (b'["prompt", "reference"]', "JSON object"),
    ],
)
def test_loader_errors_name_file_and_line(tmp_path: Path, bad_line: bytes, problem: str) -> None:
    path = tmp_path / "bad_data.jsonl"
    path.write_bytes(GOOD + b"\n" + GOOD + b"\n" + bad_line + b"\n" + GOOD + b"\n")
    with pytest.raises(DatasetError) as info:
        load_instructions(path)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "bad_data.jsonl:3:" in message
    assert problem in message


def test_loader_defaults_and_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_bytes(b'{"prompt": "p", "reference": "r"}\r\n' + GOOD)  # CRLF and no final newline
    assert load_instructions(path) == [
        InstructionExample("p", "r", "train", None),
        InstructionExample("what is a dog ?", "a dog barks .", "train", None),
    ]
    path.write_bytes(GOOD + b"\n\n")  # a second newline is a blank line
    with pytest.raises(DatasetError, match="ok.jsonl:2: blank line"):
        load_instructions(path)


# --- sampler -----------------------------------------------------------------------------------------


def _take(sampler: PromptSampler, n: int) -> list[list[int]]:
    return [sampler.next_batch() for _ in range(n)]


def test_sampler_resume_matches_uninterrupted_across_epochs() -> None:
    args = dict(num_examples=23, batch_size_per_rank=2, dp_rank=1, dp_size=3, seed=5)
    reference = _take(PromptSampler(**args), 10)  # 3 batches per epoch -> crosses 3 epoch boundaries
    first = PromptSampler(**args)
    head = _take(first, 2)
    state = json.loads(json.dumps(first.state_dict()))  # survives a round trip through a checkpoint
    resumed = PromptSampler(**args)
    resumed.load_state_dict(state)
    assert head + _take(resumed, 8) == reference
    assert resumed.state_dict()["epoch"] == 3


def test_sampler_shards_disjoint_and_cover_epoch() -> None:
    n, bs, dp = 29, 3, 4
    ranks = [PromptSampler(n, bs, r, dp, seed=0) for r in range(dp)]
    assert ranks[0].dropped_tail_per_epoch == n % (bs * dp) == 5
    seen: list[int] = []
    for _ in range(ranks[0].batches_per_epoch):
        shards = [s.next_batch() for s in ranks]
        assert all(len(s) == bs for s in shards)
        flat = [i for s in shards for i in s]
        assert len(set(flat)) == len(flat)
        seen += flat
    assert len(set(seen)) == len(seen) == n - 5
    assert ranks[0].state_dict()["epoch"] == 1 and ranks[0].state_dict()["position"] == 0


def test_sampler_seeds_and_validation() -> None:
    a = _take(PromptSampler(72, 8, 0, 1, seed=0), 3)
    assert a == _take(PromptSampler(72, 8, 0, 1, seed=0), 3)
    assert a != _take(PromptSampler(72, 8, 0, 1, seed=1), 3)
    assert _take(PromptSampler(10, 5, 0, 1, seed=0, shuffle=False), 2) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    with pytest.raises(ValueError, match=r"num_examples \(5\).*12"):
        PromptSampler(5, 3, 0, 4, seed=0)
    state = PromptSampler(72, 8, 0, 2, seed=0).state_dict()
    mismatched = {
        "seed": PromptSampler(72, 8, 0, 2, seed=1),
        "num_examples": PromptSampler(71, 8, 0, 2, seed=0),
        "dp_size": PromptSampler(72, 8, 0, 4, seed=0),
    }
    for key, sampler in mismatched.items():
        with pytest.raises(ValueError, match=key):
            sampler.load_state_dict(state)
