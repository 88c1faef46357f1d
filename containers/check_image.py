"""Build-time check of the image: the base's torch is untouched and every layer is present.

Reads versions from package metadata (importing TensorRT-LLM or Transformer Engine needs a GPU
driver, which a `docker build` does not have) and writes them to /opt/nemo_rlsr/versions.txt.
"""

import importlib.metadata as md
import sys
from pathlib import Path

PACKAGES = ["torch", "transformer_engine", "tensorrt_llm", "megatron-core", "transformers",
            "sentence-transformers", "ray", "nemo-rlsr"]


def main() -> int:
    base_torch = Path(sys.argv[1]).read_text().strip()
    versions, missing = {}, []
    for name in PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            missing.append(name)
    import torch

    report = "\n".join(f"{k}=={v}" for k, v in versions.items()) + f"\npython=={sys.version.split()[0]}\n"
    Path("/opt/nemo_rlsr").mkdir(parents=True, exist_ok=True)
    Path("/opt/nemo_rlsr/versions.txt").write_text(report)
    print(report)
    if torch.__version__ != base_torch:
        print(f"torch changed from the base image's {base_torch} to {torch.__version__}", file=sys.stderr)
        return 1
    if missing:
        print(f"missing from the image: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
