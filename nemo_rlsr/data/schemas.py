"""Row schemas -> one chat form (a list of ``{"role", "content"}`` turns), then the prompt/reference split.

Three schemas, field names configurable (`DataConfig`): TULU-3 style ``messages`` (role/content,
optional system turn), Infinity-Instruct style ``conversations`` (from/value with human/gpt/system),
and plain prompt/response rows. The reference RLSR rewards against is the LAST assistant turn; every
turn before it is the prompt, so a multi-turn row keeps its context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemo_rlsr.config import DataConfig

MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
UNKNOWN_ROLE = "unknown_role"
NO_ASSISTANT_TURN = "no_assistant_turn"
EMPTY_REFERENCE = "empty_reference"
EMPTY_PROMPT = "empty_prompt"

FORMATS = ("tulu", "infinity", "prompt_response", "auto")
CHAT_ROLES = ("system", "user", "assistant")


class RowProblem(ValueError):
    """A row that cannot become a training example; `reason` is the counted drop reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Conversation:
    """A row in chat form, split: `context` (the prompt turns) and `reference` (the last assistant turn)."""

    context: list[dict[str, str]]
    reference: str
    source: str
    row: int


def _field(obj: dict[str, Any], name: str, kind: type, what: str) -> Any:
    if name not in obj or obj[name] is None:
        raise RowProblem(MISSING_FIELD, f"missing field {name!r}{what}")
    if not isinstance(obj[name], kind):
        raise RowProblem(WRONG_TYPE, f"field {name!r}{what} must be {kind.__name__}, got {type(obj[name]).__name__}")
    return obj[name]


def _turns(obj: dict[str, Any], list_field: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict[str, str]]:
    turns = []
    for i, turn in enumerate(_field(obj, list_field, list, ""), start=1):
        where = f" of {list_field}[{i}]"
        if not isinstance(turn, dict):
            raise RowProblem(WRONG_TYPE, f"{list_field}[{i}] must be an object, got {type(turn).__name__}")
        role = _field(turn, role_key, str, where)
        if role not in roles:
            raise RowProblem(UNKNOWN_ROLE, f"{list_field}[{i}] has {role_key}={role!r} (known: {sorted(roles)})")
        turns.append({"role": roles[role], "content": _field(turn, text_key, str, where)})
    return turns


def tulu_messages(obj: dict[str, Any], cfg: DataConfig) -> list[dict[str, str]]:
    return _turns(obj, cfg.messages_field, cfg.role_field, cfg.content_field, {r: r for r in CHAT_ROLES})


def infinity_messages(obj: dict[str, Any], cfg: DataConfig) -> list[dict[str, str]]:
    roles = {**{r: "system" for r in cfg.infinity_system_roles}, **{r: "user" for r in cfg.infinity_user_roles},
             **{r: "assistant" for r in cfg.infinity_assistant_roles}}
    return _turns(obj, cfg.conversations_field, cfg.from_field, cfg.value_field, roles)


def prompt_response_messages(obj: dict[str, Any], cfg: DataConfig) -> list[dict[str, str]]:
    prompt = _field(obj, cfg.prompt_field, str, "")
    response = _field(obj, cfg.response_field, str, "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def row_messages(obj: dict[str, Any], cfg: DataConfig) -> list[dict[str, str]]:
    """The row's turns by `cfg.format`; "auto" picks the schema per row by which field it has."""
    fmt = cfg.format
    if fmt == "auto":
        present = [f for f, field in (("tulu", cfg.messages_field), ("infinity", cfg.conversations_field),
                                      ("prompt_response", cfg.prompt_field)) if field in obj]
        if not present:
            raise RowProblem(MISSING_FIELD, f"none of the fields {cfg.messages_field!r}, {cfg.conversations_field!r}, "
                                            f"{cfg.prompt_field!r} (data.format=auto)")
        fmt = present[0]
    if fmt == "tulu":
        return tulu_messages(obj, cfg)
    if fmt == "infinity":
        return infinity_messages(obj, cfg)
    return prompt_response_messages(obj, cfg)


def split_reference(turns: list[dict[str, str]], source: str, row: int) -> Conversation:
    """Reference = the last assistant turn; prompt = every turn before it (later turns are unanswered)."""
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        raise RowProblem(NO_ASSISTANT_TURN, "no assistant turn to take the reference from")
    reference = turns[last]["content"]
    if not reference.strip():
        raise RowProblem(EMPTY_REFERENCE, f"the last assistant turn (turn {last + 1}) is empty")
    context = turns[:last]
    if not any(t["role"] == "user" and t["content"].strip() for t in context):
        raise RowProblem(EMPTY_PROMPT, "no non-empty user turn before the reference")
    return Conversation(context, reference, source, row)
