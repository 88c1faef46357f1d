"""The rules on a config's values that hold on any machine: ranges, choices, keys that go together.

`config_problems(cfg, mode)` returns every one a config breaks, as sentences naming the keys; the
trainers' start-up check (trainer/startup.py) runs it with the rules that depend on the machine
(distributed/layout.py, generation/factory.py), and so does `nemo-rlsr plan`. The components built
from these keys raise from the same functions for their own arguments (SamplingParams,
RepetitionPenalty, SentenceEncoder.load, PreemptionHandler), so each rule is written once. Pure
Python: the planner runs it without importing torch.
"""

from __future__ import annotations

import re
import signal

from nemo_rlsr.config.reward_terms import term_problems
from nemo_rlsr.config.schema import DataConfig, RewardConfig, RLSRConfig

REWARD_BACKENDS = ("local", "ray", "openai")
# `reward.encoder` names (the planner's, planner/shapes.py) -> family: "sb" (Sentence-BERT, mean
# pooling) or "qwen-em" (Qwen3-Embedding: last-token pooling, an instruction before queries)
ENCODER_FAMILIES = ({name: "sb" for name in ("minilm-l6", "mpnet-base-v2")}
                    | {f"qwen3-embedding-{size}": "qwen-em" for size in ("0.6b", "4b", "8b")})
LONG_RESPONSE_POLICIES = ("truncate", "chunk")
REPETITION_MODES = ("self", "reference", "prompt")
REFERENCE_PLACEMENTS = ("resident", "cpu_swap")
ROLLOUT_PLACEMENTS = ("colocated", "separate")
ATTENTION_LAYOUTS = ("auto", "thd", "mask")

# Keys the schema accepts (recipes for GPU clusters set them; the planner and the launcher read
# them) but this build's trainer cannot act on yet, with what is missing. Any of them set to a
# non-default value is refused at start-up, so a recipe never runs with a setting silently ignored.
_NOT_BUILT = {
    "optimizer.cpu_offload": "optimizer CPU offload is not wired into the optimizer builder",
}


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def unsupported_problems(cfg: RLSRConfig) -> list[str]:
    """Every key set to a value this build's trainer cannot act on, with what is missing.

    `cluster.*` is not checked: it describes where a recipe is meant to run (planner, launcher).
    """
    default = type(cfg)()
    return [
        f"`{key}`={_get(cfg, key)!r} (default {_get(default, key)!r}): {why}"
        for key, why in _NOT_BUILT.items()
        if _get(cfg, key) != _get(default, key)
    ]


# ---- rules the components raise from too -----------------------------------------------------------


