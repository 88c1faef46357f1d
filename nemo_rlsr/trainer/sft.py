"""Supervised fine-tuning (`nemo-rlsr sft`): next-token loss on the reference answers only.

Each training row is one example, the rendered prompt + reference + <eos> (data/dataset.py: the tiny
word template or the tokenizer's chat template, the same prompt tokens the RLSR rollouts start from),
right-padded; the loss mask keeps only the targets that are response tokens, so the prompt is
context, never a target. The run around the steps (start-up checks, setup, resume, the reliability
hooks, summary, close) is trainer/run.py's, the same as `nemo-rlsr train`'s, and so is the
checkpoint's run state (trainer/state.py): an SFT checkpoint is what `pretrain.init_checkpoint` of an
RLSR run loads (starting policy and KL reference), and what `export-hf` / `eval` read.

`sft.pack_sequences: true` packs each step's examples into rows of model.max_sequence_length
instead (data/packing.py): block-diagonal attention through `TokenBatch.segment_ids`, same loss.
"""

from __future__ import annotations

import math

import torch

from nemo_rlsr.data.dataset import TrainingData, TrainingExample
from nemo_rlsr.data.instructions import DatasetError
from nemo_rlsr.data.packing import packed_sft_batch
from nemo_rlsr.data.sampler import PromptSampler
from nemo_rlsr.models.hf.start import load_hf_policy
from nemo_rlsr.models.policy import TokenBatch
from nemo_rlsr.trainer.guards import inject_nan
from nemo_rlsr.trainer.loop import debug_stall, guard_metrics
from nemo_rlsr.trainer.pretrain import nll_loss
from nemo_rlsr.trainer.run import TrainingRun
from nemo_rlsr.trainer.state import load_init_checkpoint


def sft_row(example: TrainingExample, eos_id: int) -> tuple[list[int], int]:
    """(token ids, prompt length): the rendered prompt's ids + the reference's + <eos>."""
    return example.prompt_ids + example.reference_ids + [eos_id], len(example.prompt_ids)


def sft_batch(examples: list[tuple[list[int], int]], length: int, pad_id: int) -> TokenBatch:
    """Right-padded rows; `loss_mask[t]` (aligned with targets = ids[t+1]) is 1 exactly where
    ids[t+1] is a response token (reference or eos)."""
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(len(examples), length)
    valid = torch.zeros(len(examples), length, dtype=torch.bool)
    for row, (tokens, prompt_len) in enumerate(examples):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        valid[row, : len(tokens)] = True
        loss_mask[row, prompt_len - 1 : len(tokens) - 1] = 1.0
    return TokenBatch(ids, valid, loss_mask, {})


def lr_at(step: int, total: int, max_lr: float, warmup: int, min_ratio: float) -> float:
    """LR of optimizer step `step` (1-based): linear warmup to max_lr over `warmup` steps, then
    cosine decay to min_ratio * max_lr at step `total`."""
    if warmup and step <= warmup:
        return max_lr * step / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return max_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class SFTTrainer(TrainingRun):
    mode = "sft"
    stage = "sft"

    def build(self, data: TrainingData) -> PromptSampler:
        cfg = self.cfg
        self.train = [sft_row(t, self.tokenizer.eos_id) for t in data.train]
        self.heldout = [sft_row(t, self.tokenizer.eos_id) for t in data.heldout]
        self.length = max(len(ids) for ids, _ in self.train + self.heldout)
        if self.length > cfg.model.max_sequence_length:
            raise DatasetError(f"the longest prompt + reference + eos = {self.length} tokens exceeds "
                               f"model.max_sequence_length={cfg.model.max_sequence_length} (no truncation: set "
                               f"data.max_prompt_tokens / data.max_reference_tokens to drop such rows)")
        self.init_from: str | None = None
        sampler = PromptSampler(len(self.train), cfg.sft.global_batch_size // self.ctx.dp, self.ctx.dp_rank,
                                self.ctx.dp, seed=cfg.data.shuffle_seed)
        self._total_steps = cfg.sft.steps or cfg.sft.epochs * sampler.batches_per_epoch
        return sampler

    @property
    def total_steps(self) -> int:
        return self._total_steps

    def start_fresh(self) -> None:
        cfg = self.cfg
        if cfg.pretrain.init_checkpoint:
            self.init_from = str(load_init_checkpoint(cfg.pretrain.init_checkpoint, self.policy, self.tokenizer,
                                                      cfg.trainer.checkpoint_checksums))
            self.print(f"initialised from {self.init_from}")
        elif cfg.model.hf_path:
            load_hf_policy(self.policy, cfg.model, self.tokenizer.vocab_size)
            self.init_from = cfg.model.hf_path
            self.print(f"initialised from the HF checkpoint {self.init_from}")

    def heldout_nll(self) -> float:
        """Token-mean response NLL on the held-out prompts (every rank computes the same number)."""
        batch = sft_batch(self.heldout, self.length, self.tokenizer.pad_id).to(self.policy.device)
        logprobs = self.policy.logprobs(batch, len(batch), max_tokens=self.cfg.sft.max_tokens_per_microbatch)
        return float(-(logprobs * batch.loss_mask).sum() / batch.loss_mask.sum())

    def run_loop(self) -> None:
        self.heldout_start = self.heldout_nll() if self.heldout else None
        super().run_loop()

    def train_step(self) -> dict[str, float]:
        """One optimizer step on the next batch; a non-finite update is skipped and counted."""
        cfg, s = self.cfg, self.cfg.sft
        debug_stall(cfg.trainer, self.step + 1, self.ctx)
        lr = lr_at(self.step + 1, self.total_steps, cfg.optimizer.lr, s.warmup_steps, s.min_lr_ratio)
        self.policy.set_learning_rate(lr)
        rows = self.state.sampler.next_batch()
        batch = self._batch([self.train[i] for i in rows])
        loss_fn = inject_nan(nll_loss) if self.step + 1 in cfg.trainer.debug_inject_nan_steps else nll_loss
        metrics = self.policy.train_step(batch, s.micro_batch_size, loss_fn, skip_nonfinite=True,
                                         max_tokens=s.max_tokens_per_microbatch)
        self.state.step += 1
        metrics.update(guard_metrics(self.guard, self.step, [metrics]))
        metrics["rows"] = float(len(batch))
        metrics["lr"] = lr
        metrics["epoch"] = float(self.state.sampler.epoch)
        return metrics

    def _batch(self, examples: list[tuple[list[int], int]]) -> TokenBatch:
        s = self.cfg.sft
        if s.pack_sequences:
            return packed_sft_batch(examples, self.cfg.model.max_sequence_length, self.tokenizer.pad_id,
                                    s.micro_batch_size)
        return sft_batch(examples, self.length, self.tokenizer.pad_id)

    def progress_fields(self, metrics: dict) -> dict[str, str]:
        return {"loss": f"{metrics['loss']:.3f}", "lr": f"{metrics['lr']:.2e}"}

    def evaluate_final(self) -> dict:
        fields: dict = {"init_checkpoint": self.init_from}
        if self.heldout:
            fields |= {"heldout_nll_start": self.heldout_start, "heldout_nll_end": self.heldout_nll()}
        return fields

    def report(self, summary: dict, records: list[dict]) -> dict:
        losses = [r["loss"] for r in records]
        fields = {}
        if losses:
            fields = {"loss_first": losses[0], "loss_last": losses[-1]}
            print(f"sft loss (response tokens): {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
        if self.heldout:
            print(f"held-out response NLL: {self.heldout_start:.3f} -> {summary['heldout_nll_end']:.3f}")
        return fields
