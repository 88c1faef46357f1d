"""A checkpoint's manifest: every file's size and sha256, written last, checked before a resume.

The directory rename in checkpoint.py makes a save atomic against a kill, but not against what
happens to the files afterwards: a full disk or a quota that truncates a shard, a copy between
file systems that stopped half way, a garbled block. megatron would then fail deep inside the
load (or, worse, load garbage). A manifest lets `--resume auto` notice before loading and fall
back to the previous checkpoint; a checkpoint without one never finished saving.

Hashing is shared round-robin over the ranks (a large checkpoint has many shard files), so the
functions here are collective when torch.distributed is initialised.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch.distributed as dist

MANIFEST = "manifest.json"
_CHUNK = 8 << 20


def _rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _share(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def _all_gather(value):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _broadcast(value):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def write_manifest(directory: str | Path, checksums: bool = True) -> None:
    """Collectively describe every file under `directory` in `directory/manifest.json` (by rank 0)."""
    directory = Path(directory)
    rank, world = _rank_and_world()
    names = _broadcast(_files(directory) if rank == 0 else None)  # one listing: NFS caches may lag
    mine = {}
    for name in _share(names, rank, world):
        path = directory / name
        mine[name] = {"size": path.stat().st_size, **({"sha256": sha256_file(path)} if checksums else {})}
    entries = {name: entry for part in _all_gather(mine) for name, entry in part.items()}
    if rank == 0:
        text = json.dumps({"files": dict(sorted(entries.items()))}, indent=1)
        (directory / MANIFEST).write_text(text)


def _problems_in_share(directory: Path, checksums: bool, rank: int, world: int) -> list[str]:
    manifest = directory / MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except FileNotFoundError:
        return [f"no {MANIFEST}: the save did not finish"] if rank == 0 else []
    except (ValueError, KeyError, TypeError) as exc:
        return [f"unreadable {MANIFEST}: {exc}"] if rank == 0 else []
    problems = []
    for name in _share(sorted(files), rank, world):
        path, entry = directory / name, files[name]
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {entry['size']}")
        elif checksums and "sha256" in entry and sha256_file(path) != entry["sha256"]:
            problems.append(f"{name} does not match its sha256")
    return problems


def verify_checkpoint(directory: str | Path, checksums: bool = True) -> list[str]:
    """Collectively check `directory` against its manifest; return the problems (empty: complete).

    Every rank gets the same list, so all ranks take the same decision."""
    rank, world = _rank_and_world()
    parts = _all_gather(_problems_in_share(Path(directory), checksums, rank, world))
    return [problem for part in parts for problem in part]