def sampling_problems(max_new_tokens: int, temperature: float, top_p: float, top_k: int, stop, n: int,
                      names: dict[str, str] | None = None) -> list[str]:
    """What `SamplingParams` (generation/interface.py) refuses; `names` renames its fields."""
    name = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
            "stop": "stop", "n": "n (samples per prompt)", **(names or {})}
    out = []
    if n < 1:
        out.append(f"{name['n']} must be >= 1, got {n}")
    if top_k < 0:
        out.append(f"{name['top_k']} must be >= 0 (0 keeps every token), got {top_k}")
    if any(not s for s in stop):
        out.append(f"{name['stop']} strings must be non-empty")
    if max_new_tokens < 1:
        out.append(f"{name['max_new_tokens']} must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        out.append(f"{name['temperature']} must be > 0 (use greedy=True for argmax), got {temperature}")
    if not 0 < top_p <= 1:
        out.append(f"{name['top_p']} must be in (0, 1], got {top_p}")
    return out


def penalty_problems(mode: str, min_chars: int, min_reference_fraction: float, penalty: float,
                     prefix: str = "") -> list[str]:
    """What `RepetitionPenalty` (rewards/repetition.py) refuses; `prefix` makes its fields config keys."""
    out = []
    if mode not in REPETITION_MODES:
        out.append(f"{prefix}mode must be one of {REPETITION_MODES}, got {mode!r}")
    if min_chars < 0:
        out.append(f"{prefix}min_chars must be >= 0, got {min_chars}")
    if not (min_reference_fraction >= 0):
        out.append(f"{prefix}min_reference_fraction must be >= 0, got {min_reference_fraction}")
    if not (-1.0 <= penalty <= 1.0):
        out.append(f"{prefix}penalty must be in [-1, 1] (a reward), got {penalty}")
    return out


def long_response_problem(long_response: str) -> list[str]:
    if long_response in LONG_RESPONSE_POLICIES:
        return []
    return [f"reward.long_response must be one of {LONG_RESPONSE_POLICIES}, got {long_response!r}"]


def encoder_problems(name: str, path: str | None, long_response: str) -> list[str]:
    """What `SentenceEncoder.load` (rewards/encoders.py) refuses before reading any file."""
    if name not in ENCODER_FAMILIES:
        out = [f"reward.encoder={name!r} is not one of {sorted(ENCODER_FAMILIES)}"]
    elif path is None and name != "minilm-l6":
        out = [f"reward.encoder={name!r} needs reward.encoder_path (a local copy; only minilm-l6 is bundled)"]
    else:
        out = []
    return out + long_response_problem(long_response)


def signal_problems(signal_names: list[str]) -> list[str]:
    """What `PreemptionHandler` (trainer/preemption.py) refuses: `trainer.preemption_signals` names signals."""
    return [f"trainer.preemption_signals: unknown signal {name!r}" for name in signal_names
            if name not in signal.Signals.__members__]


# Keys of an in-process encoder: with `reward.backend: openai` the server loads and runs its own model.
_LOCAL_ENCODER_KEYS = ("encoder_path", "encoder_prompt_name", "encoder_max_tokens", "tokens_per_batch",
                       "offload_between_steps")


def endpoint_problems(cfg: RewardConfig) -> list[str]:
    """The `reward.endpoint_*` keys of `reward.backend: openai` (rewards/endpoint.py), and the keys
    of an in-process encoder it cannot act on."""
    if cfg.backend != "openai":
        return [] if cfg.endpoint_url is None else [
            f"reward.endpoint_url is read by reward.backend=openai only (backend is {cfg.backend!r})"]
    out = []
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", cfg.endpoint_url or ""):
        out.append(f"reward.endpoint_url must be an http:// or https:// URL (the API base, e.g. "
                   f"http://host:7997/v1), got {cfg.endpoint_url!r}")
    if not cfg.endpoint_model:
        out.append("reward.endpoint_model must name the model the server serves (the request's `model`)")
    key_env = cfg.endpoint_api_key_env
    if key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env):
        # Not echoed: a key pasted here by mistake must not reach the logs.
        out.append("reward.endpoint_api_key_env must be the NAME of an environment variable holding the key "
                   "(letters, digits, _), not the key itself")
    if cfg.endpoint_timeout_s <= 0:
        out.append(f"reward.endpoint_timeout_s must be > 0, got {cfg.endpoint_timeout_s}")
    if cfg.endpoint_retries < 0:
        out.append(f"reward.endpoint_retries must be >= 0, got {cfg.endpoint_retries}")
    if cfg.endpoint_backoff_s < 0:
        out.append(f"reward.endpoint_backoff_s must be >= 0, got {cfg.endpoint_backoff_s}")
    if cfg.endpoint_chars_per_batch < 1:
        out.append(f"reward.endpoint_chars_per_batch must be >= 1, got {cfg.endpoint_chars_per_batch}")
    if cfg.long_response != "truncate":
        out.append(f"reward.long_response={cfg.long_response!r}: with reward.backend=openai the server decides "
                   f"how a long text is cut; only 'truncate' applies")
    default = RewardConfig()
    out += [f"reward.{key}={getattr(cfg, key)!r} is read by an in-process encoder only; reward.backend=openai "
            f"embeds on the server" for key in _LOCAL_ENCODER_KEYS if getattr(cfg, key) != getattr(default, key)]
    return out


