"""Stand-in of tensorrt_llm/_torch/virtual_memory.py: the memory tags."""

import enum


class ExecutorMemoryType(enum.Enum):
    MODEL_WEIGHTS = "model_weights"
    KV_CACHE = "kv_cache"
