"""Raw rows from dataset files: JSONL / JSON, parquet, and Hugging Face `datasets` directories or hub names.

Every reader yields one `RawRow` per input row, in file order, numbered from 1 (the JSONL line, or
the row index of a table): a row that cannot be parsed (bad UTF-8, bad JSON, too many bytes, not an
object) is yielded with its problem instead of raising, so the caller counts it (or, in strict mode,
reports it with file and row) and nothing is silently lost. JSONL is read as bytes per line for that
reason: one bad byte spoils its own line, not the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Drop reasons a reader can assign (the schema and filter stages add their own; see dataset.py).
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
ROW_TOO_LARGE = "row_too_large"
NOT_AN_OBJECT = "not_an_object"


@dataclass(frozen=True)
class RawRow:
    """One input row: `value` (a dict) when it parsed, else `reason` and `detail` say why not."""

    source: str
    row: int  # 1-based: the line of a JSONL file, the row of a table
    value: dict[str, Any] | None = None
    reason: str | None = None
    detail: str = ""


def _parse_json_line(source: str, row: int, raw: bytes, max_row_bytes: int) -> RawRow:
    if len(raw) > max_row_bytes:
        return RawRow(source, row, reason=ROW_TOO_LARGE, detail=f"{len(raw)} bytes > data.max_row_bytes={max_row_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RawRow(source, row, reason=INVALID_UTF8, detail=f"byte {raw[e.start]:#04x} at byte offset {e.start}")
    if not text.strip():
        return RawRow(source, row, reason=INVALID_JSON, detail="blank line")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return RawRow(source, row, reason=INVALID_JSON, detail=f"{e.msg} at column {e.colno}")
    return _object_row(source, row, value)


def _object_row(source: str, row: int, value: Any) -> RawRow:
    if not isinstance(value, dict):
        return RawRow(source, row, reason=NOT_AN_OBJECT, detail=f"expected an object, got {type(value).__name__}")
    return RawRow(source, row, value)


def read_jsonl(path: Path, max_row_bytes: int) -> Iterator[RawRow]:
    """One row per line; the final newline ends the last line rather than starting an empty one."""
    with open(path, "rb") as f:
        for row, raw in enumerate(f, start=1):
            yield _parse_json_line(str(path), row, raw.rstrip(b"\r\n"), max_row_bytes)


def read_json_array(path: Path, max_row_bytes: int) -> Iterator[RawRow]:
    """A `.json` file holding one array of objects; the whole file must parse (it is one value)."""
    raw = path.read_bytes()
    try:
        values = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON array file ({e}); use JSONL for row-level error reporting") from None
    if not isinstance(values, list):
        raise ValueError(f"{path}: a .json dataset must hold an array of objects, got {type(values).__name__}")
    yield from _rows_from_objects(str(path), values, max_row_bytes)


def _row_bytes(value: Any) -> int:
    """Size of a table row as UTF-8 JSON, the unit `data.max_row_bytes` counts for every format."""
    return len(json.dumps(value, ensure_ascii=False, default=repr).encode("utf-8"))


def _rows_from_objects(source: str, values, max_row_bytes: int) -> Iterator[RawRow]:
    for row, value in enumerate(values, start=1):
        size = _row_bytes(value)
        if size > max_row_bytes:
            yield RawRow(source, row, reason=ROW_TOO_LARGE, detail=f"{size} bytes > data.max_row_bytes={max_row_bytes}")
        else:
            yield _object_row(source, row, value)


def read_parquet(path: Path, max_row_bytes: int) -> Iterator[RawRow]:
    """Rows of a parquet file, read in record batches (never the whole table at once)."""
    import pyarrow.parquet as pq

    def objects():
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()

    yield from _rows_from_objects(str(path), objects(), max_row_bytes)


def read_hf_dataset(name: str, split: str, max_row_bytes: int) -> Iterator[RawRow]:
    """A `datasets` directory written by `save_to_disk`, a directory of data files `load_dataset`
    understands, or (online only) a hub dataset name."""
    import datasets

    path = Path(name)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        dataset = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        dataset = datasets.load_dataset(name, split=split)
    yield from _rows_from_objects(name, iter(dataset), max_row_bytes)


def read_rows(path: str, hf_split: str, max_row_bytes: int) -> Iterator[RawRow]:
    """Rows of `path` by its kind: .jsonl / .json / .parquet files, a directory, or a hub name."""
    p = Path(path)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            return read_jsonl(p, max_row_bytes)
        if suffix == ".json":
            return read_json_array(p, max_row_bytes)
        if suffix == ".parquet":
            return read_parquet(p, max_row_bytes)
        raise ValueError(f"{path}: unknown dataset file type {suffix!r} (expected .jsonl, .json or .parquet)")
    if p.exists() and not p.is_dir():
        raise ValueError(f"{path}: not a file or directory")
    if not p.exists() and (path.startswith((".", "/")) or path.count("/") > 1
                           or p.suffix.lower() in (".jsonl", ".json", ".parquet")):
        raise FileNotFoundError(f"{path}: no such dataset file or directory")
    return read_hf_dataset(path, hf_split, max_row_bytes)
