"""Supervised fine-tuning (`nemo-rlsr sft`): next-token loss on the reference answers only.

Each training row is one example, ``encode_prompt(question) + reference + <eos>`` (the tiny chat
template, the same prompt tokens the RLSR rollouts start from), right-padded; the loss mask keeps
only the targets that are response tokens, so the prompt is context, never a target. Same
MegatronPolicy, same tokenizer (built from the same data as RLSRTrainer's) and the same checkpoint
`extra` fields as the RLSR trainer, so an SFT checkpoint is what `pretrain.init_checkpoint` of an
RLSR run loads (starting policy and KL reference), and what `export-hf` / `eval` read.

No sequence packing: `TokenBatch.valid` is a per-key mask, which cannot express the block-diagonal
attention (nor the per-example position reset) that packing several examples into a row needs.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from nemo_rlsr.config import ConfigError, RLSRConfig, to_dict, validate_supported
from nemo_rlsr.data.instructions import BUNDLED_DATASET, build_word_tokenizer, encode_prompt, load_instructions
from nemo_rlsr.data.sampler import PromptSampler
from nemo_rlsr.data.tokenizer import WordTokenizer
from nemo_rlsr.distributed.parallel import init_distributed
from nemo_rlsr.models.policy import MegatronPolicy, TokenBatch
from nemo_rlsr.trainer.checkpoint import (
    find_resumable_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from nemo_rlsr.trainer.fingerprint import parameters_sha256
from nemo_rlsr.trainer.manifest import verify_checkpoint
from nemo_rlsr.trainer.metrics import MetricsLogger, read_metrics
from nemo_rlsr.trainer.pretrain import nll_loss


def resolve_checkpoint(path: str | Path, checksums: bool = True) -> Path:
    """A complete checkpoint: `path` itself, or the newest complete one under the root `path`."""
    path = Path(path)
    if not verify_checkpoint(path, checksums):
        return path
    found = find_resumable_checkpoint(path, checksums)
    if found is None:
        raise FileNotFoundError(f"{path}: neither a complete checkpoint nor a directory holding one")
    return found


def load_init_checkpoint(path: str | Path, policy: MegatronPolicy, tokenizer: WordTokenizer,
                         checksums: bool = True) -> Path:
    """Load the weights (not the optimizer) of `path` into `policy`; the checkpoint's tokenizer
    must be this run's (same ids), else the weights would mean other words. Returns the path."""
    resolved = resolve_checkpoint(path, checksums)
    extra = load_checkpoint(resolved, policy, load_optimizer=False)
    if "tokenizer" not in extra or WordTokenizer.from_json(extra["tokenizer"]) != tokenizer:
        raise ValueError(f"{resolved}: the checkpoint's tokenizer differs from this run's data "
                         f"(pretrain.init_checkpoint must come from a run on the same data.path)")
    return resolved


