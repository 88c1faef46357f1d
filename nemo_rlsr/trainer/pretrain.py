"""Brief language-model pre-training of the tiny random-init base on the reference answers.

The embedded demo starts from random weights, which do not learn under the embedding reward (the
policy collapses to one token and every group's rewards tie, so GRPO's advantages are all zero).
A few hundred LM steps on the references give a base that writes varied answer-like sentences.

Each answer is shown after a rendered training prompt, as a policy samples it: one of its own with
probability `pretrain.own_prompt_fraction`, else one drawn from all of them. Why (issue 17):
- A base pre-trained on bare answers never saw a prompt: after one it spread 40-50% of its mass
  at the answer's subject slot over mid-sentence words ("a chain ...", "a school ..."), and GRPO
  turned those into subjectless answers ("a loyal pet that barks ...", "a and is a loyal pet ...").
  MiniLM's cosine rewards them: against a wrong topic's reference an answer without its subject
  scores more than one with (0.140 vs 0.110 on average), so in every group where no sample names
  the asked topic, dropping the subject wins, whatever the prompt.
- After random prompts only (fraction 0) the base starts its answers where a prompt ends (99% of
  its mass on a topic at the subject slot) but nothing links a prompt to its topic: GRPO learned
  no link in 40 steps and then dropped the subject as well.
- With answers after their own prompts part of the time, the base names the asked topic more often
  than chance, and GRPO learns which topic a prompt asks for before the subject-dropping hedge.
"""

from __future__ import annotations

import torch

from nemo_rlsr.config import PretrainConfig
from nemo_rlsr.models.policy import MegatronPolicy, TokenBatch


def prompted_answer_batch(
    pairs: list[tuple[list[int], list[int]]], own_prompt_fraction: float, eos_id: int, rows: int, length: int,
    generator: torch.Generator,
) -> TokenBatch:
    """`rows` windows of `length` tokens cut from a stream of documents `prompt answer <eos>`.

    `pairs` are the training (prompt ids, answer ids) pairs; every distinct answer appears once per
    pass, in random order. Its prompt is, with probability `own_prompt_fraction`, one of its own
    prompts, else one drawn uniformly from all prompts (its own among them). The loss counts the
    answer and `<eos>` tokens only: the prompts are context, the answers are what the base learns
    to write. Windows start anywhere, so answers also follow arbitrary context, as in LM pre-training.
    """
    prompts = [p for p, _ in pairs]
    answers: dict[tuple[int, ...], list[int]] = {}  # answer -> indices of its own prompts
    for index, (_, answer) in enumerate(pairs):
        answers.setdefault(tuple(answer), []).append(index)
    order = sorted(answers)
    ids = torch.empty(rows, length, dtype=torch.long)
    loss_mask = torch.empty(rows, length)
    for row in range(rows):
        stream: list[int] = []
        is_answer: list[bool] = []
        while len(stream) < 2 * length:
            for index in torch.randperm(len(order), generator=generator).tolist():
                answer = order[index]
                own = float(torch.rand((), generator=generator)) < own_prompt_fraction
                choices = answers[answer] if own else range(len(prompts))
                prompt = prompts[choices[int(torch.randint(len(choices), (1,), generator=generator))]]
                stream += prompt + list(answer) + [eos_id]
                is_answer += [False] * len(prompt) + [True] * (len(answer) + 1)
        start = int(torch.randint(len(stream) - length, (1,), generator=generator))
        ids[row] = torch.tensor(stream[start : start + length])
        # loss_mask[t] weights the prediction of token t + 1 (TokenBatch.targets)
        loss_mask[row] = torch.tensor(is_answer[start + 1 : start + length + 1], dtype=torch.float)
    loss_mask[:, -1] = 0.0  # the last position's target lies outside the window
    return TokenBatch(ids, torch.ones(rows, length, dtype=torch.bool), loss_mask, {})


def nll_loss(logprobs: torch.Tensor, entropy: torch.Tensor, mb: TokenBatch):
    loss = -(logprobs * mb.loss_mask).sum()
    return loss, {"loss": loss.detach()}


def pretrain_on_answers(
    policy: MegatronPolicy,
    pairs: list[tuple[list[int], list[int]]],
    eos_id: int,
    cfg: PretrainConfig,
    length: int,
    micro_batch_size: int,
    seed: int,
    progress=None,
) -> list[float]:
    """`cfg.steps` optimizer steps of next-token prediction on the answers of `prompted_answer_batch`;
    returns the mean NLL per answer token of each step."""
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(cfg.steps):
        batch = prompted_answer_batch(pairs, cfg.own_prompt_fraction, eos_id, cfg.batch_size, length, generator)
        metrics = policy.train_step(batch, micro_batch_size, nll_loss)
        losses.append(metrics["loss"])
        if progress is not None:
            progress.set_postfix(nll=f"{metrics['loss']:.3f}")
            progress.update(1)
    return losses
