"""Config files -> the typed schema (config/schema.py): YAML with `defaults:` chains, dotted overrides.

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
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from nemo_rlsr.config.schema import ConfigError, RLSRConfig

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
    if dataclasses.is_dataclass(hint):  # a list of sections, e.g. reward.terms
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: `{key}` must be a mapping, got {value!r}")
        return _build(hint, value, key + ".", {}, source)
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
