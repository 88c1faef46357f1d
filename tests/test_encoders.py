"""SentenceEncoder with real models: the bundled MiniLM ("SB") and a tiny random Qwen3 ("Qwen-EM").

No mocks: every embedding below comes from a real forward pass, and is checked against an
independent computation (sentence-transformers' own encode, or a plain transformers forward).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from nemo_rlsr.config import RewardConfig
from nemo_rlsr.rewards import EmbeddingSimilarityReward, SentenceEncoder
from nemo_rlsr.rewards.batching import pad, token_budget_batches
from nemo_rlsr.rewards.random_qwen import QUERY_PROMPT, build_random_qwen3_embedding

SHORT = ["A dog is a loyal animal.", "", "The stock market fell sharply on Tuesday."]


def _sentences(rng: random.Random, subjects, verbs, objects, count: int) -> str:
    return " ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.randint(2, 999)} times."
                    for _ in range(count))


def _long_response() -> tuple[str, str]:
    """(response, reference): ~320 word pieces about dogs, then ~160 about markets; the reference
    is about markets. MiniLM's first window (254 word pieces + [CLS], [SEP]) sees only dogs."""
    rng = random.Random(0)
    dogs = _sentences(rng, ["My puppy", "The old terrier", "Our loyal dog", "A playful hound"],
                      ["barked at", "chased", "fetched", "sniffed"], ["the ball", "a squirrel", "the cat", "sticks"], 32)
    markets = _sentences(rng, ["The stock index", "Bond yields", "Share prices", "The central bank"],
                         ["fell against", "rose after", "dropped with", "jumped on"],
                         ["interest rates", "inflation data", "earnings reports", "the dollar"], 16)
    reference = "Stock prices fell sharply as interest rates and inflation rose."
    return dogs + " " + markets, reference


@pytest.fixture(scope="module")
def minilm() -> SentenceEncoder:
    return SentenceEncoder.load("minilm-l6", None)


# ---- MiniLM: truncate vs chunk ------------------------------------------------------------------
def test_truncate_matches_sentence_transformers(minilm: SentenceEncoder):
    long, _ = _long_response()
    texts = SHORT + [long]
    encoded = minilm.encode(texts)
    expected = minilm.model.encode(texts, normalize_embeddings=True, convert_to_tensor=True)  # cuts at 256
    torch.testing.assert_close(encoded.embeddings, expected.cpu(), atol=1e-5, rtol=0)
    assert encoded.cut.tolist() == [False, False, False, True]
    assert not encoded.chunked.any()


def test_chunk_is_mean_of_unit_window_embeddings(minilm: SentenceEncoder):
    long, _ = _long_response()
    chunker = SentenceEncoder(minilm.model, "sb", long_response="chunk")
    pieces, owner, cut, chunked = chunker.pieces(SHORT + [long])
    full = chunker._tokenize([long])[0]
    assert chunker.window < len(full) <= 2 * chunker.window  # two windows
    long_pieces = [p for p, o in zip(pieces, owner) if o == 3]
    assert len(long_pieces) == 2 and all(len(p) <= chunker.max_tokens for p in long_pieces)
    assert sum((p[1:-1] for p in long_pieces), []) == full  # [CLS] window [SEP], windows in order
    assert cut.tolist() == [False] * 4 and chunked.tolist() == [False, False, False, True]

    with torch.inference_mode():  # each window alone, no padding: independent of our batching
        singles = [F.normalize(minilm.model.forward({"input_ids": torch.tensor([p]),
                                                      "attention_mask": torch.ones(1, len(p), dtype=torch.long)})
                               ["sentence_embedding"], dim=-1)[0] for p in long_pieces]
    expected = F.normalize(torch.stack(singles).mean(0), dim=0)
    encoded = chunker.encode(SHORT + [long])
    torch.testing.assert_close(encoded.embeddings[3], expected, atol=1e-5, rtol=0)
    # texts within the window: chunk and truncate agree
    torch.testing.assert_close(encoded.embeddings[:3], minilm.encode(SHORT).embeddings, atol=1e-6, rtol=0)


def test_chunk_sees_past_the_window_and_truncate_does_not(minilm: SentenceEncoder):
    long, reference = _long_response()
    truncate = EmbeddingSimilarityReward(minilm)
    chunk = EmbeddingSimilarityReward(SentenceEncoder(minilm.model, "sb", long_response="chunk"))
    cut_res = truncate.score(["p"], [long], [reference])
    chunk_res = chunk.score(["p"], [long], [reference])
    assert cut_res.cut.tolist() == [True] and not cut_res.chunked.any()
    assert chunk_res.chunked.tolist() == [True] and not chunk_res.cut.any()
    assert not cut_res.penalized.any() and not chunk_res.penalized.any()
    # The market part (what the reference is about) lies past the first window.
    assert chunk_res.rewards.item() > cut_res.rewards.item() + 0.1, (chunk_res.rewards, cut_res.rewards)


