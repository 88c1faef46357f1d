"""Section `reward_encoder`: the reward's sentence encoder (rewards/encoders.py, the bundled MiniLM
"SB" encoder) against sentence-transformers' own `encode()` on the same texts and device.

Texts are benchmarks/texts.py rollouts (log-normal lengths, some empty, some looping; the long
ones are cut at the encoder's 256-token window by both paths). Both must give the same unit
embeddings (ours batches by a token budget after sorting by length, `encode()` by a row count);
the numbers are sentences/s, best of two timed calls after a warm-up, and the full reward
(`EmbeddingSimilarityReward.score`: cosine to the reference + repetition checks) in rollouts/s.
"""

from __future__ import annotations

import torch

from .options import Options
from .record import SectionRecord, timed

EMBEDDING_TOL = 1e-3  # fp32 both ways; only the padding of each batch differs


def reward_encoder(rec: SectionRecord, opts: Options) -> None:
    from texts import rollouts  # benchmarks/texts.py

    from nemo_rlsr.rewards import EmbeddingSimilarityReward, SentenceEncoder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompts, responses, references = rollouts(16 if opts.smoke else 2048, seed=0)
    encoder = SentenceEncoder.load("minilm-l6", None, device)
    model = encoder.model
    rec.metric("encoder", {"device": device, "window_tokens": encoder.max_tokens, "batch_size": encoder.batch_size,
                           "texts": len(responses), "dtype": str(next(model.parameters()).dtype)})

    def sentence_transformers_encode() -> torch.Tensor:
        return model.encode(responses, batch_size=encoder.batch_size, normalize_embeddings=True,
                            convert_to_tensor=True, show_progress_bar=False).float().cpu()

    ours_s, ours = timed(lambda: encoder.encode(responses).embeddings, repeat=2, warmup=1)
    theirs_s, theirs = timed(sentence_transformers_encode, repeat=2, warmup=1)
    worst = float((ours - theirs).abs().max())
    rec.check("embeddings_equal_sentence_transformers", worst < EMBEDDING_TOL,
              f"max |diff| {worst:.2e} < {EMBEDDING_TOL} over {len(responses)} texts")
    rec.metric("sentences_per_s", {"ours": len(responses) / ours_s,
                                   "sentence_transformers_encode": len(responses) / theirs_s,
                                   "ours_over_encode": theirs_s / ours_s})

    def score():  # a fresh reward each time: its reference cache starts cold
        reward = EmbeddingSimilarityReward(encoder)
        try:
            return reward.score(prompts, responses, references)
        finally:
            reward.close()

    score_s, scores = timed(score)
    rec.metric("reward_rollouts_per_s", len(responses) / score_s)
    rec.check("rewards_in_range", bool(((scores.rewards >= -1) & (scores.rewards <= 1)).all()),
              f"rewards in [{float(scores.rewards.min()):.3f}, {float(scores.rewards.max()):.3f}]")
