"""EmbeddingSimilarityReward with the real bundled all-MiniLM-L6-v2 (no mocks)."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_rlsr.rewards import EmbeddingSimilarityReward, RepetitionPenalty, RewardResult, SentenceEncoder
from nemo_rlsr.rewards.encoders import bundled_minilm_path

REFERENCE = "A dog is a loyal animal that barks and likes to play fetch."
PARAPHRASE = "Dogs are faithful pets; they bark and enjoy fetching balls."
UNRELATED = "The stock market fell sharply on Tuesday after interest rates rose."
PHRASE = "I will keep saying this again."  # 30 chars
LOOPING = PHRASE * 10  # longest self-repeat 270 > 100 and > 10% of the reference


@pytest.fixture(scope="module")
def reward() -> EmbeddingSimilarityReward:
    return EmbeddingSimilarityReward()


def test_bundled_path_exists():
    import os

    path = bundled_minilm_path()
    assert isinstance(path, str)
    assert os.path.isfile(os.path.join(path, "model.safetensors"))


def test_identical_text_cosine_one(reward: EmbeddingSimilarityReward):
    res = reward.score(["p"], [REFERENCE], [REFERENCE])
    assert isinstance(res, RewardResult)
    assert res.rewards.dtype == torch.float32 and res.rewards.shape == (1,)
    assert res.cosine.shape == (1,) and res.penalized.dtype == torch.bool
    assert abs(res.cosine.item() - 1.0) < 1e-5
    assert abs(res.rewards.item() - 1.0) < 1e-5
    assert not res.penalized.item()


def test_paraphrase_beats_unrelated(reward: EmbeddingSimilarityReward):
    res = reward.score(["p", "p"], [PARAPHRASE, UNRELATED], [REFERENCE, REFERENCE])
    para, unrel = res.rewards.tolist()
    assert para > unrel + 0.3, (para, unrel)
    assert para > 0.5 and unrel < 0.3, (para, unrel)
    assert torch.equal(res.rewards, res.cosine)  # nothing penalized


def test_looping_response_gets_penalty(reward: EmbeddingSimilarityReward):
    assert len(PHRASE) == 30
    res = reward.score(["p", "p"], [LOOPING, PARAPHRASE], [REFERENCE, REFERENCE])
    assert res.penalized.tolist() == [True, False]
    assert res.rewards[0].item() == -1.0
    assert -1.0 <= res.cosine[0].item() <= 1.0  # cosine still reported for logging
    assert res.rewards[1].item() == pytest.approx(res.cosine[1].item())


def test_custom_penalty_value(reward: EmbeddingSimilarityReward):
    r = EmbeddingSimilarityReward(reward.encoder, repetition=RepetitionPenalty(penalty=-0.5))
    res = r.score(["p"], [LOOPING], [REFERENCE])
    assert res.rewards.item() == -0.5 and res.penalized.item()


def test_empty_response_is_scored_not_dropped(reward: EmbeddingSimilarityReward):
    res = reward.score(["p", "p", "p"], ["", REFERENCE, ""], [REFERENCE] * 3)
    assert res.rewards.shape == (3,)
    assert all(math.isfinite(x) for x in res.rewards.tolist())
    assert res.rewards[1].item() > res.rewards[0].item()
    assert res.rewards[0].item() == pytest.approx(res.rewards[2].item(), abs=1e-6)


class _CountingEncoder(SentenceEncoder):
    """Real encoder; only records which texts reach it (a spy, not a mock)."""

    def encode(self, texts):
        self.encoded.extend(texts)
        return super().encode(texts)


def test_references_are_cached(reward: EmbeddingSimilarityReward):
    encoder = _CountingEncoder(reward.encoder.model, "sb")
    encoder.encoded = []
    r = EmbeddingSimilarityReward(encoder)
    refs = [REFERENCE, "Paris is the capital of France.", REFERENCE, "Water boils at 100 C."]
    responses = [PARAPHRASE, "The capital of France is Paris.", UNRELATED, "It boils at 100 degrees."]
    first = r.score(["p"] * 4, responses, refs)
    assert len(r._ref_cache) == 3
    assert sorted(encoder.encoded) == sorted(responses + list(dict.fromkeys(refs)))
    encoder.encoded.clear()
    second = r.score(["p"] * 4, responses, refs)
    assert len(r._ref_cache) == 3
    assert sorted(encoder.encoded) == sorted(responses)  # no reference re-embedded
    torch.testing.assert_close(first.rewards, second.rewards)
    r.score(["p"], [PARAPHRASE], ["A new reference."])
    assert len(r._ref_cache) == 4


def test_batch_result_matches_single_scores(reward: EmbeddingSimilarityReward):
    responses = [PARAPHRASE, UNRELATED, REFERENCE]
    batch = reward.score(["p"] * 3, responses, [REFERENCE] * 3).rewards
    singles = torch.cat([reward.score(["p"], [x], [REFERENCE]).rewards for x in responses])
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=0)


def test_mismatched_lengths_raise(reward: EmbeddingSimilarityReward):
    with pytest.raises(ValueError, match="length mismatch"):
        reward.score(["p"], [PARAPHRASE, UNRELATED], [REFERENCE, REFERENCE])
    with pytest.raises(ValueError, match="length mismatch"):
        reward.score(["p", "p"], [PARAPHRASE, UNRELATED], [REFERENCE])


def test_empty_batch(reward: EmbeddingSimilarityReward):
    res = reward.score([], [], [])
    assert res.rewards.shape == (0,) and res.penalized.shape == (0,)


def test_repeated_responses_embedded_once_with_the_same_rewards(reward: EmbeddingSimilarityReward):
    """A step's samples of one prompt are often the same text: each distinct text reaches the
    encoder once, and every copy gets the reward that text gets when scored alone."""
    sent: list[list[str]] = []
    encode = reward.encoder.encode
    reward.encoder.encode = lambda texts: sent.append(list(texts)) or encode(texts)
    try:
        responses = [PARAPHRASE, UNRELATED, PARAPHRASE, LOOPING, PARAPHRASE, UNRELATED]
        res = reward.score(["p"] * 6, responses, [REFERENCE] * 6)
    finally:
        reward.encoder.encode = encode
    assert sent[0] == [PARAPHRASE, UNRELATED, LOOPING]
    alone = {text: reward.score(["p"], [text], [REFERENCE]) for text in (PARAPHRASE, UNRELATED, LOOPING)}
    for i, text in enumerate(responses):
        assert res.cosine[i].item() == pytest.approx(alone[text].cosine.item(), abs=1e-6)
        assert res.rewards[i].item() == pytest.approx(alone[text].rewards.item(), abs=1e-6)
        assert res.penalized[i].item() == alone[text].penalized.item()
