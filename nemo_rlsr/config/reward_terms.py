"""The rules on `reward.terms` / `reward.combine`, the default term list, and user-function lookup.

Kept apart from rules.py because a `function` term's rule is to import the user's code: a term that
names a missing file or function is refused at start-up (ConfigError, exit 2) with its key, not at
the first step. Pure Python, no torch (the planner runs these rules too).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path

from nemo_rlsr.config.schema import RewardConfig, RewardTermConfig

TERM_KINDS = ("cosine", "repetition", "overlong", "regex", "function")
COMBINE_MODES = ("weighted_sum", "group_normalized")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a metric path segment: reward/term/<name>/mean


def effective_terms(cfg: RewardConfig) -> list[RewardTermConfig]:
    """`reward.terms`, or when empty the terms of the reward before terms existed: the cosine, replaced
    by `reward.repetition_penalty` where the repetition check fires."""
    if cfg.terms:
        return list(cfg.terms)
    return [RewardTermConfig(kind="cosine"), RewardTermConfig(kind="repetition", replace=True)]


def term_name(term: RewardTermConfig) -> str:
    return term.name if term.name is not None else term.kind


def load_user_function(spec: str) -> Callable:
    """The callable named by `module:function` (imported from sys.path) or `path/to/file.py:function`
    (a file anywhere, relative paths from the working directory). Raises ValueError saying why not."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"{spec!r} is not `module:function` or `path/to/file.py:function`")
    path = Path(target).resolve() if target.endswith(".py") else None
    if path is not None and not path.is_file():
        raise ValueError(f"no file {path}")
    try:
        if path is not None:
            module_name = "nemo_rlsr_user_reward_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
            module = sys.modules.get(module_name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(loader_spec)
                loader_spec.loader.exec_module(module)
                sys.modules[module_name] = module  # once per process, however many lookups
        else:
            module = importlib.import_module(target)
    except Exception as exc:  # the user's module failed to import: say how
        raise ValueError(f"cannot import {target!r}: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{target!r} has no function {attr!r}")
    return fn


def _one_term_problems(term: RewardTermConfig, key: str, max_new_tokens: int) -> list[str]:
    if term.kind not in TERM_KINDS:
        return [f"{key}.kind={term.kind!r} is not one of {TERM_KINDS}"]
    out = []
    if term.weight != term.weight or term.weight in (float("inf"), float("-inf")):
        out.append(f"{key}.weight must be a finite number, got {term.weight}")
    if term.replace and term.kind != "repetition":
        out.append(f"{key}.replace is for kind repetition only (got kind {term.kind!r})")
    if term.replace and term.weight not in (0.0, 1.0):
        out.append(f"{key}.weight must be 1 (replace) or 0 (log only) for a replacing term, got {term.weight}")
    if term.kind == "regex":
        try:
            re.compile(term.pattern if term.pattern is not None else "")
        except re.error as exc:
            out.append(f"{key}.pattern={term.pattern!r} is not a regular expression: {exc}")
        if not term.pattern:
            out.append(f"{key}.pattern must be a non-empty regular expression for kind regex")
    elif term.pattern is not None:
        out.append(f"{key}.pattern is for kind regex only (got kind {term.kind!r})")
    if term.kind == "function":
        try:
            load_user_function(term.function or "")
        except ValueError as exc:
            out.append(f"{key}.function: {exc}")
    elif term.function is not None:
        out.append(f"{key}.function is for kind function only (got kind {term.kind!r})")
    if term.kind == "overlong":
        limit = term.max_tokens if term.max_tokens is not None else max_new_tokens
        if limit < 1:
            out.append(f"{key}.max_tokens must be >= 1, got {limit}")
        if not 0 <= term.buffer_tokens < max(limit, 1):
            out.append(f"{key}.buffer_tokens must be in [0, max_tokens={limit}), got {term.buffer_tokens}")
    return out


def term_problems(cfg: RewardConfig, max_new_tokens: int) -> list[str]:
    """Every problem of `reward.terms` and `reward.combine`; `max_new_tokens` is the overlong
    term's default limit (rollout.max_new_tokens)."""
    out = [] if cfg.combine in COMBINE_MODES else [f"reward.combine={cfg.combine!r} is not one of {COMBINE_MODES}"]
    terms = effective_terms(cfg)
    names = [term_name(t) for t in terms]
    for i, (term, name) in enumerate(zip(terms, names)):
        key = f"reward.terms[{i}]" if cfg.terms else "reward.terms (default)"
        if not _NAME.fullmatch(name):
            out.append(f"{key}.name={name!r} must be letters, digits, '_', '.' or '-' (it is a metric name)")
        elif names.count(name) > 1:
            out.append(f"{key}.name={name!r} is used by {names.count(name)} terms: names must be unique")
        out += _one_term_problems(term, key, max_new_tokens)
        if term.replace and term.weight and cfg.combine == "group_normalized":
            out.append(f"{key}.replace needs reward.combine=weighted_sum: a replaced value has no common scale "
                       f"with group-normalised terms (set replace: false to normalise it like the others)")
    if sum(1 for t in terms if t.replace and t.weight) > 1:
        out.append("reward.terms: at most one term may replace the reward")
    if not any(t.weight and not t.replace for t in terms):
        out.append("reward.terms: at least one term needs a non-zero weight and replace: false (else the "
                   "reward is constant and GRPO learns nothing)")
    return out