def sft_example_ids(tokenizer: WordTokenizer, prompt: str, reference: str) -> tuple[list[int], int]:
    """(token ids, prompt length): ``encode_prompt(prompt) + reference + <eos>``."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    return prompt_ids + tokenizer.encode(reference) + [tokenizer.eos_id], len(prompt_ids)


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


class SFTTrainer:
    def __init__(self, cfg: RLSRConfig, resume: str | None = None) -> None:
        self.cfg = cfg
        validate_supported(cfg)
        if cfg.pretrain.steps:
            raise ConfigError("`pretrain.steps` must be 0 for `nemo-rlsr sft` (it starts from random init or "
                              "from `pretrain.init_checkpoint`)")
        self.ctx = init_distributed(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                                    cfg.parallel.seed, cfg.parallel.collective_timeout_s)
        s = cfg.sft
        if s.global_batch_size % (self.ctx.dp * s.micro_batch_size):
            raise ConfigError(f"sft.global_batch_size={s.global_batch_size} does not split into DP={self.ctx.dp} "
                              f"ranks x whole sft.micro_batch_size={s.micro_batch_size} micro-batches")
        self.run_dir = Path(cfg.trainer.output_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"

        examples = load_instructions(cfg.data.path or BUNDLED_DATASET)
        self.tokenizer = build_word_tokenizer(examples)
        self.train = [sft_example_ids(self.tokenizer, e.prompt, e.reference) for e in examples if e.split == "train"]
        self.heldout = [sft_example_ids(self.tokenizer, e.prompt, e.reference)
                        for e in examples if e.split == "heldout"]
        self.length = max(len(ids) for ids, _ in self.train + self.heldout)
        if self.length > cfg.model.max_sequence_length:
            raise ValueError(f"longest prompt + reference + eos = {self.length} tokens exceeds "
                             f"model.max_sequence_length={cfg.model.max_sequence_length} (no truncation)")

        self.policy = MegatronPolicy(cfg.model, cfg.optimizer, self.tokenizer.vocab_size, self.ctx)
        self.sampler = PromptSampler(len(self.train), s.global_batch_size // self.ctx.dp, self.ctx.dp_rank,
                                     self.ctx.dp, seed=cfg.data.shuffle_seed)
        self.total_steps = s.steps or s.epochs * self.sampler.batches_per_epoch
        # The same sinks as the RLSR trainer (JSONL always; TensorBoard / W&B / MLflow per `logging.*`).
        self.logger = MetricsLogger(self.run_dir, self.ctx.is_logging_rank, cfg.logging,
                                    to_dict(cfg))
        self.step = 0
        self.init_from: str | None = None
        if resume:
            path = (find_resumable_checkpoint(self.checkpoint_dir, cfg.trainer.checkpoint_checksums)
                    if resume == "auto" else resolve_checkpoint(resume, cfg.trainer.checkpoint_checksums))
            if path is not None:
                extra = load_checkpoint(path, self.policy)
                if WordTokenizer.from_json(extra["tokenizer"]) != self.tokenizer:
                    raise ValueError(f"{path}: the checkpoint's tokenizer differs from this run's data")
                self.step = extra["step"]
                self.sampler.load_state_dict(extra["sampler"])
                self.logger.truncate_after(self.step)
                self._print(f"resumed from {path} at step {self.step}")
                return
        if latest_checkpoint(self.checkpoint_dir):
            raise FileExistsError(f"{self.run_dir} already holds checkpoints: pass --resume to continue that run, "
                                  f"or choose another trainer.output_dir")
        self.logger.truncate_after(0)
        if cfg.pretrain.init_checkpoint:
            self.init_from = str(load_init_checkpoint(cfg.pretrain.init_checkpoint, self.policy, self.tokenizer,
                                                      cfg.trainer.checkpoint_checksums))
            self._print(f"initialised from {self.init_from}")

    def _extra(self) -> dict:
        # The fields RLSRTrainer's checkpoints carry, so that export-hf / eval / init_checkpoint read it.
        return {"step": self.step, "sampler": self.sampler.state_dict(), "tokenizer": self.tokenizer.to_json(),
                "config": to_dict(self.cfg), "base_heldout": None, "guard": {"consecutive": 0, "total": 0},
                "stage": "sft"}

    def heldout_nll(self) -> float:
        """Token-mean response NLL on the held-out prompts (every rank computes the same number)."""
        batch = sft_batch(self.heldout, self.length, self.tokenizer.pad_id)
        logprobs = self.policy.logprobs(batch, len(batch))
        return float(-(logprobs * batch.loss_mask).sum() / batch.loss_mask.sum())

    def fit(self) -> dict:
        cfg, s = self.cfg, self.cfg.sft
        interactive = sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="sft", mininterval=0.2 if interactive else 15.0,
                   disable=not (cfg.trainer.progress_bar and self.ctx.is_logging_rank))
        heldout_start = self.heldout_nll() if self.heldout else None
        try:
            while self.step < self.total_steps:
                lr = lr_at(self.step + 1, self.total_steps, cfg.optimizer.lr, s.warmup_steps, s.min_lr_ratio)
                for group in self.policy.optimizer.param_groups:
                    group["lr"] = lr
                rows = self.sampler.next_batch()
                batch = sft_batch([self.train[i] for i in rows], self.length, self.tokenizer.pad_id)
                metrics = self.policy.train_step(batch, s.micro_batch_size, nll_loss)
                self.step += 1
                metrics["lr"] = lr
                metrics["epoch"] = float(self.sampler.epoch)
                self.logger.log(self.step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{lr:.2e}")
                bar.update(1)
                every = cfg.trainer.checkpoint_every
                if (every and self.step % every == 0) or self.step == self.total_steps:
                    self._save()
        finally:
            bar.close()
        if latest_checkpoint(self.checkpoint_dir) is None:  # steps already done on resume
            self._save()
        return self._summarise(heldout_start)

    def _save(self) -> Path:
        keep = self.cfg.trainer.keep_last_checkpoints or None
        return save_checkpoint(self.checkpoint_dir, self.step, self.policy, self._extra(), keep_last=keep,
                               checksums=self.cfg.trainer.checkpoint_checksums)

    def _summarise(self, heldout_start: float | None) -> dict:
        summary: dict = {"steps": self.step, "checkpoint": str(latest_checkpoint(self.checkpoint_dir)),
                         "param_sha256": parameters_sha256(self.policy.module), "init_checkpoint": self.init_from}
        if self.heldout:
            summary["heldout_nll_start"] = heldout_start
            summary["heldout_nll_end"] = self.heldout_nll()
        if self.ctx.is_logging_rank:
            losses = [r["loss"] for r in read_metrics(self.logger.jsonl_path)]
            if losses:
                summary["loss_first"], summary["loss_last"] = losses[0], losses[-1]
                print(f"sft loss (response tokens): {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
            if self.heldout:
                print(f"held-out response NLL: {heldout_start:.3f} -> {summary['heldout_nll_end']:.3f}")
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self.logger.close()
            print(f"metrics: {self.logger.jsonl_path}  checkpoint: {summary['checkpoint']}")
        return summary

    def _print(self, message: str) -> None:
        if self.ctx.is_logging_rank:
            tqdm.write(message)