def reward_problems(cfg: RewardConfig) -> list[str]:
    """Every `reward.*` value the reward actors refuse, before any encoder is loaded."""
    out = [] if cfg.backend in REWARD_BACKENDS else [f"reward.backend={cfg.backend!r} is not one of {REWARD_BACKENDS}"]
    if cfg.backend != "openai":  # the server's model, not ours
        out += encoder_problems(cfg.encoder, cfg.encoder_path, cfg.long_response)
    out += endpoint_problems(cfg)
    out += penalty_problems(cfg.repetition_mode, cfg.repetition_min_chars, cfg.repetition_min_reference_fraction,
                            cfg.repetition_penalty, prefix="reward.repetition_")
    out += [f"reward.{key} must be >= 0, got {getattr(cfg, key)}"
            for key in ("repetition_workers", "repetition_measure_first", "ray_max_restarts") if getattr(cfg, key) < 0]
    out += [f"reward.{key} must be >= 1, got {getattr(cfg, key)}"
            for key in ("batch_size", "tokens_per_batch", "ray_num_actors", "overlap_chunks")
            if getattr(cfg, key) is not None and getattr(cfg, key) < 1]
    if cfg.ray_timeout_s <= 0:
        out.append(f"reward.ray_timeout_s must be > 0, got {cfg.ray_timeout_s}")
    return out


def data_config_problems(cfg: DataConfig) -> list[str]:
    """`data.format` must be known and, except the bundled set's, come with a `data.path`
    (data/dataset.py raises these too)."""
    from nemo_rlsr.data.schemas import FORMATS

    if cfg.format != "instructions" and cfg.format not in FORMATS:
        return [f"data.format={cfg.format!r} is not one of {['instructions', *FORMATS]}"]
    if cfg.format != "instructions" and not cfg.path:
        return [f"data.format={cfg.format!r} needs data.path (a file, a directory or a hub dataset name)"]
    return []


# ---- the trainers' rules -----------------------------------------------------------------------------


def size_problems(cfg: RLSRConfig, mode: str) -> list[str]:
    """Counts other rules divide by (parallel sizes, batch sizes): each must be >= 1."""
    p, g, s = cfg.parallel, cfg.grpo, cfg.sft
    keys = {f"parallel.{k}": getattr(p, k) for k in ("tensor_parallel", "pipeline_parallel", "context_parallel",
                                                       "expert_parallel", "expert_tensor_parallel")}
    if p.virtual_pipeline_parallel is not None:
        keys["parallel.virtual_pipeline_parallel"] = p.virtual_pipeline_parallel
    if mode == "sft":
        keys |= {"sft.global_batch_size": s.global_batch_size, "sft.micro_batch_size": s.micro_batch_size}
    else:
        keys |= {"grpo.prompts_per_step": g.prompts_per_step, "grpo.micro_batch_size": g.micro_batch_size,
                 "grpo.mini_batches_per_step": g.mini_batches_per_step}
    problems = [f"{key} must be >= 1, got {value}" for key, value in keys.items() if value < 1]
    if cfg.model.logprob_chunk_tokens < 0:
        problems.append(f"model.logprob_chunk_tokens must be >= 0 (0: one chunk per micro-batch), got "
                        f"{cfg.model.logprob_chunk_tokens}")
    return problems


def attention_layout(layout: str, te_spec: bool) -> str:
    """`model.attention_layout` resolved for a model on TE's layer spec or not: "thd" | "mask"
    (models/packed_seq.py). `auto`: THD where TE's flash / fused attention can use it, else the mask."""
    if layout == "auto":
        return "thd" if te_spec else "mask"
    return layout


