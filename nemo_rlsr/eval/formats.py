"""Answer files in the formats the public instruction-following judges read.

Checked against the projects' sources (Nov 2025 search of their repositories):
* AlpacaEval (tatsu-lab/alpaca_eval README, "model_outputs"): a JSON list of dicts with
  `instruction` and `output`; `generator` names the model (its leaderboard column) and `dataset`
  the subset, as in the reference outputs of the `tatsu-lab/alpaca_eval` dataset.
* Arena-Hard-Auto (lmarena/arena-hard-auto, gen_answer.py v0.1): one JSON object per line in
  `data/<bench>/model_answer/<model>.jsonl` with `question_id`, `answer_id` (shortuuid there; any
  unique string works), `model_id`, `choices` = [{"index": 0, "turns": [{"content", "token_len"}]}]
  and `tstamp` (Unix seconds).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

ALPACA_EVAL_FIELDS = ("instruction", "output", "generator", "dataset")
ARENA_HARD_FIELDS = ("question_id", "answer_id", "model_id", "choices", "tstamp")


def alpaca_eval_outputs(instructions: list[str], outputs: list[str], generator: str, dataset: str) -> list[dict]:
    return [{"instruction": i, "output": o, "generator": generator, "dataset": dataset}
            for i, o in zip(instructions, outputs, strict=True)]


def arena_hard_answers(question_ids: list[str], outputs: list[str], token_lens: list[int], model_id: str) -> list[dict]:
    now = time.time()
    return [{"question_id": q, "answer_id": uuid.uuid4().hex, "model_id": model_id,
             "choices": [{"index": 0, "turns": [{"content": o, "token_len": n}]}], "tstamp": now}
            for q, o, n in zip(question_ids, outputs, token_lens, strict=True)]


def write_answer_files(out_dir: Path, alpaca: list[dict], arena: list[dict]) -> tuple[Path, Path]:
    """`model_outputs.json` (AlpacaEval) and `arena_hard_answers.jsonl` (Arena-Hard) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    alpaca_path, arena_path = out_dir / "model_outputs.json", out_dir / "arena_hard_answers.jsonl"
    alpaca_path.write_text(json.dumps(alpaca, indent=2, ensure_ascii=False))
    arena_path.write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in arena))
    return alpaca_path, arena_path