def test_token_budget_respected(minilm: SentenceEncoder):
    long, _ = _long_response()
    enc = SentenceEncoder(minilm.model, "sb", batch_size=8, tokens_per_batch=600)
    pieces, *_ = enc.pieces(SHORT * 4 + [long, long[:300]])
    batches = list(enc.batches(pieces))
    assert sorted(r for b in batches for r in b.pieces) == list(range(len(pieces)))
    for b in batches:
        assert b.input_ids.numel() <= 600 or len(b.pieces) == 1
        assert b.attention_mask[:, 0].all()  # SB pads on the right
    torch.testing.assert_close(enc.encode(SHORT).embeddings, minilm.encode(SHORT).embeddings, atol=1e-6, rtol=0)


def test_offload_and_onload(minilm: SentenceEncoder):
    enc = SentenceEncoder(minilm.model, "sb")
    before = enc.encode(SHORT).embeddings
    enc.offload()
    assert not enc.on_device and all(p.device.type == "cpu" for p in enc.model.parameters())
    torch.testing.assert_close(enc.encode(SHORT).embeddings, before)  # encode moves it back
    assert enc.on_device


def test_config_choices_are_checked(minilm: SentenceEncoder):
    with pytest.raises(ValueError, match="long_response"):
        SentenceEncoder(minilm.model, "sb", long_response="split")
    with pytest.raises(ValueError, match="is not one of"):
        SentenceEncoder.load("bert-large", None)
    with pytest.raises(ValueError, match="needs reward.encoder_path"):
        SentenceEncoder.load("qwen3-embedding-8b", None)
    with pytest.raises(ValueError, match="prompts"):
        SentenceEncoder(minilm.model, "sb", prompt_name="instruct")


# ---- batching -----------------------------------------------------------------------------------
def test_token_budget_batches_properties():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(0, 60))]
        max_seq, max_tok = rng.randint(1, 16), rng.randint(50, 2000)
        batches = token_budget_batches(lengths, max_seq, max_tok)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(flat, reverse=True)
        for b in batches:
            assert len(b) <= max_seq
            assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= max_tok


def test_pad_sides():
    ids, mask = pad([[5, 6, 7], [8], []], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    ids, mask = pad([[5, 6, 7], [8]], pad_id=9, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# ---- Qwen-EM: a tiny random Qwen3 saved as a sentence-transformers folder ------------------------
@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory) -> str:
    return build_random_qwen3_embedding(tmp_path_factory.mktemp("qwen3_tiny"))


def test_qwen_em_last_token_left_padding_and_prompt(qwen_path: str):
    from transformers import AutoModel

    enc = SentenceEncoder.load("qwen3-embedding-0.6b", qwen_path, batch_size=16)
    assert enc.padding_side == "left" and enc.prompt == QUERY_PROMPT and enc.prompt_ids
    assert enc.prefix == [] and enc.suffix == [enc.tokenizer.eos_token_id]  # EOS appended, as Qwen3-Embedding
    texts = ["hello world", "A dog is a loyal animal that barks at night.", "", "word " * 40]
    pieces, owner, cut, _ = enc.pieces(texts)
    assert all(p[: len(enc.prompt_ids)] == enc.prompt_ids for p in pieces)
    (batch,) = list(enc.batches(pieces))
    assert batch.attention_mask[:, -1].all() and not batch.attention_mask[:, 0].all()  # left padding

    # Independent: a plain transformers forward of each text alone; its last hidden state, normalized.
    hf = AutoModel.from_pretrained(qwen_path).eval()
    with torch.inference_mode():
        manual = torch.stack([F.normalize(hf(input_ids=torch.tensor([p])).last_hidden_state[0, -1], dim=0)
                              for p in pieces])
    encoded = enc.encode(texts)
    torch.testing.assert_close(encoded.embeddings, manual, atol=1e-5, rtol=0)
    # and sentence-transformers' own encode with the model's query prompt agrees
    st = enc.model.encode(texts, prompt_name="query", normalize_embeddings=True, convert_to_tensor=True)
    torch.testing.assert_close(encoded.embeddings, st.cpu(), atol=1e-5, rtol=0)
    assert not cut.any()


def test_qwen_em_through_the_reward_config(qwen_path: str):
    cfg = RewardConfig(encoder="qwen3-embedding-0.6b", encoder_path=qwen_path, encoder_max_tokens=64,
                       long_response="chunk")
    reward = EmbeddingSimilarityReward.from_config(cfg, "cpu")
    res = reward.score(["p"] * 2, ["short answer", "many words " * 60], ["short answer"] * 2)
    assert abs(res.rewards[0].item() - 1.0) < 1e-5  # identical text
    assert res.chunked.tolist() == [False, True]
    reward.close()


def test_qwen_em_refuses_mean_pooling(minilm: SentenceEncoder):
    with pytest.raises(ValueError, match="last token"):
        SentenceEncoder(minilm.model, "qwen-em")