def attention_layout_problems(cfg: RLSRConfig) -> list[str]:
    """A known layout; THD only without context parallelism (TE's CP over THD needs every sequence
    padded to 2 x CP, not built; the local spec's CP splits [B, T] rows: models/packed_seq.py)."""
    layout = cfg.model.attention_layout
    if layout not in ATTENTION_LAYOUTS:
        return [f"model.attention_layout={layout!r}: choose one of {', '.join(ATTENTION_LAYOUTS)}"]
    if layout == "thd" and cfg.parallel.context_parallel > 1:
        return [f"model.attention_layout=thd with parallel.context_parallel={cfg.parallel.context_parallel} is not "
                f"built (context parallelism splits [B, T] rows): set model.attention_layout to auto or mask"]
    return []


def microbatch_problems(cfg: RLSRConfig, mode: str) -> list[str]:
    """A token budget must hold the longest row a step can have, so that every micro-batch stays
    within it (models/microbatches.py; the planner's activation memory counts the budget)."""
    key = f"{'sft' if mode == 'sft' else 'grpo'}.max_tokens_per_microbatch"
    budget, limit = _get(cfg, key), cfg.model.max_sequence_length
    if budget is None or budget == 0:
        return []
    if budget < 0:
        return [f"{key} must be > 0 (or 0/null: fixed micro-batches), got {budget}"]
    if budget < limit:
        return [f"{key}={budget} is below model.max_sequence_length={limit}: a row of that length could never "
                f"fit a micro-batch"]
    return []


