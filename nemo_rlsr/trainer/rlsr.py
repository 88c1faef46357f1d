"""`nemo-rlsr train`: one RLSR step, sample -> reward -> advantages -> logprobs -> GRPO update -> log.

`RLSRTrainer.train_step` reads top to bottom like one step (docs/design.md follows the data through
it). Every rank runs it (SPMD); each data-parallel rank samples and scores its own shard of the
prompts. The run around the steps (start-up checks, setup, resume, the reliability hooks of the
loop, summary, close) is trainer/run.py's, shared with SFT. Before the first step a fresh run
prepares its base (`start_fresh`): loaded from `pretrain.init_checkpoint` or `model.hf_path`, or
briefly pre-trained on the references (pretrain.py), then frozen as the KL reference, scored on the
held-out prompts and saved under `output_dir/base`, the state at step 0.

Temperature: the rollout engine samples from softmax(logits / rollout.temperature) and returns the
logprobs of that distribution; the step takes the policy's old logprobs, the reference's and the
loss's own at the same temperature (the PPO ratio and the k3 KL compare the distributions that
sampled). Base pre-training fits the model's own likelihood, at temperature 1.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from nemo_rlsr.algorithms.grpo import GRPOLossConfig, group_advantages, grpo_loss, tis_metrics, tis_weights
from nemo_rlsr.config import OptimizerConfig, RLSRConfig
from nemo_rlsr.data.dataset import TrainingData, TrainingExample
from nemo_rlsr.data.instructions import DatasetError, InstructionExample
from nemo_rlsr.data.sampler import PromptSampler
from nemo_rlsr.generation.factory import build_engine, build_rollout_worker
from nemo_rlsr.generation.interface import RolloutEngine, SamplingParams
from nemo_rlsr.generation.layout import concat_rollouts
from nemo_rlsr.generation.rollout_worker import named_hf_tensors
from nemo_rlsr.generation.sampling import request_seeds
from nemo_rlsr.models.hf.start import load_hf_policy
from nemo_rlsr.models.policy import LossFn, TokenBatch
from nemo_rlsr.models.reference import build_reference
from nemo_rlsr.rewards import RewardActor, build_reward_actor
from nemo_rlsr.rewards.diagnostics import TrendWindow, topic_subject_flags
from nemo_rlsr.rewards.overlap import OverlappedScoring, chunk_bounds
from nemo_rlsr.rewards.replica import ReplicaScoring
from nemo_rlsr.rewards.terms import RewardTerms
from nemo_rlsr.trainer.async_rollouts import AsyncRollouts
from nemo_rlsr.trainer.checkpoint import find_resumable_checkpoint
from nemo_rlsr.trainer.fingerprint import parameters_sha256
from nemo_rlsr.trainer.guards import inject_nan
from nemo_rlsr.trainer.loop import debug_stall, guard_metrics
from nemo_rlsr.trainer.metrics import plot_reward
from nemo_rlsr.trainer.pretrain import pretrain_on_answers
from nemo_rlsr.trainer.rollout_metrics import gather_over_dp, reward_term_metrics, rollout_metrics
from nemo_rlsr.trainer.run import TrainingRun
from nemo_rlsr.trainer.state import load_init_checkpoint
from nemo_rlsr.trainer.throughput import step_throughput
from nemo_rlsr.weight_sync.refit_sender import StreamPeers


@dataclass
class Prompts:
    """Examples with their questions already rendered and tokenised."""

    examples: list[InstructionExample]
    token_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.examples)


def rollout_prompts(examples: list[TrainingExample], cfg: RLSRConfig) -> Prompts:
    """The prompts of `examples`; each must leave room for rollout.max_new_tokens in the model's
    context (a data problem: the length filters, data.max_prompt_tokens, drop such rows at load)."""
    ids = [t.prompt_ids for t in examples]
    longest = max(map(len, ids), default=0) + cfg.rollout.max_new_tokens
    if longest > cfg.model.max_sequence_length:
        raise DatasetError(f"a prompt + rollout.max_new_tokens = {longest} tokens exceeds model.max_sequence_length="
                           f"{cfg.model.max_sequence_length} (set data.max_prompt_tokens to drop such rows)")
    return Prompts([t.example for t in examples], ids)


def grpo_loss_fn(cfg: GRPOLossConfig) -> LossFn:
    """GRPO loss summed over the micro-batch's tokens; megatron divides by the global token count.
    Logs the policy's entropy where the step computes it (`train_step(..., with_entropy=True)`, as
    the RLSR update does)."""

    def loss_fn(logprobs: torch.Tensor, entropy: torch.Tensor, mb: TokenBatch):
        loss, metrics = grpo_loss(
            logprobs, mb.extras["old_logprobs"], mb.extras["ref_logprobs"], mb.extras["advantages"],
            mb.loss_mask, cfg, engine_logprobs=mb.extras.get("engine_logprobs"),
        )
        metrics["loss"] = loss.detach()
        if entropy is not None:
            metrics["entropy"] = (entropy * mb.loss_mask).sum()
        return loss, metrics

    return loss_fn


ENTROPY_TREND_STEPS = 10  # entropy/trend: the slope of the policy's entropy over this many last steps


class RLSRTrainer(TrainingRun):
    mode = "rlsr"

    def __init__(self, cfg: RLSRConfig, resume: str | None = None) -> None:
        super().__init__(cfg, resume)
        self.base_dir = self.run_dir / "base"

    # ---- setup -------------------------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        return self.cfg.trainer.steps

    def first_optimizer(self) -> OptimizerConfig:
        """Base pre-training's (pretrain.lr); the RL optimizer replaces it once the base is ready."""
        if self.cfg.pretrain.steps == 0:
            return self.cfg.optimizer
        return OptimizerConfig(lr=self.cfg.pretrain.lr, clip_grad=self.cfg.optimizer.clip_grad,
                               use_distributed_optimizer=self.cfg.optimizer.use_distributed_optimizer)

    def build(self, data: TrainingData) -> PromptSampler:
        cfg = self.cfg
        if cfg.trainer.heldout_eval and not data.heldout:
            raise DatasetError(f"trainer.heldout_eval needs held-out prompts and {cfg.data.path or 'the bundled set'} "
                               f"has no rows of split heldout: set trainer.heldout_eval=false")
        self.train = rollout_prompts(data.train, cfg)
        self.heldout = rollout_prompts(data.heldout, cfg)
        self.all_references = sorted({t.example.reference for t in data.train + data.heldout})
        vocab = self.tokenizer.vocab_size
        self.reference = build_reference(cfg.grpo.reference_placement, self.policy, cfg.model, vocab, self.ctx)
        self.engine: RolloutEngine = self.own(build_engine(cfg, self.policy, self.tokenizer, self.run_dir))
        self._engine_stale = True  # the engine's weights lag the policy's until the next refit
        self.reward: RewardActor = self.own(build_reward_actor(cfg.reward, str(self.ctx.device), self.ctx.world_size))
        self.replica = ReplicaScoring(self.ctx.dp_rank, self.ctx.device)
        self.reward_terms = RewardTerms(cfg.reward, cfg.rollout.max_new_tokens, cfg.grpo.num_generations,
                                        cfg.grpo.advantage_eps)
        self.entropy_trend = TrendWindow(ENTROPY_TREND_STEPS)
        self.loss_fn = grpo_loss_fn(GRPOLossConfig(cfg.grpo.clip_low, cfg.grpo.clip_high, cfg.grpo.kl_coef,
                                                   cfg.grpo.tis_cap))
        self.sampling = SamplingParams(cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                       top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                                       stop_on_eos=cfg.rollout.stop_on_eos, stop=tuple(cfg.rollout.stop),
                                       n=cfg.grpo.num_generations)
        # rollout.placement=separate: the training rollouts come from a worker of their own (held-out
        # evaluation keeps sampling with `engine`, on the trainer's module)
        self.async_rollouts: AsyncRollouts | None = None
        if cfg.rollout.placement == "separate":
            worker = None  # the worker's client lives on rank 0, which serves every rank (async_rollouts.py)
            if self.ctx.rank == 0:
                worker = build_rollout_worker(cfg, self.policy.hf_adapter, self.tokenizer, self.run_dir, self.ctx.dp)
            peers = StreamPeers.of_rank_0(named_hf_tensors(self.policy.hf_adapter, cfg.model, vocab))
            self.async_rollouts = self.own(AsyncRollouts(
                worker, self.train.token_ids, self.sampling, cfg.grpo.max_staleness, cfg.trainer.steps,
                self._sample_seed, stopping=lambda: self.preemption.received is not None,
                local=lambda rows, seed: self.engine.generate([self.train.token_ids[i] for i in rows], self.sampling,
                                                              request_seeds(seed, len(rows))),
                dp_rank=self.ctx.dp_rank, peers=peers))
        return PromptSampler(len(self.train), cfg.grpo.prompts_per_step // self.ctx.dp, self.ctx.dp_rank,
                             self.ctx.dp, seed=cfg.data.shuffle_seed)

    def trackers(self) -> dict:
        return {"entropy_trend": self.entropy_trend}

    def checkpoint_roots(self) -> list:
        # No RLSR checkpoint yet: the base checkpoint is the state at step 0.
        return [self.checkpoint_dir, self.base_dir]

    def start_fresh(self) -> None:
        """Load the base or pre-train it, freeze it as the reference, score it on held-out, save it."""
        cfg = self.cfg
        if cfg.pretrain.init_checkpoint:
            path = load_init_checkpoint(cfg.pretrain.init_checkpoint, self.policy, self.tokenizer,
                                        cfg.trainer.checkpoint_checksums)
            self.print(f"initialised policy and reference from {path} "
                       f"(weights sha256 {parameters_sha256(self.policy.weights)})")
        elif cfg.model.hf_path:
            load_hf_policy(self.policy, cfg.model, self.tokenizer.vocab_size)
            self.print(f"initialised policy and reference from the HF checkpoint {cfg.model.hf_path}")
        if cfg.pretrain.steps:
            pairs = [(ids, self.tokenizer.encode(e.reference)) for e, ids in zip(self.train.examples, self.train.token_ids)]
            bar = self.progress(cfg.pretrain.steps, "pretrain base")
            losses = pretrain_on_answers(self.policy, pairs, self.tokenizer.eos_id, cfg.pretrain,
                                         cfg.model.max_sequence_length, cfg.grpo.micro_batch_size,
                                         cfg.parallel.seed, bar)
            bar.close()
            self.print(f"base pre-training: NLL {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
            self.policy.rebuild_optimizer(cfg.optimizer)
        self.reference.freeze_from(self.policy)
        if cfg.trainer.heldout_eval:
            self.state.base_heldout = self.evaluate_heldout()
            self.print(f"base policy on held-out prompts: {format_eval(self.state.base_heldout)}")
        self.save(self.base_dir)

    def before_resume(self) -> None:
        """The reference is the base checkpoint's weights; the RL optimizer's state comes with the checkpoint."""
        base = find_resumable_checkpoint(self.base_dir, self.cfg.trainer.checkpoint_checksums)
        if base is None:
            raise FileNotFoundError(f"no complete base checkpoint under {self.base_dir} (the KL reference)")
        self.reference.load(base)
        self.policy.rebuild_optimizer(self.cfg.optimizer)

    # ---- one RLSR step -----------------------------------------------------------------------------

    def _sample_seed(self, step: int) -> int:
        # Same on every TP/PP rank of a DP replica (they must draw identical tokens), distinct per DP rank.
        return (self.cfg.parallel.seed * 1_000_003 + step) * 131 + self.ctx.dp_rank

    def _rollout(self, prompts: Prompts, rows: list[int], seed: int, timings: dict | None = None):
        """n samples per prompt (the engine shares each prompt's KV prefix among them), decoded and
        rewarded. Rows are group-contiguous. The engine is refitted first when the policy has changed
        since its last refit, woken for generation and put back to sleep.

        The prompts generate in `reward.overlap_chunks` chunks; each chunk is scored in the
        background while the next generates (rewards/overlap.py). Every prompt keeps the seed it has
        in one call (`request_seeds`), so the samples are those of an unchunked call. Only the
        replica's scorer scores; the other ranks of its model-parallel group receive its result
        (rewards/replica.py). Fills `timings` (when given) with time/generate, time/reward (the
        wait for scores after the last chunk generated), time/reward_overlapped (scoring hidden
        behind generation), reward/scored_rows and the refit's metrics."""
        group = self.cfg.grpo.num_generations
        examples = [prompts.examples[i] for i in rows for _ in range(group)]
        seeds = request_seeds(seed, len(rows))
        chunks = chunk_bounds(len(rows), self.cfg.reward.overlap_chunks)
        refit = self.engine.update_weights() if self._engine_stale else {}
        self._engine_stale = False
        parts, texts = [], []
        with OverlappedScoring(self.reward, background=len(chunks) > 1) as scoring:  # 1 chunk: in this thread
            start = time.perf_counter()
            self.engine.wake()
            for a, b in chunks:
                part = self.engine.generate([prompts.token_ids[i] for i in rows[a:b]], self.sampling, seeds[a:b])
                chunk_texts = [self.tokenizer.decode(r) for r in part.response_ids]
                if self.replica.is_scorer:
                    chunk = examples[a * group : b * group]
                    scoring.submit([e.prompt for e in chunk], chunk_texts, [e.reference for e in chunk])
                parts.append(part)
                texts += chunk_texts
            self.engine.sleep()
            generated = time.perf_counter()
            scores = scoring.join() if self.replica.is_scorer else None
        scores = self.replica.share(scores, len(texts))
        scores.check([e.prompt for e in examples])  # any RewardActor: never train on a bad number
        rollouts = parts[0] if len(parts) == 1 else concat_rollouts(parts, self.tokenizer.pad_id)
        if timings is not None:
            timings["time/generate"] = generated - start
            timings["time/reward"] = time.perf_counter() - generated
            timings["time/reward_overlapped"] = scoring.hidden_seconds(generated)
            timings["reward/scored_rows"] = len(texts) if self.replica.is_scorer else 0  # this rank's; summed in train_step
            timings.update(refit)
        return rollouts, texts, examples, scores

    def _async_rollout(self, rows: list[int], timings: dict):
        """`_rollout`'s results for the training step from the separate worker's queue
        (trainer/async_rollouts.py), scored whole here (reward.overlap_chunks=1): this rank's rows."""
        rollouts, metrics = self.async_rollouts.take(self.step, rows, self.state.sampler, self.policy.chunks)
        group = self.cfg.grpo.num_generations
        examples = [self.train.examples[i] for i in rows for _ in range(group)]
        texts = [self.tokenizer.decode(r) for r in rollouts.response_ids]
        prompts = [e.prompt for e in examples]
        start = time.perf_counter()
        scores = self.reward.score(prompts, texts, [e.reference for e in examples]).check(prompts)
        timings.update(metrics)
        timings.update({"time/reward": time.perf_counter() - start, "time/reward_overlapped": 0.0,
                        "reward/scored_rows": len(texts)})
        return rollouts, texts, examples, scores

    def train_step(self) -> dict[str, float]:
        cfg, timings = self.cfg, {}
        t0 = time.perf_counter()
        debug_stall(cfg.trainer, self.step + 1, self.ctx)
        rows = self.state.sampler.next_batch()
        if self.async_rollouts is None:
            rollouts, texts, examples, scores = self._rollout(self.train, rows, self._sample_seed(self.step), timings)
        else:
            rollouts, texts, examples, scores = self._async_rollout(rows, timings)
        # The trained reward: the terms of reward.terms over what the reward actor returned.
        references = [e.reference for e in examples]
        terms = self.reward_terms.evaluate(scores, [e.prompt for e in examples], texts, references,
                                           rollouts.response_mask.sum(dim=1), self.step + 1)
        scores = dataclasses.replace(scores, rewards=self.reward_terms.combine(terms))
        t1 = time.perf_counter()
        advantages = group_advantages(scores.rewards, cfg.grpo.num_generations, cfg.grpo.advantage_eps)
        # On the policy's device once (advantages come from host rewards; an engine may return host
        # tensors): the logprob passes, the loss and the metrics below all read this batch.
        batch = rollouts.to_token_batch(advantages=advantages, engine_logprobs=rollouts.engine_logprobs)
        batch = batch.to(self.policy.device)
        t2 = time.perf_counter()
        # Every logprob of the step at the sampling temperature: the engine drew the tokens from
        # softmax(logits / T), and the ratio and KL compare distributions at that temperature.
        temperature = cfg.rollout.temperature
        micro, budget = cfg.grpo.micro_batch_size, cfg.grpo.max_tokens_per_microbatch
        batch.extras["old_logprobs"] = self.policy.logprobs(batch, micro, temperature, budget)
        batch.extras["ref_logprobs"] = self.reference.logprobs(batch, micro, temperature, budget)
        t3 = time.perf_counter()
        mini_size = len(batch) // cfg.grpo.mini_batches_per_step
        loss_fn = inject_nan(self.loss_fn) if self.step + 1 in cfg.trainer.debug_inject_nan_steps else self.loss_fn
        updates = [self.policy.train_step(batch.slice(i, i + mini_size), micro, loss_fn,
                                          skip_nonfinite=True, temperature=temperature, max_tokens=budget,
                                          with_entropy=True)
                   for i in range(0, len(batch), mini_size)]
        self.state.step += 1
        self._engine_stale = True
        if self.async_rollouts is not None and self.step not in cfg.trainer.debug_skip_refit_steps:
            refit = self.async_rollouts.refit(self.policy.chunks, self.step)  # part of time/train
            timings.update({k: timings.get(k, 0.0) + v for k, v in refit.items()})  # with a drop's refit, if any
        t4 = time.perf_counter()

        metrics = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}
        metrics.update(guard_metrics(self.guard, self.step, updates))
        metrics.update(rollout_metrics(batch, rollouts.truncated, scores, self.policy.device))
        metrics.update(reward_term_metrics(terms, scores.rewards, texts, references, cfg.grpo.num_generations,
                                           self.policy.device))
        metrics["entropy/trend"] = self.entropy_trend.add(metrics["entropy"])
        subject = gather_over_dp(topic_subject_flags(texts, [e.topic for e in examples]), self.policy.device)
        if not subject.isnan().all():  # the prompts name topics (the bundled set)
            metrics["response/topic_subject_rate"] = float(subject.nanmean())
        if cfg.grpo.tis_cap is not None:
            weights = tis_weights(batch.extras["old_logprobs"], batch.extras["engine_logprobs"], batch.loss_mask,
                                  cfg.grpo.tis_cap)
            metrics.update(tis_metrics(weights, batch.loss_mask, cfg.grpo.tis_cap))
        timings.update({"time/advantages": t2 - t1, "time/logprobs": t3 - t2, "time/train": t4 - t3,
                        "time/step": t4 - t0})
        metrics.update(step_throughput(batch.valid.sum(), self.policy.num_parameters, t4 - t0, self.ctx))
        metrics.update(timings)
        # Summed over the world after the update, not before it: a collective of its own ahead of the
        # gradient all-reduce would be where a rank waits for a slow peer (the watchdog's stacks show it).
        metrics["reward/scored_rows"] = self.replica.scored_rows(timings["reward/scored_rows"])
        metrics["sample/response"] = texts[0]
        return metrics

    def progress_fields(self, metrics: dict) -> dict[str, str]:
        return {"reward": f"{metrics['reward/mean']:.3f}", "kl": f"{metrics['kl']:.4f}",
                "step_s": f"{metrics['time/step']:.2f}"}

    # ---- evaluation and summary --------------------------------------------------------------------

    def evaluate_heldout(self, num_examples: int = 4) -> dict:
        """Mean reward on held-out prompts with a fixed sampling seed, how often a response's
        nearest reference (by embedding) is its own prompt's (a policy that drifts to one generic
        answer scores a fair mean reward but a low `own_answer_rate`), and how often its subject is
        the prompt's topic (`topic_subject_rate`, null without topics: an answer that drops its
        subject keeps most of the cosine and its own nearest reference)."""
        # Every DP rank scores all held-out prompts with the same seed: the numbers agree everywhere.
        rows = list(range(len(self.heldout)))
        seed = self.cfg.parallel.seed + 1
        _, texts, examples, scores = self._rollout(self.heldout, rows, seed)
        references = self.reward.embed(self.all_references)
        nearest = (self.reward.embed(texts) @ references.T).argmax(dim=1)
        own = torch.tensor([self.all_references[j] == e.reference for j, e in zip(nearest.tolist(), examples)])
        group = self.cfg.grpo.num_generations
        samples = [[examples[i].prompt, texts[i]] for i in range(0, len(texts), group)][:num_examples]
        subject = topic_subject_flags(texts, [e.topic for e in examples])
        subject_rate = None if subject.isnan().all() else float(subject.nanmean())
        return {"reward": float(scores.rewards.mean()), "own_answer_rate": float(own.float().mean()),
                "topic_subject_rate": subject_rate, "examples": samples}

    def evaluate_final(self) -> dict:
        if not self.cfg.trainer.heldout_eval:
            return {}
        return {"heldout_base": self.state.base_heldout, "heldout_trained": self.evaluate_heldout()}

    def report(self, summary: dict, records: list[dict]) -> dict:
        rewards = [r["reward/mean"] for r in records]
        if not rewards:
            return {}
        fields = {"reward_first10": sum(rewards[:10]) / len(rewards[:10]),
                  "reward_last10": sum(rewards[-10:]) / len(rewards[-10:])}
        plot_reward(records, self.run_dir / "reward.png")
        print(f"mean reward, first 10 steps: {fields['reward_first10']:.3f}")
        print(f"mean reward, last 10 steps:  {fields['reward_last10']:.3f}")
        if self.cfg.trainer.heldout_eval:
            print(f"held-out prompts, base:    {format_eval(summary['heldout_base'])}")
            print(f"held-out prompts, trained: {format_eval(summary['heldout_trained'])}")
            for (prompt, base), (_, trained) in zip(summary["heldout_base"]["examples"],
                                                    summary["heldout_trained"]["examples"]):
                print(f"  {prompt!r}\n    base:    {base}\n    trained: {trained}")
        print(f"plot: {self.run_dir / 'reward.png'}")
        return fields


def format_eval(result: dict) -> str:
    line = f"mean reward {result['reward']:.3f}, answers its own prompt {result['own_answer_rate']:.0%}"
    if result.get("topic_subject_rate") is not None:  # .get: a run resumed from before the field existed
        line += f", names its topic as the subject {result['topic_subject_rate']:.0%}"
    return line