def trainer_problems(cfg: RLSRConfig, mode: str) -> list[str]:
    """The loop, checkpoints, base pre-training and the HF tokenizer (both trainers)."""
    t, out = cfg.trainer, signal_problems(cfg.trainer.preemption_signals)
    out += [f"trainer.{key} must be >= 0, got {getattr(t, key)}"
            for key in ("steps", "checkpoint_every", "watchdog_step_s", "debug_stall_s") if getattr(t, key) < 0]
    if t.keep_last_checkpoints < 0:
        out.append("trainer.keep_last_checkpoints must be >= 0 (0 keeps every checkpoint)")
    if t.max_consecutive_nonfinite < 1:
        out.append(f"trainer.max_consecutive_nonfinite must be >= 1, got {t.max_consecutive_nonfinite}")
    if cfg.pretrain.steps < 0 or cfg.pretrain.batch_size < 1:
        out.append(f"pretrain.steps must be >= 0 and pretrain.batch_size >= 1, got {cfg.pretrain.steps} and "
                   f"{cfg.pretrain.batch_size}")
    if not 0.0 <= cfg.pretrain.own_prompt_fraction <= 1.0:
        out.append(f"pretrain.own_prompt_fraction must be in [0, 1], got {cfg.pretrain.own_prompt_fraction}")
    if cfg.model.hf_path and not cfg.data.tokenizer_path:
        # the word tokenizer's ids would index unrelated embedding rows of the HF model
        out.append(f"model.hf_path={cfg.model.hf_path} needs data.tokenizer_path (the model's HF tokenizer "
                   f"directory, usually the same folder)")
    if mode == "sft":
        s = cfg.sft
        out += [f"sft.{key} must be >= 0, got {getattr(s, key)}" for key in ("epochs", "steps", "warmup_steps")
                if getattr(s, key) < 0]
        if not 0 <= s.min_lr_ratio <= 1:
            out.append(f"sft.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
        if cfg.pretrain.steps:
            out.append("`pretrain.steps` must be 0 for `nemo-rlsr sft` (it starts from random init or from "
                       "`pretrain.init_checkpoint`)")
        return out
    if cfg.pretrain.init_checkpoint and cfg.pretrain.steps:
        out.append("pretrain.init_checkpoint and pretrain.steps > 0 are exclusive: the base is loaded, not pre-trained")
    if t.heldout_eval and cfg.data.format != "instructions":
        out.append(f"trainer.heldout_eval needs held-out prompts and data.format={cfg.data.format!r} has none "
                   f"(only the instructions format has a heldout split): set trainer.heldout_eval=false")
    return out


def rlsr_problems(cfg: RLSRConfig) -> list[str]:
    """GRPO, sampling and reward keys (`nemo-rlsr train` only)."""
    r, g = cfg.rollout, cfg.grpo
    out = sampling_problems(r.max_new_tokens, r.temperature, r.top_p, r.top_k, r.stop, g.num_generations,
                            {key: f"rollout.{key}" for key in ("max_new_tokens", "temperature", "top_p", "top_k", "stop")}
                            | {"n": "grpo.num_generations"})
    if g.num_generations == 1:
        out.append("grpo.num_generations must be >= 2: advantages are relative within a group")
    if g.reference_placement not in REFERENCE_PLACEMENTS:
        out.append(f"grpo.reference_placement={g.reference_placement!r}: choose one of {', '.join(REFERENCE_PLACEMENTS)}")
    if g.tis_cap is not None and g.tis_cap <= 0:
        out.append(f"grpo.tis_cap must be > 0 (or null: off), got {g.tis_cap}")
    if cfg.reward.overlap_chunks > g.prompts_per_step:
        out.append(f"reward.overlap_chunks={cfg.reward.overlap_chunks} exceeds grpo.prompts_per_step="
                   f"{g.prompts_per_step}: a chunk holds at least one prompt's whole group")
    if r.max_new_tokens >= cfg.model.max_sequence_length:
        out.append(f"rollout.max_new_tokens={r.max_new_tokens} leaves no room for a prompt in "
                   f"model.max_sequence_length={cfg.model.max_sequence_length}")
    return out + reward_problems(cfg.reward) + term_problems(cfg.reward, r.max_new_tokens)


def placement_problems(cfg: RLSRConfig, cuda: bool) -> list[str]:
    """rollout.placement, rollout.gpus, grpo.max_staleness and trainer.debug_skip_refit_steps. A
    separate worker is our torch sampler in a Ray actor on the CPU (generation/rollout_worker.py) or
    TensorRT-LLM engines on GPUs of their own (generation/trtllm_worker.py), for data- and
    tensor-parallel trainers; the rest is refused here rather than run wrong."""
    r, g = cfg.rollout, cfg.grpo
    if r.placement not in ROLLOUT_PLACEMENTS:
        return [f"rollout.placement={r.placement!r}: choose one of {', '.join(ROLLOUT_PLACEMENTS)}"]
    out = []
    if g.max_staleness < 0:
        out.append(f"grpo.max_staleness must be >= 0, got {g.max_staleness}")
    separate_trtllm = r.placement == "separate" and r.engine == "trtllm"
    if r.gpus and not separate_trtllm:
        out.append(f"rollout.gpus={r.gpus} is for rollout.engine=trtllm with rollout.placement=separate (engines on "
                   f"GPUs of their own); here engine={r.engine}, placement={r.placement}: use 0")
    if r.placement == "colocated":
        if g.max_staleness:
            out.append(f"grpo.max_staleness={g.max_staleness} needs rollout.placement=separate (a colocated engine "
                       f"generates between training phases, always on the current weights)")
        if cfg.trainer.debug_skip_refit_steps:
            out.append("trainer.debug_skip_refit_steps needs rollout.placement=separate (a colocated engine has no "
                       "refit to skip)")
        return out
    if g.max_staleness > 0 and g.tis_cap is None:
        out.append(f"grpo.max_staleness={g.max_staleness} needs grpo.tis_cap (e.g. 2.0): rollouts of an older policy "
                   f"are corrected by truncated importance sampling against the engine's logprobs")
    if r.engine == "megatron":
        out.append("rollout.placement=separate is built for rollout.engine=torch (CPU) and trtllm (GPUs): megatron "
                   "samples on the trainer's own module")
    if r.engine == "torch" and cuda:
        out.append("rollout.placement=separate with rollout.engine=torch is built for the CPU only (our sampler in a "
                   "Ray actor); on GPUs use rollout.engine=trtllm with rollout.gpus")
    p = cfg.parallel
    if separate_trtllm:
        gpus = r.tensor_parallel or p.tensor_parallel * p.pipeline_parallel  # generation/factory.engine_gpus
        if r.gpus < 1 or r.gpus % gpus:
            out.append(f"rollout.gpus={r.gpus} must be a positive multiple of rollout.tensor_parallel={gpus}: the "
                       f"GPUs of the Ray cluster the TensorRT-LLM engines take (the trainer's are not among them)")
        if cfg.reward.backend == "ray" and cfg.reward.ray_gpus_per_actor:
            out.append(f"reward.ray_gpus_per_actor={cfg.reward.ray_gpus_per_actor} with separate TensorRT-LLM engines: "
                       f"the Ray cluster's GPUs are the engines' (rollout.gpus); score on CPUs (0) or reward.backend=local")
    # Rank 0 streams the refit with its tensor-parallel peers (weight_sync/refit_sender.StreamPeers). EP
    # would bring in ranks of other replicas (its expert gathers span them); held-out evaluation and the
    # preemption fallback sample on the trainer's module with our torch sampler, which needs PP = CP = 1.
    split = {key: size for key, size in {"pipeline_parallel": p.pipeline_parallel, "context_parallel": p.context_parallel,
                                         "expert_parallel": p.expert_parallel}.items() if size != 1}
    if split:
        out.append(f"rollout.placement=separate is built for data- and tensor-parallel trainers, not "
                   f"{', '.join(f'parallel.{k}={v}' for k, v in split.items())}: use rollout.placement=colocated")
    if cfg.reward.overlap_chunks != 1:
        out.append(f"reward.overlap_chunks={cfg.reward.overlap_chunks} with rollout.placement=separate is refused: the "
                   f"worker returns a step's rollouts at once and the trainer scores them whole; use 1")
    return out


def data_problems(cfg: RLSRConfig, mode: str) -> list[str]:
    """`data.*` choices, and length filters that must make every kept row fit model.max_sequence_length,
    so that a long row is dropped and counted at load time (data/dataset.py) instead of stopping the
    trainer, which refuses a prompt + rollout.max_new_tokens (RLSR) or a prompt + reference + eos
    (SFT) longer than that."""
    d, limit = cfg.data, cfg.model.max_sequence_length
    problems = data_config_problems(d)
    if problems:
        return problems
    if d.format == "instructions":
        return [f"data.{key}={getattr(d, key)} is not applied to data.format=instructions (the bundled demo "
                f"reader has no filters): set data.format to the file's (tulu | infinity | prompt_response | auto)"
                for key in ("max_prompt_tokens", "max_reference_tokens") if getattr(d, key) is not None]
    if mode == "rlsr" and d.max_prompt_tokens is not None and d.max_prompt_tokens + cfg.rollout.max_new_tokens > limit:
        return [f"data.max_prompt_tokens={d.max_prompt_tokens} + rollout.max_new_tokens={cfg.rollout.max_new_tokens} "
                f"exceeds model.max_sequence_length={limit}: a kept prompt could stop the trainer"]
    if (mode == "sft" and None not in (d.max_prompt_tokens, d.max_reference_tokens)
            and d.max_prompt_tokens + d.max_reference_tokens + 1 > limit):
        return [f"data.max_prompt_tokens={d.max_prompt_tokens} + data.max_reference_tokens={d.max_reference_tokens} "
                f"+ eos exceeds model.max_sequence_length={limit}: a kept row could stop the trainer"]
    return []


def config_problems(cfg: RLSRConfig, mode: str) -> list[str]:
    """Every machine-independent rule `cfg` breaks for `mode` ("rlsr" or "sft")."""
    problems = (unsupported_problems(cfg) + size_problems(cfg, mode) + microbatch_problems(cfg, mode)
                + attention_layout_problems(cfg) + trainer_problems(cfg, mode))
    if mode == "rlsr":
        problems += rlsr_problems(cfg)
    return problems + data_problems(cfg, mode)
